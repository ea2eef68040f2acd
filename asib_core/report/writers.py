"""Markdown renderings of the report's tables (CSV files are the tables as they are)."""
from __future__ import annotations

import datetime as dt
import math

import pandas as pd

from .query import VALUE_COLUMNS
from .tables import LADDER

DASH = "-"


def clock(seconds: float) -> str:
    """``h:mm:ss`` of a duration in seconds."""
    return str(dt.timedelta(seconds=int(round(seconds))))


def markdown_table(header: list[str], rows: list[list]) -> str:
    def cell(value) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def number(value, decimals: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"


def mean_std(mean, std, decimals: int = 2) -> str:
    if mean is None or mean != mean:
        return DASH
    if std is None or std != std:
        return number(mean, decimals)
    return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def groups_markdown(groups: pd.DataFrame, cols: list[str], labels: list[str]) -> str:
    if groups.empty:
        return "_No FINISHED distill runs matched._\n"
    mixed = bool((groups["n_configs"] > 1).any())
    header = [*labels, "n", "seeds", *(h for h, _ in VALUE_COLUMNS.values())] + (["configs"] if mixed else [])
    rows = []
    for _, g in groups.iterrows():
        row = [g[c] for c in cols] + [int(g["n"]), g["seeds"] or DASH]
        row += [mean_std(g[f"{v}_mean"], g[f"{v}_std"], d) for v, (_, d) in VALUE_COLUMNS.items()]
        if mixed:
            row.append(int(g["n_configs"]))
        rows.append(row)
    text = markdown_table(header, rows)
    if mixed:
        text += ("\n`configs` > 1: the group's runs differ in more than the seed (their params "
                 "differ); add the differing param to `group_by` (e.g. `params.ib_beta`).\n")
    return text


def runs_markdown(runs: pd.DataFrame, cols: list[str], labels: list[str]) -> str:
    """One small table per group: its runs, then mean / std / n."""
    parts = []
    if runs.empty:
        return ""
    for key, part in runs.groupby(cols, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        parts.append("#### " + " / ".join(f"{lab} {val}" for lab, val in zip(labels, key)) + "\n")
        header = ["seed", "run", *(h for h, _ in VALUE_COLUMNS.values())]
        rows = [[r["seed"], f"`{r['run_id'][:12]}` {r['run_name']}",
                 *(number(r[v], d) for v, (_, d) in VALUE_COLUMNS.items())]
                for _, r in part.iterrows()]
        for label, fn in (("mean", "mean"), ("std", "std"), ("n", "count")):
            stats = [getattr(part[v].dropna(), fn)() for v in VALUE_COLUMNS]
            rows.append([f"**{label}**", "", *(str(int(s)) if fn == "count" else number(s, d)
                                                for s, (_, d) in zip(stats, VALUE_COLUMNS.values()))])
        parts.append(markdown_table(header, rows))
    return "\n".join(parts)


def ladder_markdown(ladder: pd.DataFrame) -> str:
    if ladder.empty:
        return ("_No runs of the ladder experiments (" + ", ".join(e for _, e in LADDER) + ")._\n")
    parts = []
    for (dataset, teachers, student), block in ladder.groupby(["dataset", "teachers", "student"], sort=True):
        parts.append(f"#### {dataset}: {teachers} -> {student}\n")
        header = ["level", "exp", "n", "seeds", "val top-1 (%)", "test top-1 (%)", "Δ val vs L0",
                  "Δ test vs L0", "train time (s)", "train img/s"]
        rows = [[r["level"], r["exp"], int(r["n"]), r["seeds"] or DASH,
                 mean_std(r["val_acc_mean"], r["val_acc_std"]),
                 mean_std(r["test_acc_mean"], r["test_acc_std"]),
                 number(r["delta_val_acc"], 2, signed=True), number(r["delta_test_acc"], 2, signed=True),
                 mean_std(r["train_time_s_mean"], r["train_time_s_std"], 1),
                 mean_std(r["img_per_s_mean"], r["img_per_s_std"], 0)]
                for _, r in block.iterrows()]
        parts.append(markdown_table(header, rows))
    return "\n".join(parts)


def baseline_cell(row, header: str) -> str:
    mean, std, n = row.get(f"{header}_mean"), row.get(f"{header}_std"), row.get(f"{header}_n")
    if not n or mean != mean:
        return DASH
    return f"{mean_std(mean, std)} ({int(n)})"


def baselines_markdown(table: pd.DataFrame, methods: list[tuple[str, str]]) -> str:
    if table.empty:
        return "_No distill runs with teachers matched._\n"
    parts = []
    for (dataset, exp), block in table.groupby(["dataset", "exp"], sort=True):
        parts.append(f"#### {dataset} · {exp}\n")
        header = ["teacher -> student", "T", "S", *(h for h, _ in methods)]
        rows = []
        for _, r in block.iterrows():
            t_cols = sorted(c for c in r.index if c[:1] == "T" and c[1:].isdigit())
            t = " / ".join(number(r[c]) for c in t_cols if r[c] == r[c]) or DASH
            if r.get("T_source") == "val" and t != DASH:
                t += " (val)"
            rows.append([r["pair"], t, baseline_cell(r, "S"), *(baseline_cell(r, h) for h, _ in methods)])
        parts.append(markdown_table(header, rows))
    parts.append("Test top-1 (%) of the best-on-validation student, mean ± std (n runs). T: the "
                 "teachers' test top-1 from their fine-tune runs (`(val)`: validation accuracy measured "
                 "by the distill run, no fine-tune run found); S: the student trained alone (method `ce`) "
                 "in the same experiment.\n")
    return "\n".join(parts)
