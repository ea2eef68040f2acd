"""Fault injection for end-to-end tests and benchmarks/fault_injection.py (reusable by any step).

* ``run_step(module, args, workdir, fault="epoch.batch#7")`` runs an entry point in a
  subprocess (own session, so a group kill stays inside it) with ``ASIB_FAULT_AT`` armed:
  the process SIGKILLs itself at that point (see :mod:`asib_core.faults` for the points);
* ``start_step`` is the same without waiting (two identical commands at once);
* ``audit(workdir)`` reads the workdir's sqlite store and files back: runs left RUNNING, runs
  per (step, identity), leftover temporary files, metric keys with a step logged twice;
* ``final_metrics(run)`` and ``metric_histories(run_id, workdir)``: what "identical results" compares;
* ``corrupt(path, how)``: a truncated, garbage or empty file.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from pipeline_helpers import all_runs, default_ctrl_c, env_for

SIGKILLED = -signal.SIGKILL
TMP_PATTERNS = ("*.tmp*", ".*.tmp*")


def _env(workdir: Path, fault: str | None, group: bool, signal_name: str | None = None) -> dict:
    env = env_for(workdir)
    for key in ("ASIB_FAULT_AT", "ASIB_FAULT_GROUP", "ASIB_FAULT_SIGNAL"):
        env.pop(key, None)
    if fault:
        env["ASIB_FAULT_AT"] = fault
        if group:
            env["ASIB_FAULT_GROUP"] = "1"
        if signal_name:        # INT / TERM at the fault point instead of SIGKILL
            env["ASIB_FAULT_SIGNAL"] = signal_name
    return env


def start_step(module: str, args: list[str], workdir: Path, *, fault: str | None = None,
               group: bool = False, signal_name: str | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=workdir,
                            env=_env(workdir, fault, group, signal_name),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=default_ctrl_c)


def run_step(module: str, args: list[str], workdir: Path, *, fault: str | None = None, group: bool = False,
             signal_name: str | None = None, timeout: int = 1200) -> subprocess.CompletedProcess:
    proc = start_step(module, args, workdir, fault=fault, group=group, signal_name=signal_name)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    if group:  # what a group kill leaves: nothing of that session still running
        _reap_group(proc.pid)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _reap_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def seeded_point(rng: random.Random, point: str, low: int, high: int) -> str:
    """``point#n`` with n drawn from [low, high] by a seeded generator."""
    return f"{point}#{rng.randint(low, high)}"


@dataclass
class Audit:
    runs: list
    running: list = field(default_factory=list)        # run ids left RUNNING
    per_identity: Counter = field(default_factory=Counter)  # (step, identity) -> number of runs
    tmp_files: list = field(default_factory=list)       # leftover temporary files under the workdir
    repeated_points: dict = field(default_factory=dict)  # run id -> metric keys with a step logged twice

    @property
    def duplicate_runs(self) -> int:
        """Runs beyond the first of the same step and identity (a rerun that opened a new run)."""
        return sum(n - 1 for n in self.per_identity.values() if n > 1)


def audit(workdir: Path, *, check_points: bool = True) -> Audit:
    runs = all_runs(workdir)
    result = Audit(runs=runs)
    result.running = [r.info.run_id for r in runs if r.info.status == "RUNNING"]
    result.per_identity = Counter((r.data.tags.get("step"), r.data.tags["asib.identity"]) for r in runs
                                  if r.data.tags.get("asib.identity"))
    result.tmp_files = sorted(str(p.relative_to(workdir)) for pattern in TMP_PATTERNS
                              for p in workdir.rglob(pattern) if p.is_file() and "mlruns" not in p.parts)
    if check_points:
        client = MlflowClient()
        for run in runs:
            repeated = [key for key in run.data.metrics
                        if _has_repeated_step(client.get_metric_history(run.info.run_id, key))]
            if repeated:
                result.repeated_points[run.info.run_id] = sorted(repeated)
    return result


def _has_repeated_step(history) -> bool:
    steps = [m.step for m in history]
    return len(steps) != len(set(steps))


def use_store(workdir: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")


def metric_histories(run_id: str, workdir: Path) -> dict:
    """key -> [(step, value), ...] sorted by step (the whole logged curve of every metric) of a
    run in ``workdir``'s store."""
    use_store(workdir)
    client = MlflowClient()
    run = client.get_run(run_id)
    timing = ("epoch_time", "img_per_s", "train/img_per_s_mean", "total_train_time_sec", "run/paused_s")
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics if not key.endswith(timing)}


def final_metrics(run) -> dict:
    """The result metrics of a distill run (timings left out: they differ between any two runs)."""
    keep = ("test/acc", "test/acc_last", "test/loss", "val/best_acc", "best_epoch", "epochs_trained")
    return {k: run.data.metrics[k] for k in keep if k in run.data.metrics}


def corrupt(path: Path, how: str) -> None:
    """Damage a file in place: ``truncated`` (first half kept), ``garbage`` (random bytes of the
    same size, fixed seed) or ``empty``."""
    data = Path(path).read_bytes()
    if how == "truncated":
        Path(path).write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        Path(path).write_bytes(random.Random(0).randbytes(len(data)))
    elif how == "empty":
        Path(path).write_bytes(b"")
    else:
        raise ValueError(f"unknown corruption {how!r}: truncated, garbage or empty")


# -- a tiny ASIB run on digits and a seeded plan of kills across its whole life ------------------
TEACHERS = ("resnet20", "wrn_16_2")
A_STEP_EPOCHS = 2
STUDENT_EPOCHS = 2
TRAIN_PER_CLASS = 10
BATCH = 32
CORRUPTIONS = ("truncated", "garbage", "empty")


def teacher_files(folder: Path) -> list[Path]:
    """Seeded, untrained resnet20 / wrn_16_2 teacher checkpoints for digits, in the format a
    fine-tune writes (the run's lifecycle, not the teachers' quality, is under test)."""
    import torch

    from asib_core.models import create_model
    from asib_core.pipeline.models import save_teacher

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(TEACHERS):
        path = folder / f"{name}_digits.pth"
        if not path.exists():
            torch.manual_seed(100 + i)
            model = create_model(name, num_classes=10, pretrained=False, small_input=True)
            save_teacher(model, path, {"teacher": name, "dataset": "digits", "num_classes": 10})
        paths.append(path)
    return paths


def asib_digits_args(teachers: list[Path]) -> list[str]:
    """ASIB (IB + A-step) on digits, resnet20 + wrn_16_2 -> resnet8, one stage, on the CPU, tiny.
    No teacher report: it is the same at every restart and tests/test_run_keys.py checks it."""
    return ["exp=L1_ib", "experiment.compute_teacher_eval=false", "dataset=digits", f"teacher1={TEACHERS[0]}",
            f"teacher2={TEACHERS[1]}", "student=resnet8",
            "experiment.distill_out_dim=32", "experiment.device=cpu", "experiment.use_amp=false",
            f"experiment.dataset.batch_size={BATCH}", "experiment.num_stages=1",
            f"experiment.student_epochs_per_stage=[{STUDENT_EPOCHS}]",
            f"experiment.teacher_adapt_epochs={A_STEP_EPOCHS}", "experiment.ib_epochs_per_stage=1",
            f"experiment.dataset.train_per_class={TRAIN_PER_CLASS}", "experiment.dataset.num_workers=0",
            "experiment.dataset.persistent_workers=false", "experiment.eval_batch_size=256",
            f"experiment.teacher1_ckpt={teachers[0]}", f"experiment.teacher2_ckpt={teachers[1]}"]


def life_plan(seed: int) -> list[str]:
    """Kill points across a whole run, in life order, drawn by a generator seeded with ``seed``;
    ``corrupt:<how>`` damages ``last.pt`` before the next command instead of killing one (the
    kind cycles with the seed: truncated, garbage, empty)."""
    rng = random.Random(seed)
    batches = STUDENT_EPOCHS * (TRAIN_PER_CLASS * 10 // BATCH)   # whole batches of the run
    return [
        "store.create",                                            # the store's first creation
        "run.created",                                             # the run exists, nothing else
        "checkpoint.write#1",                                      # the first checkpoint, half written
        seeded_point(rng, "aux.epoch", 1, A_STEP_EPOCHS),          # inside the A-step
        seeded_point(rng, "epoch.batch", 1, batches - 1),          # in the middle of an epoch
        f"corrupt:{CORRUPTIONS[seed % len(CORRUPTIONS)]}",         # last.pt damaged on disk
        seeded_point(rng, "checkpoint.saved", 1, 2),               # right after a checkpoint
        "final.eval",                                              # the final evaluation
    ]


@dataclass
class LifeResult:
    steps: list = field(default_factory=list)     # (fault, returncode, resumed?, traceback?)
    final: subprocess.CompletedProcess | None = None

    @property
    def kills_tried(self) -> int:
        return sum(1 for fault, *_ in self.steps if not fault.startswith("corrupt:"))

    @property
    def kills_survived(self) -> int:
        """Kills that happened (SIGKILL) and after which the next identical command went on."""
        return sum(1 for fault, rc, *_ in self.steps if not fault.startswith("corrupt:") and rc == SIGKILLED) \
            if self.final is not None and self.final.returncode == 0 else 0


def live_through(workdir: Path, module: str, args: list[str], plan: list[str], *, group: bool = False) -> LifeResult:
    """Run ``module args`` once per kill of the plan (each killed at its point), then once to
    the end; ``corrupt:<how>`` damages the state folder's ``last.pt`` instead."""
    result = LifeResult()
    for fault in plan:
        if fault.startswith("corrupt:"):
            lasts = sorted(workdir.glob("checkpoints/runs/*/last.pt"))
            if lasts:
                corrupt(lasts[0], fault.split(":", 1)[1])
            result.steps.append((fault, None, None, False))
            continue
        out = run_step(module, args, workdir, fault=fault, group=group)
        result.steps.append((fault, out.returncode, "resumed from" in out.stderr, "Traceback" in out.stderr))
    result.final = run_step(module, args, workdir)
    return result
