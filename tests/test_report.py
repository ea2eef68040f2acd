"""Issue 8: the `report` step on a store holding a handful of tiny real runs.

Two teachers fine-tuned for one epoch, a vanilla-KD student with seeds 1 and 2 and the student
alone (CE) with seed 1, all on the real digits data (about a minute and a half on 2 cores).
Every number of the report is checked against an independent computation with numpy from the
raw runs fetched through MlflowClient. The ablation ladder (L0-L4 need big teachers) is checked
on runs written directly to the store with the project's tag and metric names.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from asib_core.tracking.runs import DEFAULT_EXPERIMENT
from tests.pipeline_helpers import TINY_DISTILL, use_isolated_store

TINY_TEACHER = ["finetune_epochs=1", "dataset.train_per_class=20"]
KEYS = ("exp", "method", "teachers", "student")
TAG_KEYS = ("exp", "method", "step", "dataset", "teachers", "student", "seed", "config_sha256")
LADDER_SEEDS = {"L0_baseline": [1, 2], "L1_ib": [1, 2, 3], "L4_full": [1]}


def _acc(exp: str, seed: int) -> tuple[float, float]:
    """Synthetic (val, test) accuracy of a ladder run."""
    level = int(exp[1])
    return 0.60 + 0.01 * level + 0.003 * seed, 0.58 + 0.012 * level - 0.002 * seed


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from asib_core.pipeline.distill import run_distill
    from asib_core.pipeline.evaluate import run_evaluate
    from asib_core.pipeline.finetune import run_finetune

    work = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        use_isolated_store(mp, work)
        runs = {"ft": [run_finetune("resnet20", "digits", TINY_TEACHER),
                       run_finetune("wrn_16_2", "digits", TINY_TEACHER)]}
        runs["kd"] = [run_distill("quickstart", TINY_DISTILL + [f"experiment.seed={s}"]) for s in (1, 2)]
        runs["ce"] = [run_distill("quickstart", TINY_DISTILL + ["experiment.seed=1", "method=ce"])]
        runs["eval"] = run_evaluate(runs["ce"][0].run_id)
        _ladder_runs(MlflowClient())
        yield {"work": work, **runs}


def _ladder_runs(client: MlflowClient) -> None:
    """L0/L1/L4 runs as the distill step logs them, one FAILED L2 run and one sweep trial."""
    exp_id = client.create_experiment("ladder")
    base = {"step": "distill", "method": "asib", "dataset": "cifar100", "teachers": "convnext_l+resnet152",
            "student": "resnet101_scratch"}
    for exp, seeds in LADDER_SEEDS.items():
        for seed in seeds:
            val, test = _acc(exp, seed)
            run = client.create_run(exp_id, run_name=f"{exp} asib", tags={
                **base, "exp": exp, "seed": str(seed), "config_sha256": f"{exp}-{seed}".ljust(64, "0")})
            rid = run.info.run_id
            for epoch in range(3):
                client.log_metric(rid, "val/acc", val * (epoch + 1) / 3, step=epoch)
                client.log_metric(rid, "train/acc", val * (epoch + 2) / 4, step=epoch)
            for key, value in {"val/best_acc": val, "test/acc": test, "test/acc_last": test - 0.01,
                               "total_train_time_sec": 100.0 * seed, "train/img_per_s_mean": 1000.0 + seed}.items():
                client.log_metric(rid, key, value, step=3)
            client.set_terminated(rid, "FINISHED")
    failed = client.create_run(exp_id, tags={**base, "exp": "L2_cccp", "seed": "1"})
    client.log_metric(failed.info.run_id, "test/acc", 0.99)
    client.set_terminated(failed.info.run_id, "FAILED")
    trial = client.create_run(exp_id, tags={**base, "exp": "L1_ib", "seed": "1", "optuna.study_name": "s"})
    client.log_metric(trial.info.run_id, "test/acc", 0.01)
    client.set_terminated(trial.info.run_id, "FINISHED")


@pytest.fixture(scope="module")
def report(store):
    from asib_core.report import run_report

    return run_report(experiment=DEFAULT_EXPERIMENT, out_dir=store["work"] / "out")


def _raw_distill_runs(experiment: str) -> list:
    client = MlflowClient()
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    return [r for r in client.search_runs([exp_id], max_results=1000)
            if r.data.tags.get("step") == "distill" and r.info.status == "FINISHED"]


def _independent_groups(experiment: str) -> dict:
    groups = defaultdict(list)
    for run in _raw_distill_runs(experiment):
        groups[tuple(run.data.tags[k] for k in KEYS)].append(run)
    out = {}
    for key, runs in groups.items():
        def values(name, scale=1.0):
            return np.array([run.data.metrics[name] * scale for run in runs], dtype=float)
        row = {"n": len(runs), "seeds": ",".join(sorted((r.data.tags["seed"] for r in runs), key=int))}
        for col, metric, scale in (("val_acc", "val/best_acc", 100.0), ("test_acc", "test/acc", 100.0),
                                   ("test_acc_last", "test/acc_last", 100.0),
                                   ("train_time_s", "total_train_time_sec", 1.0),
                                   ("img_per_s", "train/img_per_s_mean", 1.0)):
            v = values(metric, scale)
            row[f"{col}_mean"] = float(np.mean(v))
            row[f"{col}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else math.nan
        wall = np.array([(r.info.end_time - r.info.start_time) / 1000.0 for r in runs])
        row["wall_time_s_mean"] = float(np.mean(wall))
        out[key] = row
    return out


def _same(a, b, tol=1e-6) -> bool:
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    return a == pytest.approx(b, rel=tol, abs=tol)


def test_group_means_std_and_counts_match_an_independent_computation(report):
    expected = _independent_groups(DEFAULT_EXPERIMENT)
    assert set(expected) == {("quickstart", "vanilla_kd", "resnet20+wrn_16_2", "resnet8"),
                             ("quickstart", "ce", "none", "resnet8")}
    written = pd.read_csv(report.report.out_dir / "groups.csv", dtype={"seeds": str})
    assert len(written) == len(expected) == len(report.report.groups)
    for _, row in written.iterrows():
        want = expected[tuple(row[k] for k in KEYS)]
        assert int(row["n"]) == want["n"]
        assert row["seeds"] == want["seeds"]
        assert int(row["n_configs"]) == 1
        for col, value in want.items():
            if col in ("n", "seeds"):
                continue
            assert _same(float(row[col]), value, tol=1e-3 if col.startswith("wall") else 1e-6), (col, row[col], value)
    kd = written[written["method"] == "vanilla_kd"].iloc[0]
    assert int(kd["n"]) == 2 and kd["seeds"] == "1,2"


def test_report_files_markdown_and_report_run(report, store):
    out = report.report.out_dir
    for name in ("report.md", "groups.md", "groups.csv", "runs.csv", "baselines.md", "baselines.csv"):
        assert (out / name).is_file(), name
    assert not (out / "ladder.md").exists()  # no ladder runs in this experiment
    pngs = sorted(p.name for p in (out / "curves").glob("*.png"))
    assert pngs == ["all_groups_val.png", "quickstart__ce__none__resnet8.png",
                    "quickstart__vanilla_kd__resnet20+wrn_16_2__resnet8.png"]
    assert all((out / "curves" / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    md = (out / "report.md").read_text()
    kd = report.report.groups.set_index("method").loc["vanilla_kd"]
    cell = f"{kd['test_acc_mean']:.2f} ± {kd['test_acc_std']:.2f}"
    assert cell in md and "| quickstart | vanilla_kd | resnet20+wrn_16_2 | resnet8 | 2 | 1,2 |" in md
    assert "not averaged" in md and "evaluate/FINISHED: 1" in md and "finetune/FINISHED: 2" in md
    runs = pd.read_csv(out / "runs.csv")
    assert len(runs) == 3 and set(runs["run_id"]) == {r.run_id for k in ("kd", "ce") for r in store[k]}

    client = MlflowClient()
    run = client.get_run(report.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["step"] == "report"
    assert run.data.params["experiment"] == DEFAULT_EXPERIMENT and run.data.params["group_by"] == ",".join(KEYS)
    assert run.data.metrics["n_runs"] == 3 and run.data.metrics["n_groups"] == 2
    top = {a.path for a in client.list_artifacts(report.run_id)}
    assert {"report.md", "groups.csv", "groups.md", "runs.csv", "baselines.md", "curves"} <= top
    assert {a.path for a in client.list_artifacts(report.run_id, "curves")} == {f"curves/{p}" for p in pngs}


def test_baselines_table_layout_and_values(report, store):
    client = MlflowClient()
    table = pd.read_csv(report.report.out_dir / "baselines.csv")
    assert len(table) == 1
    row = table.iloc[0]
    assert row["pair"] == "resnet20+wrn_16_2 -> resnet8" and row["exp"] == "quickstart"
    kd = [client.get_run(r.run_id).data.metrics["test/acc"] * 100 for r in store["kd"]]
    ce = [client.get_run(r.run_id).data.metrics["test/acc"] * 100 for r in store["ce"]]
    teachers = [client.get_run(r.run_id).data.metrics["test/acc"] * 100 for r in store["ft"]]
    assert row["KD_mean"] == pytest.approx(np.mean(kd)) and row["KD_std"] == pytest.approx(np.std(kd, ddof=1))
    assert int(row["KD_n"]) == 2 and int(row["S_n"]) == 1 and row["S_mean"] == pytest.approx(ce[0])
    assert [row["T1"], row["T2"]] == pytest.approx(teachers) and row["T_source"] == "test"
    assert int(row["DKD_n"]) == 0
    md = (report.report.out_dir / "baselines.md").read_text()
    # the header of the published reference table (kd-reference.md, outside this repository)
    header = "| teacher -> student | T | S | KD | FitNet | AT | AB | FT | CRD | DKD | ReviewKD |"
    assert header in md
    assert f"| resnet20+wrn_16_2 -> resnet8 | {teachers[0]:.2f} / {teachers[1]:.2f} |" in md


def test_ladder_table_difference_to_l0(store, tmp_path):
    from asib_core.report import build_report

    rep = build_report(experiment="ladder", out_dir=tmp_path / "ladder")
    ladder = pd.read_csv(tmp_path / "ladder" / "ladder.csv")
    assert list(ladder["level"]) == ["L0", "L1", "L4"]  # the FAILED L2 run is left out
    base = np.mean([_acc("L0_baseline", s)[1] * 100 for s in LADDER_SEEDS["L0_baseline"]])
    base_val = np.mean([_acc("L0_baseline", s)[0] * 100 for s in LADDER_SEEDS["L0_baseline"]])
    for _, row in ladder.iterrows():
        seeds = LADDER_SEEDS[row["exp"]]
        tests = [_acc(row["exp"], s)[1] * 100 for s in seeds]
        vals = [_acc(row["exp"], s)[0] * 100 for s in seeds]
        assert int(row["n"]) == len(seeds)  # the sweep trial of L1 is not counted
        assert row["test_acc_mean"] == pytest.approx(np.mean(tests))
        assert row["delta_test_acc"] == pytest.approx(np.mean(tests) - base)
        assert row["delta_val_acc"] == pytest.approx(np.mean(vals) - base_val)
        if len(seeds) > 1:
            assert row["test_acc_std"] == pytest.approx(np.std(tests, ddof=1))
        assert row["train_time_s_mean"] == pytest.approx(np.mean([100.0 * s for s in seeds]))
    md = (tmp_path / "ladder" / "ladder.md").read_text()
    l1 = ladder[ladder["level"] == "L1"].iloc[0]
    assert "| L1 | L1_ib | 3 | 1,2,3 |" in md and f"{l1['delta_test_acc']:+.2f}" in md
    assert rep.skipped == {"distill/FAILED": 1, "distill (sweep trial)/FINISHED": 1}
    # the baselines table has the ASIB column when asib runs exist
    assert "| ASIB |" in (tmp_path / "ladder" / "baselines.md").read_text()
    # the trials come back when the filter asks for them
    trials = build_report(experiment="ladder", filter_string="tags.`optuna.study_name` = 's'",
                          group_by="exp", out_dir=tmp_path / "trials")
    assert list(trials.groups["n"]) == [1]


def test_runs_are_comparable_in_the_ui(store):
    """Every step's runs carry the same filterable tags; distill runs of different methods have
    the same param names; fine-tune runs log run time and throughput under distill's names."""
    client = MlflowClient()
    exp_id = client.get_experiment_by_name(DEFAULT_EXPERIMENT).experiment_id
    runs = client.search_runs([exp_id], "tags.step != 'report'", max_results=100)
    steps = defaultdict(list)
    for run in runs:
        steps[run.data.tags["step"]].append(run)
        missing = [k for k in TAG_KEYS if not run.data.tags.get(k)]
        assert not missing, (run.info.run_name, missing)
    assert {len(steps[s]) for s in ("finetune", "distill", "evaluate")} <= {1, 2, 3}
    assert len({frozenset(r.data.params) for r in steps["distill"]}) == 1
    assert {r.data.tags["teachers"] for r in steps["finetune"]} == {"none"}
    for run in steps["finetune"]:
        assert {"total_train_time_sec", "train/img_per_s_mean", "test/acc", "val/best_acc"} <= set(run.data.metrics)
    evaluate = client.get_run(store["eval"].run_id)
    source = client.get_run(store["ce"][0].run_id)
    assert evaluate.data.params == source.data.params
    assert {k: evaluate.data.tags[k] for k in TAG_KEYS} == {k: source.data.tags[k] for k in TAG_KEYS if k != "step"} | {"step": "evaluate"}


def test_cli_prints_the_table_and_defaults_to_reports_dir(store, capsys):
    from pipelines.report import main

    assert main([f"experiment={DEFAULT_EXPERIMENT}", "group_by=method,params.seed"]) == 0
    out = capsys.readouterr().out
    assert "| method | params.seed | n |" in out and "report run " in out
    made = sorted((store["work"] / "reports").iterdir())
    assert made and (made[-1] / "report.md").is_file()


@pytest.mark.parametrize("args, message", [
    (["experiment=nope"], "no MLflow experiment named 'nope'"),
    ([f"experiment={DEFAULT_EXPERIMENT}", "group_by=exp,colour"], "group_by key 'colour'"),
    (["filter=tags.exp = oops"], "MLflow refused the filter"),
    (["filter=tags.exp = 'zzz'"], "no FINISHED distill runs match"),
    (["colour=red"], "report takes experiment="),
])
def test_cli_user_errors_exit_2(store, capsys, args, message):
    from pipelines.report import main

    before = len(MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "tags.step = 'report'"))
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
    after = len(MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], "tags.step = 'report'"))
    assert after == before  # a query that fails leaves no report run behind


def test_mlproject_report_entry_point():
    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "MLproject").read_text())
    entry = spec["entry_points"]["report"]
    assert set(entry["parameters"]) == {"experiment", "filter", "group_by", "out", "benchmark"}
    assert entry["parameters"]["group_by"]["default"] == ",".join(KEYS)
    assert entry["command"].startswith("python -m pipelines.report ")


def test_mlflow_run_report_entry_point(store):
    """`mlflow run -e report` (MLflow quotes the filter; it logs the parameters itself)."""
    import subprocess
    import sys

    from tests.pipeline_helpers import ROOT, env_for

    out = store["work"] / "via_mlflow_run"
    proc = subprocess.run([sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "report",
                           "-P", f"experiment={DEFAULT_EXPERIMENT}", "-P", "filter=tags.seed = '1'", "-P", f"out={out}"],
                          cwd=store["work"], env=env_for(store["work"]), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              f"tags.step = 'report' and params.out = '{out}'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    # `mlflow run` and the runs started in-process (python -m) share one experiment by default
    assert runs[0].info.experiment_id == client.get_run(store["ce"][0].run_id).info.experiment_id
    assert runs[0].data.metrics["n_runs"] == 2  # seed 1: one vanilla-KD run, one CE run
    groups = pd.read_csv(out / "groups.csv")
    assert sorted(groups["method"]) == ["ce", "vanilla_kd"] and set(groups["n"]) == {1}
