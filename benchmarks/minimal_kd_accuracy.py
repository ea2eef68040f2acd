"""Accuracy cross-check: CE-only, Hinton KD and avg-KD trained by a minimal hand-written loop.

Question (issue 12): on the low-data protocol the pipeline's Hinton KD from resnet20 gains
+5.8 test points over CE-only (the issue's target is +6), and avg-KD (the mean of both
teachers' softened outputs) lands below the better single-teacher KD. Are these properties
of the setting, or of the pipeline (its model code, loader, augmentation, schedule, loss)?

This script answers it with code that shares nothing with the pipeline's training path: the
plain ``nn.Module`` CIFAR ResNet-8 of ``bench_engine_overhead.py`` (the reference init:
Kaiming-normal fan-out convolutions), its own vectorised crop (pad 4) + flip, its own SGD +
warm-up/cosine schedule and its own loss, written from Hinton et al. (0.1 CE + 0.9 T^2 KL, T = 4;
avg-KD: the mean of the teachers' softmax(logits / T)). It shares the inputs only: the
protocol's images and splits (the pipeline's loader decodes them; the same 5,000-image
student subset, the 5,000-image validation split and the 10,000 test images) and the
protocol's two teachers, read from the committed run archive (``docs/results/
cifar10-lowdata-runs``) with ``torch.load(weights_only=True)``.

Each (row, seed) trains 30 epochs (the protocol's budget) and reports the validation top-1 of
its best epoch and the test top-1 of that epoch's student and of the last one: the results
page's columns. The table at the end puts the pipeline's means from the committed results CSV
next to the minimal loop's.

    python benchmarks/minimal_kd_accuracy.py [--rows ce,kd_resnet20,avg_kd] [--seeds 0,1,2]
        [--epochs 30] [--per-class 500]

Prints the figures; no assertions. About 2-6 minutes per (row, seed) on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_data import extracted_root  # noqa: E402
from bench_engine_overhead import accuracy, plain_student, protocol_data, sgd_cosine, train_epoch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO / "docs" / "results" / "cifar10-lowdata-runs"
RESULTS_CSV = REPO / "docs" / "results" / "cifar10-lowdata.csv"
#: the minimal loop's rows: (teachers, the results page's row it reproduces)
ROWS = {
    "ce": ((), "CE-only"),
    "kd_resnet20": (("resnet20",), "KD (resnet20)"),
    "kd_wrn_16_2": (("wrn_16_2",), "KD (wrn_16_2)"),
    "avg_kd": (("resnet20", "wrn_16_2"), "avg-KD"),
}


def archived_teacher(name: str, archive: Path = ARCHIVE) -> torch.nn.Module:
    """The protocol's teacher ``name`` from the run archive's checkpoint, in eval mode."""
    from asib_core.models import create_model
    from asib_core.pipeline.models import teacher_payload

    found = sorted(archive.glob(f"artifacts/*/teacher/{name}_imagefolder.pth"))
    if len(found) != 1:
        sys.exit(f"expected one {name} checkpoint under {archive}/artifacts/*/teacher/, found {len(found)}: "
                 "restore the archive (git checkout docs/results/cifar10-lowdata-runs).")
    payload = teacher_payload(found[0], name, 10, f"{name} checkpoint", "restore the archive")
    model = create_model(name, num_classes=10, small_input=True)
    model.load_state_dict(payload["model"])
    return Logits(model).eval().to(memory_format=torch.channels_last)


class Logits(torch.nn.Module):
    """A project model seen as a plain ``x -> logits`` module (its forward returns a dict)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)["logit"]


def train_row(data: dict, teachers: list, seed: int, epochs: int) -> dict:
    """30 (``epochs``) epochs of the minimal loop: the best-on-validation epoch's val and test
    top-1, the last epoch's test top-1, the wall time."""
    start = time.perf_counter()
    student = plain_student(8, seed)
    opt, sched = sgd_cosine(student, epochs)
    gen = torch.Generator().manual_seed(seed)
    best_val, best_state = -1.0, None
    for _ in range(epochs):
        train_epoch(student, opt, data, teachers, gen)
        sched.step()
        val = accuracy(student, data["vx"], data["vy"], data)
        if val > best_val:
            best_val, best_state = val, copy.deepcopy(student.state_dict())
    last_test = accuracy(student, data["tx"], data["ty"], data)
    student.load_state_dict(best_state)
    return {"val": best_val, "test": accuracy(student, data["tx"], data["ty"], data), "test_last": last_test,
            "seconds": time.perf_counter() - start}


def pipeline_means(path: Path = RESULTS_CSV) -> dict[str, dict]:
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["row"]: r for r in csv.DictReader(fh)}


def mean_sd(values: list[float], signed: bool = False) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):{'+' if signed else ''}.2f} ± {sd:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="ce,kd_resnet20,avg_kd", help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--per-class", type=int, default=500)
    args = ap.parse_args()
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; the rows are {', '.join(ROWS)}.")
    seeds = [int(s) for s in args.seeds.split(",")]
    os.environ.setdefault("ASIB_NO_PROGRESS", "1")

    data = protocol_data(extracted_root(), args.per_class)
    teachers = {name: archived_teacher(name) for name in sorted({t for r in rows for t in ROWS[r][0]})}
    for name, teacher in teachers.items():
        print(f"teacher {name}: val top-1 {accuracy(teacher, data['vx'], data['vy'], data):.2f} %, "
              f"test top-1 {accuracy(teacher, data['tx'], data['ty'], data):.2f} %", flush=True)
    print(f"threads={torch.get_num_threads()} train={len(data['y'])} val={len(data['vy'])} "
          f"test={len(data['ty'])} epochs={args.epochs} seeds={seeds}", flush=True)

    results: dict[str, list[dict]] = {r: [] for r in rows}
    for seed in seeds:          # seed-major: an interrupted run still has every row at the early seeds
        for row in rows:
            res = train_row(data, [teachers[t] for t in ROWS[row][0]], seed, args.epochs)
            results[row].append(res)
            print(f"{row:12s} seed {seed}: val {res['val']:.2f}  test {res['test']:.2f}  "
                  f"last {res['test_last']:.2f}  ({res['seconds']:.0f} s)", flush=True)

    page = pipeline_means()
    ce = [r["test"] for r in results.get("ce", [])]
    print("\n| row | minimal loop: val top-1 | minimal loop: test top-1 | minimal loop: test vs CE-only "
          "| pipeline: test top-1 | pipeline: test vs CE-only |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        tests = [r["test"] for r in results[row]]
        delta = mean_sd([t - c for t, c in zip(tests, ce)], signed=True) if ce and row != "ce" else "-"
        ref = page.get(ROWS[row][1], {})
        ref_test = (f"{float(ref['test_acc_mean']):.2f} ± {float(ref['test_acc_std']):.2f}"
                    if ref.get("test_acc_mean") else "-")
        ref_delta = f"{float(ref['delta_test']):+.2f}" if ref.get("delta_test") and row != "ce" else "-"
        print(f"| {ROWS[row][1]} | {mean_sd([r['val'] for r in results[row]])} | {mean_sd(tests)} | {delta} "
              f"| {ref_test} | {ref_delta} |")
    print("\n(mean ± sd over seeds; 'test vs CE-only' pairs the seeds; the pipeline's figures are the "
          f"committed {RESULTS_CSV.relative_to(REPO)})")


if __name__ == "__main__":
    main()
