"""From the composed Hydra tree to the flat effective config (decisions.md, spec 0.3).

Steps, in order:
1. take the ``experiment`` subtree; copy the root keys ``results_dir, exp_id, seed,
   log_level, device`` in when present at root;
2. flatten accidental double nesting (``dataset.dataset`` ...);
3. promote the method's keys, fill-only (decisions.md, "Precedence (corrected)"): a key
   that the experiment file, a config it composes into its node (``/base``) or an
   ``experiment.*`` override sets counts as set at experiment level; the method file
   fills only keys that none of them sets. In effect experiment > base > method for keys
   base sets, experiment > method otherwise;
4. merge the paper recipe (``recipe=NAME``, ``configs/recipe``) over the result, except the
   keys an override sets (override > recipe > experiment file > base > method file), and
   record its name as ``recipe``; or merge the anchor (``anchor=fair_baseline``) over the
   result, remembering the pre-merge values of the protected keys (the two are exclusive);
5. method policy: non-ASIB methods run with IB, A-step, CCCP, feature KD and the hybrid
   ensemble term off;
   ``force_ppf_off`` switches partial freezing off;
6. ``strict_mode``: ``ce_alpha + kd_alpha == 1`` or refuse (``auto_renorm`` rescales);
7. numeric casting of strings.
"""
from __future__ import annotations

import copy
from typing import Any

from omegaconf import OmegaConf

from .casting import cast_numbers
from .compose import compose_experiment, config_dir, group_choices, to_container
from .errors import ConfigError

ROOT_KEYS = ("results_dir", "exp_id", "seed", "log_level", "device")
NESTED_GROUPS = ("dataset", "schedule", "teacher1", "teacher2", "anchor")
ASIB_FAMILY = {"asib", "asib_stage", "asib_ablation_stage", "asib_ablation_ce"}
ANCHOR_PROTECTED = (
    "ce_alpha", "kd_alpha", "tau", "tau_schedule", "ce_label_smoothing", "optimizer",
    "student_lr", "student_weight_decay", "dataset.batch_size", "mixup_alpha",
    "cutmix_alpha_distill", "use_partial_freeze", "student_freeze_bn",
    "student_freeze_level", "student_freeze_level_schedule",
    "teacher1_freeze_level", "teacher1_freeze_level_schedule",
    "teacher2_freeze_level", "teacher2_freeze_level_schedule",
    "teacher1_freeze_bn", "teacher2_freeze_bn",
)
STRICT_TOL = 1e-8


def get_dotted(cfg: dict, key: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def has_dotted(cfg: dict, key: str) -> bool:
    sentinel = object()
    return get_dotted(cfg, key, sentinel) is not sentinel


def set_dotted(cfg: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = cfg
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _unwrap(node: dict, name: str) -> dict:
    """``{name: {...}}`` (a group file that repeats its own package) -> ``{...}``."""
    while isinstance(node, dict) and set(node) == {name} and isinstance(node[name], dict):
        node = node[name]
    return node


def _load_raw(path) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def _walk_keys(node: dict, prefix: str, keys: set[str]) -> None:
    for k, v in node.items():
        dotted = f"{prefix}{k}"
        keys.add(dotted)
        if isinstance(v, dict):
            _walk_keys(v, dotted + ".", keys)


def _composed_configs(raw: dict) -> list[dict]:
    """The plain configs (``- /base``) an experiment file's defaults list composes in."""
    found = []
    for entry in raw.get("defaults", []) or []:
        if isinstance(entry, str) and entry not in ("_self_",):
            path = config_dir() / f"{entry.lstrip('/')}.yaml"
            if path.is_file():
                found.append(_load_raw(path))
    return found


def _explicit_experiment_keys(exp: str, overrides: list[str]) -> set[str]:
    """Dotted keys set at experiment level: by the experiment file, by a config it composes
    into the experiment node (``/base``: decisions.md, "Precedence (corrected)"), or by an
    ``experiment.*`` override."""
    raw = _load_raw(config_dir() / "experiment" / f"{exp}.yaml")
    keys: set[str] = set()
    for composed in _composed_configs(raw):
        _walk_keys(composed.get("experiment") or {}, "", keys)
    _walk_keys(raw.get("experiment") or {}, "", keys)
    # group selections made in the experiment's defaults list are explicit too
    for entry in raw.get("defaults", []) or []:
        if isinstance(entry, dict):
            for target in entry:
                if "@experiment." in target:
                    keys.add(target.split("@experiment.", 1)[1])
    return keys | _override_keys(overrides)


def _override_keys(overrides: list[str]) -> set[str]:
    """Dotted experiment keys that the command-line overrides set."""
    keys: set[str] = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key.startswith("experiment."):
            keys.add(key[len("experiment."):])
        elif key in ("seed",):
            keys.add(key)
        elif key in ("dataset", "schedule", "teacher1", "teacher2"):
            keys.add(key)
        elif key == "student":
            keys.add("model.student")
    return keys


def _fill_from_method(target: dict, method: dict, explicit: set[str], prefix: str = "") -> None:
    for key, value in method.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _fill_from_method(target[key], value, explicit, dotted + ".")
        elif dotted not in explicit:
            target[key] = copy.deepcopy(value)


def promote_method(exp_node: dict, method: dict, explicit: set[str]) -> dict:
    method = dict(method or {})
    name = str(method.pop("name", "") or "").strip().lower()
    if not name:
        raise ConfigError(
            "the experiment's method has no name: every method file needs 'name: ...' "
            "(select one with method=NAME)."
        )
    _fill_from_method(exp_node, method, explicit)
    exp_node["method_name"] = name
    return exp_node


def merge_recipe(cfg: dict, recipe: dict, name: str, overrides: list[str]) -> None:
    """Merge a paper recipe's ``experiment`` keys over ``cfg``, leaving the keys an override
    sets (a recipe wins over the experiment file, an override over the recipe)."""
    values = (recipe or {}).get("experiment") or {}
    _fill_from_method(cfg, values, _override_keys(overrides))
    cfg["recipe"] = name


def merge_anchor(cfg: dict, anchor: dict) -> dict:
    """Deep-merge the anchor over cfg (anchor wins). Returns the pre-merge values."""
    pre = {k: copy.deepcopy(get_dotted(cfg, k)) for k in ANCHOR_PROTECTED if has_dotted(cfg, k)}

    def merge(dst: dict, src: dict) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = copy.deepcopy(v)

    merge(cfg, anchor)
    cfg["anchor"] = copy.deepcopy(anchor)
    cfg["anchor"]["_pre_merge"] = pre
    return pre


def check_anchor(cfg: dict) -> None:
    """Refuse when a protected key's effective value differs from the anchor's value."""
    anchor = cfg.get("anchor")
    if not isinstance(anchor, dict):
        return
    bad = []
    for key in ANCHOR_PROTECTED:
        if not has_dotted(anchor, key):
            continue
        want, have = get_dotted(anchor, key), get_dotted(cfg, key)
        if want != have:
            before = (anchor.get("_pre_merge") or {}).get(key, "<unset>")
            bad.append(f"{key}: anchor={want!r} effective={have!r} before-merge={before!r}")
    if bad:
        raise ConfigError(
            "the fair-baseline anchor's protected keys were changed after the anchor was "
            "merged: " + "; ".join(bad) + ". Under an anchor these keys are fixed for fair "
            "comparison; drop anchor=... to change them, or remove the override."
        )


def apply_method_policy(cfg: dict) -> None:
    if cfg.get("method_name") not in ASIB_FAMILY:
        cfg["use_ib"] = False
        cfg["teacher_adapt_epochs"] = 0
        cfg["use_cccp"] = False
        cfg["feat_kd_alpha"] = 0.0
        cfg["hybrid_beta"] = 0.0
    if cfg.get("force_ppf_off"):
        cfg["use_partial_freeze"] = False


def check_strict_mode(cfg: dict) -> None:
    """``strict_mode``: ce_alpha + kd_alpha must be 1 (or ``auto_renorm`` rescales)."""
    if not cfg.get("strict_mode", False):
        return
    ce, kd = float(cfg.get("ce_alpha", 0.0)), float(cfg.get("kd_alpha", 0.0))
    if abs(ce + kd - 1.0) <= STRICT_TOL:
        return
    if cfg.get("auto_renorm", False):
        total = ce + kd
        cfg["ce_alpha"], cfg["kd_alpha"] = (0.5, 0.5) if total == 0 else (ce / total, kd / total)
        return
    raise ConfigError(
        f"strict_mode: ce_alpha + kd_alpha must equal 1, got ce_alpha={ce} + kd_alpha={kd} "
        f"= {ce + kd:g}. Fix one of them (e.g. experiment.kd_alpha={1 - ce:g}), or set "
        "experiment.auto_renorm=true to rescale both, or experiment.strict_mode=false."
    )


def _flatten_double_nesting(node: dict) -> None:
    for group in NESTED_GROUPS:
        if isinstance(node.get(group), dict):
            node[group] = _unwrap(node[group], group)
    model = node.get("model")
    if isinstance(model, dict) and isinstance(model.get("student"), dict):
        model["student"] = _unwrap(model["student"], "student")
    if isinstance(node.get("experiment"), dict):  # accidental experiment.experiment
        inner = node.pop("experiment")
        for k, v in inner.items():
            node.setdefault(k, v)


def build_effective(exp: str, overrides: list[str] | tuple = ()) -> dict:
    """Compose + flatten + promote + anchor + policy + strict + cast (no finalize yet)."""
    overrides = list(overrides)
    composed = to_container(compose_experiment(exp, overrides))
    return effective_from_composed(composed, exp, overrides)


def effective_from_composed(composed: dict, exp: str, overrides: list[str]) -> dict:
    node = copy.deepcopy(_unwrap(composed.get("experiment") or {}, "experiment"))
    for key in ROOT_KEYS:
        if key in composed and composed[key] is not None:
            node[key] = composed[key]
    _flatten_double_nesting(node)

    method = node.pop("method", None) or {}
    preset = composed.get("method")
    if isinstance(preset, dict) and preset:
        # configs/method/NAME.yaml selected with method_preset=NAME replaces the
        # experiment's method file
        method = _unwrap(preset, "method")
    explicit = _explicit_experiment_keys(exp, overrides)
    node = promote_method(node, method, explicit)

    recipe = composed.get("recipe")
    if isinstance(recipe, dict) and recipe:
        merge_recipe(node, recipe, group_choices(overrides)["recipe"], overrides)
    anchor = composed.get("anchor")
    if isinstance(anchor, dict) and anchor:
        merge_anchor(node, _unwrap(anchor, "anchor"))
    node = cast_numbers(node)
    apply_method_policy(node)
    check_strict_mode(node)
    node["exp"] = exp
    return node
