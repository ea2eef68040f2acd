"""The Optuna study of a sweep: create or resume it, sampler and pruner, trial accounting.

**Counting.** ``n_trials`` is the study's total. A trial counts when it is RUNNING or ended by
itself (COMPLETE, PRUNED, FAIL). A trial cut short by its worker (Ctrl-C, or a worker process
that died, found by the next worker on that machine) is recorded as FAIL with the user attribute
``asib.interrupted`` and does not count, so resuming the study runs a replacement.
"""
from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass

from asib_core.config.errors import ConfigError

from .space import SearchSpace
from .storage import StudyStorage

log = logging.getLogger("asib.sweep")

PRUNERS = ("median", "hyperband", "none")
SIGNATURE_ATTR = "asib.sweep"
WORKER_ATTR = "asib.worker"
INTERRUPTED_ATTR = "asib.interrupted"


def worker_identity() -> str:
    """host:pid:start-time of this process (start time guards against a reused pid)."""
    import psutil
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{psutil.Process(pid).create_time():.3f}"


def _alive_here(identity: str) -> bool | None:
    """True/False for a worker of this host, None for a worker of another host."""
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


def build_sampler(space: SearchSpace, seed: int):
    import optuna
    settings = {k: v for k, v in space.sampler.items() if k != "name"}
    if space.sampler["name"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, **settings)


def build_pruner(name: str, space: SearchSpace, total_epochs: int):
    import optuna
    if name not in PRUNERS:
        raise ConfigError(f"pruner='{name}' is not known; use one of {', '.join(PRUNERS)}.")
    settings = dict(space.pruner.get(name) or {})
    if name == "median":
        return optuna.pruners.MedianPruner(**settings)
    if name == "hyperband":
        settings.setdefault("min_resource", 1)
        settings.setdefault("max_resource", max(int(total_epochs), 1))
        settings.setdefault("reduction_factor", 3)
        return optuna.pruners.HyperbandPruner(**settings)
    return optuna.pruners.NopPruner()


def sampler_seed(base_seed: int, *position: int) -> int:
    """The seed of the sampler for the trial asked at ``position`` (the study's trial counts at
    that moment, unique under the ask lock): a fresh single-worker study is reproducible, no two
    trials of any workers share a seed, and a resumed study does not repeat its first draws."""
    import numpy as np
    return int(np.random.SeedSequence([int(base_seed), *map(int, position)]).generate_state(1)[0])


@dataclass
class Signature:
    """What a study was created for; a resumed study must match it."""
    exp: str
    overrides: list
    params: list
    objective: str = "val/best_acc"

    def as_dict(self) -> dict:
        return {"exp": self.exp, "overrides": list(self.overrides), "params": sorted(self.params),
                "objective": self.objective}


def open_study(store: StudyStorage, name: str, signature: Signature, sampler, pruner):
    """Create the study, or load it (same name) after checking it was made for this sweep."""
    import optuna
    from optuna.study import StudyDirection

    study = optuna.create_study(study_name=name, storage=store.storage, direction="maximize",
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    if study.direction != StudyDirection.MAXIMIZE:
        raise ConfigError(f"study '{name}' in {store.description} minimises; a sweep maximises the validation "
                          "accuracy. Use another study_name.")
    wanted = signature.as_dict()
    with store.ask_lock(name):
        found = study.user_attrs.get(SIGNATURE_ATTR)
        if found is None:
            study.set_user_attr(SIGNATURE_ATTR, wanted)
            found = wanted
    if found != wanted:
        raise ConfigError(
            f"study '{name}' in {store.description} was created for {json.dumps(found, sort_keys=True)}, but this "
            f"sweep is {json.dumps(wanted, sort_keys=True)}. Resume it with the same exp, overrides and search-space "
            "parameters, or start a new study with another study_name."
        )
    return study


def counted(trial) -> bool:
    from optuna.trial import TrialState
    if trial.state == TrialState.WAITING:
        return False
    return not (trial.state == TrialState.FAIL and trial.user_attrs.get(INTERRUPTED_ATTR))


def count_trials(study) -> int:
    return sum(1 for t in study.get_trials(deepcopy=False) if counted(t))


def fail_orphans(study) -> list[int]:
    """RUNNING trials whose worker (a process of this host) is gone: FAIL + interrupted."""
    from optuna.trial import TrialState
    storage = study._storage  # noqa: SLF001 - the public Study has no per-trial state setter
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(WORKER_ATTR)
        if owner and _alive_here(owner) is False:
            try:
                storage.set_trial_user_attr(trial._trial_id, INTERRUPTED_ATTR, "worker process died")
                study.tell(trial.number, state=TrialState.FAIL)
                failed.append(trial.number)
            except Exception:  # noqa: BLE001 - another worker got there first
                continue
    if failed:
        log.warning("trials %s were left RUNNING by a worker that no longer runs: recorded as FAIL "
                    "(interrupted, not counted)", failed)
    return failed


def ask_next(study, store: StudyStorage, n_trials: int, identity: str, make_sampler=None, seed: int = 0):
    """The next trial of this worker, or None once the study holds n_trials counted trials.

    ``make_sampler(seed)`` builds the sampler of this trial (samplers read the study's history from
    the storage, so a fresh one per trial loses nothing), seeded from ``seed`` and the study's
    trial counts."""
    with store.ask_lock(study.study_name):
        fail_orphans(study)
        done = count_trials(study)
        if done >= n_trials:
            return None
        if make_sampler is not None:
            study.sampler = make_sampler(sampler_seed(seed, len(study.get_trials(deepcopy=False)), done))
        trial = study.ask()
        trial.set_user_attr(WORKER_ATTR, identity)
        return trial
