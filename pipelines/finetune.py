"""Entry point ``finetune``: train a teacher with its configs/finetune recipe.

    python -m pipelines.finetune teacher=resnet20 dataset=digits [overrides="finetune_epochs=10 ..."]

The recipe configs/finetune/<teacher>_<dataset>.yaml is used; overrides are KEY=VALUE.
"""
from __future__ import annotations

import shlex
import sys

from pipelines._cli import exit_on_help, user_errors


def parse(argv: list[str]) -> tuple[str, str, list[str]]:
    from asib_core.config import ConfigError

    named, overrides = {}, []
    for item in argv:
        key = item.split("=", 1)[0]
        if key in ("teacher", "dataset"):
            named[key] = item.split("=", 1)[1]
        elif key == "overrides":
            overrides.extend(shlex.split(item.split("=", 1)[1]))
        elif item:
            overrides.append(item)
    missing = [k for k in ("teacher", "dataset") if not named.get(k)]
    if missing:
        raise ConfigError(f"finetune needs {' and '.join(k + '=NAME' for k in missing)} "
                          "(the recipe configs/finetune/<teacher>_<dataset>.yaml is used).")
    return named["teacher"], named["dataset"], overrides


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, __doc__, "finetune")
    with user_errors():
        teacher, dataset, overrides = parse(argv)
        from asib_core.pipeline.finetune import run_finetune  # heavy: after the arguments are checked

        result = run_finetune(teacher, dataset, overrides)
        print(f"finetune run {result.run_id}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
