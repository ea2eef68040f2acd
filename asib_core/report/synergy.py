"""The ASIB part of a benchmark's results page, from the metric histories of its runs.

An ASIB run logs, at every A-step epoch, the validation top-1 of the synergy (``head(mu)``), of
each teacher, of their ensemble and of the oracle (``a_step_val/<name>_acc``) with the stage
(``stage``, 1-based) at the same MLflow step, and at every B-step epoch the share of training
samples the synergy taught (``b_step/syn_share``). For each row of the protocol whose runs have
these, the page shows:

- per stage and A-step epoch, the mean over the row's seeds of each accuracy and of
  synergy - ensemble (the issue's question: does the synergy beat the ensemble it is built on?);
- per stage, the mean B-step share of the synergy;
- the cost: each ASIB row's run time (method ``asib``, with or without an A-step) against the
  first ASIB row of the protocol on the same recipe (the ladder's L0 on the seed's recipe, or on
  ``recipe=asib_kd_paper``), with the student and A-step epochs that make it, so a ratio is read
  at equal student epochs and equal augmentation.
"""
from __future__ import annotations

import ast

import pandas as pd

from .query import metric_histories
from .tables import stats
from .writers import DASH, markdown_table, mean_std, number

ACC_PREFIX, STAGE_KEY, SHARE_KEY = "a_step_val/", "stage", "b_step/syn_share"
ASIB_METHOD = "asib"


def accuracy_names(n_teachers: int) -> list[str]:
    return ["synergy", *(f"teacher{i}" for i in range(1, n_teachers + 1)), "ensemble", "oracle"]


def teacher_count(runs: pd.DataFrame) -> int:
    names = runs["teachers"].dropna().astype(str) if "teachers" in runs.columns else pd.Series(dtype=str)
    return max((len(t.split("+")) for t in names if t and t != "-"), default=2)


def run_a_steps(history: dict, names: list[str]) -> pd.DataFrame:
    """One run's A-step epochs: ``stage``, ``epoch`` (1-based within the stage), one column per
    accuracy (fraction). Empty when the run logged no synergy accuracy."""
    synergy = history.get(f"{ACC_PREFIX}synergy_acc")
    if synergy is None or synergy.empty:
        return pd.DataFrame(columns=["stage", "epoch", *names])
    frame = pd.DataFrame({n: history.get(f"{ACC_PREFIX}{n}_acc", pd.Series(dtype=float)).reindex(synergy.index)
                          for n in names})
    stage = history.get(STAGE_KEY, pd.Series(dtype=float)).reindex(synergy.index)
    frame.insert(0, "stage", stage.fillna(0).astype(int))
    frame.insert(1, "epoch", frame.groupby("stage").cumcount() + 1)
    return frame.reset_index(drop=True)


def run_shares(history: dict) -> pd.Series:
    """One run's mean B-step synergy share per stage (fraction)."""
    share = history.get(SHARE_KEY)
    if share is None or share.empty:
        return pd.Series(dtype=float)
    stage = history.get(STAGE_KEY, pd.Series(dtype=float)).reindex(share.index).fillna(0).astype(int)
    return share.groupby(stage).mean()


def student_epochs(value) -> float:
    """``params.student_epochs_per_stage`` (e.g. ``[15, 15]``) -> their sum."""
    try:
        parsed = ast.literal_eval(str(value))
    except (ValueError, SyntaxError):
        return float("nan")
    items = parsed if isinstance(parsed, (list, tuple)) else [parsed]
    try:
        return float(sum(int(v) for v in items))
    except (TypeError, ValueError):
        return float("nan")


def synergy_tables(runs: pd.DataFrame, row_order: list[str]) -> dict[str, pd.DataFrame]:
    """``epochs`` (row, stage, epoch, n, mean accuracies in %, synergy - ensemble) and ``shares``
    (row, stage, n, mean B-step share in %) for the rows of ``runs`` with A-step accuracies;
    ``cost`` (row, recipe, n, student and A-step epochs, run time, reference row and ratio, see
    :func:`with_references`) for every ASIB row."""
    empty = {"epochs": pd.DataFrame(), "shares": pd.DataFrame(), "cost": pd.DataFrame()}
    if runs.empty:
        return empty
    names = accuracy_names(teacher_count(runs))
    keys = (*(f"{ACC_PREFIX}{n}_acc" for n in names), STAGE_KEY, SHARE_KEY)
    histories = metric_histories(list(runs["run_id"]), keys)
    epochs, shares, cost = [], [], []
    for row in row_order:
        mine = runs[(runs["row"] == row) & (runs["method"] == ASIB_METHOD)]
        if mine.empty:
            continue
        steps = {r: run_a_steps(histories.get(r, {}), names) for r in mine["run_id"]}
        steps = {r: f for r, f in steps.items() if not f.empty}
        if steps:
            both = pd.concat(steps.values(), ignore_index=True)
            for (stage, epoch), group in both.groupby(["stage", "epoch"], sort=True):
                line = {"row": row, "stage": int(stage), "epoch": int(epoch), "n": int(len(group))}
                line.update({n: 100.0 * group[n].mean() for n in names})
                line["synergy_minus_ensemble"] = line["synergy"] - line["ensemble"]
                epochs.append(line)
            per_run = pd.DataFrame({r: run_shares(histories.get(r, {})) for r in steps})
            for stage, values in per_run.iterrows():
                mean, _, n = stats(values)
                shares.append({"row": row, "stage": int(stage), "n": n, "share": 100.0 * mean})
        time_mean, time_std, n = stats(mine["wall_time_s"])
        per_stage = mine.get("params.student_epochs_per_stage")
        recipes = mine.get("params.recipe", pd.Series(dtype=object)).dropna()
        cost.append({"row": row, "recipe": str(recipes.iloc[0]) if len(recipes) else "", "n": n,
                     "student_epochs": float("nan") if per_stage is None else per_stage.map(student_epochs).mean(),
                     "a_step_epochs": sum(len(f) for f in steps.values()) / len(mine),
                     "wall_time_s_mean": time_mean, "wall_time_s_std": time_std,
                     "measured_utc": measured_span(mine["start_time"])})
    return {"epochs": pd.DataFrame(epochs), "shares": pd.DataFrame(shares), "cost": with_references(pd.DataFrame(cost))}


def measured_span(start_times: pd.Series) -> str:
    """When a row's runs started (UTC): ``YYYY-MM-DD HH:MM``, or the first and the last of them.
    Sessions may run on machines of different speed under one machine label, so run times are
    only comparable between rows measured together."""
    times = pd.to_datetime(start_times, utc=True, errors="coerce").dropna()
    if times.empty:
        return ""
    first, last = times.min().strftime("%Y-%m-%d %H:%M"), times.max().strftime("%Y-%m-%d %H:%M")
    return first if first == last else f"{first} to {last}"


def with_references(cost: pd.DataFrame) -> pd.DataFrame:
    """``cost`` plus ``reference_row`` (the first row, in protocol order, on the same recipe: ""
    is the seed's own) and ``ratio_to_reference`` (mean run time over the reference's). A rung
    on the seed's recipe runs CutMix, whose clean-image synergy query costs a second teacher
    pass, so it is only compared with a rung of the same recipe."""
    if cost.empty:
        return cost
    groups = cost.groupby("recipe", sort=False)
    return cost.assign(reference_row=groups["row"].transform("first"),
                       ratio_to_reference=cost["wall_time_s_mean"] / groups["wall_time_s_mean"].transform("first"))


def teacher_labels(runs: pd.DataFrame, n: int) -> list[str]:
    """Column headers of the teachers: their names from the runs' ``teachers`` tag."""
    tags = [t for t in runs.get("teachers", pd.Series(dtype=str)).dropna().astype(str) if t and t != "-"]
    names = tags[0].split("+") if tags else []
    return [f"`{names[i]}`" if i < len(names) else f"teacher{i + 1}" for i in range(n)]


def synergy_markdown(tables: dict[str, pd.DataFrame], runs: pd.DataFrame, figure: str | None) -> str:
    epochs, shares, cost = tables["epochs"], tables["shares"], tables["cost"]
    if cost.empty:
        return "_No ASIB runs in the store yet._\n"
    parts = ["_No ASIB run with A-step accuracies in the store yet._", ""] if epochs.empty else \
        synergy_epochs_markdown(epochs, runs, figure)
    if not shares.empty:
        parts += ["Share of training samples the synergy taught in the B-step (%, mean over the stage's "
                  "epochs and the seeds):", "",
                  markdown_table(["row", "stage", "n", "synergy share (%)"],
                                 [[s["row"], s["stage"], s["n"], number(s["share"], 1)] for _, s in shares.iterrows()])]
    parts += ["Cost: each ASIB row's run time (wall clock, all stages) against the first ASIB row on the "
              "same recipe; compare rows with equal student epochs. Sessions may run on machines of "
              "different speed under the same machine label, so a ratio holds only between rows whose "
              "runs were measured together (the last column: when their runs started, UTC).", "",
              markdown_table(["row", "n", "student epochs", "A-step epochs", "run time (s)", "against", "ratio",
                              "measured (UTC)"],
                             [[c["row"], c["n"], number(c["student_epochs"], 0), number(c["a_step_epochs"], 0),
                               mean_std(c["wall_time_s_mean"], c["wall_time_s_std"], 0), c["reference_row"],
                               number(c["ratio_to_reference"]), c["measured_utc"] or DASH]
                              for _, c in cost.iterrows()])]
    return "\n".join(parts)


def synergy_epochs_markdown(epochs: pd.DataFrame, runs: pd.DataFrame, figure: str | None) -> list[str]:
    n_teachers = teacher_count(runs)
    names = accuracy_names(n_teachers)
    header = ["row", "stage", "A-step epoch", "n", "synergy", *teacher_labels(runs, n_teachers),
              "ensemble", "oracle", "synergy - ensemble"]
    rows = [[e["row"], e["stage"], e["epoch"], e["n"], *(number(e[n]) for n in names),
             number(e["synergy_minus_ensemble"], signed=True)] for _, e in epochs.iterrows()]
    parts = ["Validation top-1 (%) at the end of each A-step epoch, mean over the row's seeds (n). "
             "The ensemble here is the one the synergy is mixed with in the B-step (`weighted_conf`: each "
             "teacher's softmax weighted by its confidence), not the plain mean of the teachers table, so the "
             "two ensemble figures may differ a little.", "",
             markdown_table(header, rows)]
    if figure:
        parts += [f"![synergy against the teachers per A-step epoch]({figure})", ""]
    return parts


def synergy_figure(tables: dict[str, pd.DataFrame], runs: pd.DataFrame):
    """One panel per ASIB row: the synergy, each teacher, the ensemble and the oracle per A-step
    epoch (x: the epochs of all stages in order, stage boundaries dashed)."""
    from .plots import MaxNLocator, plt

    epochs = tables["epochs"]
    rows = list(dict.fromkeys(epochs["row"]))
    n_teachers = teacher_count(runs)
    labels = dict(zip((f"teacher{i}" for i in range(1, n_teachers + 1)),
                      (t.strip("`") for t in teacher_labels(runs, n_teachers))))
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False, sharey=True)
    for ax, row in zip(axes[0], rows):
        part = epochs[epochs["row"] == row].reset_index(drop=True)
        x = list(range(1, len(part) + 1))
        for name in accuracy_names(n_teachers):
            style = {"synergy": dict(lw=2.5, color="black"), "ensemble": dict(ls="--"),
                     "oracle": dict(ls=":")}.get(name, dict(lw=1, alpha=.8))
            ax.plot(x, part[name], marker="o", ms=3, label=labels.get(name, name), **style)
        for i in range(1, len(part)):
            if part["stage"].iloc[i] != part["stage"].iloc[i - 1]:
                ax.axvline(i + 0.5, color="grey", lw=.8, ls="--")
        ax.set_title(f"{row} (n={int(part['n'].min())})", fontsize=9)
        ax.set_xlabel("A-step epoch (all stages)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=.3)
    axes[0][0].set_ylabel("validation top-1 (%)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig
