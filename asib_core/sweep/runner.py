"""One sweep worker: open (or resume) the study, run trials until the study holds ``n_trials``,
then report on the parent run.

Every trial is one in-process distillation (``run_distill``) nested under this worker's parent
run. The objective is the best validation accuracy of the distilled student
(``val/best_acc``); the validation accuracy of every epoch is reported to the pruner. The test
split is never looked at by the search.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import shutil
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from asib_core.config import ConfigError, resolve_experiment
from asib_core.tracking import configure_tracking, experiment_name, open_run
from asib_core.tracking.environ import scoped_environ

from . import study as st
from .recovery import IDENTITY_TAG, PARENT_ATTR, STATE_ATTR, UID_ATTR, Heartbeat, close_dead_worker_runs, \
    worker_identity
from .report import BestTrial, report, state_counts
from .space import SearchSpace, load_space, parse_sampler
from .storage import DEFAULT_HEARTBEAT, DEFAULT_MAX_RETRY, StudyStorage, open_storage

log = logging.getLogger("asib.sweep")
OBJECTIVE = "val/best_acc"


@dataclass
class SweepSettings:
    exp: str = "quickstart"
    space: str = "default"
    n_trials: int = 20
    study_name: str = ""
    storage: str = ""
    sampler_seed: int = 0
    pruner: str = "median"
    sampler: str = ""          # "" = the space's sampler; tpe, gp or random replaces it
    heartbeat: int = DEFAULT_HEARTBEAT     # seconds (database storages)
    max_retry: int = DEFAULT_MAX_RETRY     # retries of a trial whose worker died
    overrides: list = field(default_factory=list)
    worker: int = 0
    out_dir: str = ""          # where best_overrides.txt goes (default experiments/sweeps/<study>)


@dataclass
class TrialOutcome:
    number: int
    state: str                 # COMPLETE, PRUNED or FAIL
    value: float | None
    run_id: str | None
    error: str | None = None


@dataclass
class SweepResult:
    parent_run_id: str
    study_name: str
    storage: str
    device: str
    outcomes: list = field(default_factory=list)
    best: BestTrial | None = None
    best_file: Path | None = None
    counts: dict = field(default_factory=dict)


def default_study_name(exp: str, space: SearchSpace) -> str:
    return f"{exp}-{space.name}"


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "study"


def override_key(item: str) -> str:
    return item.split("=", 1)[0].lstrip("+~")


def check_overrides(space: SearchSpace, overrides: list) -> None:
    searched = set(space.keys)
    clash = [o for o in overrides if override_key(o) in searched]
    if clash:
        raise ConfigError(f"the overrides {clash} set keys the search space '{space.name}' searches "
                          f"({sorted(searched)}); drop them or remove the parameter from the space.")


def worker_device(cfg: dict, overrides: list, worker: int) -> tuple[list[str], str]:
    """``experiment.device=cuda:N`` for worker N (mod the GPU count) when several GPUs are visible."""
    import torch

    requested = str(cfg.get("device") or "auto").lower()
    if any(override_key(o) == "experiment.device" for o in overrides):
        return [], f"{requested} (set by the overrides)"
    if not torch.cuda.is_available():
        return [], "cpu (no CUDA device visible)"
    if requested == "cpu":
        return [], "cpu (the experiment sets device=cpu)"
    count = torch.cuda.device_count()
    if count > 1 and not requested.startswith("cuda:"):
        index = worker % count
        return [f"experiment.device=cuda:{index}"], f"cuda:{index} of {count} ({torch.cuda.get_device_name(index)})"
    index = int(requested.split(":")[1]) if requested.startswith("cuda:") else 0
    return [], f"cuda:{index} ({torch.cuda.get_device_name(index)})"


@contextlib.contextmanager
def trial_environment(experiment: str):
    """Trials nest under the parent: same MLflow experiment, and not attached to the run that
    ``mlflow run`` created for the parent (``MLFLOW_RUN_ID``)."""
    with scoped_environ(MLFLOW_RUN_ID=None, MLFLOW_EXPERIMENT_NAME=experiment):
        yield


def preflight(settings: SweepSettings, space: SearchSpace):
    """Refuse a sweep that cannot work before any trial: bad overrides, a space whose keys the
    experiment does not accept or that something else decides."""
    check_overrides(space, settings.overrides)
    base = resolve_experiment(settings.exp, settings.overrides)
    for end in (0, -1):
        values = space.probe_values(end)
        probe = space.overrides(values)
        try:
            cfg = resolve_experiment(settings.exp, list(settings.overrides) + probe).cfg
        except ConfigError as exc:
            raise ConfigError(f"the search space '{space.name}' does not fit experiment '{settings.exp}' "
                              f"(checked with {probe}): {exc}") from None
        check_effective(space, values, cfg)
    return base


def check_teachers(cfg: dict) -> None:
    from asib_core.methods import get_method
    from asib_core.pipeline.teachers import resolve_teachers

    if get_method(cfg["method_name"]).needs_teachers:
        resolve_teachers(cfg)


def check_effective(space: SearchSpace, values: dict, cfg: dict) -> None:
    """Every searched ``experiment.*`` key must reach the run with the sampled value (an anchor,
    for example, sets ce_alpha/kd_alpha over the experiment: searching them would do nothing)."""
    from asib_core.config import get_dotted

    for name, key in space.key_map.items():
        if not key.startswith("experiment.") or name not in values:
            continue
        got = get_dotted(cfg, key[len("experiment."):])
        want = values[name]
        same = got == want
        if isinstance(want, (int, float)) and isinstance(got, (int, float)) and not isinstance(want, bool):
            same = math.isclose(float(got), float(want), rel_tol=1e-9, abs_tol=1e-12)
        if not same:
            raise ConfigError(
                f"the search space '{space.name}' sets {key}={want!r}, but the resolved config has {got!r}: "
                "something else (e.g. anchor=fair_baseline for ce_alpha/kd_alpha) decides this key, so "
                "the sweep would not search it. Remove the parameter or what overrides it."
            )


def run_sweep(settings: SweepSettings) -> SweepResult:
    from asib_core.pipeline.common import run_tags, setup_logging

    setup_logging()
    configure_tracking()
    if int(settings.n_trials) < 1:
        raise ConfigError(f"n_trials must be at least 1, got {settings.n_trials}.")
    space = load_space(settings.space)
    if settings.sampler:
        space = dataclasses.replace(space, sampler=parse_sampler(f"sampler={settings.sampler}", space.sampler,
                                                                 settings.sampler))
    base = preflight(settings, space)
    cfg = base.cfg
    name = settings.study_name or default_study_name(settings.exp, space)
    pruner = st.build_pruner(settings.pruner, space, sum(int(e) for e in cfg["student_epochs_per_stage"]))
    store = open_storage(settings.storage, settings.heartbeat, settings.max_retry)
    with store.ask_lock(name):
        # workers starting together on a new sqlite tracking store: one creates its tables;
        # runs of this study left RUNNING by dead workers of this host are closed
        MlflowClient().search_experiments(max_results=1)
        close_dead_worker_runs(name)
    check_teachers(cfg)
    signature = st.Signature(exp=settings.exp, overrides=list(settings.overrides), params=space.param_names)
    study = st.open_study(store, name, signature, sampler=st.build_sampler(space, settings.sampler_seed),
                          pruner=pruner)
    device_overrides, device = worker_device(cfg, settings.overrides, settings.worker)
    log.info("sweep worker %d: study '%s' in %s, %d/%d trials so far; trials run on %s",
             settings.worker, name, store.description, st.count_trials(study), settings.n_trials, device)
    identity = worker_identity()
    tags = run_tags(cfg, "sweep", base.sha256, **{
        "optuna.study_name": name, "optuna.storage": store.description, "sweep.space": space.name,
        "sweep.worker": str(settings.worker), "sweep.device": device, IDENTITY_TAG: identity})
    title = f"sweep {name}" + (f" worker {settings.worker}" if settings.worker else "")
    out_dir = Path(settings.out_dir or Path("experiments") / "sweeps" / safe_name(name)).resolve()
    result = SweepResult(parent_run_id="", study_name=name, storage=store.description, device=device)
    with open_run(experiment=experiment_name(), run_name=title, tags=tags) as parent:
        result.parent_run_id = parent.run_id
        # the effective settings ("sweep." keys: `mlflow run` logs its raw parameters unprefixed)
        mlflow.log_params({f"sweep.{k}": v for k, v in {
            "exp": settings.exp, "space": space.name, "space_source": space.source,
            "n_trials": int(settings.n_trials), "study_name": name, "storage": store.description,
            "pruner": settings.pruner, "sampler": space.sampler["name"], "sampler_seed": int(settings.sampler_seed),
            "heartbeat": int(settings.heartbeat) if store.heartbeat else "none (journal)",
            "max_retry": settings.max_retry,
            "overrides": " ".join(settings.overrides)[:6000], "worker": int(settings.worker)}.items()},
            run_id=parent.run_id)
        parent_experiment = MlflowClient().get_experiment(parent.experiment_id).name
        state_root = Path(cfg.get("checkpoint_dir") or "checkpoints/runs") / f"sweep-{safe_name(name)}"
        trials = TrialRunner(settings, space, study, store, parent.run_id, device_overrides, state_root, identity)
        with trial_environment(parent_experiment):
            while True:
                trial = st.ask_next(study, store, int(settings.n_trials), identity,
                                    make_sampler=lambda seed: st.build_sampler(space, seed),
                                    seed=settings.sampler_seed)
                if trial is None:
                    break
                result.outcomes.append(trials.run(trial))
        with contextlib.suppress(OSError):
            state_root.rmdir()        # the trials removed their own folders; drop the empty parent
        result.best, result.best_file = report(study, parent.run_id, space, settings.exp,
                                               list(settings.overrides), out_dir)
        result.counts = state_counts(study)
    log.info("sweep worker %d done: this worker ran %d trials; study '%s' now %s", settings.worker,
             len(result.outcomes), name, result.counts)
    return result


class TrialRunner:
    """Runs one trial as a nested distillation run and records its end on both sides."""

    def __init__(self, settings: SweepSettings, space: SearchSpace, study, store: StudyStorage,
                 parent_run_id: str, device_overrides: list, state_root: Path, identity: str):
        self.settings = settings
        self.space = space
        self.study = study
        self.store = store
        self.parent_run_id = parent_run_id
        self.device_overrides = device_overrides
        self.study_name = study.study_name
        self.state_root = state_root      # each trial's resumable state: a folder of its own
        self.identity = identity

    def run(self, trial) -> TrialOutcome:
        """The trial, its heartbeat recorded all along (database storages)."""
        with Heartbeat(self.store.storage, self.study_name, trial.number):
            return self._run(trial)

    def _run(self, trial) -> TrialOutcome:
        import optuna

        from asib_core.pipeline.distill import run_distill

        uid = uuid.uuid4().hex
        number = trial.number
        state_dir = self.state_root / f"trial-{number}-{uid[:8]}"
        # before anything can leave a trace: what a recovering worker needs to clean up after us
        for key, value in {UID_ATTR: uid, PARENT_ATTR: self.parent_run_id,
                           STATE_ATTR: str(state_dir.resolve())}.items():
            trial.set_user_attr(key, value)
        tags = {"optuna.study_name": self.study_name, "optuna.trial_number": str(number),
                "sweep.trial_uid": uid, "sweep.worker": str(self.settings.worker), IDENTITY_TAG: self.identity,
                "mlflow.runName": f"{self.study_name} trial {number}"}
        seen: dict = {}
        values: dict = {}
        overrides: list = []
        state, value, run_id, error = "FAIL", None, None, None

        def on_epoch_end(epoch: int, metrics: dict) -> None:
            active = mlflow.active_run()
            if active is not None:
                seen["run_id"] = active.info.run_id
            acc = metrics.get("val/acc")
            if acc is None or not math.isfinite(float(acc)):
                return
            trial.report(float(acc), step=int(epoch))
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned by the {self.settings.pruner} pruner after epoch {epoch} "
                                         f"(val/acc {float(acc):.4f})")

        try:
            values = self.space.suggest(trial)
            overrides = list(self.settings.overrides) + self.space.overrides(values) + self.device_overrides
            log.info("trial %d of study '%s': %s", number, self.study_name, " ".join(self.space.overrides(values)))
            result = run_distill(self.settings.exp, overrides, parent_run_id=self.parent_run_id,
                                 on_epoch_end=on_epoch_end, extra_tags=tags, state_root=state_dir)
            run_id = result.run_id
            value = result.metrics.get(OBJECTIVE)
            if value is None or not math.isfinite(float(value)):
                error = f"{OBJECTIVE} is not a finite number ({value}): is the validation split empty?"
            else:
                state, value = "COMPLETE", float(value)
        except optuna.TrialPruned as exc:
            state, error = "PRUNED", str(exc)
        except KeyboardInterrupt:
            reason = "interrupted (KeyboardInterrupt)"
            self._record(trial, uid, "FAIL", values, overrides, seen.get("run_id"), reason, status="KILLED")
            self._tell(trial, "FAIL", None, retry_reason=reason)
            raise
        except Exception as exc:  # noqa: BLE001 - a failing trial is recorded; the sweep goes on
            error = f"{type(exc).__name__}: {exc}"
            log.warning("trial %d failed: %s\n%s", number, error, traceback.format_exc())
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)
            _free_gpu_memory()
        run_id = self._record(trial, uid, state, values, overrides, run_id or seen.get("run_id"), error)
        self._tell(trial, state, value)
        log.info("trial %d: %s%s", number, state, f" {OBJECTIVE}={value:.4f}" if state == "COMPLETE" else f" ({error})")
        return TrialOutcome(number=number, state=state, value=value if state == "COMPLETE" else None,
                            run_id=run_id, error=error)

    def _tell(self, trial, state: str, value: float | None, retry_reason: str | None = None) -> None:
        """End the trial in the study; an interrupted one is retried (the MLflow runs are ended
        by their own ``open_run``)."""
        from optuna.trial import TrialState
        try:
            frozen = self.study.tell(trial, value) if state == "COMPLETE" else \
                self.study.tell(trial, state=TrialState[state])
        except Exception as exc:  # noqa: BLE001 - declared dead meanwhile (no heartbeat for grace_period)
            log.warning("trial %d could not be recorded as %s (%s: %s): another worker failed it as stale and "
                        "retries it", trial.number, state, type(exc).__name__, exc)
            return
        if retry_reason:
            self.store.on_dead(self.study, frozen, reason=retry_reason, close_runs=False)

    def _record(self, trial, uid: str, state: str, values: dict, overrides: list, run_id: str | None,
                error: str | None, status: str = "FAILED") -> str:
        """Trial params, state and config hash on the trial's MLflow run (made here, FAILED, when
        the trial failed before its distillation run started)."""
        from mlflow.entities import Param

        client = MlflowClient()
        run_id = run_id or self._find_run(uid)
        if run_id is None:
            run_id = self._failed_run(trial.number, uid, error, status)
        tags = client.get_run(run_id).data.tags
        sha = tags.get("config_sha256")
        if not sha and overrides:
            with contextlib.suppress(Exception):
                sha = resolve_experiment(self.settings.exp, overrides).sha256
        existing = client.get_run(run_id).data.params
        params = [Param(f"trial.{k}", str(v)) for k, v in values.items() if f"trial.{k}" not in existing]
        if params:
            client.log_batch(run_id, params=params)
        client.set_tag(run_id, "optuna.state", state)
        if sha:
            client.set_tag(run_id, "config_sha256", sha)
            trial.set_user_attr("config_sha256", sha)
        if error and state != "COMPLETE":
            client.set_tag(run_id, "optuna.reason", error[:5000])
        trial.set_user_attr("mlflow_run_id", run_id)
        return run_id

    def _find_run(self, uid: str) -> str | None:
        client = MlflowClient()
        ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(ids, f"tags.`sweep.trial_uid` = '{uid}'", max_results=1) if ids else []
        return runs[0].info.run_id if runs else None

    def _failed_run(self, number: int, uid: str, error: str | None, status: str) -> str:
        client = MlflowClient()
        parent = client.get_run(self.parent_run_id)
        tags = {"mlflow.parentRunId": self.parent_run_id, "optuna.study_name": self.study_name,
                "optuna.trial_number": str(number), "sweep.trial_uid": uid, "step": "distill",
                "exp": self.settings.exp, "sweep.worker": str(self.settings.worker),
                "asib.error": (error or "failed before the run started")[:5000]}
        run = client.create_run(parent.info.experiment_id, run_name=f"{self.study_name} trial {number}", tags=tags)
        client.set_terminated(run.info.run_id, status)
        return run.info.run_id


def _free_gpu_memory() -> None:
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
