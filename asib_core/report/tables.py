"""The tables of a KD paper from normalised runs (see ``query.normalize``).

Every statistic is over the runs of a group (normally its seeds): ``mean``, sample standard
deviation ``std`` (``ddof=1``; NaN for one run) and the count ``n``.
"""
from __future__ import annotations

import math

import pandas as pd

from .query import VALUE_COLUMNS, config_signature

#: the ablation ladder of the ASIB experiments, in order
LADDER = (("L0", "L0_baseline"), ("L1", "L1_ib"), ("L2", "L2_cccp"),
          ("L3", "L3_ib_cccp_tadapt"), ("L4", "L4_full"))
#: kd-reference.md's columns after T and S: (header, method name)
BASELINE_METHODS = (("KD", "vanilla_kd"), ("FitNet", "fitnet"), ("AT", "at"), ("AB", "ab"),
                    ("FT", "ft"), ("CRD", "crd"), ("DKD", "dkd"), ("ReviewKD", "reviewkd"))
#: our methods that the reference table lacks; a column appears when such runs exist
EXTRA_METHODS = (("SimKD", "simkd"), ("SSKD", "sskd"), ("ASIB", "asib"))
STUDENT_ALONE = "ce"
NO_TEACHERS = ("", "-", "none")


def seeds_text(part: pd.DataFrame) -> str:
    ordered = part.sort_values(["seed_order", "seed"])["seed"].astype(str)
    return ",".join(s for s in ordered if s not in ("", "-"))


def difference_se(std_a: float, n_a: int, std_b: float, n_b: int) -> float:
    """Standard error of the difference of two independent means (Welch): sqrt(sa^2/na + sb^2/nb);
    NaN unless both have a sample sd (n >= 2)."""
    if n_a < 2 or n_b < 2 or std_a != std_a or std_b != std_b:
        return float("nan")
    return math.sqrt(std_a ** 2 / n_a + std_b ** 2 / n_b)


def stats(values: pd.Series) -> tuple[float, float, int]:
    """(mean, sample std, count of non-missing values)."""
    values = pd.to_numeric(values, errors="coerce").dropna()
    n = int(len(values))
    mean = float(values.mean()) if n else float("nan")
    std = float(values.std(ddof=1)) if n > 1 else float("nan")
    return mean, std, n


def group_table(runs: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """One row per group: the keys, ``n`` runs, their ``seeds``, ``n_configs`` (distinct
    configurations apart from the seed; more than 1 means the group mixes settings) and
    ``<value>_mean`` / ``<value>_std`` for every value column."""
    rows = []
    if runs.empty:
        return pd.DataFrame(columns=[*cols, "n", "seeds", "n_configs"])
    signature = config_signature(runs)
    for key, part in runs.groupby(cols, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = dict(zip(cols, key))
        row.update({"n": int(len(part)), "seeds": seeds_text(part),
                    "n_configs": int(signature.loc[part.index].nunique())})
        for value in VALUE_COLUMNS:
            mean, std, _ = stats(part[value])
            row[f"{value}_mean"], row[f"{value}_std"] = mean, std
        rows.append(row)
    return pd.DataFrame(rows)


def runs_table(runs: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """One row per run (the raw numbers behind the group table)."""
    keep = [*cols, "seed", "run_id", "run_name", "experiment", "config_sha256", *VALUE_COLUMNS]
    keep = list(dict.fromkeys(keep))
    if runs.empty:
        return pd.DataFrame(columns=keep)
    return runs.sort_values([*cols, "seed_order", "seed"])[keep].reset_index(drop=True)


def ladder_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The ASIB ladder L0-L4, one block per setting (dataset, teachers, student): each rung's
    statistics and the difference of its means to L0's (``delta_*``; NaN without L0 runs)."""
    order = {exp: i for i, (_, exp) in enumerate(LADDER)}
    sub = runs[runs["exp"].isin(order)] if not runs.empty else runs
    if sub.empty:
        return pd.DataFrame()
    rows = []
    for (dataset, teachers, student), part in sub.groupby(["dataset", "teachers", "student"], sort=True):
        base = part[part["exp"] == LADDER[0][1]]
        base_val, base_test = stats(base["val_acc"])[0], stats(base["test_acc"])[0]
        for level, exp in LADDER:
            rung = part[part["exp"] == exp]
            if rung.empty:
                continue
            row = {"dataset": dataset, "teachers": teachers, "student": student, "level": level,
                   "exp": exp, "n": int(len(rung)), "seeds": seeds_text(rung)}
            for value in VALUE_COLUMNS:
                mean, std, _ = stats(rung[value])
                row[f"{value}_mean"], row[f"{value}_std"] = mean, std
            row["delta_val_acc"] = row["val_acc_mean"] - base_val
            row["delta_test_acc"] = row["test_acc_mean"] - base_test
            rows.append(row)
    return pd.DataFrame(rows)


def baseline_columns(runs: pd.DataFrame) -> list[tuple[str, str]]:
    present = set(runs["method"]) if not runs.empty else set()
    return [*BASELINE_METHODS, *[(h, m) for h, m in EXTRA_METHODS if m in present]]


def baselines_table(runs: pd.DataFrame, teacher_acc: dict[str, float]) -> pd.DataFrame:
    """kd-reference.md's layout: one row per (dataset, exp, teachers -> student) with the
    teachers' accuracy ``T`` (their fine-tune runs' test top-1; else, marked ``val``, the
    distill run's validation accuracy of the teacher), the student alone ``S`` (method ``ce``
    runs of the same exp, dataset and student) and one column per method (test top-1)."""
    if runs.empty:
        return pd.DataFrame()
    kd = runs[~runs["teachers"].isin(NO_TEACHERS)]
    alone = runs[runs["method"] == STUDENT_ALONE]
    methods = baseline_columns(runs)
    rows = []
    for (dataset, exp, teachers, student), part in kd.groupby(["dataset", "exp", "teachers", "student"], sort=True):
        row = {"dataset": dataset, "exp": exp, "pair": f"{teachers} -> {student}",
               "teachers": teachers, "student": student}
        t_values, t_source = teacher_values(part, teachers, dataset, teacher_acc)
        for i, value in enumerate(t_values, start=1):
            row[f"T{i}"] = value
        row["T_source"] = t_source
        s = alone[(alone["dataset"] == dataset) & (alone["exp"] == exp) & (alone["student"] == student)]
        _cell(row, "S", s["test_acc"])
        for header, method in methods:
            _cell(row, header, part.loc[part["method"] == method, "test_acc"])
        rows.append(row)
    return pd.DataFrame(rows)


def _cell(row: dict, header: str, values: pd.Series) -> None:
    mean, std, n = stats(values)
    row[f"{header}_mean"], row[f"{header}_std"], row[f"{header}_n"] = mean, std, n


def teacher_values(part: pd.DataFrame, teachers: str, dataset: str,
                   teacher_acc: dict) -> tuple[list[float], str]:
    """Test top-1 (%) of each teacher of the pair: the mean over the runs' tagged fine-tune runs
    (``teacher{i}_run``), else the newest fine-tune run of that teacher on the dataset, else
    (source ``val``) the teacher's validation accuracy measured by the distill runs."""
    values, source = [], "test"
    for i, name in enumerate(teachers.split("+"), start=1):
        col = f"teacher{i}_run"
        tagged = part[col].map(teacher_acc) if col in part.columns else pd.Series(dtype=float)
        mean = stats(tagged)[0]
        if mean != mean:
            mean = teacher_acc.get((name, dataset), float("nan"))
        if mean != mean and f"metrics.teacher{i}/val_acc" in part.columns:
            mean = stats(part[f"metrics.teacher{i}/val_acc"])[0] * 100.0
            source = "val"
        values.append(mean)
    return values, source
