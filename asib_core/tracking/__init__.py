"""MLflow tracking: store setup, run lifecycle (never left RUNNING), params, plots."""
from .runs import RunHandle, experiment_name, open_run, search_finished
from .store import configure_tracking

__all__ = ["RunHandle", "configure_tracking", "experiment_name", "open_run", "search_finished"]
