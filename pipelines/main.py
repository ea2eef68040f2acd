"""Entry point ``main``: finetune (each teacher) -> distill -> evaluate, with run reuse.

    python -m pipelines.main exp=quickstart [overrides=...] [finetune_overrides=...]
                             [baseline=ce|none] [nproc=1] [env_manager=local] [force=false]

A step is reused when a FINISHED run with the same identity exists (config, teacher files and
code version); force=true runs every step again.
"""
from __future__ import annotations

import os
import shlex
import sys

from pipelines._cli import (ENV_MANAGERS, choice_option, count_option, exit_on_help, parse_exp_args, pop_option,
                           user_errors)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, __doc__, "main")
    with user_errors():
        baseline = pop_option(argv, "baseline", "ce")
        nproc = count_option(argv, "nproc", 1)
        env_manager = choice_option(argv, "env_manager", os.environ.get("ASIB_ENV_MANAGER", "local"),
                                    ENV_MANAGERS)
        finetune_overrides = shlex.split(pop_option(argv, "finetune_overrides", ""))
        force = choice_option(argv, "force", "false", ("false", "true")) == "true"
        exp, overrides = parse_exp_args(argv, default_exp="quickstart")
        from asib_core.pipeline.chain import run_main  # heavy: after the arguments are checked

        result = run_main(exp, overrides, env_manager=env_manager, baseline=baseline, nproc=nproc,
                          finetune_overrides=finetune_overrides, force=force)
        print(f"main run {result.parent_run_id}")
        for name, run_id in result.steps.items():
            print(f"  {name}: {run_id}{' (reused)' if result.reused.get(name) else ''}")
        for key, value in result.metrics.items():
            print(f"  {key} = {value:.4f}")
        verdict = result.verdict()
        if verdict:
            print(f"  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
