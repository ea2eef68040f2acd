"""One registry naming every distillation method (adding a method = one file + one entry)."""
from __future__ import annotations

from typing import Callable

from asib_core.config.errors import ConfigError

_METHODS: dict[str, Callable] = {}


def register_method(name: str):
    def deco(cls):
        _METHODS[name] = cls
        cls.name = name
        return cls
    return deco


def _ensure_loaded() -> None:
    from . import builtin  # noqa: F401  (imports every method module once)


def list_methods() -> list[str]:
    _ensure_loaded()
    return sorted(_METHODS)


def get_method(name: str):
    _ensure_loaded()
    if name not in _METHODS:
        raise ConfigError(
            f"unknown distillation method '{name}'. Known methods: {', '.join(sorted(_METHODS))}. "
            "Select one with method=NAME."
        )
    return _METHODS[name]


def build_distiller(cfg: dict, student, teachers):
    return get_method(cfg["method_name"])(student, teachers, cfg)
