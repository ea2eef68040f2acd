"""Entry point ``archive``: move runs between tracking stores as a folder of plain files.

    python -m pipelines.archive export benchmark=cifar10_lowdata [out=docs/results/<its name>-runs]
                                       [artifacts=teachers|all|none]
    python -m pipelines.archive export filter="tags.step = 'finetune'" out=DIR [artifacts=...]
    python -m pipelines.archive import src=DIR

export: the FINISHED runs of a benchmark (or every run the filter matches) and the runs they
name (their teachers, their parent run), with params, tags, metric histories and, by default,
the teachers' checkpoints (artifacts=all: every artifact). import: into the store of
MLFLOW_TRACKING_URI, skipping runs it already has; it prints the teacher_runs= value that
makes `pipelines.benchmark` reuse the imported teachers. See docs/benchmarks.md, "Archives".
"""
from __future__ import annotations

import sys

from pipelines._cli import choice_option, exit_on_help, pop_option, user_errors

ACTIONS = ("export", "import")
INTERRUPTED = ("an export leaves the archive folder as it was; an import deletes the runs it had begun. "
               "Run the same command again: an import skips the runs it has already imported.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, __doc__, "archive")
    with user_errors(INTERRUPTED):
        from asib_core.config import ConfigError

        action = argv.pop(0) if argv and argv[0] in ACTIONS else None
        if action is None:
            raise ConfigError(f"archive takes an action first, one of {', '.join(ACTIONS)} "
                              "(python -m pipelines.archive export benchmark=cifar10_lowdata, "
                              "python -m pipelines.archive import src=DIR); got "
                              f"{argv[0] if argv else 'nothing'!r}.")
        if action == "export":
            benchmark, flt = pop_option(argv, "benchmark", ""), pop_option(argv, "filter", "")
            out = pop_option(argv, "out", "")
            artifacts = choice_option(argv, "artifacts", "teachers", ("teachers", "all", "none"))
            _no_more(argv, "export", ("benchmark", "filter", "out", "artifacts"))
            return _export(benchmark, flt, out, artifacts)
        src = pop_option(argv, "src", "")
        _no_more(argv, "import", ("src",))
        if not src:
            raise ConfigError("archive import needs src=DIR, the folder `python -m pipelines.archive export` wrote.")
        return _import(src)


def _no_more(argv: list[str], action: str, options: tuple[str, ...]) -> None:
    from asib_core.config import ConfigError

    if argv:
        raise ConfigError(f"archive {action} takes {', '.join(f'{o}=...' for o in options)}; got {argv[0]!r}.")


def _export(benchmark: str, flt: str, out: str, artifacts: str) -> int:
    from asib_core.config import ConfigError

    if bool(benchmark) == bool(flt):
        raise ConfigError("archive export selects runs by benchmark=NAME or by filter=\"<MLflow filter>\" "
                          f"(one of the two); got {'both' if benchmark else 'neither'}.")
    if flt and not out:
        raise ConfigError("archive export with filter= needs out=DIR, the folder to write.")
    from asib_core.benchmark.archive import default_archive_dir, export_benchmark
    from asib_core.benchmark.spec import load_benchmark
    from asib_core.tracking import configure_tracking
    from asib_core.tracking.archive import export_matching

    bench = load_benchmark(benchmark) if benchmark else None      # an unknown name: before the store opens
    uri = configure_tracking()
    if bench is not None:
        result = export_benchmark(bench, out or default_archive_dir(bench), artifacts)
    else:
        result = export_matching(flt, out, artifacts)
    print(f"archived {result.runs} runs of {uri} ({result.points} metric points, {result.artifacts} artifacts, "
          f"{result.bytes / 1e6:.1f} MB) in {result.out}")
    return 0


def _import(src: str) -> int:
    from asib_core.tracking import configure_tracking
    from asib_core.tracking.archive import import_records, read_archive

    archive = read_archive(src)          # checked before a store is opened or created
    uri = configure_tracking()
    result = import_records(*archive)
    if result.discarded:
        print(f"deleted {len(result.discarded)} half-imported runs of an earlier, interrupted import")
    print(f"imported {len(result.imported)} runs into {uri} ({len(result.skipped)} were there already)")
    if result.teachers:
        pairs = ",".join(f"{name}={run_id}" for name, run_id in sorted(result.teachers.items()))
        print(f"teachers: teacher_runs={pairs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
