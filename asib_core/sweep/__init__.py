"""Optuna sweeps over distillation runs (entry point ``sweep``; docs/sweeps.md)."""
from .runner import SweepResult, SweepSettings, TrialOutcome, run_sweep
from .space import SearchSpace, list_spaces, load_space
from .storage import default_journal_path, open_storage

__all__ = ["SearchSpace", "SweepResult", "SweepSettings", "TrialOutcome", "default_journal_path",
           "list_spaces", "load_space", "open_storage", "run_sweep"]
