"""Two sweep workers on one PostgreSQL study; one is killed (SIGKILL) in the middle of a trial,
the other retries that trial, the killed worker is started again with the identical command.
Prints what happened: trial states, the retried trial, and every run's status.

    python benchmarks/sweep_kill_retry.py [--work DIR] [--n-trials 4] [--epochs 6]

Needs the PostgreSQL server binaries (`apt-get install -y postgresql`); the server is a
throwaway one in a temporary folder. Trials are tiny CE students on the embedded digits.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlflow  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402

from asib_core.sweep import open_storage  # noqa: E402
from asib_core.sweep import study as st  # noqa: E402
from asib_core.sweep.recovery import RETRIED_TAG, retry_history  # noqa: E402
from tests.sweep_helpers import runs_of, start_worker, throwaway_postgres, trial_run_with_epoch, wait_for  # noqa: E402


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="work directory (default: a temporary one)")
    parser.add_argument("--n-trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    home = Path(args.work or tempfile.mkdtemp(prefix="sweep-kill-")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    (home / "lr.yaml").write_text(yaml.safe_dump(
        {"params": {"student_lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}}))
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    mlflow.MlflowClient().search_experiments()
    overrides = ["method=ce", f"experiment.student_epochs_per_stage=[{args.epochs}]",
                 "experiment.dataset.train_per_class=10", "experiment.dataset.val_split=0.05",
                 "experiment.dataset.batch_size=16", "experiment.eval_batch_size=256",
                 "experiment.schedule.lr_warmup_epochs=0"]
    name = "pg-kill"
    with throwaway_postgres() as url:
        say(f"PostgreSQL study '{name}' at {url}; work dir {home}; n_trials={args.n_trials}")
        cmd = ["exp=quickstart", f"space={home / 'lr.yaml'}", f"n_trials={args.n_trials}", f"study_name={name}",
               f"storage={url}", "pruner=none", "overrides=" + " ".join(overrides)]
        w0, w1 = start_worker(home, cmd, 0), start_worker(home, cmd, 1)
        say(f"started worker 0 (pid {w0.pid}) and worker 1 (pid {w1.pid}): python -m pipelines.sweep "
            + " ".join(cmd[:-1]) + " overrides=...")
        storage = open_storage(url).storage

        def worker1_trial() -> str | None:
            run_id = trial_run_with_epoch(name)
            if run_id and mlflow.MlflowClient().get_run(run_id).data.tags.get("sweep.worker") == "1":
                return run_id
            return None

        if not wait_for(worker1_trial, w1):
            sys.exit("worker 1 ended before it trained a trial: " + w1.communicate()[0][-2000:])
        victim = mlflow.MlflowClient().get_run(worker1_trial())
        number = victim.data.tags["optuna.trial_number"]
        os.kill(w1.pid, signal.SIGKILL)
        w1.wait()
        epochs = len(mlflow.MlflowClient().get_metric_history(victim.info.run_id, "val/acc"))
        say(f"SIGKILL worker 1 during trial {number} (its run {victim.info.run_id} had logged {epochs} of "
            f"{args.epochs} epochs)")
        out0 = w0.communicate(timeout=1800)[0]
        say(f"worker 0 exited {w0.returncode}")
        print("\n".join("    " + line for line in out0.splitlines() if "retried" in line or "ended FAIL" in line
                        or line.startswith(("  trial", "  study trials"))))
        again = start_worker(home, cmd, 1)
        out1 = again.communicate(timeout=1800)[0]
        say(f"worker 1 restarted with the identical command: exited {again.returncode}")
        print("\n".join("    " + line for line in out1.splitlines() if line.startswith(("  trial", "  study", "  best"))
                        or "closed" in line))

        study = optuna.load_study(study_name=name, storage=storage)
        trials = study.get_trials()
        print(f"\nstudy '{name}': {len(trials)} trials, {st.count_trials(study)} counted (n_trials={args.n_trials})")
        print("| trial | state | student_lr | value | retry of | worker |")
        print("|---|---|---|---|---|---|")
        for t in trials:
            history = retry_history(t)
            value = f"{t.value:.4f}" if t.value is not None else "-"
            print(f"| {t.number} | {t.state.name} | {t.params.get('student_lr', float('nan')):.5f} | {value} | "
                  f"{history[-1] if history else '-'} | {t.user_attrs.get('asib.worker', '?').rsplit(':', 2)[-2]} |")
        print("\n| run | kind | worker | trial | status | optuna.state | retried as | asib.error |")
        print("|---|---|---|---|---|---|---|---|")
        runs = sorted(runs_of(name), key=lambda r: r.info.start_time)
        for r in runs:
            tags = r.data.tags
            kind = "parent" if tags.get("step") == "sweep" else "trial"
            print(f"| {r.info.run_id[:12]} | {kind} | {tags.get('sweep.worker')} | {tags.get('optuna.trial_number', '-')} "
                  f"| {r.info.status} | {tags.get('optuna.state', '-')} | {tags.get(RETRIED_TAG, '-')} | "
                  f"{tags.get('asib.error', '-')[:90]} |")
        running = [r for r in runs if r.info.status == "RUNNING"]
        retried = [t for t in trials if retry_history(t)]
        print(f"\nretried trials: {[(retry_history(t)[-1], t.number) for t in retried]} (dead -> retry, same params: "
              f"{all(t.params == trials[retry_history(t)[-1]].params for t in retried)}); "
              f"runs left RUNNING: {len(running)}")


if __name__ == "__main__":
    main()
