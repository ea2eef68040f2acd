"""Entry point ``benchmark``: run a benchmark protocol (configs/benchmark/<name>.yaml) end to end.

    python -m pipelines.benchmark [name=cifar10_lowdata] [rows=CE-only,KD (wrn_16_2)|0,3]
                                  [seeds=0,1,2] [dry_run=false] [report=true] [out=docs/results]
                                  [teacher_runs=resnet20=RUN_ID,wrn_16_2=RUN_ID] [archive=DIR]

Fine-tunes each teacher once (reused by identity from the MLflow store), evaluates them, then
runs every selected row x seed through the distillation step; runs the store already has
FINISHED with the same identity are reused, so a killed benchmark continues where it stopped
when the same command runs again. One progress line per run (elapsed time, ETA). Finally the
results page <out>/<benchmark name>.md + .csv (also `python -m pipelines.report benchmark=NAME`).
rows: names or 0-based indices (empty: all); seeds: empty = the benchmark's; dry_run=true only
prints what would run or be reused; name may also be a path to a benchmark YAML file;
teacher_runs: FINISHED fine-tune runs to use as those teachers instead of looking them up by
identity (e.g. teachers trained by an earlier version of the code); archive: a folder rewritten
as a run archive of the benchmark's runs after the teachers' evaluation and after every trained
run (e.g. archive=docs/results/cifar10-lowdata-runs, the protocol's archive), so a machine that
is lost mid-benchmark loses no finished run that its checkout keeps.
"""
from __future__ import annotations

import shlex
import sys

from pipelines._cli import choice_option, exit_on_help, pop_option, user_errors

OPTIONS = ("name", "rows", "seeds", "dry_run", "report", "out", "teacher_runs", "archive")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, __doc__, "benchmark")
    command = "python -m pipelines.benchmark " + shlex.join(argv)
    with user_errors():
        from asib_core.config import ConfigError

        name = pop_option(argv, "name", "cifar10_lowdata")
        rows, seeds = pop_option(argv, "rows", ""), pop_option(argv, "seeds", "")
        dry_run = choice_option(argv, "dry_run", "false", ("false", "true")) == "true"
        report = choice_option(argv, "report", "true", ("false", "true")) == "true"
        out = pop_option(argv, "out", "docs/results")
        teacher_runs = parse_teacher_runs(pop_option(argv, "teacher_runs", ""))
        archive = pop_option(argv, "archive", "")
        if argv:
            raise ConfigError(f"benchmark takes {', '.join(f'{o}=...' for o in OPTIONS)}; got {argv[0]!r}.")
        from asib_core.benchmark.runner import run_benchmark  # heavy: after the arguments are checked

        result = run_benchmark(name, rows, seeds, dry_run=dry_run, report=report, out_dir=out, command=command,
                               teacher_runs=teacher_runs, archive=archive)
        if not dry_run:
            trained = sum(not r.reused for r in result.runs)
            print(f"benchmark run {result.parent_run_id}: {trained} runs trained, "
                  f"{len(result.runs) - trained} reused")
    return 0


def parse_teacher_runs(text: str) -> dict[str, str]:
    from asib_core.config import ConfigError

    pairs = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        teacher, sep, run_id = item.partition("=")
        if not sep or not teacher or not run_id:
            raise ConfigError(f"teacher_runs takes NAME=RUN_ID[,NAME=RUN_ID]; got {item!r}.")
        pairs[teacher] = run_id
    return pairs


if __name__ == "__main__":
    sys.exit(main())
