"""Runs of the tracking store as one pandas DataFrame, with the report's named columns.

``mlflow.search_runs`` gives ``tags.*``, ``params.*`` and ``metrics.*`` columns; ``load_runs``
adds the columns the tables use:

==================  ===============================================  =======
column              source                                           unit
==================  ===============================================  =======
``val_acc``         metric ``val/best_acc`` (validation, best epoch)   %
``test_acc``        metric ``test/acc`` (best-on-validation student)   %
``test_acc_last``   metric ``test/acc_last`` (last-epoch student)      %
``train_time_s``    metric ``total_train_time_sec`` (sum of epochs)    s
``wall_time_s``     run end time - start time - ``run/paused_s``       s
``img_per_s``       metric ``train/img_per_s_mean`` (training images/s)
==================  ===============================================  =======

plus ``experiment`` (the MLflow experiment's name) and the project's tags without their
prefix (``exp``, ``method``, ``step``, ``dataset``, ``teachers``, ``student``, ``seed``,
``config_sha256``, ``teacher1_run``, ``teacher2_run``).
"""
from __future__ import annotations

import math

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from asib_core.config.errors import ConfigError

#: report column -> (MLflow metric, scale to the report's unit)
RUN_METRICS = {
    "val_acc": ("val/best_acc", 100.0),
    "test_acc": ("test/acc", 100.0),
    "test_acc_last": ("test/acc_last", 100.0),
    "train_time_s": ("total_train_time_sec", 1.0),
    "img_per_s": ("train/img_per_s_mean", 1.0),
}
#: every value column of the tables, in display order, with its Markdown header and decimals
VALUE_COLUMNS = {
    "val_acc": ("val top-1 (%)", 2),
    "test_acc": ("test top-1 (%)", 2),
    "test_acc_last": ("test top-1, last epoch (%)", 2),
    "train_time_s": ("train time (s)", 1),
    "wall_time_s": ("run time (s)", 1),
    "img_per_s": ("train img/s", 0),
}
#: the tags every run of the project carries (the UI filters on them)
TAG_KEYS = ("exp", "method", "step", "dataset", "teachers", "student", "seed", "config_sha256")
EXTRA_TAGS = ("teacher1_run", "teacher2_run", "teacher")
#: params that differ between the seeds of one setting (not a different configuration)
SEED_PARAM_WORDS = ("seed", "config_sha256")


def resolve_experiments(experiment: str | None) -> list[str] | None:
    """``experiment`` (comma-separated names) -> names, after checking they exist; None = all."""
    names = [n.strip() for n in (experiment or "").split(",") if n.strip()]
    if not names:
        return None
    client = MlflowClient()
    known = [e.name for e in client.search_experiments()]
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(
            f"no MLflow experiment named {', '.join(repr(m) for m in missing)} in the tracking store "
            f"{mlflow.get_tracking_uri()}; known experiments: {', '.join(known) or '(none)'}. "
            "Pass experiment=NAME (or leave it empty for all experiments)."
        )
    return names


def search(experiment: str | None = None, filter_string: str = "") -> pd.DataFrame:
    """All runs (every step and status) of the experiments that match the filter string."""
    names = resolve_experiments(experiment)
    kwargs = {"experiment_names": names} if names else {"search_all_experiments": True}
    try:
        frame = mlflow.search_runs(filter_string=filter_string or "", output_format="pandas", **kwargs)
    except MlflowException as exc:
        raise ConfigError(
            f"MLflow refused the filter {filter_string!r}: {exc.message} "
            "Write it as in the MLflow UI's search box, e.g. \"tags.exp = 'L1_ib' and params.seed = '1'\"."
        ) from None
    if not isinstance(frame, pd.DataFrame):  # pragma: no cover - output_format="pandas"
        frame = pd.DataFrame(frame)
    return frame


def normalize(frame: pd.DataFrame) -> pd.DataFrame:
    """Add the report's named columns (see the module docstring) to a ``search_runs`` frame."""
    df = frame.copy()
    if df.empty:
        df = pd.DataFrame(columns=["run_id", "experiment_id", "status", "start_time", "end_time"])
    client = MlflowClient()
    names = {}
    for exp_id in df["experiment_id"].dropna().unique():
        try:
            names[exp_id] = client.get_experiment(exp_id).name
        except MlflowException:  # pragma: no cover - experiment vanished meanwhile
            names[exp_id] = str(exp_id)
    df["experiment"] = df["experiment_id"].map(names)
    df["run_name"] = _column(df, "tags.mlflow.runName")
    for key in (*TAG_KEYS, *EXTRA_TAGS):
        df[key] = _column(df, f"tags.{key}")
    for name, (metric, scale) in RUN_METRICS.items():
        df[name] = pd.to_numeric(_column(df, f"metrics.{metric}", float("nan")), errors="coerce") * scale
    start = pd.to_datetime(_column(df, "start_time", pd.NaT), utc=True, errors="coerce")
    end = pd.to_datetime(_column(df, "end_time", pd.NaT), utc=True, errors="coerce")
    paused = pd.to_numeric(_column(df, "metrics.run/paused_s", 0.0), errors="coerce").fillna(0.0)
    df["wall_time_s"] = (end - start).dt.total_seconds() - paused   # a resumed run's downtime is not run time
    df["seed_order"] = df["seed"].map(_seed_number)
    return df


def _column(df: pd.DataFrame, name: str, default=""):
    """A column of the search result with missing values (or the whole column) set to default."""
    if name in df.columns:
        return df[name].where(df[name].notna(), default)
    return pd.Series([default] * len(df), index=df.index, dtype=object if isinstance(default, str) else None)


def _seed_number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf


def load_runs(experiment: str | None = None, filter_string: str = "") -> pd.DataFrame:
    """Every run that matches, normalised; the tables pick the steps they need."""
    return normalize(search(experiment, filter_string))


SWEEP_TAG = "optuna.study_name"


def is_sweep_trial(df: pd.DataFrame) -> pd.Series:
    col = f"tags.{SWEEP_TAG}"
    if col not in df.columns:
        return pd.Series(False, index=df.index)
    return df[col].notna() & (df[col].astype(str) != "")


def finished_distill(df: pd.DataFrame, filter_string: str = "") -> pd.DataFrame:
    """The runs the tables average: FINISHED ``step=distill`` runs, without the trials of
    Optuna sweeps (tag ``optuna.study_name``: their hyperparameters differ from run to run)
    unless the filter names that tag, i.e. asks for the trials."""
    if df.empty:
        return df
    keep = (df["step"] == "distill") & (df["status"] == "FINISHED")
    if SWEEP_TAG not in (filter_string or ""):
        keep &= ~is_sweep_trial(df)
    return df[keep].copy()


def group_columns(df: pd.DataFrame, keys: list[str]) -> list[str]:
    """Group-by keys -> column names: a report column, else ``tags.KEY``, else ``params.KEY``.

    Writing ``tags.X`` / ``params.X`` explicitly also works. Missing values become ``-``.
    """
    cols = []
    for key in keys:
        for candidate in (key, f"tags.{key}", f"params.{key}"):
            if candidate in df.columns:
                cols.append(candidate)
                break
        else:
            tags = sorted(c[5:] for c in df.columns if c.startswith("tags.") and not c.startswith("tags.mlflow."))
            raise ConfigError(
                f"group_by key {key!r} is neither a run tag nor a param of the selected runs; "
                f"tags: {', '.join(tags) or '(none)'} (params work as params.NAME)."
            )
    for col in cols:
        df[col] = df[col].where(df[col].notna() & (df[col].astype(str) != ""), "-").astype(str)
    return cols


def config_signature(df: pd.DataFrame) -> pd.Series:
    """One string per run: its params except the seed ones (equal = same configuration)."""
    cols = sorted(c for c in df.columns if c.startswith("params.") and not is_seed_param(c))
    if not cols:
        return pd.Series([""] * len(df), index=df.index)
    values = df[cols].astype(object).where(df[cols].notna(), "").astype(str)
    return values.agg("\x1f".join, axis=1)


def is_seed_param(column: str) -> bool:
    """Whether a ``params.*`` column is one that differs between the seeds of one setting."""
    return any(word in column[len("params."):].lower() for word in SEED_PARAM_WORDS)


def metric_histories(run_ids: list[str], keys: tuple[str, ...] = ("val/acc", "train/acc")) -> dict:
    """``{run_id: {metric: pandas Series step -> value}}``; a resumed run's repeated step keeps
    its last value."""
    client = MlflowClient()
    out: dict = {}
    for run_id in run_ids:
        out[run_id] = {}
        for key in keys:
            points = client.get_metric_history(run_id, key)
            if not points:
                continue
            points = sorted(points, key=lambda m: (m.step, m.timestamp))
            series = pd.Series({m.step: m.value for m in points}, dtype=float).sort_index()
            out[run_id][key] = series
    return out


def teacher_accuracies(run_ids) -> dict:
    """Test top-1 (%) of teachers: ``{run_id: acc}`` for the given fine-tune run ids and
    ``{(teacher, dataset): acc}`` of the newest FINISHED fine-tune run on all classes of each
    teacher and dataset (the run ``resolve_teachers`` would pick when no run id is tagged)."""
    client = MlflowClient()
    out: dict = {}
    for run_id in sorted({r for r in run_ids if r and r != "-"}):
        try:
            value = client.get_run(run_id).data.metrics.get("test/acc")
        except MlflowException:
            continue
        if value is not None:
            out[run_id] = 100.0 * float(value)
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    if experiment_ids:
        runs = client.search_runs(experiment_ids, "attributes.status = 'FINISHED' and tags.step = 'finetune'",
                                  order_by=["attributes.start_time DESC"], max_results=5000)
        for run in runs:
            tags, value = run.data.tags, run.data.metrics.get("test/acc")
            if value is not None and tags.get("class_subset", "all") == "all":
                out.setdefault((tags.get("teacher"), tags.get("dataset")), 100.0 * float(value))
    return out
