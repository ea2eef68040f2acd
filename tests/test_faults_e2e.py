"""Issue 14, item 7: fault injection on whole runs (real subprocesses, real SIGKILL, real store).

* a tiny ASIB run on digits is killed at seeded points across its whole life - the store's
  creation, the run's creation, its first checkpoint, the A-step, the middle of an epoch,
  right after a checkpoint, the final evaluation - with ``last.pt`` damaged once on disk; each
  kill is followed by the identical command. It must end as ONE finished run, with nothing
  left RUNNING, no temporary file, no metric point logged twice, and exactly the metrics
  (every point of every curve) of an uninterrupted run;
* the uninterrupted run is two identical commands started at once on a fresh store: one
  trains, the other is refused with one sentence (exit 2), and neither crashes on the store;
* ``main`` killed as a whole (process group) in the middle of its distill step, then run
  again: the orphans are closed, the distill run is resumed, nothing stays RUNNING.

The kill points are deterministic (``ASIB_FAULT_AT``, see asib_core/faults.py); which batch,
A-step epoch and checkpoint is drawn by a seeded generator (``ASIB_FAULT_SEED``, default 0).
"""
from __future__ import annotations

import os

import pytest

from fault_helpers import (SIGKILLED, asib_digits_args, audit, final_metrics, life_plan, live_through,
                           metric_histories, run_step, start_step, teacher_files)
from pipeline_helpers import runs_by_step

pytestmark = pytest.mark.slow
SEED = int(os.environ.get("ASIB_FAULT_SEED", "0"))


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    return teacher_files(tmp_path_factory.mktemp("teachers"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teachers):
    """Two identical commands at once on a fresh store: (workdir, both processes)."""
    work = tmp_path_factory.mktemp("reference")
    args = asib_digits_args(teachers)
    procs = [start_step("pipelines.distill", args, work) for _ in range(2)]
    outs = [p.communicate(timeout=1800) for p in procs]
    return work, [(p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def test_two_identical_commands_at_once_one_trains_the_other_is_refused(reference):
    work, outs = reference
    codes = sorted(rc for rc, _, _ in outs)
    assert codes == [0, 2], [err[-3000:] for _, _, err in outs]
    refused = next(err for rc, _, err in outs if rc == 2)
    assert "Traceback" not in refused
    message = [line for line in refused.splitlines() if line.startswith("error:")]
    assert len(message) == 1 and "is in use by process" in message[0] and "checkpoints/runs/distill-" in message[0]
    report = audit(work)
    assert len(report.runs) == 1 and report.runs[0].info.status == "FINISHED"
    assert not report.running and not report.tmp_files and not report.repeated_points


def test_a_run_killed_across_its_whole_life_ends_as_one_run_with_the_uninterrupted_metrics(
        tmp_path, teachers, reference):
    args = asib_digits_args(teachers)
    plan = life_plan(SEED)
    life = live_through(tmp_path, "pipelines.distill", args, plan)
    assert life.final.returncode == 0, life.final.stderr[-4000:]
    for fault, rc, _, traceback in life.steps:
        if not fault.startswith("corrupt:"):
            assert rc == SIGKILLED, f"{fault} was never reached (exit {rc})"
            assert not traceback, fault
    assert "Traceback" not in life.final.stderr
    assert life.kills_survived == life.kills_tried == len(plan) - 1
    report = audit(tmp_path)
    distills = [r for r in report.runs if r.data.tags.get("step") == "distill"]
    assert len(distills) == 1 and distills[0].info.status == "FINISHED", [r.info.status for r in report.runs]
    assert len(report.runs) == 1 and not report.running and report.duplicate_runs == 0
    assert not report.tmp_files and not report.repeated_points
    ref_run = next(r for r in audit(reference[0]).runs if r.info.status == "FINISHED")
    run = distills[0]
    assert final_metrics(run) == final_metrics(ref_run)
    assert metric_histories(run.info.run_id, tmp_path) == metric_histories(ref_run.info.run_id, reference[0])


def test_sigterm_ends_the_run_killed_in_one_paragraph_with_exit_130(tmp_path):
    """A scheduler's stop (SIGTERM) in the middle of an epoch: no traceback, one paragraph that says
    what became of the run and how to go on, the shell's 130, and the run KILLED."""
    args = ["exp=quickstart", "method=ce", "experiment.student_epochs_per_stage=[2]",
            "experiment.dataset.train_per_class=10", "experiment.dataset.batch_size=64",
            "experiment.eval_batch_size=256"]
    stopped = run_step("pipelines.distill", args, tmp_path, fault="epoch.batch#2", signal_name="TERM")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted (terminated by signal 15): ") and "ended KILLED" in last, last
    assert "same command" in last
    report = audit(tmp_path)
    assert [r.info.status for r in report.runs] == ["KILLED"] and not report.running and not report.tmp_files


def test_main_killed_as_a_whole_is_completed_by_the_next_main(tmp_path):
    # batch 64 and 100 training images: one batch per epoch; the kill comes in the second epoch
    args = ["exp=quickstart", "method=ce", "baseline=none", "experiment.student_epochs_per_stage=[2]",
            "experiment.dataset.train_per_class=10", "experiment.dataset.batch_size=64",
            "experiment.eval_batch_size=256"]
    killed = run_step("pipelines.main", args, tmp_path, fault="epoch.batch#2", group=True)
    assert killed.returncode == SIGKILLED, killed.stderr[-3000:]
    again = run_step("pipelines.main", args, tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    report = audit(tmp_path)
    assert not report.running and not report.tmp_files and not report.repeated_points
    assert report.duplicate_runs == 0
    mains = sorted(runs_by_step(tmp_path, "main"), key=lambda r: r.info.start_time)
    assert [r.info.status for r in mains] == ["KILLED", "FINISHED"]
    assert "ended without closing it" in mains[0].data.tags["asib.orphan"]
    distills = runs_by_step(tmp_path, "distill")
    assert len(distills) == 1 and distills[0].info.status == "FINISHED"
    assert "resumed from" in again.stderr
    assert len(runs_by_step(tmp_path, "evaluate")) == 1
