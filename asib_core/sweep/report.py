"""What the sweep's parent run shows: the best trial, all trials as CSV, plots, and the
best-config override file that ``-e distill`` takes as its ``overrides`` parameter."""
from __future__ import annotations

import json
import logging
import math
import os
import shlex
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from .space import SearchSpace

log = logging.getLogger("asib.sweep")

BEST_FILE = "best_overrides.txt"
PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "intermediate_values": "plot_intermediate_values",
}


@dataclass
class BestTrial:
    number: int
    value: float
    params: dict              # searched and derived values
    overrides: list           # the sweep's fixed overrides + the trial's values
    run_id: str | None
    config_sha256: str | None

    @property
    def overrides_line(self) -> str:
        return shlex.join(self.overrides)


def state_counts(study) -> dict:
    from optuna.trial import TrialState
    counts = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def best_trial(study, space: SearchSpace, fixed_overrides: list) -> BestTrial | None:
    from optuna.trial import TrialState
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value)]
    if not done:
        return None
    best = max(done, key=lambda t: (t.value, -t.number))   # ties: the earliest trial
    values = space.complete(dict(best.params))
    return BestTrial(number=best.number, value=float(best.value), params=values,
                     overrides=list(fixed_overrides) + space.overrides(values),
                     run_id=best.user_attrs.get("mlflow_run_id"),
                     config_sha256=best.user_attrs.get("config_sha256"))


def write_best_file(best: BestTrial, out_dir: Path) -> Path:
    """``out_dir/best_overrides.txt``: one line of Hydra overrides, written atomically."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BEST_FILE
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=".best_overrides.")
    with os.fdopen(fd, "w") as fh:
        fh.write(best.overrides_line + "\n")
    os.replace(tmp, path)
    return path


def distill_command(exp: str, path: Path) -> str:
    return (f"mlflow run . --env-manager local -e distill -P exp={exp} "
            f"-P overrides=\"$(cat {shlex.quote(str(path))})\"")


def report(study, parent_run_id: str, space: SearchSpace, exp: str, fixed_overrides: list,
           out_dir: Path) -> tuple[BestTrial | None, Path | None]:
    """Log the study's state on the parent run; write the best-config override file."""
    client = MlflowClient()
    counts = state_counts(study)
    metrics = {f"n_{k.lower()}": float(v) for k, v in counts.items()}
    metrics["n_trials"] = float(sum(counts.values()))
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "trials.csv"
        study.trials_dataframe().to_csv(csv, index=False)
        client.log_artifact(parent_run_id, str(csv))
    mlflow.log_text(json.dumps(space.raw, indent=1, sort_keys=True), "search_space.json", run_id=parent_run_id)
    best = best_trial(study, space, fixed_overrides)
    path = None
    if best is None:
        log.warning("study '%s': no trial completed, so there is no best config", study.study_name)
        client.set_tag(parent_run_id, "sweep.best_trial", "none")
    else:
        metrics["best_value"] = best.value
        path = write_best_file(best, out_dir)
        client.log_artifact(parent_run_id, str(path), artifact_path="best")
        payload = {"study": study.study_name, "trial": best.number, "objective": "val/best_acc",
                   "value": best.value, "params": best.params, "overrides": best.overrides,
                   "config_sha256": best.config_sha256, "run_id": best.run_id,
                   "command": distill_command(exp, path)}
        mlflow.log_text(json.dumps(payload, indent=1), "best/best_params.json", run_id=parent_run_id)
        existing = client.get_run(parent_run_id).data.params
        client.log_batch(parent_run_id, params=[
            mlflow.entities.Param(f"best.{k}", str(v)) for k, v in best.params.items() if f"best.{k}" not in existing])
        client.set_tag(parent_run_id, "sweep.best_trial", str(best.number))
        client.set_tag(parent_run_id, "sweep.best_run_id", best.run_id or "")
        client.set_tag(parent_run_id, "sweep.best_config_sha256", best.config_sha256 or "")
        client.set_tag(parent_run_id, "sweep.best_overrides", best.overrides_line[:5000])
    mlflow.log_metrics(metrics, run_id=parent_run_id)
    if best is not None:
        log_plots(study, parent_run_id)
    return best, path


def log_plots(study, run_id: str) -> list[str]:
    """The optuna.visualization.matplotlib plots as PNG artifacts under plots/ (skipped, with a
    warning, when the study cannot support one yet, e.g. importances need two finished trials)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    logged = []
    client = MlflowClient()
    for name, func in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.simplefilter("ignore", UserWarning)
                axes = getattr(ovm, func)(study)
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            fig = first.figure
            fig.set_size_inches(max(fig.get_size_inches()[0], 8), max(fig.get_size_inches()[1], 5))
            fig.tight_layout()
            client.log_figure(run_id, fig, f"plots/{name}.png")
            plt.close(fig)
            logged.append(name)
        except Exception as exc:  # noqa: BLE001 - a plot is never worth failing a sweep for
            log.warning("plot %s skipped: %s: %s", name, type(exc).__name__, exc)
            plt.close("all")
    return logged
