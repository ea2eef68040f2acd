"""Entry point ``sweep``: an Optuna search over distillation runs, one nested MLflow run per trial.

    python -m pipelines.sweep exp=L1_ib n_trials=20 [space=default] [study_name=NAME]
        [storage=PATH|URL] [sampler=tpe|gp|random] [sampler_seed=0]
        [pruner=median|successive_halving|hyperband|none] [worker=0] [heartbeat=60] [max_retry=2]
        [overrides="experiment.KEY=VALUE ..."]

Start more workers on the same study (same exp, space, study_name, storage) to run trials in
parallel; ``n_trials`` is the study's total. Exit 0 once the study holds n_trials trials and
at least one completed, 1 if none completed, 2 on a user error, 130 when interrupted (Ctrl-C,
SIGTERM: the same command resumes).
"""
from __future__ import annotations

import sys

from pipelines._cli import count_option, exit_on_help, parse_exp_args, pop_option, user_errors

INTERRUPTED = ("the sweep's running trial ended FAIL and is retried with its parameters, its run and this "
               "worker's parent run ended KILLED. Run the same command again to resume the study.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exit_on_help(argv, __doc__, "sweep")
    with user_errors(interrupted=INTERRUPTED):
        counts = {name: count_option(argv, name, default)
                  for name, default in (("n_trials", 20), ("sampler_seed", 0), ("worker", 0),
                                        ("heartbeat", 60), ("max_retry", 2))}
        from asib_core.sweep import SweepSettings, run_sweep  # heavy: after the counts are checked

        settings = SweepSettings(
            space=pop_option(argv, "space", "default"),
            n_trials=counts["n_trials"],
            study_name=pop_option(argv, "study_name", ""),
            storage=pop_option(argv, "storage", ""),
            sampler=pop_option(argv, "sampler", ""),
            sampler_seed=counts["sampler_seed"],
            pruner=pop_option(argv, "pruner", "median"),
            worker=counts["worker"],
            heartbeat=counts["heartbeat"],
            max_retry=counts["max_retry"],
        )
        settings.exp, settings.overrides = parse_exp_args(argv, default_exp="quickstart")
        result = run_sweep(settings)
        print(f"sweep run {result.parent_run_id}: study '{result.study_name}' in {result.storage}; "
              f"trials on {result.device}")
        print("  study trials: " + ", ".join(f"{k}={v}" for k, v in result.counts.items()))
        for outcome in result.outcomes:
            shown = f"{outcome.value:.4f}" if outcome.value is not None else outcome.error
            print(f"  trial {outcome.number}: {outcome.state} {shown} (run {outcome.run_id})")
        if result.best is None:
            print("  no trial completed: no best config", file=sys.stderr)
            return 1
        print(f"  best: trial {result.best.number} val/best_acc={result.best.value:.4f} "
              f"{result.best.overrides_line}")
        print(f"  best-config overrides: {result.best_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
