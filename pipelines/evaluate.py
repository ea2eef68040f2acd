"""Entry point ``evaluate``: a finished distill or finetune run's model on the test split.

    python -m pipelines.evaluate run_id=<RUN_ID>
"""
from __future__ import annotations

import sys

from pipelines._cli import user_errors


def main(argv: list[str] | None = None) -> int:
    from asib_core.config import ConfigError

    with user_errors():
        args = dict(item.split("=", 1) for item in (sys.argv[1:] if argv is None else argv) if "=" in item)
        if not args.get("run_id"):
            raise ConfigError("evaluate needs run_id=<id of a FINISHED distill or finetune run>.")
        from asib_core.pipeline.evaluate import run_evaluate  # heavy: after the arguments are checked

        result = run_evaluate(args["run_id"])
        print(f"evaluate run {result.run_id}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
