"""Run lifecycle: open (or resume) a run, and end it FINISHED, FAILED or KILLED.

A run that fails for any reason ends FAILED with the error as the tag
``asib.error`` - never RUNNING; a run stopped by an Optuna pruner (``optuna.TrialPruned``,
sweeps) ends KILLED with the reason as the tag ``asib.pruned``. Runs started by ``mlflow run``
are attached through ``MLFLOW_RUN_ID``; runs started directly go to the same experiment ``mlflow run``
would use (:func:`experiment_name`), so both kinds of run of one project land side by side.
A run whose process is killed outright (SIGKILL) is closed as KILLED by the next command
(owners.py) at its last metric point; a resumed run logs no metric point twice (:class:`RunHandle`)
and adds the time it stood still since its previous attempt ended to the metric ``run/paused_s``
(one point per resume, the running total), so its run time is ``end - start - run/paused_s``
whatever happened in between. Every run samples
system metrics (``system/...``, every 10 s) unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false``.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from dataclasses import dataclass, field

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from asib_core.faults import fault_point

from .owners import ACTIVE_TAG, ORPHAN_TAG, OWNER_TAG, close_orphans, owner_id
from .store import artifact_root

SYSTEM_METRICS_ENV = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
ERROR_TAG = "asib.error"
PRUNED_TAG = "asib.pruned"
PAUSED_METRIC = "run/paused_s"
MAX_TAG = 5000


DEFAULT_EXPERIMENT = "Default"   # MLflow's own default experiment (id 0): where `mlflow run` puts runs


def experiment_name() -> str:
    """The MLflow experiment new runs go to, chosen exactly as ``mlflow run`` chooses it:
    ``MLFLOW_EXPERIMENT_NAME``, else the experiment of ``MLFLOW_EXPERIMENT_ID``, else MLflow's
    ``Default`` experiment. (``mlflow run --experiment-name X`` passes X on to every step.)"""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    if name:
        return name
    exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
    if exp_id:
        with contextlib.suppress(MlflowException):
            return MlflowClient().get_experiment(exp_id).name
    return DEFAULT_EXPERIMENT


def system_metrics_enabled() -> bool:
    """System metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) are logged by every run
    unless ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING`` is set to something other than true/1."""
    value = (os.environ.get(SYSTEM_METRICS_ENV) or "").strip().lower()
    return value in ("", "true", "1")


def ensure_experiment(name: str) -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_artifact_location(name))
    except MlflowException:  # created meanwhile by a command that started at the same time
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def _artifact_location(name: str) -> str | None:
    root = artifact_root()
    return None if root is None else f"{root}/{name}"


@dataclass
class RunHandle:
    """An open run. Metrics go through :meth:`log_metrics`, which keeps one point per metric
    and step: a point the run already has (logged before a kill, by the run this one resumes)
    is not logged again - the first value written stays."""

    run_id: str
    experiment_id: str
    resumed: bool
    logged: dict = field(default_factory=dict)   # metric key -> steps the store already has

    def load_logged_points(self) -> None:
        client = MlflowClient()
        for key in client.get_run(self.run_id).data.metrics:
            self.logged[key] = {m.step for m in client.get_metric_history(self.run_id, key)}

    def log_metrics(self, metrics: dict, step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items()
                 if v is not None and v == v and step not in self.logged.get(k, ())}
        if clean:
            mlflow.log_metrics(clean, step=step, run_id=self.run_id)
            MlflowClient().set_tag(self.run_id, ACTIVE_TAG, str(int(time.time() * 1000)))
            for key in clean:
                self.logged.setdefault(key, set()).add(step)

    def set_tags(self, tags: dict) -> None:
        client = MlflowClient()
        for key, value in tags.items():
            client.set_tag(self.run_id, key, str(value)[:MAX_TAG])


@contextlib.contextmanager
def open_run(*, experiment: str, run_name: str, tags: dict, resume_run_id: str | None = None,
             nested: bool = False, parent_run_id: str | None = None):
    """Start, attach to or resume a run; always end it with a terminal status.

    RUNNING runs of this host whose process is gone are closed first (owners.py). The run
    carries its owner tag from the moment it exists (a new run is created with all its tags in
    one call); a resumed run is taken over (RUNNING, this owner, its known metric points loaded).
    """
    close_orphans()
    system_metrics = system_metrics_enabled()
    attached = os.environ.get("MLFLOW_RUN_ID")
    client = MlflowClient()
    all_tags = {k: str(v)[:MAX_TAG] for k, v in tags.items()}
    all_tags[OWNER_TAG] = owner_id()
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    if resume_run_id and attached and attached != resume_run_id:
        # `mlflow run` created a fresh run for this invocation, but the work resumes an
        # interrupted run: close the fresh one as a pointer to the resumed run.
        client.set_tag(attached, "asib.resumed_into", resume_run_id)
        client.set_terminated(attached, "KILLED")
        parent = client.get_run(attached).data.tags.get("mlflow.parentRunId")
        if parent and not parent_run_id:   # the resumed run moves under the new chain's parent
            all_tags["mlflow.parentRunId"] = parent
        os.environ.pop("MLFLOW_RUN_ID", None)
    if resume_run_id:
        client.set_tag(resume_run_id, OWNER_TAG, all_tags[OWNER_TAG])
        add_pause(client, resume_run_id)
        run = mlflow.start_run(run_id=resume_run_id, nested=nested, log_system_metrics=system_metrics)
        client.update_run(resume_run_id, status="RUNNING")
        stale = [t for t in (ORPHAN_TAG, ERROR_TAG) if t in client.get_run(resume_run_id).data.tags]
        for tag in stale:   # how the run ended before: no longer true
            client.delete_tag(resume_run_id, tag)
    elif attached:
        client.set_tag(attached, OWNER_TAG, all_tags[OWNER_TAG])
        run = mlflow.start_run(run_id=attached, run_name=run_name, nested=nested, log_system_metrics=system_metrics)
        if mlflow.get_run(attached).info.run_name != run_name:
            client.update_run(attached, name=run_name)
    else:
        exp_id = ensure_experiment(experiment)
        run = mlflow.start_run(experiment_id=exp_id, run_name=run_name, nested=nested, tags=all_tags,
                               log_system_metrics=system_metrics)
    handle = RunHandle(run.info.run_id, run.info.experiment_id, bool(resume_run_id))
    fault_point("run.created")
    mlflow.set_tags(all_tags)
    if handle.resumed:
        handle.load_logged_points()
    try:
        yield handle
    except KeyboardInterrupt:
        client.set_tag(handle.run_id, ERROR_TAG, "interrupted (KeyboardInterrupt)")
        mlflow.end_run(status="KILLED")
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure must end the run FAILED
        if _is_trial_pruned(exc):  # stopped on purpose by an Optuna pruner (sweeps): KILLED
            client.set_tag(handle.run_id, PRUNED_TAG, (str(exc) or "pruned")[:MAX_TAG])
            mlflow.end_run(status="KILLED")
            raise
        message = f"{type(exc).__name__}: {exc}"
        client.set_tag(handle.run_id, ERROR_TAG, message[:MAX_TAG])
        with contextlib.suppress(Exception):
            mlflow.log_text(traceback.format_exc(), "error.txt", run_id=handle.run_id)
        mlflow.end_run(status="FAILED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def add_pause(client: MlflowClient, run_id: str) -> None:
    """Before a run is resumed: add the time since its previous attempt ended (its end time) to
    ``run/paused_s``, and mark the run active now (should this attempt be killed before its first
    metric point, its orphan end time is then not the previous attempt's)."""
    run = client.get_run(run_id)
    now = int(time.time() * 1000)
    client.set_tag(run_id, ACTIVE_TAG, str(now))
    if not run.info.end_time:
        return
    history = client.get_metric_history(run_id, PAUSED_METRIC)
    total = (max(history, key=lambda m: m.step).value if history else 0.0) + max(0, now - run.info.end_time) / 1000
    client.log_metric(run_id, PAUSED_METRIC, total, timestamp=now, step=len(history))


def _is_trial_pruned(exc: BaseException) -> bool:
    """optuna.TrialPruned (looked up only if optuna is already imported: nothing else raises it)."""
    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(exc, optuna.TrialPruned)


def search_finished(filter_string: str, experiment_ids: list[str] | None = None,
                    order_by: tuple = ("attributes.start_time DESC",)):
    """FINISHED runs matching a filter, newest first, across all experiments by default."""
    client = MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if not experiment_ids:
        return []
    flt = f"attributes.status = 'FINISHED' and {filter_string}" if filter_string else "attributes.status = 'FINISHED'"
    return client.search_runs(experiment_ids, flt, order_by=list(order_by), max_results=50)
