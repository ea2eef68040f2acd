"""Accuracy curves per group from the runs' metric histories, drawn against the student's epoch.

An MLflow step counts every epoch of a run, an ASIB run's A-step epochs included (they log no
``val/acc``), so the student's n-th epoch is the n-th point of its ``val/acc`` / ``train/acc``
history, whatever its step: the curves of ASIB and non-ASIB rows line up epoch for epoch."""
from __future__ import annotations

import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

PANELS = (("val/acc", "validation top-1 (%)"), ("train/acc", "train top-1 (%)"))


def slug(values) -> str:
    text = "__".join(str(v) for v in values)
    return re.sub(r"[^A-Za-z0-9_.+-]+", "_", text).strip("_")[:150] or "group"


EPOCH_AXIS = "student epoch"
LINE_STYLES = ("-", "--", ":", "-.")


def by_student_epoch(series: pd.Series) -> pd.Series:
    """The history re-indexed 1..n in step order (n-th point = the student's n-th epoch)."""
    ordered = series.sort_index()
    return pd.Series(ordered.values, index=range(1, len(ordered) + 1), name=series.name)


def mean_curve(series: list[pd.Series]) -> pd.Series:
    """Mean over runs at each step (steps some runs lack use the runs that have them)."""
    return pd.concat(series, axis=1).mean(axis=1) if series else pd.Series(dtype=float)


def group_figure(title: str, runs: pd.DataFrame, histories: dict):
    fig, axes = plt.subplots(1, len(PANELS), figsize=(11, 4))
    for ax, (key, label) in zip(axes, PANELS):
        curves = []
        for _, run in runs.sort_values(["seed_order", "seed"]).iterrows():
            series = histories.get(run["run_id"], {}).get(key)
            if series is None or series.empty:
                continue
            series = by_student_epoch(series) * 100.0
            curves.append(series)
            ax.plot(series.index, series.values, lw=1, alpha=.6, marker="o", ms=2,
                    label=f"seed {run['seed']}")
        if len(curves) > 1:
            mean = mean_curve(curves)
            ax.plot(mean.index, mean.values, lw=2.5, color="black", label=f"mean of {len(curves)}")
        ax.set_xlabel(EPOCH_AXIS)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=.3)
        if curves:
            ax.legend(fontsize=7)
        else:
            ax.text(.5, .5, f"no {key} history", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def overview_figure(groups: list[tuple[str, pd.DataFrame]], histories: dict, key: str = "val/acc"):
    """Mean validation curve of every group in one plot."""
    fig, ax = plt.subplots(figsize=(9, 5))
    for title, runs in groups:
        curves = [histories.get(r, {}).get(key) for r in runs["run_id"]]
        curves = [by_student_epoch(c) * 100.0 for c in curves if c is not None and not c.empty]
        if curves:
            mean = mean_curve(curves)
            # the colour cycle has 10 colours: every further ten lines get the next line style
            ax.plot(mean.index, mean.values, marker="o", ms=2, label=f"{title} (n={len(curves)})",
                    linestyle=LINE_STYLES[len(ax.lines) // 10 % len(LINE_STYLES)])
    ax.set_xlabel(EPOCH_AXIS)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation top-1 (%), mean over seeds")
    ax.grid(alpha=.3)
    if ax.lines:
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    return fig


def save(fig, path) -> None:
    fig.savefig(path, dpi=110)
    plt.close(fig)
