"""Entry point ``distill``: distil the experiment's student from its teachers.

    python -m pipelines.distill exp=L1_ib [overrides...]
    python -m pipelines.distill exp=L1_ib nproc=4      (data-parallel, re-launched under torchrun)
"""
from __future__ import annotations

import sys

from pipelines._cli import parse_exp_args, relaunch_distributed, user_errors


def main(argv: list[str] | None = None) -> int:
    with user_errors():
        argv = list(sys.argv[1:] if argv is None else argv)
        relaunch_distributed(argv, "pipelines.distill")
        exp, overrides = parse_exp_args(argv)
        from asib_core.pipeline.distill import run_distill  # heavy: after the arguments are checked

        result = run_distill(exp, overrides)
        if result.run_id:
            print(f"distill run {result.run_id}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
