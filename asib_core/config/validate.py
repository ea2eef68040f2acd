"""The one validator of a config: every key's domain and the cross-key rules (issue #14).

The domains are written next to each key in ``asib_core/config/keys.yaml``:

- ``range``: an interval such as ``"[0, 1)"`` or ``"(0, inf)"`` (brackets inclusive,
  parentheses exclusive); for a list it applies to every element;
- ``choices``: the allowed values;
- ``rules``: a cross-key rule in words, enforced by the function registered here for that key
  with :func:`rule` (a test keeps the two in step).

Besides, no number may be NaN, and none may be infinite unless its range includes ``inf``.
``null`` passes wherever the key's type allows it (what null means is in the key's meaning).

:func:`config_problems` returns every problem of a config, the key reference's own (unknown
keys, wrong types, planned keys) included; :func:`refuse` turns them into one
:class:`ConfigError` paragraph naming each key, its value and what is allowed. Both resolution
paths call them before any data or model is touched: ``resolve_experiment`` (the config CLI,
``distill``, ``main`` and every sweep trial) and ``finetune_config`` (``finetune``).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Iterable

from .errors import ConfigError
from .reference import KeySpec, find_spec, leaf_items, load_reference, reference_problems

SECTIONS = ("run", "finetune")
OVERRIDE_FORM = {"run": "experiment.KEY=VALUE", "finetune": "KEY=VALUE"}
_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s]+)\s*([\])])\s*$")
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


# --------------------------------------------------------------------------- domains

@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    low_closed: bool
    high_closed: bool
    text: str

    def __contains__(self, value: float) -> bool:
        if math.isnan(value):
            return False
        above = value >= self.low if self.low_closed else value > self.low
        below = value <= self.high if self.high_closed else value < self.high
        return above and below


def _bound(text: str) -> float:
    word = text.strip().lower()
    if word in ("inf", "+inf"):
        return math.inf
    if word == "-inf":
        return -math.inf
    return float(word)


@lru_cache(maxsize=None)
def parse_interval(text: str) -> Interval:
    """``"[0, 1)"`` -> :class:`Interval`; a malformed text is an error in keys.yaml."""
    match = _INTERVAL.match(str(text))
    if not match:
        raise ValueError(f"keys.yaml: range {text!r} is not an interval such as '[0, 1)' or '(0, inf)'")
    opening, low, high, closing = match.groups()
    try:
        interval = Interval(_bound(low), _bound(high), opening == "[", closing == "]",
                            f"{opening}{low}, {high}{closing}")
    except ValueError:
        raise ValueError(f"keys.yaml: range {text!r} has a bound that is not a number or inf") from None
    if interval.low > interval.high:
        raise ValueError(f"keys.yaml: range {text!r} is empty")
    return interval


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def show(value: Any) -> str:
    return repr(value)


def allowed(spec: KeySpec) -> str:
    """What the key accepts, in words: 'an integer in [1, inf)', 'one of sgd, adamw', ..."""
    kinds = {t.strip() for t in spec.type.split("|")}
    if spec.choices is not None:
        text = "one of " + ", ".join(show(c) for c in spec.choices)
    elif spec.range:
        noun = "an integer" if "int" in kinds and "float" not in kinds else "a number"
        if "list" in kinds and not kinds & {"int", "float"}:
            noun = "a list of numbers, each"
        text = f"{noun} in {parse_interval(spec.range).text}"
        if "list" in kinds and kinds & {"int", "float"}:
            text += " (or a list of such)"
    else:
        text = f"a finite {spec.type}"
    return text + (" or null" if "null" in kinds else "")


def _item_problem(spec: KeySpec, item: Any) -> str | None:
    interval = parse_interval(spec.range) if spec.range else None
    if is_number(item) and not math.isfinite(item) and (interval is None or item not in interval):
        return f"{'NaN' if math.isnan(item) else 'an infinite value'} is not allowed, it must be {allowed(spec)}"
    if interval is not None:
        if not is_number(item):
            return f"{show(item)} is not a number, it must be {allowed(spec)}"
        if item not in interval:
            return f"it must be {allowed(spec)}"
    if spec.choices is not None and item not in spec.choices:
        return f"it must be {allowed(spec)}"
    return None


def domain_problem(spec: KeySpec, value: Any) -> str | None:
    """Why ``value`` lies outside the key's domain (None: inside). The type is checked elsewhere."""
    if value is None or isinstance(value, dict):
        return None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    for item in items:
        problem = _item_problem(spec, item)
        if problem:
            return problem
    return None


def domain_problems(cfg: dict, section: str = "run") -> list[str]:
    specs = load_reference(section)
    problems = []
    for key, value in leaf_items(cfg):
        spec = find_spec(key, specs)
        if spec is None or not spec.accepts(value):
            continue  # reported by the reference check
        problem = domain_problem(spec, value)
        if problem:
            problems.append(f"{key}={show(value)}: {problem}")
    return problems


# --------------------------------------------------------------------------- cross-key rules

RuleFn = Callable[[dict], Iterable[str]]
RULES: dict[tuple[str, str], RuleFn] = {}


def rule(sections: str | tuple[str, ...], key: str):
    """Register the check of the ``rules`` text of ``key`` in keys.yaml (per section)."""
    def register(fn: RuleFn) -> RuleFn:
        for section in (sections,) if isinstance(sections, str) else sections:
            RULES[(section, key)] = fn
        return fn
    return register


def _finite(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


@rule("run", "student_epochs_per_stage")
def _stage_epochs(cfg: dict) -> list[str]:
    epochs, stages = cfg.get("student_epochs_per_stage"), cfg.get("num_stages")
    if isinstance(epochs, (list, tuple)):
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in epochs):
            return []
        stages = stages if isinstance(stages, int) and stages >= 1 else (len(epochs) or 1)
        if len(epochs) not in (1, stages):
            return [f"student_epochs_per_stage={show(list(epochs))} with num_stages={stages}: give one "
                    f"epoch count per stage ({stages} entries), or one number for every stage"]
        total = sum(epochs) * (stages if len(epochs) == 1 else 1)
    elif isinstance(epochs, int) and not isinstance(epochs, bool):
        total = epochs * (stages if isinstance(stages, int) and stages >= 1 else 1)
    else:
        return []
    if total < 1 and all(e >= 0 for e in (epochs if isinstance(epochs, (list, tuple)) else [epochs])):
        return [f"student_epochs_per_stage={show(epochs)}: the student would train for 0 epochs; "
                "give at least one epoch in total"]
    return []


@rule("run", "tau_start")
def _tau_pair(cfg: dict) -> list[str]:
    start, end = cfg.get("tau_start"), cfg.get("tau_end")
    if (start is None) != (end is None):
        return [f"tau_start={show(start)}, tau_end={show(end)}: set both (a linear temperature "
                "schedule) or neither"]
    return []


@rule("run", "tau_schedule")
def _tau_schedule(cfg: dict) -> list[str]:
    sched = cfg.get("tau_schedule")
    if isinstance(sched, (list, tuple)) and len(sched) != 2:
        return [f"tau_schedule={show(sched)}: it must be [start, end] (two temperatures) or null"]
    return []


@rule("run", "teacher_weights")
def _teacher_weights(cfg: dict) -> list[str]:
    weights = cfg.get("teacher_weights")
    if not isinstance(weights, (list, tuple)) or not all(_finite(w) for w in weights):
        return []
    teachers = [r for r in ("teacher1", "teacher2") if isinstance(cfg.get(r), dict) and cfg[r].get("name")]
    problems = []
    if teachers and len(weights) != len(teachers):
        problems.append(f"teacher_weights={show(list(weights))}: give one weight per teacher "
                        f"({len(teachers)}: {', '.join(teachers)}), or null for equal weights")
    if weights and sum(weights) <= 0:
        problems.append(f"teacher_weights={show(list(weights))}: the weights must have a positive sum")
    return problems


@rule("run", "max_cw")
def _certainty_clip(cfg: dict) -> list[str]:
    low, high = cfg.get("min_cw"), cfg.get("max_cw")
    if _finite(low) and _finite(high) and low > high:
        return [f"min_cw={show(low)}, max_cw={show(high)}: min_cw must not exceed max_cw"]
    return []


@rule("run", "kd_ens_alpha_max")
def _ensemble_share(cfg: dict) -> list[str]:
    low, high = cfg.get("kd_ens_alpha"), cfg.get("kd_ens_alpha_max")
    if _finite(low) and _finite(high) and high < low:
        return [f"kd_ens_alpha={show(low)}, kd_ens_alpha_max={show(high)}: kd_ens_alpha_max must lie "
                "in [kd_ens_alpha, 1] (or be null for a constant share)"]
    return []


@rule("run", "kd_max_ratio")
def _kd_cap_needs_ce(cfg: dict) -> list[str]:
    ratio, ce, kd = cfg.get("kd_max_ratio"), cfg.get("ce_alpha"), cfg.get("kd_alpha")
    if ratio is not None and _finite(ce) and _finite(kd) and ce == 0 and kd > 0 \
            and cfg.get("method_name") != "ce":
        return [f"kd_max_ratio={show(ratio)} with ce_alpha=0: the cap compares the KD term with the CE term, "
                "which is off; set kd_max_ratio=null or ce_alpha > 0"]
    return []


@rule("run", "kd_ens_alpha_ramp")
def _ensemble_ramp(cfg: dict) -> list[str]:
    epochs = cfg.get("teacher_adapt_kd_warmup")
    if cfg.get("kd_ens_alpha_ramp") is True and _finite(epochs) and epochs > 0:
        return [f"kd_ens_alpha_ramp=True with teacher_adapt_kd_warmup={show(epochs)}: the ramp sets the "
                "ensemble share of every B-step epoch, so the mixing-epoch count would do nothing; set "
                "teacher_adapt_kd_warmup=0 or kd_ens_alpha_ramp=false"]
    return []


@rule(SECTIONS, "device")
def _device(cfg: dict) -> list[str]:
    device = cfg.get("device")
    if isinstance(device, str) and not _DEVICE.match(device.strip().lower()):
        return [f"device={show(device)}: it must be auto, cuda, cuda:N (N = a GPU index) or cpu"]
    return []


@rule("finetune", "subset")
def _class_subset(cfg: dict) -> list[str]:
    pct, subset = cfg.get("overlap_pct"), cfg.get("subset")
    if subset is not None and pct is None:
        return [f"subset={show(subset)} without overlap_pct: a class subset needs overlap_pct (the "
                "share of classes both teachers see); set both or neither"]
    if pct is not None and subset is None:
        return [f"overlap_pct={show(pct)} without subset: say which teacher's classes to train on "
                "with subset=1 or subset=2, or set overlap_pct=null"]
    return []


@rule("finetune", "restart_multiplier")
def _restart_multiplier(cfg: dict) -> list[str]:
    value = cfg.get("restart_multiplier")
    if _finite(value) and value >= 1 and float(value) != int(value):  # below 1: the range says
        return [f"restart_multiplier={show(value)}: cosine_warm_restarts grows each period by a whole "
                "factor (1 = equal periods, 2 = doubling)"]
    return []


@rule("finetune", "finetune_momentum")
def _sgd_only_keys(cfg: dict) -> list[str]:
    if cfg.get("finetune_optimizer") == "sgd":
        return []
    defaults = {"finetune_momentum": 0.9, "finetune_nesterov": True}
    changed = [f"{k}={show(cfg[k])}" for k, v in defaults.items() if k in cfg and cfg[k] != v]
    if changed:
        return [f"{', '.join(changed)} with finetune_optimizer={show(cfg.get('finetune_optimizer'))}: "
                "only SGD uses momentum; set finetune_optimizer=sgd, or leave them at their defaults"]
    return []


def rule_problems(cfg: dict, section: str = "run") -> list[str]:
    problems: list[str] = []
    for (where, _key), check in RULES.items():
        if where == section:
            problems.extend(check(cfg))
    return problems


# --------------------------------------------------------------------------- the one entry point

def config_problems(cfg: dict, section: str = "run", *, for_run: bool = True) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of a config: unknown keys, wrong types and planned keys (the key
    reference), values outside their domain, broken cross-key rules. Notes: planned keys of a
    config that is only printed (``for_run=False``)."""
    problems, notes = reference_problems(cfg, section, for_run=for_run)
    problems += domain_problems(cfg, section)
    problems += rule_problems(cfg, section)
    return problems, notes


def refuse(problems: Iterable[str], section: str = "run", context: str = "") -> None:
    """Raise one :class:`ConfigError` listing every problem (nothing happens without problems)."""
    unique = list(dict.fromkeys(problems))
    if not unique:
        return
    what = f"the config{f' of {context}' if context else ''} cannot run as given"
    count = f" ({len(unique)} problems)" if len(unique) > 1 else ""
    raise ConfigError(
        f"{what}{count}: " + "; ".join(unique) + ". Each key's type and allowed values are listed in "
        f"docs/configuration.md; correct the value in the config file or override it as "
        f"{OVERRIDE_FORM.get(section, 'KEY=VALUE')}."
    )


def validate_config(cfg: dict, section: str = "run", *, for_run: bool = True, context: str = "") -> list[str]:
    """Refuse a config with any problem (one paragraph naming them all); returns the notes."""
    problems, notes = config_problems(cfg, section, for_run=for_run)
    refuse(problems, section, context)
    return notes
