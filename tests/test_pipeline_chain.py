"""Issue 4: `main` chains finetune -> distill -> evaluate as nested runs and reuses them;
failure paths through the real entry points. Resume after SIGKILL, kill by kill across a run's
whole life, is in tests/test_faults_e2e.py."""
from __future__ import annotations

import subprocess

import pytest

from pipeline_helpers import (ROOT, TINY_DISTILL, TINY_FINETUNE, all_runs, env_for, run_module,
                              runs_by_step)

pytestmark = pytest.mark.slow


def test_main_chains_nested_steps_and_reuses_them(tmp_path):
    args = ["exp=quickstart", "overrides=" + " ".join(TINY_DISTILL),
            "finetune_overrides=" + " ".join(TINY_FINETUNE)]
    first = run_module("pipelines.main", args, tmp_path, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    parents = runs_by_step(tmp_path, "main")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent_id = parents[0].info.run_id
    children = [r for r in all_runs(tmp_path) if r.data.tags.get("mlflow.parentRunId") == parent_id]
    steps = sorted(r.data.tags.get("step") for r in children)
    assert steps == ["distill", "distill", "evaluate", "evaluate", "finetune", "finetune"]
    assert all(r.info.status == "FINISHED" for r in children)
    methods = sorted(r.data.tags["method"] for r in children if r.data.tags["step"] == "distill")
    assert methods == ["ce", "vanilla_kd"]
    metrics = parents[0].data.metrics
    assert {"distill/test_acc", "baseline_ce/test_acc"} <= set(metrics)
    n_runs = len(all_runs(tmp_path))

    second = run_module("pipelines.main", args, tmp_path, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("(reused)") == 6, second.stdout
    assert len(all_runs(tmp_path)) == n_runs + 1  # only the new parent
    new_parent = [r for r in runs_by_step(tmp_path, "main") if r.info.run_id != parent_id][0]
    six = ("finetune_teacher1", "finetune_teacher2", "distill", "evaluate_distill", "baseline_ce",
           "evaluate_baseline_ce")
    assert {k: parents[0].data.tags.get(f"asib.reused.{k}") for k in six} == dict.fromkeys(six, "False")
    assert {k: new_parent.data.tags.get(f"asib.reused.{k}") for k in six} == dict.fromkeys(six, "True")
    by_id = {r.info.run_id for r in children}
    assert all(parents[0].data.tags.get(f"asib.step.{k}") in by_id for k in six)
    assert {k: new_parent.data.tags[f"asib.step.{k}"] for k in six} == \
        {k: parents[0].data.tags[f"asib.step.{k}"] for k in six}


def test_distill_without_cifar100_fails_with_the_path_and_ends_its_run_failed(tmp_path):
    env = env_for(tmp_path)
    env["ASIB_DATA_ROOT"] = str(tmp_path / "no-data-here")
    out = subprocess.run(["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "distill",
                          "-P", "exp=L0_baseline"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert str(tmp_path / "no-data-here") in out.stderr and "cifar" in out.stderr.lower()
    runs = all_runs(tmp_path)
    assert runs and all(r.info.status == "FAILED" for r in runs)


def test_config_error_exits_2_without_a_running_run(tmp_path):
    out = run_module("pipelines.distill", ["exp=quickstart", "experiment.tau=hot"], tmp_path)
    assert out.returncode == 2 and "tau" in out.stderr
    assert all(r.info.status != "RUNNING" for r in all_runs(tmp_path))


@pytest.mark.parametrize("method, baseline, expected", [
    ("kd", "ce", [("distill", ["x=1"]), ("baseline_ce", ["x=1", "method=ce"])]),
    ("kd", "none", [("distill", ["x=1"])]),
    ("kd", "", [("distill", ["x=1"])]),
    ("ce", "ce", [("distill", ["x=1"])]),          # the baseline would repeat the run itself
    ("asib", "dkd", [("distill", ["x=1"]), ("baseline_dkd", ["x=1", "method=dkd"])]),
])
def test_main_baseline_option_decides_the_distill_runs(method, baseline, expected):
    from asib_core.pipeline.chain import chain_variants

    assert chain_variants(method, ["x=1"], baseline) == expected


@pytest.mark.parametrize("metrics, expected", [
    ({"distill/test_acc": 0.95, "baseline_ce/test_acc": 0.881},
     "the distilled student reaches 95.0 % test accuracy, 6.9 points above the same student trained by ce alone "
     "(88.1 %)"),
    ({"distill/test_acc": 0.80, "baseline_ce/test_acc": 0.85}, "5.0 points below"),
    ({"distill/test_acc": 0.80}, None),
])
def test_main_states_how_far_distillation_is_from_the_baseline(metrics, expected):
    from asib_core.pipeline.chain import ChainResult

    verdict = ChainResult(parent_run_id="x", metrics=metrics).verdict()
    assert verdict == expected if expected is None or expected.startswith("the ") else expected in verdict
