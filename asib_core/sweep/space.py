"""Search spaces of ``-e sweep``: Hydra configs in ``configs/sweep/<name>.yaml``.

A space names Optuna distributions (``params``), keys computed from them (``derived``, e.g.
``ce_alpha: 1 - kd_alpha`` so that ``strict_mode`` holds) and the settings of the sampler and
the pruners. Every parameter becomes one Hydra override of the distillation run, by default
``experiment.<name>=<value>``. The keys are documented in docs/sweeps.md.
"""
from __future__ import annotations

import ast
import math
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asib_core.config.errors import ConfigError

PARAM_TYPES = ("float", "int", "categorical")
TOP_KEYS = {"params", "derived", "sampler", "pruner", "defaults"}
PARAM_KEYS = {"float": {"type", "low", "high", "log", "step", "key"},
              "int": {"type", "low", "high", "log", "step", "key"},
              "categorical": {"type", "choices", "key"}}
#: sampler name -> {setting: type}
SAMPLER_SETTINGS = {"tpe": {"n_startup_trials": int, "multivariate": bool, "constant_liar": bool, "group": bool},
                    "gp": {"n_startup_trials": int, "deterministic_objective": bool},
                    "random": {}}
SAMPLERS = tuple(SAMPLER_SETTINGS)
PRUNER_SETTINGS = {"median": {"n_startup_trials", "n_warmup_steps", "interval_steps", "n_min_trials"},
                   "successive_halving": {"min_resource", "reduction_factor", "min_early_stopping_rate",
                                          "bootstrap_count"},
                   "hyperband": {"min_resource", "max_resource", "reduction_factor", "bootstrap_count"}}
_SIMPLE_VALUE = re.compile(r"^[A-Za-z0-9_.:/+-]+$")


@dataclass
class ParamSpec:
    """One searched parameter: an Optuna distribution and the override key it sets."""
    name: str
    type: str
    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Any:
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def probe_value(self, end: int = 0) -> Any:
        """The first (end=0) or last (end=-1) value of the distribution, to check the overrides
        before the study starts."""
        if self.type == "categorical":
            return self.choices[end]
        return self.low if end == 0 else self.high


@dataclass
class Derived:
    """A key computed from the sampled parameters, e.g. ``ce_alpha = 1 - kd_alpha``."""
    name: str
    key: str
    expression: str
    tree: ast.Expression = field(repr=False, default=None)

    def value(self, params: dict) -> float:
        value = _evaluate(self.tree.body, params, self.name)
        if isinstance(self.tree.body, ast.Name) or not isinstance(value, float):
            return value                     # a copy (tau_start: tau) stays exactly equal
        # computed: 12 significant digits, so 1 - 0.7234 gives 0.2766, not 0.27659999999999996
        return float(f"{value:.12g}")


@dataclass
class SearchSpace:
    name: str
    source: str
    params: list[ParamSpec]
    derived: list[Derived]
    sampler: dict
    pruner: dict
    raw: dict

    @property
    def param_names(self) -> list[str]:
        return [p.name for p in self.params]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params] + [d.key for d in self.derived]

    def suggest(self, trial) -> dict:
        """Sample every parameter of a trial; returns {name: value} including derived keys."""
        values = {p.name: p.suggest(trial) for p in self.params}
        return self.complete(values)

    def complete(self, params: dict) -> dict:
        values = dict(params)
        for item in self.derived:
            values[item.name] = item.value(values)
        return values

    def overrides(self, values: dict) -> list[str]:
        """Hydra overrides of the values of one trial (parameters, then derived keys)."""
        keys = self.key_map
        return [f"{keys[name]}={format_value(value)}" for name, value in values.items() if name in keys]

    def probe_values(self, end: int = 0) -> dict:
        return self.complete({p.name: p.probe_value(end) for p in self.params})

    @property
    def key_map(self) -> dict:
        """name -> override key, for parameters and derived keys."""
        return {p.name: p.key for p in self.params} | {d.name: d.key for d in self.derived}


def format_value(value: Any) -> str:
    """A Python value as a Hydra override value (floats round-trip exactly)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"a sweep value must be finite, got {value!r}.")
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    text = str(value)
    if _SIMPLE_VALUE.match(text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def list_spaces() -> list[str]:
    from asib_core.config import config_dir
    folder = config_dir() / "sweep"
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_space(space: str) -> SearchSpace:
    """``NAME`` (configs/sweep/NAME.yaml, composed by Hydra) or a path to a YAML file."""
    from omegaconf import OmegaConf

    if space.endswith((".yaml", ".yml")) or "/" in space:
        path = Path(space)
        if not path.is_file():
            raise ConfigError(f"search space file '{space}' does not exist.")
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
        return parse_space(path.stem, str(path.resolve()), raw)
    known = list_spaces()
    if space not in known:
        raise ConfigError(
            f"unknown search space '{space}'. Known spaces: {', '.join(known) or '(none)'}; pass "
            "space=NAME for configs/sweep/NAME.yaml or space=/path/to/space.yaml."
        )
    from asib_core.config.compose import _compose, config_dir, to_container
    raw = to_container(_compose("config", [f"+sweep={space}"])).get("sweep") or {}
    return parse_space(space, str(config_dir() / "sweep" / f"{space}.yaml"), raw)


def parse_space(name: str, source: str, raw: dict) -> SearchSpace:
    where = f"search space '{name}' ({source})"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping with the key 'params'.")
    unknown = set(raw) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(TOP_KEYS - {'defaults'})}.")
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict) or not params_raw:
        raise ConfigError(f"{where}: 'params' must map at least one parameter name to its distribution.")
    params = [_parse_param(where, pname, spec) for pname, spec in params_raw.items()]
    derived = [_parse_derived(where, dname, expr, set(params_raw))
               for dname, expr in (raw.get("derived") or {}).items()]
    names = [p.name for p in params] + [d.name for d in derived]
    keys = [p.key for p in params] + [d.key for d in derived]
    for group in (names, keys):
        dup = sorted({k for k in group if group.count(k) > 1})
        if dup:
            raise ConfigError(f"{where}: {dup} appear more than once (each parameter sets one key).")
    sampler = parse_sampler(where, dict(raw.get("sampler") or {}))
    pruner = dict(raw.get("pruner") or {})
    for pname, settings in pruner.items():
        if pname not in PRUNER_SETTINGS:
            raise ConfigError(f"{where}: pruner settings for '{pname}' are not known; use {sorted(PRUNER_SETTINGS)}.")
        bad = set(settings or {}) - PRUNER_SETTINGS[pname]
        if bad:
            raise ConfigError(f"{where}: unknown pruner.{pname} settings {sorted(bad)}; "
                              f"allowed: {sorted(PRUNER_SETTINGS[pname])}.")
    return SearchSpace(name=name, source=source, params=params, derived=derived, sampler=sampler,
                       pruner={k: dict(v or {}) for k, v in pruner.items()},
                       raw={k: v for k, v in raw.items() if k != "defaults"})


def parse_sampler(where: str, sampler: dict, name: str | None = None) -> dict:
    """``{name: tpe|gp|random, <setting>: value}``; ``name`` (the sweep's ``sampler=`` option)
    replaces the space's sampler, keeping the settings the new one takes."""
    if name:
        sampler = {k: v for k, v in sampler.items() if k in SAMPLER_SETTINGS.get(name, {})} | {"name": name}
    sampler.setdefault("name", "tpe")
    kind = sampler["name"]
    if kind not in SAMPLERS:
        raise ConfigError(f"{where}: sampler '{kind}' is not known; use one of {', '.join(SAMPLERS)}.")
    allowed = SAMPLER_SETTINGS[kind]
    extra = set(sampler) - {"name"} - set(allowed)
    if extra:
        raise ConfigError(f"{where}: unknown settings {sorted(extra)} for sampler '{kind}'; allowed: "
                          f"{', '.join(['name', *allowed])}.")
    for key, kind_of in allowed.items():
        value = sampler.get(key)
        if value is None:
            continue
        if kind_of is bool and not isinstance(value, bool):
            raise ConfigError(f"{where}: sampler.{key} must be true or false, got {value!r}.")
        if kind_of is int and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"{where}: sampler.{key} must be a whole number >= 0, got {value!r}.")
    return sampler


def default_key(name: str) -> str:
    return name if name.startswith("experiment.") else f"experiment.{name}"


def _parse_param(where: str, name: str, spec: Any) -> ParamSpec:
    if not isinstance(spec, dict) or spec.get("type") not in PARAM_TYPES:
        raise ConfigError(f"{where}: parameter '{name}' needs 'type' as one of {PARAM_TYPES}.")
    kind = spec["type"]
    extra = set(spec) - PARAM_KEYS[kind]
    if extra:
        raise ConfigError(f"{where}: parameter '{name}' ({kind}) has unknown keys {sorted(extra)}; "
                          f"allowed: {sorted(PARAM_KEYS[kind])}.")
    key = str(spec.get("key") or default_key(name))
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ConfigError(f"{where}: categorical parameter '{name}' needs a non-empty 'choices' list.")
        bad = [c for c in choices if c is not None and not isinstance(c, (bool, int, float, str))]
        if bad:
            raise ConfigError(f"{where}: choices of '{name}' must be numbers, strings, booleans or null; got {bad}.")
        return ParamSpec(name=name, type=kind, key=key, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: parameter '{name}' ({kind}) needs 'low' and 'high'.")
    cast = float if kind == "float" else int
    try:
        low, high = cast(spec["low"]), cast(spec["high"])
        step = None if spec.get("step") is None else cast(spec["step"])
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: 'low', 'high' and 'step' of '{name}' must be {kind} numbers.") from None
    log = bool(spec.get("log", False))
    if not low < high:
        raise ConfigError(f"{where}: parameter '{name}' needs low < high, got low={low}, high={high}.")
    if log and low <= 0:
        raise ConfigError(f"{where}: log-scaled parameter '{name}' needs low > 0, got {low}.")
    if log and step is not None and kind == "float":
        raise ConfigError(f"{where}: parameter '{name}' cannot have both 'log: true' and 'step'.")
    return ParamSpec(name=name, type=kind, key=key, low=low, high=high, log=log, step=step)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _parse_derived(where: str, name: str, spec: Any, param_names: set) -> Derived:
    """``name: EXPRESSION`` or ``name: {expr: EXPRESSION, key: OVERRIDE_KEY}``."""
    key = default_key(name)
    if isinstance(spec, dict):
        extra = set(spec) - {"expr", "key"}
        if extra or "expr" not in spec:
            raise ConfigError(f"{where}: derived key '{name}' takes 'expr' (and optionally 'key').")
        key = str(spec.get("key") or key)
        spec = spec["expr"]
    expression = str(spec)
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ConfigError(f"{where}: derived key '{name}': cannot parse '{expression}'.") from None
    for node in ast.walk(tree.body):
        if isinstance(node, ast.Name):
            if node.id not in param_names:
                raise ConfigError(f"{where}: derived key '{name}' uses '{node.id}', which is not a parameter "
                                  f"of the space ({sorted(param_names)}).")
        elif isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)) or isinstance(node.value, bool):
                raise ConfigError(f"{where}: derived key '{name}': only numbers are allowed as constants.")
        elif not isinstance(node, (ast.BinOp, ast.UnaryOp, ast.Load, *_OPS)):
            raise ConfigError(f"{where}: derived key '{name}': '{expression}' may only use numbers, "
                              "parameter names, + - * / ** and parentheses.")
    return Derived(name=name, key=key, expression=expression, tree=tree)


def _evaluate(node: ast.AST, values: dict, name: str) -> float:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, ast.UnaryOp):
        return _OPS[type(node.op)](_evaluate(node.operand, values, name))
    if isinstance(node, ast.BinOp):
        return _OPS[type(node.op)](_evaluate(node.left, values, name), _evaluate(node.right, values, name))
    raise ConfigError(f"derived key '{name}': unsupported expression node {type(node).__name__}.")
