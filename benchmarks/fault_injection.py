"""Fault-injection figures (issue 14): kills across the whole life of a run, two identical
commands at once, ``main`` killed as a whole, and the time to a clear error with a dead
tracking server. Prints the figures; asserts nothing.

For every seed, a tiny ASIB run on digits (tests/fault_helpers.py: resnet20 + wrn_16_2 ->
resnet8, A-step, two student epochs) is killed by SIGKILL at the seeded points of
``life_plan`` - store creation, run creation, the first checkpoint half written, inside the
A-step, mid-epoch, right after a checkpoint, the final evaluation - with ``last.pt`` damaged
once (truncated, garbage or empty); every kill is followed by the identical command. The
uninterrupted reference is two identical commands started at once on a fresh store.

    python benchmarks/fault_injection.py [--seeds 0 1 2] [--work DIR] [--no-main] [--dead-server-only]

Figures:
* kills survived / tried: SIGKILLs that happened and after which the identical command went on
  to finish the same run;
* runs left RUNNING, duplicate runs (runs beyond one per step and identity), leftover
  temporary files, metric keys with a step logged twice, tracebacks printed;
* identical final metrics: final test/validation numbers and every logged curve point equal to
  the uninterrupted run's;
* two identical commands at once: exit codes, runs made;
* seconds from the start of ``python -m pipelines.<step>`` to its exit with
  ``MLFLOW_TRACKING_URI=http://127.0.0.1:9`` (interpreter start and imports included; on a
  shared machine the wall time follows its load, so the command's CPU seconds are printed
  too), and the probe's own time from its message.
"""
from __future__ import annotations

import argparse
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from fault_helpers import (SIGKILLED, asib_digits_args, audit, final_metrics, life_plan,  # noqa: E402
                           live_through, metric_histories, run_step, start_step, teacher_files)
from pipeline_helpers import env_for, runs_by_step  # noqa: E402


def reference_pair(work: Path, args: list[str]) -> dict:
    procs = [start_step("pipelines.distill", args, work) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    report = audit(work)
    finished = [r for r in report.runs if r.info.status == "FINISHED"]
    return {"codes": sorted(p.returncode for p in procs), "runs": len(report.runs), "running": len(report.running),
            "refusal": next((line for _, err in outs for line in err.splitlines() if line.startswith("error:")), ""),
            "tracebacks": sum("Traceback" in err for _, err in outs),
            "run": finished[0] if finished else None}


def one_life(work: Path, args: list[str], seed: int, reference) -> dict:
    plan = life_plan(seed)
    life = live_through(work, "pipelines.distill", args, plan)
    report = audit(work)
    distills = [r for r in report.runs if r.data.tags.get("step") == "distill"]
    done = [r for r in distills if r.info.status == "FINISHED"]
    same = False
    if len(done) == 1 and reference is not None:
        same = (final_metrics(done[0]) == final_metrics(reference["run"])
                and metric_histories(done[0].info.run_id, work)
                == metric_histories(reference["run"].info.run_id, reference["work"]))
    return {"plan": plan, "tried": life.kills_tried, "survived": life.kills_survived,
            "final_rc": life.final.returncode, "runs": len(report.runs), "running": len(report.running),
            "duplicates": report.duplicate_runs, "tmp": len(report.tmp_files),
            "repeated": sum(len(v) for v in report.repeated_points.values()),
            "tracebacks": sum(bool(s[3]) for s in life.steps) + ("Traceback" in life.final.stderr),
            "same": same}


def main_life(work: Path) -> dict:
    args = ["exp=quickstart", "method=ce", "baseline=none", "experiment.student_epochs_per_stage=[2]",
            "experiment.dataset.train_per_class=10", "experiment.eval_batch_size=256"]
    killed = run_step("pipelines.main", args, work, fault="epoch.batch#2", group=True)
    again = run_step("pipelines.main", args, work)
    report = audit(work)
    return {"killed": killed.returncode == SIGKILLED, "final_rc": again.returncode, "running": len(report.running),
            "duplicates": report.duplicate_runs, "tmp": len(report.tmp_files),
            "mains": [r.info.status for r in sorted(runs_by_step(work, "main"), key=lambda r: r.info.start_time)],
            "distills": [r.info.status for r in runs_by_step(work, "distill")]}


def dead_server(work: Path, module: str, args: list[str]) -> tuple[float, float, int, str]:
    """(wall seconds, CPU seconds of the command, exit code, its error line)."""
    env = env_for(work)
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", module, *args], cwd=work, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    line = next((ln for ln in out.stderr.splitlines() if ln.startswith("error:")), out.stderr.strip()[-300:])
    return elapsed, cpu, out.returncode, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="none: no run lives")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--no-main", action="store_true", help="skip the main scenario")
    parser.add_argument("--dead-server-only", action="store_true", help="only the dead tracking server timing")
    opts = parser.parse_args()
    base = opts.work or Path(tempfile.mkdtemp(prefix="asib-faults-"))
    if base.exists() and opts.work:
        shutil.rmtree(base)
    base.mkdir(parents=True, exist_ok=True)
    args = asib_digits_args(teacher_files(base / "teachers"))

    print("== dead tracking server (MLFLOW_TRACKING_URI=http://127.0.0.1:9)")
    for module, margs in (("pipelines.distill", ["exp=quickstart"]), ("pipelines.main", ["exp=quickstart"])):
        (base / "dead").mkdir(exist_ok=True)
        elapsed, cpu, rc, line = dead_server(base / "dead", module, margs)
        probe = re.search(r"in ([0-9.]+) s", line)
        print(f"  {module}: exit {rc} after {elapsed:.1f} s wall, {cpu:.1f} s CPU (the probe itself: "
              f"{probe.group(1) if probe else '?'} s): {line}")
    if opts.dead_server_only:
        return

    ref = {"running": 0, "run": None}
    if opts.seeds:
        print("== two identical distill commands at once on a fresh store (the uninterrupted reference)")
        (base / "reference").mkdir()
        ref = reference_pair(base / "reference", args)
        ref["work"] = base / "reference"
        print(f"  exit codes {ref['codes']}, runs made {ref['runs']}, left RUNNING {ref['running']}, "
              f"tracebacks {ref['tracebacks']}\n  refused with: {ref['refusal']}")

    lives = []
    for seed in opts.seeds:
        work = base / f"life-{seed}"
        work.mkdir()
        life = one_life(work, args, seed, ref if ref["run"] is not None else None)
        lives.append(life)
        print(f"== seed {seed}: {' -> '.join(life['plan'])}")
        print(f"  kills survived {life['survived']}/{life['tried']}, final exit {life['final_rc']}, runs {life['runs']}, "
              f"left RUNNING {life['running']}, duplicate runs {life['duplicates']}, tmp files {life['tmp']}, "
              f"repeated metric keys {life['repeated']}, tracebacks {life['tracebacks']}, "
              f"identical to the uninterrupted run: {life['same']}")

    if not opts.no_main:
        (base / "main").mkdir()
        m = main_life(base / "main")
        print(f"== main killed as a whole mid-distill, then run again: killed {m['killed']}, final exit {m['final_rc']}, "
              f"main runs {m['mains']}, distill runs {m['distills']}, left RUNNING {m['running']}, "
              f"duplicate runs {m['duplicates']}, tmp files {m['tmp']}")

    print("== totals")
    print(f"  kills survived / tried: {sum(x['survived'] for x in lives)}/{sum(x['tried'] for x in lives)} "
          f"over {len(lives)} seeded lives (+ main: {0 if opts.no_main else int(m['killed'] and m['final_rc'] == 0)}"
          f"/{0 if opts.no_main else 1})")
    print(f"  runs left RUNNING: {sum(x['running'] for x in lives) + ref['running'] + (0 if opts.no_main else m['running'])}")
    print(f"  duplicate runs: {sum(x['duplicates'] for x in lives) + (0 if opts.no_main else m['duplicates'])}")
    print(f"  identical final metrics: {sum(x['same'] for x in lives)}/{len(lives)}")
    print(f"  work folder: {base}")


if __name__ == "__main__":
    main()
