"""Numeric casting of string values (decisions.md: 'numeric casting').

YAML 1.1 (PyYAML / OmegaConf) reads ``5e-05`` as a string; command-line overrides
may arrive as strings too. Strings that spell a number become numbers, the words
true/false/yes/no/on/off become booleans. Unlike the reference code, the strings
"1" and "0" become integers, never booleans.
"""
from __future__ import annotations

import re
from typing import Any

_INT = re.compile(r"^[+-]?\d+$")
_FLOAT = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?$")
_TRUE = {"true", "yes", "on"}
_FALSE = {"false", "no", "off"}


def cast_value(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = value.strip()
    low = text.lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    if low in {"null", "none", "~"}:
        return None
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    return value


def cast_numbers(obj: Any) -> Any:
    """Recursively cast numeric-looking strings inside dicts and lists."""
    if isinstance(obj, dict):
        return {k: cast_numbers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [cast_numbers(v) for v in obj]
    return cast_value(obj)
