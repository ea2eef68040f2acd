"""Imports every method module of this package once, so their @register_method entries run.

Adding a method = one file in asib_core/methods/ with a @register_method class.
"""
import importlib
import pkgutil
from pathlib import Path

_NOT_METHODS = {"builtin", "registry", "targets", "teacher_cache"}

for _info in pkgutil.iter_modules([str(Path(__file__).parent)]):
    if not _info.name.startswith("_") and _info.name not in _NOT_METHODS:
        importlib.import_module(f"asib_core.methods.{_info.name}")
