"""Workers that die: find their trials and runs, close them, and retry the trials.

A sweep worker can die anywhere (SIGKILL, out of memory, a lost machine). What it leaves:
an Optuna trial in state RUNNING, the trial's nested MLflow run and the worker's parent run
in status RUNNING, and the trial's resumable-state folder. Two ways find such a trial:

* **Heartbeats** (database storages): the worker records a heartbeat of its running trial
  every ``heartbeat_interval`` seconds (``RDBStorage(heartbeat_interval=..., grace_period=...)``);
  a trial without one for ``grace_period`` seconds is failed by ``optuna.storages.fail_stale_trials``,
  which any worker runs before it asks for a trial. Works across machines; takes the grace period.
* **Dead owner on this host** (every storage): each trial carries its worker's identity
  (``host:pid:start time``, user attribute ``asib.worker``); a worker that asks for a trial fails
  the RUNNING trials of workers of its own host that no longer run. Immediate, so the identical
  command after a kill finds the dead trial at once. Optuna 5's journal storage has no heartbeat,
  so on the default journal file (one machine by design) this is the way.

Either way the trial ends FAIL and :class:`RetryDeadTrial` runs: the trial's runs and the dead
worker's parent run are closed KILLED (tags ``asib.error`` and ``asib.retried_as``), its state
folder is removed, and Optuna's ``RetryHeartbeatStaleTrialCallback`` enqueues a copy with the
same parameters (up to ``max_retry`` times). A retried trial does not count towards ``n_trials``;
its retry does (study.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import warnings

from mlflow.tracking import MlflowClient

log = logging.getLogger("asib.sweep")

WORKER_ATTR = "asib.worker"            # host:pid:start of the worker running the trial
UID_ATTR = "asib.trial_uid"            # = the trial run's tag sweep.trial_uid
PARENT_ATTR = "asib.parent_run_id"     # the worker's parent MLflow run
STATE_ATTR = "asib.state_dir"          # the trial's resumable-state folder
#: a trial's marks of one attempt; a retry starts with copies of its predecessor's (Optuna's
#: retry callback copies the user attributes), cleared when the retry is handed out
ATTEMPT_ATTRS = (UID_ATTR, PARENT_ATTR, STATE_ATTR, "mlflow_run_id", "config_sha256")
IDENTITY_TAG = "sweep.worker_identity"
RETRIED_TAG = "asib.retried_as"


def worker_identity() -> str:
    """host:pid:start-time of this process (start time guards against a reused pid)."""
    import psutil
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{psutil.Process(pid).create_time():.3f}"


def alive_here(identity: str) -> bool | None:
    """True/False for a worker of this host, None for a worker of another host (or unreadable)."""
    import psutil
    try:
        host, pid, started = identity.rsplit(":", 2)
        pid_i, started_f = int(pid), float(started)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        return abs(psutil.Process(pid_i).create_time() - started_f) < 1e-3
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


@contextlib.contextmanager
def quiet_experimental():
    """Optuna marks its heartbeat and retry helpers experimental; the warning says nothing new."""
    import optuna
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


def retry_history(trial) -> list[int]:
    """The numbers of the trials this trial retries (empty for an original trial)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    with quiet_experimental():
        return list(RetryHeartbeatStaleTrialCallback.retry_history(trial))


def retried_numbers(trials) -> set[int]:
    return {n for t in trials for n in retry_history(t)}


class RetryDeadTrial:
    """Called with a trial that ended FAIL because its worker died (or was interrupted): close
    its runs, remove its state folder, enqueue a retry with the same parameters."""

    def __init__(self, max_retry: int | None):
        from optuna.storages import RetryHeartbeatStaleTrialCallback
        self.max_retry = max_retry
        with quiet_experimental():
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study, trial, reason: str = "its worker stopped sending heartbeats",
                 close_runs: bool = True) -> int | None:
        with quiet_experimental():
            self._retry(study, trial)
        retry = next((t.number for t in reversed(study.get_trials(deepcopy=False))
                      if retry_history(t) and retry_history(t)[-1] == trial.number), None)
        outcome = f"retried as trial {retry}" if retry is not None else \
            f"not retried: it already had {self.max_retry} retries"
        log.warning("trial %d of study '%s' ended FAIL: %s; %s", trial.number, study.study_name, reason, outcome)
        state_dir = trial.user_attrs.get(STATE_ATTR)
        if state_dir:
            shutil.rmtree(state_dir, ignore_errors=True)
        if close_runs:
            close_trial_runs(trial, f"{reason}; trial {outcome}", retry)
        return retry


def _runs(filter_string: str):
    client = MlflowClient()
    ids = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(ids, filter_string, max_results=1000) if ids else []


def _kill(run_id: str, reason: str, extra: dict | None = None) -> None:
    client = MlflowClient()
    client.set_tag(run_id, "asib.error", reason[:5000])
    for key, value in (extra or {}).items():
        client.set_tag(run_id, key, str(value))
    client.set_terminated(run_id, "KILLED")


def close_trial_runs(trial, reason: str, retry: int | None) -> list[str]:
    """The dead trial's nested run(s) and its worker's parent run: RUNNING -> KILLED."""
    closed = []
    tags = {"optuna.state": "FAIL"} | ({RETRIED_TAG: retry} if retry is not None else {})
    uid = trial.user_attrs.get(UID_ATTR)
    # the trial number too: a retry starts with a copy of its dead predecessor's attributes
    for run in _runs(f"tags.`sweep.trial_uid` = '{uid}' and tags.`optuna.trial_number` = '{trial.number}'") \
            if uid else []:
        client = MlflowClient()
        for key, value in tags.items():
            client.set_tag(run.info.run_id, key, str(value))
        if run.info.status == "RUNNING":
            _kill(run.info.run_id, f"trial {trial.number}: {reason}")
            closed.append(run.info.run_id)
    parent = trial.user_attrs.get(PARENT_ATTR)
    if parent:
        with contextlib.suppress(Exception):
            if MlflowClient().get_run(parent).info.status == "RUNNING":
                _kill(parent, f"sweep worker {trial.user_attrs.get(WORKER_ATTR, '?')} died during trial "
                              f"{trial.number}")
                closed.append(parent)
    return closed


def close_dead_worker_runs(study_name: str) -> list[str]:
    """RUNNING runs (parents and trials) of this study whose worker was a process of this host
    that no longer runs: KILLED. Covers a worker killed between trials or while reporting."""
    closed = []
    for run in _runs(f"tags.`optuna.study_name` = '{study_name}' and attributes.status = 'RUNNING'"):
        owner = run.data.tags.get(IDENTITY_TAG)
        if owner and alive_here(owner) is False:
            _kill(run.info.run_id, f"sweep worker {owner} is no longer running")
            closed.append(run.info.run_id)
    if closed:
        log.warning("study '%s': closed %d run(s) left RUNNING by dead workers: %s", study_name, len(closed),
                    ", ".join(closed))
    return closed


def fail_dead_trials(study, on_dead: RetryDeadTrial, locked: bool) -> list[int]:
    """Under the ask lock: FAIL (and retry) the RUNNING trials whose worker is a dead process
    of this host, or that have no worker at all (killed between ask and the owner's mark,
    which both happen under the lock; only when the storage has a real lock)."""
    from optuna.trial import TrialState

    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(WORKER_ATTR)
        if owner:
            if alive_here(owner) is not False:
                continue
            reason = f"its worker {owner} is no longer running"
        elif locked:
            reason = "its worker died before it marked the trial"
        else:
            continue
        try:
            frozen = study.tell(trial.number, state=TrialState.FAIL)
        except Exception:  # noqa: BLE001 - finished meanwhile (another worker, a late tell)
            continue
        on_dead(study, frozen, reason=reason)
        failed.append(trial.number)
    return failed


class Heartbeat:
    """Record the heartbeat of one running trial every ``interval`` seconds in a thread
    (what ``Study.optimize`` does; a sweep drives Optuna by ask/tell). No-op without heartbeats."""

    def __init__(self, storage, study_name: str, number: int):
        self.storage = storage
        self.interval = storage.get_heartbeat_interval() if hasattr(storage, "get_heartbeat_interval") else None
        self.trial_id = None
        if self.interval:
            study_id = storage.get_study_id_from_name(study_name)
            self.trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
        self._stop = threading.Event()
        self._thread = None

    def beat(self) -> None:
        if self.trial_id is not None:
            self.storage.record_heartbeat(self.trial_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):   # a missed beat is retried at the next interval
                self.beat()

    def __enter__(self):
        if self.trial_id is not None:
            self.beat()
            self._thread = threading.Thread(target=self._loop, name="optuna-heartbeat", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

