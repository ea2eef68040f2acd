"""Entry point ``report``: compare runs as the tables and plots of a KD paper.

    python -m pipelines.report [experiment=NAME[,NAME]] [filter="tags.dataset = 'cifar100'"]
                               [group_by=exp,method,teachers,student] [out=reports/<timestamp>]
    python -m pipelines.report benchmark=cifar10_lowdata [out=docs/results]

Writes Markdown, CSV and PNG files to ``out`` and logs them as artifacts of a run tagged
``step=report`` (see docs/reports.md). With ``benchmark=NAME``: the results page of that
benchmark, ``<out>/<its name>.md`` + ``.csv``, from its runs in the store (docs/benchmarks.md).
"""
from __future__ import annotations

import sys

from pipelines._cli import exit_on_help, user_errors

OPTIONS = ("experiment", "filter", "group_by", "out", "benchmark")


def parse_args(argv: list[str]) -> dict:
    from asib_core.config import ConfigError

    args = {}
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in OPTIONS:
            raise ConfigError(f"report takes {', '.join(f'{o}=...' for o in OPTIONS)}; got {item!r}.")
        args[key] = value
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, __doc__, "report")
    with user_errors():
        args = parse_args(argv)
        if args.get("benchmark"):
            from asib_core.report.benchmark import run_benchmark_report

            page = run_benchmark_report(args["benchmark"], args.get("out") or "docs/results")
            print(page.markdown.read_text(encoding="utf-8"))
            print(f"results page {page.markdown} and {page.csv}")
            return 0
        from asib_core.report import run_report

        result = run_report(experiment=args.get("experiment") or None, filter_string=args.get("filter", ""),
                            group_by=args.get("group_by") or None, out_dir=args.get("out") or None)
        report = result.report
        print((report.out_dir / "groups.md").read_text(encoding="utf-8"))
        print(f"report run {result.run_id}: {len(report.runs)} runs in {len(report.groups)} groups; "
              f"files in {report.out_dir} (open {report.out_dir / 'report.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
