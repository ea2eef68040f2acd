"""Issue 14: a sweep worker killed (SIGKILL) at seeded random points of its life, each kill
followed by the identical command. Whatever the point, the study ends with exactly n_trials
counted trials, every retried trial was rerun with its parameters, every counted trial has one
nested run in the matching status, and no run is left RUNNING.

Kill points: a random delay after the start (imports, study, parent run), the parent run's
creation, a trial handed out, a trial run's first epoch, a trial run's end (before its trial is
told, or while the worker reports); each plus a seeded random delay. The MLflow store exists
before the first worker (a kill during its creation is the tracking suite's case); ``max_retry``
is the number of kills, so that retries cannot run out (running out counts as a FAIL, by design).
"""
from __future__ import annotations

import os
import random
import signal
import time

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from asib_core.sweep import open_storage
from asib_core.sweep import study as st
from asib_core.sweep.recovery import RETRIED_TAG, retry_history
from tests.sweep_helpers import runs_of, start_worker, study_trials, trial_runs_of, wait_for

SEED = 14
KILLS = 4
N_TRIALS = 3
FAST = ["method=ce", "experiment.student_epochs_per_stage=[2]", "experiment.dataset.train_per_class=10",
        "experiment.dataset.val_split=0.05", "experiment.dataset.batch_size=16", "experiment.eval_batch_size=256",
        "experiment.schedule.lr_warmup_epochs=0"]


def _events(name: str, journal: str):
    storage = open_storage(journal).storage

    def snapshot() -> dict:
        runs = runs_of(name)
        return {"parents": {r.info.run_id for r in runs if r.data.tags.get("step") == "sweep"},
                "asked": {t.number for t in study_trials(name, storage) if t.state.name == "RUNNING"},
                "epoch": {r.info.run_id for r in runs if "val/acc" in r.data.metrics},
                "ended": {r.info.run_id for r in runs if r.data.tags.get("step") != "sweep"
                          and r.info.status != "RUNNING"}}

    return snapshot


@pytest.mark.slow
def test_sweep_worker_survives_sigkill_anywhere(tmp_path):
    home = tmp_path
    (home / "lr.yaml").write_text(yaml.safe_dump(
        {"params": {"student_lr": {"type": "float", "low": 0.01, "high": 0.2, "log": True}}}))
    mlflow.set_tracking_uri(f"sqlite:///{home / 'mlflow.db'}")
    MlflowClient().search_experiments()                  # the store exists before the first worker
    name, journal = "faults", str(home / "journal.log")
    args = ["exp=quickstart", f"space={home / 'lr.yaml'}", f"n_trials={N_TRIALS}", f"study_name={name}",
            f"storage={journal}", "pruner=none", f"max_retry={KILLS}", "overrides=" + " ".join(FAST)]
    snapshot = _events(name, journal)
    rng = random.Random(SEED)
    tried = []
    for _ in range(KILLS):
        event = rng.choice(["start", "parents", "asked", "epoch", "ended"])
        delay = rng.uniform(0.0, 4.0 if event == "start" else 0.5)
        before = snapshot()
        proc = start_worker(home, args)
        if event == "start":
            reached = proc.poll() is None
        else:
            reached = wait_for(lambda: snapshot()[event] - before[event], proc)
        time.sleep(delay)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=120)[0]
        tried.append((event, round(delay, 2), "killed" if killed else f"exited {proc.returncode}"))
        assert killed or proc.returncode == 0, out[-3000:]
        if not reached and not killed:
            break                                          # the study completed before the event
    final = start_worker(home, args)                       # the identical command, undisturbed
    out = final.communicate(timeout=600)[0]
    assert final.returncode == 0, out[-3000:]

    storage = open_storage(journal).storage
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials()
    assert st.count_trials(study) == N_TRIALS
    assert all(t.state.is_finished() for t in trials), [(t.number, t.state.name) for t in trials]
    retried = {n: t for t in trials for n in retry_history(t)[-1:]}      # dead trial -> its retry
    for number, retry in retried.items():     # (a trial killed before it sampled has no parameters to keep)
        assert trials[number].state.name == "FAIL" and trials[number].params.items() <= retry.params.items()
    counted = [t for t in trials if not (t.state.name == "FAIL" and t.number in retried)]
    runs = trial_runs_of(name)
    assert len(counted) == N_TRIALS and all(t.state.name == "COMPLETE" for t in counted), (
        f"after kills {tried}: trials {[(t.number, t.state.name, retry_history(t)) for t in trials]}, runs "
        f"{[(r.data.tags.get('optuna.trial_number'), r.info.status, r.data.tags.get('asib.error')) for r in runs]}")
    by_number: dict = {}
    for run in runs:
        by_number.setdefault(int(run.data.tags["optuna.trial_number"]), []).append(run)
    for trial in counted:                                  # one run per counted trial, no duplicates
        (run,) = by_number[trial.number]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "COMPLETE"
        assert trial.user_attrs["mlflow_run_id"] == run.info.run_id
        assert run.data.metrics["val/best_acc"] == trial.value
    for number, retry in retried.items():                  # a dead trial's run names its retry
        for run in by_number.get(number, []):
            assert run.data.tags[RETRIED_TAG] == str(retry.number) and run.info.status in ("KILLED", "FINISHED")
    everything = runs_of(name)
    left = [(r.data.tags.get("step"), r.info.run_id) for r in everything if r.info.status == "RUNNING"]
    assert not left, f"runs left RUNNING after kills {tried}: {left}"
    parents = [r for r in everything if r.data.tags.get("step") == "sweep"]
    assert sum(r.info.status == "FINISHED" for r in parents) >= 1
    state_root = home / "checkpoints" / "runs" / f"sweep-{name}"
    assert not state_root.exists() or not any(state_root.iterdir()), "a dead trial's state folder is left"
    kills = sum(1 for *_, what in tried if what == "killed")
    print(f"\nsweep worker faults (seed {SEED}): {kills} kills at {tried}; identical command survived {kills}/{kills}; "
          f"trials {len(trials)} ({len(retried)} retried), runs left RUNNING {len(left)}, "
          f"parents {len(parents)} ({', '.join(sorted(r.info.status for r in parents))})")
