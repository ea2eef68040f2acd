"""The results page's check of a benchmark's ``targets`` (``asib_core.benchmark.spec.Target``).

Each target is checked on the results table (one line per row, the means and sds of its
seeds): the row's mean test top-1 minus the highest mean among the rows it is compared with,
the standard error of that difference (Welch, as the table's "test vs" column) and whether the
difference reaches the target's ``by``. A target whose rows lack runs is "not measured".
"""
from __future__ import annotations

import pandas as pd

from asib_core.benchmark.spec import Benchmark

from .tables import difference_se
from .writers import DASH, markdown_table, number

MET, NOT_MET, NOT_MEASURED = "met", "not met", "not measured"


def targets_table(bench: Benchmark, table: pd.DataFrame) -> pd.DataFrame:
    """One line per target: row, compared (the best of its ``over`` rows), required, difference,
    se, n of both sides, status."""
    lines = table.set_index("row")
    out = []
    for target in bench.targets:
        mine = lines.loc[target.row]
        line = {"row": target.row, "over": ", ".join(target.over), "n_over": len(target.over),
                "compared": DASH, "by": target.by,
                "delta": float("nan"), "se": float("nan"), "n": int(mine["n"]), "n_compared": 0,
                "status": NOT_MEASURED, "source": target.source}
        if mine["n"] > 0 and all(lines.loc[name, "n"] > 0 for name in target.over):
            best = max(target.over, key=lambda name: lines.loc[name, "test_acc_mean"])
            other = lines.loc[best]
            delta = float(mine["test_acc_mean"] - other["test_acc_mean"])
            line.update(compared=best, delta=delta, n_compared=int(other["n"]),
                        se=difference_se(mine["test_acc_std"], int(mine["n"]), other["test_acc_std"], int(other["n"])),
                        status=MET if delta >= target.by else NOT_MET)
        out.append(line)
    return pd.DataFrame(out, columns=["row", "over", "n_over", "compared", "by", "delta", "se", "n", "n_compared",
                                      "status", "source"])


def targets_markdown(targets: pd.DataFrame) -> str:
    if targets.empty:
        return ""
    rows = []
    for _, t in targets.iterrows():
        claim = (f"{t['row']} ≥ {'the best of ' if t['n_over'] > 1 else ''}{t['over']}"
                 + (f" {t['by']:+.2f}" if t["by"] else ""))
        delta = number(t["delta"], signed=True)
        if delta != DASH and t["se"] == t["se"]:
            delta += f" ± {t['se']:.2f}"
        status = t["status"]
        if status == NOT_MET:
            short = t["by"] - t["delta"]
            within = ", less than 1 s.e." if t["se"] == t["se"] and short < t["se"] else ""
            status += f" (short by {short:.2f}{within})"
        rows.append([claim, t["source"] or DASH, t["compared"], f"{t['n']} / {t['n_compared']}", delta, status])
    header = ["target (test top-1, mean over seeds)", "source", "compared with", "n (row / compared)",
              "difference (points ± s.e.)", "status"]
    return ("The protocol's targets, checked on the table above: the row's mean test top-1 minus that of the "
            "row it is compared with (the higher mean where several are named), with the standard error of "
            "the difference (Welch).\n\n" + markdown_table(header, rows))
