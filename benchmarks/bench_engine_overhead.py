"""Framework overhead of `distill` (vanilla KD) against a minimal hand-written KD loop.

Same models (two teachers resnet20 + wrn_16_2 -> student resnet8, teachers frozen),
same data tensors (the real CIFAR-10 JPEGs of ../shared/data, a balanced subset),
same batch size and augmentation (the project's device-side crop+flip), same optimiser.
Both run in this one process, one after the other; each side runs EPOCHS timed epochs
after one warm-up epoch.

    python benchmarks/bench_engine_overhead.py [--per-class 500] [--epochs 3] [--batch 128]

Prints seconds per epoch of the training loop for both and their ratio, and the same
for a whole epoch (training + validation pass + logging + checkpoint for `distill`,
training + validation pass for the minimal loop). Goal: ratio <= 1.05.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_data import extracted_root  # noqa: E402

from asib_core.data import build_data  # noqa: E402
from asib_core.models import create_model  # noqa: E402
from asib_core.pipeline.models import save_teacher  # noqa: E402


def minimal_loop(data, teachers, student, epochs: int, batch: int, lr: float) -> dict:
    """The loop a person would write by hand: no framework at all."""
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    train = data.loader("train", batch_size=batch)
    val = data.loader("val", batch_size=512)
    tau, alpha = 4.0, 0.9
    train_times, epoch_times = [], []
    for epoch in range(epochs + 1):
        start = time.perf_counter()
        student.train()
        train.set_epoch(epoch)
        for x, y, _ in train:
            with torch.no_grad():
                target = sum(F.softmax(t(x)["logit"] / tau, 1) for t in teachers) / len(teachers)
            logits = student(x)["logit"]
            kd = F.kl_div(F.log_softmax(logits / tau, 1), target, reduction="batchmean") * tau * tau
            loss = (1 - alpha) * F.cross_entropy(logits, y) + alpha * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mid = time.perf_counter()
        student.eval()
        with torch.no_grad():
            correct = sum(int((student(x)["logit"].argmax(1) == y).sum()) for x, y, _ in val)
        end = time.perf_counter()
        if epoch > 0:  # epoch 0 is the warm-up
            train_times.append(mid - start)
            epoch_times.append(end - start)
    return {"train": sum(train_times) / epochs, "epoch": sum(epoch_times) / epochs, "val_correct": correct}


def framework_run(root: Path, per_class: int, epochs: int, batch: int, lr: float, teacher_files) -> dict:
    import mlflow
    from mlflow.tracking import MlflowClient

    from asib_core.pipeline.distill import run_distill

    work = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    overrides = [
        "dataset=imagefolder", f"experiment.dataset.root={root}", f"experiment.dataset.train_per_class={per_class}",
        f"experiment.dataset.batch_size={batch}", "experiment.dataset.val_split=0.1",
        f"experiment.student_epochs_per_stage=[{epochs + 1}]", f"experiment.student_lr={lr}",
        "experiment.schedule.lr_warmup_epochs=0", "experiment.eval_batch_size=512",
        f"experiment.teacher1_ckpt={teacher_files[0]}", f"experiment.teacher2_ckpt={teacher_files[1]}",
        "experiment.compute_teacher_eval=false", "experiment.grad_clip_norm=0",
    ]
    result = run_distill("quickstart", overrides)
    client = MlflowClient()
    train = [m.value for m in client.get_metric_history(result.run_id, "epoch_time")][1:]
    stamps = sorted(m.timestamp for m in client.get_metric_history(result.run_id, "val/acc"))
    whole = [(b - a) / 1000 for a, b in zip(stamps, stamps[1:])]
    mlflow.end_run()
    return {"train": sum(train) / len(train), "epoch": sum(whole) / len(whole)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    os.environ.setdefault("ASIB_NO_PROGRESS", "1")
    torch.manual_seed(0)
    root = extracted_root()
    cfg = {"seed": 42, "dataset": {"name": "imagefolder", "root": str(root), "val_split": 0.1, "data_aug": 1,
                                   "batch_size": args.batch, "train_per_class": args.per_class}}
    data = build_data(cfg, "cpu")
    teachers = [create_model(n, num_classes=10).eval() for n in ("resnet20", "wrn_16_2")]
    for t in teachers:
        t.requires_grad_(False)
    files = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-teachers-"))
    for name, t in zip(("resnet20", "wrn_16_2"), teachers):
        files.append(tmp / f"{name}.pth")
        save_teacher(t, files[-1], {"teacher": name})
    print(f"data: {len(data.train)} train / {len(data.val)} val CIFAR-10 images, batch {args.batch}, "
          f"{torch.get_num_threads()} threads, {args.epochs} timed epochs after 1 warm-up")
    mini = minimal_loop(data, teachers, create_model("resnet8", num_classes=10), args.epochs, args.batch, 0.05)
    fw = framework_run(root, args.per_class, args.epochs, args.batch, 0.05, files)
    print(f"minimal loop : {mini['train']:.2f} s/epoch training, {mini['epoch']:.2f} s/epoch with validation")
    print(f"distill      : {fw['train']:.2f} s/epoch training, {fw['epoch']:.2f} s/epoch with validation, "
          "logging and checkpoint")
    print(f"ratio (training loop)  : {fw['train'] / mini['train']:.3f}")
    print(f"ratio (whole epoch)    : {fw['epoch'] / mini['epoch']:.3f}")


if __name__ == "__main__":
    main()
