"""Entry point ``distill``: distil the experiment's student from its teachers.

    python -m pipelines.distill exp=L1_ib [overrides="experiment.KEY=VALUE method=NAME ..."] [nproc=1]
    python -m pipelines.distill exp=L1_ib nproc=4      (data-parallel, re-launched under torchrun)

``exp`` names configs/experiment/<exp>.yaml; the overrides (also given one by one) are Hydra
overrides (docs/configuration.md). The run logs its student as an MLflow model (``runs:/<id>/model``).
"""
from __future__ import annotations

import sys

from pipelines._cli import exit_on_help, parse_exp_args, relaunch_distributed, user_errors


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, __doc__, "distill")
    with user_errors():
        relaunch_distributed(argv, "pipelines.distill")
        exp, overrides = parse_exp_args(argv)
        from asib_core.pipeline.distill import run_distill  # heavy: after the arguments are checked

        result = run_distill(exp, overrides)
        if result.run_id:
            print(f"distill run {result.run_id}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
