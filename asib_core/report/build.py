"""The ``report`` step: query runs -> tables -> Markdown / CSV / PNG files -> a report run.

Files written to ``out`` (and logged as artifacts of the report run, tagged ``step=report``):

- ``report.md``: everything below in one page;
- ``groups.md`` / ``groups.csv``: one row per group (``group_by``) with n, seeds and mean/std;
- ``runs.csv``: one row per run (the raw numbers);
- ``ladder.md`` / ``ladder.csv``: L0-L4 with the difference to L0 (only with ladder runs);
- ``baselines.md`` / ``baselines.csv``: kd-reference.md's teacher -> student table;
- ``curves/<group>.png`` and ``curves/all_groups_val.png``: accuracy curves.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

from asib_core.config.errors import ConfigError
from asib_core.tracking import configure_tracking, experiment_name, open_run

from . import plots, writers
from .query import (finished_distill, group_columns, is_sweep_trial, load_runs, metric_histories,
                    teacher_accuracies)
from .tables import baseline_columns, baselines_table, group_table, ladder_table, runs_table

log = logging.getLogger("asib.report")
DEFAULT_GROUP_BY = "exp,method,teachers,student"


@dataclass
class Report:
    out_dir: Path
    runs: pd.DataFrame            # the FINISHED distill runs, normalised
    groups: pd.DataFrame
    ladder: pd.DataFrame
    baselines: pd.DataFrame
    group_cols: list[str]
    files: list[Path] = field(default_factory=list)
    skipped: dict = field(default_factory=dict)   # "step/status" -> count of runs not averaged


@dataclass
class ReportResult:
    run_id: str
    report: Report


def default_out_dir() -> Path:
    return Path("reports") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def parse_group_by(group_by: str | None) -> list[str]:
    keys = [k.strip() for k in (group_by or DEFAULT_GROUP_BY).split(",") if k.strip()]
    if not keys:
        raise ConfigError("group_by is empty; give comma-separated tag names, e.g. exp,method,teachers,student.")
    return keys


def build_report(experiment: str | None = None, filter_string: str = "", group_by: str | None = None,
                 out_dir: str | Path | None = None) -> Report:
    """Query, tabulate and write the report files (no MLflow run; see ``run_report``)."""
    keys = parse_group_by(group_by)
    everything = load_runs(experiment, filter_string)
    runs = finished_distill(everything, filter_string)
    skipped = {}
    if not everything.empty:
        rest = everything.drop(index=runs.index)
        step = rest["step"].replace("", "-").where(~is_sweep_trial(rest), rest["step"] + " (sweep trial)")
        counts = rest.groupby([step, rest["status"]]).size()
        skipped = {f"{k[0]}/{k[1]}": int(v) for k, v in counts.items() if v}
    if runs.empty:
        seen = ", ".join(f"{k}: {v}" for k, v in sorted(skipped.items())) or "none at all"
        raise ConfigError(
            f"no FINISHED distill runs match experiment={experiment or '(all)'} filter={filter_string!r} "
            f"in {mlflow.get_tracking_uri()} (runs seen by step/status: {seen}). Train some first "
            "(mlflow run . --env-manager local) or widen experiment= / filter=."
        )
    cols = group_columns(runs, keys)
    out = Path(out_dir) if out_dir else default_out_dir()
    (out / "curves").mkdir(parents=True, exist_ok=True)
    teacher_ids = [*runs["teacher1_run"], *runs["teacher2_run"]]
    report = Report(out_dir=out, runs=runs, groups=group_table(runs, cols), ladder=ladder_table(runs),
                    baselines=baselines_table(runs, teacher_accuracies(teacher_ids)), group_cols=cols,
                    skipped=skipped)
    _write(report, keys, experiment, filter_string)
    return report


def _write(report: Report, labels: list[str], experiment, filter_string) -> None:
    out, cols, runs = report.out_dir, report.group_cols, report.runs
    files = report.files

    def text(name: str, body: str) -> None:
        (out / name).write_text(body, encoding="utf-8")
        files.append(out / name)

    def csv(name: str, frame: pd.DataFrame) -> None:
        frame.to_csv(out / name, index=False)
        files.append(out / name)

    groups_md = writers.groups_markdown(report.groups, cols, labels)
    csv("groups.csv", report.groups)
    text("groups.md", "# Groups\n\n" + groups_md)
    csv("runs.csv", runs_table(runs, cols))
    ladder_md = writers.ladder_markdown(report.ladder)
    if not report.ladder.empty:
        csv("ladder.csv", report.ladder)
        text("ladder.md", "# Ablation ladder L0-L4\n\n" + ladder_md)
    methods = baseline_columns(runs)
    baselines_md = writers.baselines_markdown(report.baselines, methods)
    if not report.baselines.empty:
        csv("baselines.csv", report.baselines)
        text("baselines.md", "# Baselines\n\n" + baselines_md)
    curve_links = _curves(report, labels)
    header = [
        "# Run report", "",
        f"- generated: {dt.datetime.now().isoformat(timespec='seconds')}",
        f"- tracking store: `{mlflow.get_tracking_uri()}`",
        f"- experiments: {experiment or '(all)'}; filter: `{filter_string or '(none)'}`",
        f"- group by: {', '.join(labels)}",
        f"- runs averaged: {len(runs)} FINISHED distill runs in {len(report.groups)} groups",
    ]
    if report.skipped:
        header.append("- not averaged (step/status: count): "
                      + ", ".join(f"{k}: {v}" for k, v in sorted(report.skipped.items())))
    body = [
        "\n".join(header), "",
        "Accuracies in %, mean ± sample std (ddof=1) over the runs of a group; val top-1 is the best "
        "epoch's validation accuracy, test top-1 that of the best-on-validation student; train time "
        "sums the epochs, run time is the run's wall clock.", "",
        "## Groups", "", groups_md,
        "## Ablation ladder L0-L4 (difference to L0)", "", ladder_md,
        "## Baselines (layout of kd-reference.md)", "", baselines_md,
        "## Accuracy curves", "", curve_links,
        "## Runs per group", "", writers.runs_markdown(runs_table(runs, cols), cols, labels),
    ]
    text("report.md", "\n".join(body))


def _curves(report: Report, labels: list[str]) -> str:
    runs, cols = report.runs, report.group_cols
    histories = metric_histories(list(runs["run_id"]))
    links, groups = [], []
    for key, part in runs.groupby(cols, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        title = " / ".join(str(k) for k in key)
        name = f"curves/{plots.slug(key)}.png"
        plots.save(plots.group_figure(title, part, histories), report.out_dir / name)
        report.files.append(report.out_dir / name)
        groups.append((title, part))
        links.append(f"### {title}\n\n![{title}]({name})\n")
    overview = "curves/all_groups_val.png"
    plots.save(plots.overview_figure(groups, histories), report.out_dir / overview)
    report.files.append(report.out_dir / overview)
    return "\n".join([f"![all groups]({overview})\n", *links])


def run_report(experiment: str | None = None, filter_string: str = "", group_by: str | None = None,
               out_dir: str | Path | None = None) -> ReportResult:
    """``build_report`` inside an MLflow run tagged ``step=report`` whose artifacts are the files.

    The query runs first, so a query that matches nothing leaves no run behind. Started
    directly, the run goes to the experiment every run of the project goes to
    (``tracking.experiment_name``); under ``mlflow run`` it is the run ``mlflow run`` created.
    """
    from asib_core.pipeline.common import git_commit, setup_logging

    setup_logging()
    configure_tracking()
    report = build_report(experiment, filter_string, group_by, out_dir)
    tags = {"step": "report", "method": "report", "exp": "report", "git_commit": git_commit(),
            "report.experiment": experiment or "(all)", "report.filter": filter_string or "(none)",
            "report.group_by": ",".join(parse_group_by(group_by))}
    name = f"report {report.out_dir.name}"
    with open_run(experiment=experiment_name(), run_name=name, tags=tags) as run:
        client = MlflowClient()
        params = {"experiment": experiment or "", "filter": filter_string or "",
                  "group_by": ",".join(parse_group_by(group_by)), "out": str(report.out_dir)}
        logged = client.get_run(run.run_id).data.params  # `mlflow run` logged its parameters already
        mlflow.log_params({k: v for k, v in params.items() if k not in logged}, run_id=run.run_id)
        run.log_metrics({"n_runs": len(report.runs), "n_groups": len(report.groups)}, step=0)
        client.log_artifacts(run.run_id, str(report.out_dir))
        log.info("report %s: %d runs, %d groups -> %s", run.run_id, len(report.runs), len(report.groups),
                 report.out_dir)
        return ReportResult(run_id=run.run_id, report=report)
