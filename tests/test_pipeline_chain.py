"""Issue 4: `main` chains finetune -> distill -> evaluate as nested runs and reuses them;
resume after SIGKILL; failure paths through the real entry points."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.pipeline_helpers import (ROOT, TINY_DISTILL, TINY_FINETUNE, all_runs, env_for, run_module,
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
    assert all(new_parent.data.tags[k] == "True" for k in new_parent.data.tags if k.startswith("asib.reused."))


def _teacher_files(tmp_path):
    for teacher in ("resnet20", "wrn_16_2"):
        out = run_module("pipelines.finetune", [f"teacher={teacher}", "dataset=digits", *TINY_FINETUNE], tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
    return [str(tmp_path / f"checkpoints/teachers/{t}_digits.pth") for t in ("resnet20", "wrn_16_2")]


def _final(run):
    m = run.data.metrics
    return {k: m[k] for k in ("test/acc", "test/acc_last", "val/best_acc", "train/loss")}


def test_sigkill_then_resume_gives_the_same_result(tmp_path):
    files = _teacher_files(tmp_path)
    args = ["exp=quickstart", "experiment.student_epochs_per_stage=[5]", "experiment.dataset.train_per_class=20",
            f"experiment.teacher1_ckpt={files[0]}", f"experiment.teacher2_ckpt={files[1]}"]
    # the uninterrupted reference, in its own checkpoint dir
    ref = run_module("pipelines.distill", [*args, "experiment.checkpoint_dir=ref_ckpt"], tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    # the killed run
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.distill", *args], cwd=tmp_path,
                            env=env_for(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    killed = False
    while time.time() < deadline and proc.poll() is None:
        lines = [p for p in (tmp_path / "checkpoints/runs").glob("distill-*/last.pt")]
        if lines and _epochs_done(lines[0]) >= 2:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.2)
    proc.wait()
    assert killed, "the run finished before it could be killed"
    running = [r for r in runs_by_step(tmp_path, "distill") if r.info.status == "RUNNING"]
    assert len(running) == 1
    again = run_module("pipelines.distill", args, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr
    distills = {r.info.run_id: r for r in runs_by_step(tmp_path, "distill")}
    assert len(distills) == 2  # the reference and the resumed one: no third run
    resumed = distills[running[0].info.run_id]
    reference = next(r for rid, r in distills.items() if rid != resumed.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert _final(resumed) == _final(reference)
    from mlflow.tracking import MlflowClient
    steps = [m.step for m in MlflowClient().get_metric_history(resumed.info.run_id, "val/acc")]
    assert sorted(set(steps)) == [0, 1, 2, 3, 4]


def _epochs_done(path) -> int:
    import torch
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["state"]["student_epoch"])
    except Exception:  # noqa: BLE001 - file being replaced
        return 0


def test_distill_without_cifar100_fails_fast_with_the_path(tmp_path):
    start = time.time()
    env = env_for(tmp_path)
    env["ASIB_DATA_ROOT"] = str(tmp_path / "no-data-here")
    out = subprocess.run(["mlflow", "run", str(ROOT), "--env-manager", "local", "-e", "distill",
                          "-P", "exp=L0_baseline"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0
    assert time.time() - start < 30
    assert str(tmp_path / "no-data-here") in out.stderr and "cifar" in out.stderr.lower()
    runs = all_runs(tmp_path)
    assert runs and all(r.info.status == "FAILED" for r in runs)


def test_config_error_exits_2_without_a_running_run(tmp_path):
    out = run_module("pipelines.distill", ["exp=quickstart", "experiment.tau=hot"], tmp_path)
    assert out.returncode == 2 and "tau" in out.stderr
    assert all(r.info.status != "RUNNING" for r in all_runs(tmp_path))
