"""Comparing runs: the tables and plots of a KD paper from the MLflow tracking store.

``build_report`` queries runs with ``mlflow.search_runs``, averages the FINISHED ``distill``
runs of each group over their seeds and writes Markdown, CSV and PNG files;
``run_report`` does the same inside an MLflow run tagged ``step=report`` (entry point
``report``). See docs/reports.md.
"""
from .build import DEFAULT_GROUP_BY, Report, ReportResult, build_report, run_report
from .query import RUN_METRICS, TAG_KEYS, load_runs
from .tables import BASELINE_METHODS, LADDER

__all__ = ["BASELINE_METHODS", "DEFAULT_GROUP_BY", "LADDER", "RUN_METRICS", "Report", "ReportResult",
           "TAG_KEYS", "build_report", "load_runs", "run_report"]
