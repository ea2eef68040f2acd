"""The Optuna study of a sweep: create or resume it, sampler and pruner, trial accounting.

**Counting.** ``n_trials`` is the study's total. A trial counts when it is RUNNING or ended by
itself (COMPLETE, PRUNED, FAIL). A trial cut short by its worker (Ctrl-C, or a worker that
died: recovery.py) ends FAIL and is retried with the same parameters; the retried trial does
not count, its retry does (unless the retries are used up: then the FAIL counts).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from asib_core.config.errors import ConfigError

from .recovery import ATTEMPT_ATTRS, WORKER_ATTR, Heartbeat, fail_dead_trials, quiet_experimental, retried_numbers
from .space import SearchSpace
from .storage import StudyStorage

log = logging.getLogger("asib.sweep")

PRUNERS = ("median", "successive_halving", "hyperband", "none")
SIGNATURE_ATTR = "asib.sweep"


def build_sampler(space: SearchSpace, seed: int):
    """TPE (multivariate, constant liar: workers in parallel steer away from each other's
    running trials), Optuna's Gaussian-process sampler (small continuous spaces) or random."""
    import optuna
    settings = {k: v for k, v in space.sampler.items() if k != "name"}
    name = space.sampler["name"]
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, **settings)
    settings.setdefault("multivariate", True)
    settings.setdefault("constant_liar", True)
    with quiet_experimental():   # multivariate and group are experimental in Optuna
        return optuna.samplers.TPESampler(seed=seed, **settings)


def build_pruner(name: str, space: SearchSpace, total_epochs: int):
    """Steps are student epochs; the resource-based pruners (successive halving, Hyperband)
    count their resource in epochs: ``min_resource`` epochs before the first decision."""
    import optuna
    if name not in PRUNERS:
        raise ConfigError(f"pruner='{name}' is not known; use one of {', '.join(PRUNERS)}.")
    settings = dict(space.pruner.get(name) or {})
    if name == "median":
        return optuna.pruners.MedianPruner(**settings)
    if name == "successive_halving":
        settings.setdefault("min_resource", 1)
        settings.setdefault("reduction_factor", 3)
        return optuna.pruners.SuccessiveHalvingPruner(**settings)
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


def counted(trial, retried: set) -> bool:
    """Does this trial take one of the study's ``n_trials`` slots?"""
    from optuna.trial import TrialState
    if trial.state == TrialState.WAITING:
        return False
    return not (trial.state == TrialState.FAIL and trial.number in retried)


def count_trials(study) -> int:
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(1 for t in trials if counted(t, retried))


def recover(study, store: StudyStorage) -> None:
    """Fail and retry the trials of dead workers: heartbeat-stale ones (database storages;
    Optuna calls ``store.on_dead``) and those of dead processes of this host."""
    import optuna
    if store.heartbeat:
        with quiet_experimental():
            optuna.storages.fail_stale_trials(study)
    fail_dead_trials(study, store.on_dead, store.locked)


def ask_next(study, store: StudyStorage, n_trials: int, identity: str, make_sampler=None, seed: int = 0):
    """The next trial of this worker, or None once the study holds n_trials counted trials.

    Retries of trials whose worker died come first (Optuna asks WAITING trials first).
    ``make_sampler(seed)`` builds the sampler of this trial (samplers read the study's history from
    the storage, so a fresh one per trial loses nothing), seeded from ``seed`` and the study's
    trial counts."""
    with store.ask_lock(study.study_name):
        recover(study, store)
        done = count_trials(study)
        if done >= n_trials:
            return None
        if make_sampler is not None:
            study.sampler = make_sampler(sampler_seed(seed, len(study.get_trials(deepcopy=False)), done))
        with quiet_experimental():
            trial = study.ask()
        trial.set_user_attr(WORKER_ATTR, identity)
        for key in ATTEMPT_ATTRS:
            if trial.user_attrs.get(key):
                trial.set_user_attr(key, "")
        Heartbeat(store.storage, study.study_name, trial.number).beat()   # stale-able from now on
        return trial
