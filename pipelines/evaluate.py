"""Entry point ``evaluate``: a finished distill or finetune run's model on the test split.

    python -m pipelines.evaluate run_id=<RUN_ID>
    python -m pipelines.evaluate model=<MODEL_URI>     (runs:/<RUN_ID>/model, models:/<NAME>/<VERSION>)

A distill run is evaluated through its logged MLflow model (no teacher checkpoint needed; the
agreement with the teachers is added when they can still be found); a finetune run through
its checkpoint. Top-1/top-5 accuracy, NLL, ECE, per-class accuracy, the confusion matrix and
one prediction per test image (``predictions.csv``) go to a new run tagged ``step=evaluate``.
"""
from __future__ import annotations

import sys

from pipelines._cli import exit_on_help, user_errors

OPTIONS = ("run_id", "model")


def main(argv: list[str] | None = None) -> int:
    from asib_core.config import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, __doc__, "evaluate")
    with user_errors():
        args = dict(item.split("=", 1) for item in argv if "=" in item)
        given = [args[k] for k in OPTIONS if args.get(k)]
        if len(given) != 1:
            raise ConfigError("evaluate needs exactly one of run_id=<id of a FINISHED distill or finetune run> "
                              "and model=<MLflow model URI: runs:/<run id>/model or models:/<name>/<version>>.")
        from asib_core.pipeline.evaluate import run_evaluate  # heavy: after the arguments are checked

        result = run_evaluate(given[0])
        print(f"evaluate run {result.run_id}: " + ", ".join(f"{k}={v:.4f}" for k, v in result.metrics.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
