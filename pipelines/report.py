"""Entry point ``report``: compare runs as the tables and plots of a KD paper.

    python -m pipelines.report [experiment=NAME[,NAME]] [filter="tags.dataset = 'cifar100'"]
                               [group_by=exp,method,teachers,student] [out=reports/<timestamp>]

Writes Markdown, CSV and PNG files to ``out`` and logs them as artifacts of a run tagged
``step=report`` (see docs/reports.md).
"""
from __future__ import annotations

import sys

from pipelines._cli import exit_on_help, user_errors

OPTIONS = ("experiment", "filter", "group_by", "out")


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
