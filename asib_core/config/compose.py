"""Compose the Hydra config tree in ``configs/`` (compose API, no @hydra.main).

``exp=NAME`` selects ``configs/experiment/NAME.yaml``. Overrides are Hydra
override strings; the experiment's keys are addressed as ``experiment.KEY=VALUE``.
A few group shortcuts are translated to the package-qualified form Hydra needs:

- ``dataset=NAME``   -> ``dataset@experiment.dataset=NAME`` plus
  ``experiment.dataset.name=NAME`` (experiments that spell out their dataset name
  would otherwise keep it)
- ``schedule=NAME``  -> ``schedule@experiment.schedule=NAME``
- ``method=NAME``    -> ``experiment/method=NAME`` (the experiment's method file)
- ``teacher1=NAME``  -> ``model/teacher@experiment.teacher1=NAME`` (same for teacher2)
- ``student=NAME``   -> ``model/student@experiment.model.student=NAME``
- ``anchor=NAME``    -> the ``configs/anchor`` group (e.g. ``anchor=fair_baseline``)
- ``method_preset=NAME`` -> the alternative method files in ``configs/method``
- ``recipe=NAME``    -> the ``configs/recipe`` group (a paper recipe) plus the selection of
  the recipe's method file (``experiment/method=<its method>``); a ``method=`` override that
  names another method, ``method_preset=`` and ``anchor=`` are refused next to it
- ``seed=N``         -> ``experiment.seed=N``

An override of an ``experiment.*`` key that the composed tree does not contain is
added (``++``); unknown keys are then refused by the key reference check.
"""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from .errors import ConfigError

_SHORTCUTS = {
    "dataset": "dataset@experiment.dataset",
    "schedule": "schedule@experiment.schedule",
    "method": "experiment/method",
    "teacher1": "model/teacher@experiment.teacher1",
    "teacher2": "model/teacher@experiment.teacher2",
    "student": "model/student@experiment.model.student",
    "method_preset": "method",
}


def config_dir() -> Path:
    """The configs/ directory (``$ASIB_CONFIG_DIR`` overrides)."""
    env = os.environ.get("ASIB_CONFIG_DIR")
    if env:
        return Path(env).resolve()
    return (Path(__file__).resolve().parents[2] / "configs").resolve()


def _group_names(group: str) -> list[str]:
    path = config_dir() / group
    if not path.is_dir():
        return []
    return sorted(p.stem for p in path.glob("*.yaml"))


def list_experiments() -> list[str]:
    return _group_names("experiment")


def list_finetune_recipes() -> list[str]:
    return _group_names("finetune")


def list_methods() -> list[str]:
    return _group_names("experiment/method")


def list_recipes() -> list[str]:
    """Selectable paper recipes (``configs/recipe``; names starting with ``_`` are shared parts)."""
    return [name for name in _group_names("recipe") if not name.startswith("_")]


def recipe_method(name: str) -> str:
    """The method a paper recipe selects (its ``method:`` entry)."""
    known = list_recipes()
    if name not in known:
        raise ConfigError(
            f"unknown recipe '{name}'. Known recipes: {', '.join(known)}. A recipe runs a baseline "
            f"with its paper's weights (files in {config_dir() / 'recipe'}); select one with recipe=NAME."
        )
    raw = OmegaConf.to_container(OmegaConf.load(config_dir() / "recipe" / f"{name}.yaml"))
    method = (raw or {}).get("method")
    if not method:
        raise ConfigError(f"recipe '{name}' names no method: every recipe file needs 'method: NAME'.")
    return str(method)


def group_choices(overrides: list[str] | tuple) -> dict[str, str]:
    """The plain ``KEY=VALUE`` overrides (no ``+``/``~``, no dot), last one per key."""
    choices = {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key and "." not in key and key[0] not in "+~":
            choices[key] = value
    return choices


def _recipe_overrides(overrides: list[str] | tuple) -> list[str]:
    """``experiment/method=<the recipe's method>`` for ``recipe=NAME`` (nothing without one)."""
    choices = group_choices(overrides)
    if "recipe" not in choices:
        return []
    name = choices["recipe"]
    method = recipe_method(name)
    clash = [k for k in ("method_preset", "anchor") if k in choices]
    if clash:
        raise ConfigError(
            f"recipe={name} cannot be combined with {clash[0]}={choices[clash[0]]}: a recipe sets the "
            "method and its weights itself. Drop one of the two."
        )
    if "method" in choices:
        if choices["method"] != method:
            raise ConfigError(
                f"recipe={name} runs method '{method}', but method={choices['method']} was given too. "
                f"Drop method=..., or pick the recipe of that method."
            )
        return []
    return [f"experiment/method={method}"]


def translate_override(item: str) -> list[str]:
    """Translate a user override into the Hydra override(s) Hydra needs."""
    if "=" not in item:
        raise ConfigError(
            f"malformed override '{item}': overrides have the form KEY=VALUE "
            f"(for example experiment.ib_beta=1e-4 or dataset=cifar10)."
        )
    key, value = item.split("=", 1)
    bare = key.lstrip("+~")
    prefix = key[: len(key) - len(bare)]
    if not bare:
        raise ConfigError(f"malformed override '{item}': the key before '=' is empty.")
    if bare == "experiment" and not prefix:
        raise ConfigError(
            f"'{item}' is not an override: the experiment config is chosen once, with exp=NAME "
            f"(here exp={value}), before the overrides. (experiment=NAME names an MLflow experiment only "
            "for the report entry point.)"
        )
    if bare == "recipe" and prefix:
        raise ConfigError(f"'{item}': select a paper recipe as recipe=NAME, without '{prefix}'.")
    if bare == "dataset" and not prefix:
        return [f"{_SHORTCUTS[bare]}={value}", f"++experiment.dataset.name={value}"]
    if bare in _SHORTCUTS and not prefix:
        return [f"{_SHORTCUTS[bare]}={value}"]
    if bare == "seed" and not prefix:
        return [f"experiment.seed={value}"]
    if bare.startswith("experiment.") and not prefix:
        return [f"++{bare}={value}"]
    return [item]


def _compose(config_name: str, overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain_hydra_error(exc, overrides)) from None


def _explain_hydra_error(exc: Exception, overrides: list[str]) -> str:
    text = str(exc).strip().replace("\n", " ")
    return (
        f"could not compose the config with overrides {overrides}: {text} "
        "Check the override's key and value (keys of the experiment are written "
        "experiment.KEY=VALUE; groups as dataset=NAME, method=NAME, student=NAME)."
    )


def compose_experiment(exp: str, overrides: list[str] | tuple = ()) -> DictConfig:
    """Compose ``configs/experiment/<exp>.yaml`` with the given overrides."""
    known = list_experiments()
    if exp not in known:
        raise ConfigError(
            f"unknown experiment '{exp}'. Known experiments: {', '.join(known)}. "
            f"Pass one of them as exp=NAME (files live in {config_dir() / 'experiment'})."
        )
    hydra_overrides = [f"experiment={exp}"] + [h for o in overrides for h in translate_override(o)]
    return _compose("config", hydra_overrides + _recipe_overrides(overrides))


def compose_finetune(recipe: str, overrides: list[str] | tuple = ()) -> DictConfig:
    """Compose ``configs/finetune/<recipe>.yaml`` (a global-package teacher recipe)."""
    known = list_finetune_recipes()
    if recipe not in known:
        raise ConfigError(
            f"unknown fine-tune recipe '{recipe}'. Known recipes: {', '.join(known)}. "
            "A recipe is named <teacher>_<dataset> (files in configs/finetune)."
        )
    hydra_overrides = [f"finetune={recipe}"] + [_finetune_override(o) for o in overrides]
    return _compose("config", hydra_overrides)


def _finetune_override(item: str) -> str:
    if "=" not in item:
        raise ConfigError(f"malformed override '{item}': overrides have the form KEY=VALUE.")
    key, value = item.split("=", 1)
    if key.startswith(("+", "~")):
        return item
    return f"++{key}={value}"


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
