"""The results page of a benchmark (``docs/results/<name>.md`` + ``.csv``), from the store alone.

Reads the FINISHED ``distill`` runs tagged ``asib.benchmark=<name>`` (per row and seed the newest
one) and the newest FINISHED ``bench_teachers`` run of the benchmark, and writes: the teachers
table (each teacher's val/test top-1, the ensemble, the oracle, their agreement), one row per
benchmark row in the protocol's order (val top-1 of the best epoch, test top-1 of the
best-on-validation student and of the last epoch as mean ± sd over n seeds, run and train time,
images/s, and the difference to the benchmark's ``reference_row`` - test points with the standard
error of a difference of two means, and run time as a ratio), the mean validation curve of every
row (a figure), the ASIB section (synergy.py), and where the numbers come from: commits, machines
and the commands, as the runs recorded them.
"""
from __future__ import annotations

import datetime as dt
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from asib_core.benchmark.runner import row_overrides
from asib_core.benchmark.spec import BENCH_TAG, COMMAND_TAG, MACHINE_TAG, ROW_TAG, TEACHERS_STEP, Benchmark
from asib_core.config import ConfigError, resolve_experiment
from asib_core.config.reference import find_spec
from asib_core.pipeline.common import TEACHERS_USED_TAG, git_commit
from asib_core.tracking import search_finished
from asib_core.tracking.params import param_items

from . import plots, synergy
from .query import is_seed_param, load_runs, metric_histories
from .tables import difference_se, seeds_text, stats
from .targets import targets_markdown, targets_table
from .writers import DASH, clock, markdown_table, mean_std, number

#: page column -> (run column, header, decimals); accuracies in %
COLUMNS = (("val_acc", "val top-1, best epoch (%)", 2),
           ("test_acc", "test top-1, best-on-val (%)", 2),
           ("test_acc_last", "test top-1, last epoch (%)", 2),
           ("wall_time_s", "run time (s, mean)", 0),
           ("train_time_s", "train time (s, mean)", 0),
           ("img_per_s", "train img/s (mean)", 0))
MEAN_ONLY = ("wall_time_s", "train_time_s", "img_per_s")
#: params that say where something is (paths of one checkout, the device), not what a run does
WHERE_SUFFIXES = ("_dir", "root", "_ckpt", "pretrained_file", "device")


@dataclass
class Page:
    markdown: Path
    csv: Path
    table: pd.DataFrame
    teachers: dict
    files: list[Path] = field(default_factory=list)


def page_name(bench: Benchmark) -> str:
    return bench.name


def benchmark_runs(bench: Benchmark) -> tuple[pd.DataFrame, list[str]]:
    """The FINISHED distill runs of the benchmark, the newest per row and seed, less those that
    ran under another definition of their row than the file's (see :func:`drop_stale`), and one
    line per run left out."""
    runs = load_runs(None, f"tags.`{BENCH_TAG}` = '{bench.name}' and tags.step = 'distill' "
                           "and attributes.status = 'FINISHED'")
    if runs.empty:
        return runs.assign(row=pd.Series(dtype=str)), []
    runs["row"] = runs.get(f"tags.{ROW_TAG}", pd.Series("", index=runs.index)).fillna("")
    runs = runs.sort_values("start_time", ascending=False).drop_duplicates(["row", "seed"])
    return drop_stale(bench, runs)


def drop_stale(bench: Benchmark, runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Keep the runs whose logged params are their row's definition as the benchmark file now
    resolves it; name the others, with the keys that differ.

    When a row is redefined (its overrides, or a recipe or experiment file it reads), the seeds
    rerun since carry the new params and the others the old: averaging them would mix two
    configurations under one name, and a row whose runs all predate the change would show
    numbers of another configuration. Such a run is left out until its seed is rerun (the
    benchmark command reruns it: its identity no longer matches). Compared: every param but the
    seed ones (``query.is_seed_param``) and those saying where a file or the hardware is
    (``WHERE_SUFFIXES``: a checkout's paths, the device). A key a run did not log counts at its
    default in the key reference (a key added to the config since, or one a config leaves out);
    a key the definition leaves null and the run logged (``num_classes``) was filled at run time."""
    expected = {row.name: row_definition(bench, row) for row in bench.rows}
    keep, notes = [], []
    for index, run in runs.iterrows():
        wanted = expected.get(run["row"])
        differ = [] if wanted is None else definition_differences(wanted, run)
        if not differ:
            keep.append(index)
            continue
        shown = ", ".join(f"`{key}` {ran} (now {now})" for key, ran, now in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        notes.append(f"{run['row']}, seed {run['seed']} (run `{run['run_id']}`): ran under another definition "
                     f"of the row: {shown}{more}; rerun this seed")
    return runs.loc[keep], notes


def row_definition(bench: Benchmark, row) -> dict[str, str] | None:
    """The params a run of ``row`` logs (seed 0; no data root), or None if the row no longer
    resolves (its runs are then kept as they are)."""
    try:
        cfg = resolve_experiment(row.exp, row_overrides(bench, row, None, 0)).cfg
    except ConfigError:
        return None
    return param_items(cfg)


def definition_differences(wanted: dict[str, str], run: pd.Series) -> list[tuple[str, str, str]]:
    """(key, the run's value, the definition's) for every compared key that differs."""
    logged = {c[len("params."):]: str(v) for c, v in run.items() if c.startswith("params.") and pd.notna(v)}
    out = []
    for key in sorted(set(wanted) | set(logged)):
        if is_seed_param(f"params.{key}") or key.endswith(WHERE_SUFFIXES):
            continue
        now, ran = wanted.get(key, default_text(key)), logged.get(key, default_text(key))
        if ran != now and now != "None":
            out.append((key, ran, now))
    return out


def default_text(key: str) -> str:
    """A key's default from the key reference, written as a logged param (``param_items``)."""
    spec = find_spec(key)
    return param_items({key: spec.default if spec is not None else None})[key]


def results_table(bench: Benchmark, runs: pd.DataFrame) -> pd.DataFrame:
    """One line per row of the protocol (rows without runs have n = 0)."""
    lines = []
    for row in bench.rows:
        part = runs[runs["row"] == row.name] if not runs.empty else runs
        used = part.get(f"tags.{TEACHERS_USED_TAG}", pd.Series(dtype=object)).dropna()
        line = {"row": row.name, "exp": row.exp,
                "method": ",".join(sorted(set(part["method"]))) if len(part) else "",
                "teachers": ",".join(sorted(set(used.astype(str)))).replace("+", " + "),
                "n": int(len(part)), "seeds": seeds_text(part) if len(part) else ""}
        for col, _, _ in COLUMNS:
            mean, std, _ = stats(part[col]) if len(part) else (float("nan"), float("nan"), 0)
            line[f"{col}_mean"], line[f"{col}_std"] = mean, std
        lines.append(line)
    table = pd.DataFrame(lines)
    ref = table[table["row"] == bench.reference_row].iloc[0]
    table["delta_test"] = table["test_acc_mean"] - ref["test_acc_mean"]
    table["delta_test_se"] = [difference_se(line["test_acc_std"], line["n"], ref["test_acc_std"], ref["n"])
                              for _, line in table.iterrows()]
    table["time_ratio"] = table["wall_time_s_mean"] / ref["wall_time_s_mean"]
    return table


def teachers_metrics(bench: Benchmark) -> tuple[dict, str | None]:
    runs = search_finished(f"tags.step = '{TEACHERS_STEP}' and tags.`{BENCH_TAG}` = '{bench.name}'")
    if not runs:
        return {}, None
    return dict(runs[0].data.metrics), runs[0].info.run_id


def teachers_markdown(bench: Benchmark, metrics: dict) -> str:
    if not metrics:
        return "_No teachers' evaluation in the store yet (it runs before the first student run)._\n"
    names = [t["teacher"] for t in bench.teachers]
    rows = [[f"`{n}`", _pct(metrics.get(f"teacher/{n}/val_acc")), _pct(metrics.get(f"teacher/{n}/test_acc"))]
            for n in names]
    if len(names) > 1:
        rows.append(["ensemble (mean of softmax)", _pct(metrics.get("ensemble/val_acc")),
                     _pct(metrics.get("ensemble/test_acc"))])
        rows.append(["oracle (any teacher right)", _pct(metrics.get("oracle/val_acc")),
                     _pct(metrics.get("oracle/test_acc"))])
        rows.append(["agreement (same prediction)", _pct(metrics.get("agreement/val")),
                     _pct(metrics.get("agreement/test"))])
    return markdown_table(["teacher", "val top-1 (%)", "test top-1 (%)"], rows)


def _pct(value) -> str:
    return number(None if value is None else 100.0 * value)


def results_markdown(table: pd.DataFrame, reference: str) -> str:
    header = ["row", "exp", "method", "teachers used", "n", "seeds", *(h for _, h, _ in COLUMNS),
              f"test vs {reference} (points ± s.e.)", f"run time / {reference}'s"]
    rows = []
    for _, line in table.iterrows():
        values = [mean_std(line[f"{c}_mean"], None if c in MEAN_ONLY else line[f"{c}_std"], d)
                  for c, _, d in COLUMNS]
        delta, ratio = number(line["delta_test"], signed=True), number(line["time_ratio"])
        if line["row"] == reference:
            delta = ratio = "(reference)"
        elif delta != DASH and line["delta_test_se"] == line["delta_test_se"]:
            delta += f" ± {line['delta_test_se']:.2f}"
        rows.append([line["row"], line["exp"], line["method"] or DASH, line["teachers"] or DASH, line["n"],
                     line["seeds"] or DASH, *values,
                     delta, ratio])
    return markdown_table(header, rows)


def curves_figure(bench: Benchmark, runs: pd.DataFrame):
    """The mean validation curve (over seeds) of every row with runs, in one plot."""
    histories = metric_histories(list(runs["run_id"]), ("val/acc",)) if not runs.empty else {}
    groups = [(row.name, runs[runs["row"] == row.name]) for row in bench.rows]
    return plots.overview_figure([(name, part) for name, part in groups if len(part)], histories)


def provenance(runs: pd.DataFrame, teacher_run: str | None, row_order: list[str] = ()) -> dict[str, list[str]]:
    """The commits, machines and commands the runs (and the teachers' evaluation) recorded."""
    frames = [runs]
    if teacher_run:
        tags = MlflowClient().get_run(teacher_run).data.tags
        frames.append(pd.DataFrame([{f"tags.{k}": v for k, v in tags.items()}]))
    both = pd.concat(frames, ignore_index=True) if not runs.empty else frames[-1]

    def distinct(col: str) -> list[str]:
        if both is None or col not in both.columns:
            return []
        return sorted({str(v) for v in both[col].dropna() if str(v)})

    commits = distinct("tags.git_commit")
    if len(commits) > 1 and "tags.git_commit" in runs.columns:      # which rows each commit made
        rows_of = {c: sorted(set(runs.loc[runs["tags.git_commit"] == c, "row"])) for c in commits}
        # '; ' between rows: a row's name may hold commas ("L4 full, feature KD at the mean's scale")
        commits = [f"`{c}` ({'; '.join(rows_of[c] or ['the teachers evaluation'])})" for c in commits]
    else:
        commits = [f"`{c}`" for c in commits]
    return {"commits": commits, "machines": distinct(f"tags.{MACHINE_TAG}"),
            "commands": collapsed_commands(distinct(f"tags.{COMMAND_TAG}"), row_order),
            "compute": compute_lines(runs, teacher_run)}


SELECTORS = ("rows", "seeds")


def inside_checkout(word: str) -> str:
    """``word`` (``key=value`` or a bare value) with an absolute path that lies in a git checkout
    written relative to that checkout's root: the page names ``archive=docs/results/...``, not one
    machine's folder, and reads the same whichever folder it is generated from."""
    key, sep, value = word.rpartition("=") if "=" in word else ("", "", word)
    path = Path(value)
    if not path.is_absolute():
        return word
    for folder in (path, *path.parents):
        if (folder / ".git").exists():
            return f"{key}{sep}{path.relative_to(folder).as_posix()}"
    return word


def collapsed_commands(commands: list[str], row_order: list[str] = ()) -> list[str]:
    """The recorded commands (markdown), those that differ only in their ``rows=`` / ``seeds=``
    arguments merged into one line with ``<row>`` / ``<seed>`` in their place and the pairs run
    (rows in ``row_order``, seeds ascending): a protocol fed row by row and seed by seed reads as
    one command, not dozens. An absolute path inside a git checkout is shown relative to its root."""
    groups: dict[str, dict[str, set[str]]] = {}
    for cmd in commands:
        try:
            words = [inside_checkout(w) for w in shlex.split(cmd)]
        except ValueError:
            words = []
        cmd = shlex.join(words) if words else cmd
        pairs = [w.split("=", 1) if "=" in w else (w, "") for w in words]
        picked = {key: value for key, value in pairs if key in SELECTORS}
        if not picked:
            groups.setdefault(cmd, {})
            continue
        shown = [f"{key}=<{key[:-1]}>" if key in SELECTORS else shlex.quote(word)
                 for word, (key, _) in zip(words, pairs)]
        seeds = groups.setdefault(" ".join(shown), {}).setdefault(picked.get("rows", "(all rows)"), set())
        seeds.update(picked.get("seeds", "(all seeds)").split(","))
    def seed_key(seed: str) -> tuple:
        return (0, int(seed), "") if seed.isdigit() else (1, 0, seed)

    def row_key(row: str) -> tuple:
        return (row_order.index(row), "") if row in row_order else (len(row_order), row)

    lines = []
    for cmd, pairs in groups.items():
        line = f"`{cmd}`"
        if pairs:
            line += ", run for " + "; ".join(f"{row}: seeds {', '.join(sorted(pairs[row], key=seed_key))}"
                                              for row in sorted(pairs, key=row_key))
        lines.append(line)
    return lines


def compute_lines(runs: pd.DataFrame, teacher_run: str | None) -> list[str]:
    """What the page cost: the student runs' summed run time, and each teacher's training time
    (the sum of its fine-tune epochs, as its run logged it)."""
    lines = []
    if not runs.empty:
        total = float(runs["wall_time_s"].sum())
        lines.append(f"{len(runs)} student runs: {clock(total)} (h:mm:ss) of run time in all")
    if teacher_run:
        client = MlflowClient()
        for key, run_id in sorted(client.get_run(teacher_run).data.tags.items()):
            if key.startswith("teacher_run."):
                seconds = client.get_run(run_id).data.metrics.get("total_train_time_sec")
                if seconds is not None:
                    lines.append(f"teacher `{key.split('.', 1)[1]}`: {clock(seconds)} of training "
                                 "(the sum of its fine-tune epochs)")
    return lines


def write_page(bench: Benchmark, out_dir: str | Path = "docs/results") -> Page:
    """Write ``<out_dir>/<name>.md`` and ``.csv`` from the store."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, stale = benchmark_runs(bench)
    table = results_table(bench, runs)
    targets = targets_table(bench, table)
    metrics, teacher_run = teachers_metrics(bench)
    files: list[Path] = []

    def figure(fig, suffix: str) -> str:
        path = out / f"{page_name(bench)}-{suffix}.png"
        plots.save(fig, path)
        files.append(path)
        return path.name

    curves = figure(curves_figure(bench, runs), "val-curves")
    asib = synergy.synergy_tables(runs, [r.name for r in bench.rows])
    asib_figure = figure(synergy.synergy_figure(asib, runs), "synergy") if not asib["epochs"].empty else None
    where = provenance(runs, teacher_run, [r.name for r in bench.rows])
    report_cmd = f"python -m pipelines.report benchmark={bench.key} out={out_dir}"

    def items(values: list[str], code: bool = False) -> str:
        if not values:
            return "  - (none recorded)"
        return "\n".join(f"  - `{v}`" if code else f"  - {v}" for v in values)

    body = [
        f"# {bench.title}", "",
        f"Benchmark `{bench.name}` (`{bench.source.name}`), generated by `report` from the MLflow store: "
        "nothing on this page is typed by hand.", "",
        f"- generated: {dt.date.today().isoformat()} at commit `{git_commit()}`",
        "- commits of the runs:", items(where["commits"]),
        "- machines of the runs (CPU, cores, torch):", items(where["machines"]),
        "- commands that made the runs:", items(where["commands"]),
        "- compute:", items(where["compute"]),
        f"- command that made this page: `{report_cmd}`", "",
        "## Teachers", "", teachers_markdown(bench, metrics),
        "## Students", "",
        "Mean ± sample sd (ddof=1) over the seeds (n); per row and seed the newest FINISHED run. Val top-1 is "
        "the best epoch's validation accuracy, test top-1 that of the best-on-validation student and of "
        "the last epoch; run time is a run's wall clock (all its stages), train time the sum of its "
        f"epochs. The last two columns compare each row with `{bench.reference_row}`: the difference of "
        "the test means with the standard error of that difference (Welch), and the ratio of the mean "
        "run times.", "", results_markdown(table, bench.reference_row),
        *(["Left out of the table (runs of an earlier definition of their row):", "", items(stale), ""]
          if stale else []),
        *(["### Targets", "", targets_markdown(targets)] if not targets.empty else []),
        f"![mean validation curve of every row]({curves})", "",
        "## ASIB: the synergy against its teachers", "", synergy.synergy_markdown(asib, runs, asib_figure),
    ]
    md, csv = out / f"{page_name(bench)}.md", out / f"{page_name(bench)}.csv"
    md.write_text("\n".join(body), encoding="utf-8")
    table.to_csv(csv, index=False)
    extra = [(asib[key], out / f"{page_name(bench)}-{suffix}.csv")
             for key, suffix in (("epochs", "synergy-epochs"), ("shares", "synergy-shares"), ("cost", "asib-cost"))
             if not asib[key].empty]
    if not targets.empty:
        extra.append((targets, out / f"{page_name(bench)}-targets.csv"))
    for frame, path in extra:
        frame.to_csv(path, index=False)
    return Page(markdown=md, csv=csv, table=table, teachers=metrics, files=[md, csv, *files, *(p for _, p in extra)])


def run_benchmark_report(name: str, out_dir: str | Path = "docs/results") -> Page:
    """``write_page`` inside a run tagged ``step=report`` whose artifacts are the two files."""
    from asib_core.benchmark.spec import load_benchmark
    from asib_core.pipeline.common import setup_logging
    from asib_core.tracking import configure_tracking, experiment_name, open_run

    setup_logging()
    bench = load_benchmark(name)
    configure_tracking()
    page = write_page(bench, out_dir)
    tags = {"step": "report", "method": "report", "exp": "report", "git_commit": git_commit(), BENCH_TAG: bench.name}
    with open_run(experiment=experiment_name(), run_name=f"report {bench.name}", tags=tags) as run:
        for path in page.files:
            MlflowClient().log_artifact(run.run_id, str(path))
    return page
