"""Issue 14, items 2-4: the pieces of a run's life that must survive a kill, on real files and a
real sqlite store - checkpoint verification and rotation, the state folder's one-writer lock,
orphaned runs, the resume lookup, and metric points that a resumed run must not repeat."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from asib_core.engine.state import (CorruptCheckpoint, StateFolder, atomic_save, latest_checkpoint_in,
                                    read_checkpoint, save_checkpoint)
from asib_core.errors import StateInUse
from asib_core.pipeline.common import STATE_TAG, resumable_state
from asib_core.tracking import configure_tracking, open_run
from asib_core.tracking.owners import ORPHAN_TAG, OWNER_TAG, close_orphans, owner_alive, owner_id
from fault_helpers import corrupt
from pipeline_helpers import ROOT

IDENTITY = "f" * 64


def _payload(step: int, run_id: str | None = None) -> dict:
    gen = torch.Generator().manual_seed(step)
    return {"model": {"w": torch.randn(64, 64, generator=gen)}, "state": {"student_epoch": step}, "run_id": run_id}


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# -- checkpoints --------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_a_damaged_checkpoint_is_refused_with_the_reason(tmp_path, how):
    path = tmp_path / "last.pt"
    atomic_save(_payload(1), path)
    corrupt(path, how)
    with pytest.raises(CorruptCheckpoint) as err:
        read_checkpoint(path)
    assert ("empty" if how == "empty" else "not a complete checkpoint") in str(err.value)


def test_a_flipped_byte_in_tensor_data_fails_the_crc_check(tmp_path):
    """torch.load itself would return the damaged tensor without a word."""
    path = tmp_path / "last.pt"
    atomic_save(_payload(1), path)
    data = bytearray(path.read_bytes())
    original = torch.load(path, weights_only=True)["model"]["w"]
    offset = data.index(original.numpy().tobytes()[:64]) + 100
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not torch.equal(torch.load(path, weights_only=True)["model"]["w"], original)
    with pytest.raises(CorruptCheckpoint, match="CRC-32"):
        read_checkpoint(path)


def test_checkpoints_rotate_and_a_corrupt_last_falls_back_to_prev(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(_payload(step), tmp_path)
    assert read_checkpoint(tmp_path / "last.pt")["state"]["student_epoch"] == 3
    assert read_checkpoint(tmp_path / "prev.pt")["state"]["student_epoch"] == 2
    corrupt(tmp_path / "last.pt", "truncated")
    payload, path = latest_checkpoint_in(tmp_path)
    assert path.name == "prev.pt" and payload["state"]["student_epoch"] == 2
    with StateFolder(tmp_path) as folder:
        payload, path, problems = folder.latest_checkpoint()
    assert path.name == "prev.pt" and len(problems) == 1 and "last.pt is corrupt" in problems[0]
    assert (tmp_path / "last.pt.corrupt").exists() and not (tmp_path / "last.pt").exists()


def test_a_writer_killed_mid_save_leaves_the_old_file_and_its_temp_file_is_removed(tmp_path):
    target = tmp_path / "last.pt"
    atomic_save(_payload(1), target)
    script = textwrap.dedent(f"""
        import torch
        from asib_core.engine.state import save_checkpoint
        save_checkpoint({{"x": torch.ones(3)}}, {str(tmp_path)!r})
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ASIB_FAULT_AT": "checkpoint.write"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == -9, out.stderr[-2000:]
    leftovers = list(tmp_path.glob("last.pt.tmp*"))
    assert len(leftovers) == 1
    assert read_checkpoint(target)["state"]["student_epoch"] == 1      # the old file is intact
    save_checkpoint(_payload(2), tmp_path)                              # the next writer cleans up
    assert not list(tmp_path.glob("*.tmp*"))


# -- one writer per state folder --------------------------------------------------------------
def test_a_second_process_is_refused_while_the_first_holds_the_folder(tmp_path):
    holder_script = textwrap.dedent(f"""
        import sys, time
        from asib_core.engine.state import StateFolder
        folder = StateFolder({str(tmp_path / 'state')!r}).claim()
        print("held", flush=True)
        sys.stdin.read()
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", holder_script], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StateInUse) as err:
            StateFolder(tmp_path / "state").claim()
        assert str(holder.pid) in str(err.value) and str(tmp_path / "state") in str(err.value)
    finally:
        holder.kill()
        holder.wait()
    (tmp_path / "state" / "last.pt.tmp123").write_bytes(b"x")
    with StateFolder(tmp_path / "state") as folder:    # the holder is gone: the lock is free again
        assert not list(folder.path.glob("*.tmp*"))


# -- orphans -------------------------------------------------------------------------------
def test_runs_whose_process_is_gone_are_closed_and_no_other(workdir):
    configure_tracking()
    client = MlflowClient()
    exp = client.create_experiment("orphans")
    dead = client.create_run(exp, tags={OWNER_TAG: owner_id(_dead_pid())}).info.run_id
    alive = client.create_run(exp, tags={OWNER_TAG: owner_id()}).info.run_id
    elsewhere = client.create_run(exp, tags={OWNER_TAG: "another-host:1:1"}).info.run_id
    foreign = client.create_run(exp).info.run_id
    assert owner_alive(owner_id()) is True and owner_alive("another-host:1:1") is None
    assert close_orphans() == [dead]
    run = client.get_run(dead)
    assert run.info.status == "KILLED" and "ended without closing it" in run.data.tags[ORPHAN_TAG]
    assert {client.get_run(r).info.status for r in (alive, elsewhere, foreign)} == {"RUNNING"}
    for run_id in (alive, elsewhere, foreign):
        client.set_terminated(run_id)


def test_a_recycled_pid_or_a_zombie_is_not_taken_for_the_owner():
    host, pid, start = owner_id().rsplit(":", 2)
    assert owner_alive(f"{host}:{pid}:{int(start) + 1}") is False
    child = subprocess.Popen([sys.executable, "-c", "pass"])   # ends, not yet reaped: a zombie
    try:
        for _ in range(600):
            with open(f"/proc/{child.pid}/stat", encoding="utf-8") as fh:
                if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.1)
        assert owner_alive(owner_id(child.pid)) is False
    finally:
        child.wait()


# -- the resume lookup on a real store -------------------------------------------------------
def _killed_run(folder: StateFolder, *, with_checkpoint: bool) -> str:
    """A distill-like run whose process died (owner: a dead pid), as a SIGKILL leaves it."""
    client = MlflowClient()
    exp = client.get_experiment_by_name("faults") or client.get_experiment(client.create_experiment("faults"))
    run = client.create_run(exp.experiment_id, tags={OWNER_TAG: owner_id(_dead_pid()), "asib.identity": IDENTITY,
                                                     STATE_TAG: folder.key, "step": "distill"})
    if with_checkpoint:
        save_checkpoint(_payload(1, run.info.run_id), folder.path)
        save_checkpoint(_payload(2, run.info.run_id), folder.path)
    return run.info.run_id


def test_a_run_killed_before_its_first_checkpoint_is_found_and_resumed(workdir):
    configure_tracking()
    state = workdir / "checkpoints" / "runs" / "distill-x"
    orphan = _killed_run(StateFolder(state), with_checkpoint=False)
    with resumable_state(state, IDENTITY) as (folder, resume_id):
        assert resume_id == orphan
        with open_run(experiment="faults", run_name="r", tags={STATE_TAG: folder.key}, resume_run_id=resume_id):
            pass
    run = MlflowClient().get_run(orphan)
    assert run.info.status == "FINISHED" and ORPHAN_TAG not in run.data.tags
    assert run.data.tags[OWNER_TAG] == owner_id()


def test_a_run_that_failed_before_its_first_checkpoint_is_reopened_not_duplicated(workdir):
    configure_tracking()
    state = workdir / "state"
    failed = _killed_run(StateFolder(state), with_checkpoint=False)
    client = MlflowClient()
    client.set_tag(failed, "asib.error", "MissingArtifactError: teacher checkpoint not found")
    client.set_terminated(failed, "FAILED")
    with resumable_state(state, IDENTITY) as (folder, resume_id):
        assert resume_id == failed
        with open_run(experiment="faults", run_name="r", tags={STATE_TAG: folder.key}, resume_run_id=resume_id):
            pass
    run = client.get_run(failed)
    assert run.info.status == "FINISHED" and "asib.error" not in run.data.tags
    assert len(client.search_runs([run.info.experiment_id])) == 1


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_a_corrupt_last_checkpoint_resumes_the_same_run_from_the_previous_one(workdir, how):
    configure_tracking()
    state = workdir / "state"
    run_id = _killed_run(StateFolder(state), with_checkpoint=True)
    corrupt(state / "last.pt", how)
    with resumable_state(state, IDENTITY) as (folder, resume_id):
        assert resume_id == run_id
        payload, path = latest_checkpoint_in(folder.path)
        assert path.name == "prev.pt" and payload["state"]["student_epoch"] == 1


def test_no_readable_checkpoint_closes_the_run_and_starts_a_new_one(workdir, caplog):
    configure_tracking()
    state = workdir / "state"
    run_id = _killed_run(StateFolder(state), with_checkpoint=True)
    corrupt(state / "last.pt", "garbage")
    corrupt(state / "prev.pt", "empty")
    with caplog.at_level("WARNING"), resumable_state(state, IDENTITY) as (folder, resume_id):
        assert resume_id is None
        assert sorted(p.name for p in folder.path.iterdir()) == [".lock"]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "KILLED" and "unreadable" in run.data.tags[ORPHAN_TAG]
    assert "no readable checkpoint" in caplog.text and "last.pt is corrupt" in caplog.text


def test_a_checkpoint_of_a_finished_run_starts_a_new_run(workdir):
    configure_tracking()
    state = workdir / "state"
    run_id = _killed_run(StateFolder(state), with_checkpoint=True)
    MlflowClient().set_terminated(run_id, "FINISHED")
    with resumable_state(state, IDENTITY) as (folder, resume_id):
        assert resume_id is None and not folder.has_checkpoint_files()


# -- metric points --------------------------------------------------------------------------
def test_a_resumed_run_does_not_log_a_point_twice(workdir):
    configure_tracking()
    with open_run(experiment="points", run_name="first", tags={}) as run:
        for step in range(3):
            run.log_metrics({"val/acc": 0.1 * step, "train/loss": 1.0 - 0.1 * step}, step=step)
        run_id = run.run_id
    with open_run(experiment="points", run_name="first", tags={}, resume_run_id=run_id) as run:
        for step in range(1, 5):   # a resume from step 1: steps 1 and 2 are known to the store
            run.log_metrics({"val/acc": 0.1 * step + 0.5, "train/loss": 1.0 - 0.1 * step}, step=step)
    client = MlflowClient()
    history = client.get_metric_history(run_id, "val/acc")
    assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    assert {m.step: round(m.value, 6) for m in history} == {0: 0.0, 1: 0.1, 2: 0.2, 3: 0.8, 4: 0.9}
    assert mlflow.get_run(run_id).info.status == "FINISHED"


def test_the_time_between_attempts_is_not_run_time(workdir):
    """A run killed (by its own handler, then outright) and resumed twice: each resume adds the
    time since the previous attempt ended to run/paused_s - for the orphan, since its last metric
    point, not since it was found - and the report's run time is end - start - run/paused_s."""
    from asib_core.report.query import load_runs
    from asib_core.tracking.owners import ACTIVE_TAG
    from asib_core.tracking.runs import PAUSED_METRIC

    configure_tracking()
    client = MlflowClient()
    with pytest.raises(KeyboardInterrupt), open_run(experiment="pauses", run_name="r", tags={}) as run:
        run.log_metrics({"val/acc": 0.1}, step=0)
        raise KeyboardInterrupt
    run_id = run.run_id
    ended = client.get_run(run_id).info.end_time
    client.set_terminated(run_id, "KILLED", end_time=ended - 100_000)       # it stood still 100 s longer
    with open_run(experiment="pauses", run_name="r", tags={}, resume_run_id=run_id) as again:
        again.log_metrics({"val/acc": 0.2}, step=1)
    last = int(client.get_run(run_id).data.tags[ACTIVE_TAG])
    # what an attempt killed outright leaves: RUNNING, its owner gone, its last sign of work 50 s ago
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, OWNER_TAG, owner_id(_dead_pid()))
    client.set_tag(run_id, ACTIVE_TAG, str(last - 50_000))
    assert close_orphans() == [run_id]
    assert client.get_run(run_id).info.end_time == last - 50_000
    with open_run(experiment="pauses", run_name="r", tags={}, resume_run_id=run_id):
        pass
    points = sorted(client.get_metric_history(run_id, PAUSED_METRIC), key=lambda m: m.step)
    assert [m.step for m in points] == [0, 1]
    assert 100 <= points[0].value < 130 and 150 <= points[1].value < 190
    info = client.get_run(run_id).info
    row = load_runs("pauses").set_index("run_id").loc[run_id]
    assert row["wall_time_s"] == pytest.approx((info.end_time - info.start_time) / 1000 - points[1].value)


def test_owner_tag_names_this_host(workdir):
    configure_tracking()
    with open_run(experiment="owner", run_name="x", tags={}) as run:
        assert MlflowClient().get_run(run.run_id).data.tags[OWNER_TAG].startswith(socket.gethostname() + ":")
