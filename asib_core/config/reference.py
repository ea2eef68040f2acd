"""The config key reference (``asib_core/config/keys.yaml``) and the run-time rule.

decisions.md, "The one rule for config keys": every key either does what its name
says, documented here, or the run refuses to start naming the key. So:

- a key the reference does not know is refused (typos included), with close matches;
- a value of the wrong type is refused, naming the key;
- a key whose status is ``planned`` set to a value that would change behaviour (not
  one of its ``inert`` values) is refused, naming the key and the issue that brings it.

The domains (``range``, ``choices``, ``rules``) of the same entries are checked by
:mod:`asib_core.config.validate`, which reports these problems together with its own.

``docs/configuration.md`` is generated from the same file (``python -m pipelines.docs``).
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

KEYS_FILE = Path(__file__).with_name("keys.yaml")
STATUSES = ("implemented", "planned")
_TYPES = {
    "float": (int, float), "int": (int,), "bool": (bool,), "str": (str,),
    "list": (list, tuple), "dict": (dict,), "any": (object,),
}


@dataclass(frozen=True)
class KeySpec:
    key: str
    type: str
    default: Any
    status: str
    meaning: str
    section: str
    inert: tuple = field(default_factory=tuple)
    issue: int | None = None
    range: str | None = None
    choices: tuple | None = None
    rules: str | None = None

    def accepts(self, value: Any) -> bool:
        for alternative in self.type.split("|"):
            alternative = alternative.strip()
            if alternative == "null" and value is None:
                return True
            kinds = _TYPES.get(alternative)
            if kinds is None:
                continue
            if alternative in ("float", "int") and isinstance(value, bool):
                continue
            if isinstance(value, kinds):
                return True
        return False


@lru_cache(maxsize=4)
def load_reference(section: str | None = "run") -> dict[str, KeySpec]:
    """Specs of one section (``run``: experiments; ``finetune``: teacher recipes)."""
    raw = yaml.safe_load(KEYS_FILE.read_text(encoding="utf-8")) or {}
    specs: dict[str, KeySpec] = {}
    for section_name, entries in raw.items():
        if section is not None and section_name != section:
            continue
        for key, body in (entries or {}).items():
            if body.get("status") not in STATUSES:
                raise ValueError(f"keys.yaml: {key} has status {body.get('status')!r}")
            specs[key] = KeySpec(
                key=key, type=str(body.get("type", "any")), default=body.get("default"),
                status=body["status"], meaning=str(body.get("meaning", "")).strip(),
                section=section_name, inert=tuple(body.get("inert", ()) or ()),
                issue=body.get("issue"), range=body.get("range"),
                choices=tuple(body["choices"]) if body.get("choices") is not None else None,
                rules=" ".join(str(body["rules"]).split()) if body.get("rules") else None,
            )
    return specs


def find_spec(key: str, specs: dict[str, KeySpec] | None = None) -> KeySpec | None:
    specs = specs if specs is not None else load_reference()
    if key in specs:
        return specs[key]
    for pattern, spec in specs.items():
        if "*" in pattern and fnmatch.fnmatchcase(key, pattern):
            return spec
    return None


def leaf_items(cfg: dict, prefix: str = ""):
    """Yield (dotted_key, value) for every leaf; lists and empty dicts are leaves."""
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaf_items(value, dotted + ".")
        else:
            yield dotted, value


def is_inert(spec: KeySpec, value: Any) -> bool:
    return any(value == inert for inert in spec.inert) or (value is None and None in spec.inert)


def reference_problems(cfg: dict, section: str = "run", *, for_run: bool = True) -> tuple[list[str], list[str]]:
    """``(problems, notes)``: unknown keys and wrong types, and planned keys set to a value that
    would change behaviour (problems with ``for_run``, else notes: printing a config is not a
    run). Each problem names its key."""
    specs = load_reference(section)
    problems, planned = [], []
    for key, value in leaf_items(cfg):
        spec = find_spec(key, specs)
        if spec is None:
            close = difflib.get_close_matches(key, list(specs), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            problems.append(f"{key} is not a config key{hint}")
        elif not spec.accepts(value):
            problems.append(f"{key}={value!r}: expected {spec.type}")
        elif spec.status == "planned" and not is_inert(spec, value):
            issue = f" (arrives with issue #{spec.issue})" if spec.issue else ""
            planned.append(f"{key}={value!r}: not implemented yet{issue}, only its inert values "
                           f"{list(spec.inert)} are accepted until then")
    if for_run:
        return problems + planned, []
    return problems, [f"not implemented yet, a run would refuse: {item}" for item in planned]


def check_against_reference(cfg: dict, section: str = "run", *, for_run: bool = True) -> list[str]:
    """Refuse unknown keys and wrong types; with ``for_run`` also planned keys set to a
    value that would change behaviour (printing a config is not a run: then those are
    returned as notes instead). Returns the notes."""
    from .validate import refuse

    problems, notes = reference_problems(cfg, section, for_run=for_run)
    refuse(problems, section)
    return notes
