"""Engine overhead: `distill` and `finetune` epochs against a minimal hand-written loop.

The minimal loop is what a person writes without any framework: a plain ``nn.Module``
CIFAR ResNet defined in this file (no project model wrapper), its own vectorised random
crop (pad 4) + horizontal flip on uint8 tensors, ``channels_last`` on the CPU, SGD with
Nesterov momentum, and for KD a frozen teacher's forward under ``no_grad``. It sees the same
decoded images (the benchmark protocol's 5,000-image student subset of the real CIFAR-10
JPEGs and its 5,000-image validation split), the same batch size and the same number of
optimiser steps as the pipeline. One epoch of it = one pass over the training images + one
validation pass.

The pipeline side runs the real entry points in-process (``run_distill`` with the protocol's
KD (resnet20) row: vanilla KD, T=4, 0.1 CE + 0.9 KD, one resnet20 teacher -> resnet8;
``run_finetune`` with the protocol's resnet20 recipe on the same 5,000 images), each in its
own temporary MLflow store. Its whole-epoch time is the gap between consecutive epochs'
MLflow metric timestamps (training, validation, logging, LR step, checkpoint); its training
time is the engine's own ``epoch_time``.

Shared machines drift up to 2x within minutes, so the sides are interleaved: every round
runs the four (pipeline distill, minimal KD, pipeline finetune, minimal CE) in a rotated
order, the first epoch of every run is discarded (warm-up), and ratios are taken per round
and reported as the median over rounds.

    python benchmarks/bench_engine_overhead.py [--epochs 4] [--rounds 3] [--per-class 500]

Goal (issue 12): distill and fine-tune epochs <= 1.10x the minimal loop.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_data import extracted_root  # noqa: E402

BATCH, LR, WD, TAU, KD_ALPHA = 128, 0.1, 5e-4, 4.0, 0.9


# -- the minimal loop: a plain CIFAR ResNet and its own augmentation -----------------------------
class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x):
        out = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(out)) + self.short(x))


class PlainResNet(nn.Module):
    """CIFAR ResNet-(6n+2), widths 16-32-64: resnet8 (n=1), resnet20 (n=3)."""

    def __init__(self, depth: int, num_classes: int = 10):
        super().__init__()
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for b in range(n):
                layers.append(Block(cin, cout, stride if b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def crop_flip(u8: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random 32x32 crop of the zero-padded batch and a random horizontal flip, in one gather."""
    b, _, h, w = u8.shape
    padded = F.pad(u8, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    out = padded[torch.arange(b)[:, None, None, None], torch.arange(3)[None, :, None, None], rows, cols]
    flip = torch.rand(b, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


def normalise(u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = (u8.float() / 255.0 - mean) / std
    return x.contiguous(memory_format=torch.channels_last)


def plain_student(depth: int, seed: int) -> nn.Module:
    """A fresh ``PlainResNet(depth)`` with the reference CIFAR init (RepDistiller, the CIFAR
    ResNet paper): Kaiming-normal convolutions (fan-out), unit/zero BatchNorm. Written here, like
    the model, rather than imported from asib_core.models: the loop shares no model code with the
    pipeline it is compared with."""
    torch.manual_seed(seed)
    model = PlainResNet(depth)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model.to(memory_format=torch.channels_last)


def sgd_cosine(model: nn.Module, epochs: int):
    """SGD (momentum 0.9, Nesterov) and its per-epoch schedule: a 1-epoch linear warm-up
    (half the LR in epoch 0), then cosine to 0."""
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=WD)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: (e + 1) / 2 if e < 1 else 0.5 * (1 + math.cos(math.pi * (e - 1) / max(1, epochs - 1))))
    return opt, sched


def soft_target(teachers: list, x: torch.Tensor) -> torch.Tensor:
    """Hinton's target: the mean over ``teachers`` of softmax(logits / T), without gradient."""
    with torch.no_grad():
        return torch.stack([F.softmax(t(x) / TAU, 1) for t in teachers]).mean(0)


def train_epoch(student: nn.Module, opt, data: dict, teachers: list, gen: torch.Generator) -> None:
    """One pass over ``data['x']`` in batches of BATCH (the last partial batch dropped): CE alone
    without teachers, else 0.1 CE + 0.9 T^2 KL(target || student)."""
    student.train()
    order = torch.randperm(len(data["y"]), generator=gen)
    for i in range(len(data["y"]) // BATCH):
        idx = order[i * BATCH:(i + 1) * BATCH]
        x = normalise(crop_flip(data["x"][idx], gen), data["mean"], data["std"])
        logits = student(x)
        loss = F.cross_entropy(logits, data["y"][idx])
        if teachers:
            kd = F.kl_div(F.log_softmax(logits / TAU, 1), soft_target(teachers, x), reduction="batchmean")
            loss = (1 - KD_ALPHA) * loss + KD_ALPHA * kd * TAU * TAU
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, data: dict) -> float:
    """Top-1 (%) of ``model`` in eval mode on uint8 NCHW ``images``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(labels), BATCH):
            x = normalise(images[i:i + BATCH], data["mean"], data["std"])
            correct += int((model(x).argmax(1) == labels[i:i + BATCH]).sum())
    return 100.0 * correct / max(1, len(labels))


def minimal_epochs(data, epochs: int, teacher: nn.Module | None, seed: int, depth: int = 8) -> tuple[list, list]:
    """(whole-epoch seconds = train pass + validation pass, train-pass seconds) of the
    hand-written loop training a ResNet-``depth`` (with ``teacher``: Hinton KD from it)."""
    student = plain_student(depth, seed)
    opt, sched = sgd_cosine(student, epochs)
    gen = torch.Generator().manual_seed(seed)
    teachers = [] if teacher is None else [teacher]
    whole, train = [], []
    for _ in range(epochs):
        start = time.perf_counter()
        train_epoch(student, opt, data, teachers, gen)
        sched.step()
        train.append(time.perf_counter() - start)
        accuracy(student, data["vx"], data["vy"], data)
        whole.append(time.perf_counter() - start)
    return whole, train


def protocol_data(root: Path, per_class: int) -> dict:
    """The protocol's splits as uint8 NCHW tensors: ``x``/``y`` the student subset (``per_class``
    images per class of the 45,000-image train split), ``vx``/``vy`` the 5,000-image validation
    split, ``tx``/``ty`` the 10,000 test images; ``mean``/``std`` the pipeline's normalisation."""
    from asib_core.data import build_data

    bundle = build_data({"seed": 0, "dataset": {"name": "imagefolder", "root": str(root), "val_split": 0.1,
                                                 "split_seed": 42, "train_per_class": per_class}})

    def nchw(split):
        return torch.from_numpy(split.images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(split.labels)

    (x, y), (vx, vy), (tx, ty) = nchw(bundle.train), nchw(bundle.val), nchw(bundle.test)
    return {"x": x, "y": y, "vx": vx, "vy": vy, "tx": tx, "ty": ty,
            "mean": torch.tensor(bundle.mean).view(1, 3, 1, 1), "std": torch.tensor(bundle.std).view(1, 3, 1, 1)}


# -- the pipeline side ----------------------------------------------------------------------------
def protocol_overrides(root: Path, per_class: int, epochs: int) -> list[str]:
    return ["dataset=imagefolder", f"experiment.dataset.root={root}", "experiment.dataset.val_split=0.1",
            "experiment.dataset.split_seed=42", f"experiment.dataset.train_per_class={per_class}",
            f"experiment.dataset.batch_size={BATCH}", "teacher1=resnet20", "teacher2=wrn_16_2", "student=resnet8",
            "experiment.num_stages=1", f"experiment.student_epochs_per_stage=[{epochs}]",
            "experiment.optimizer=sgd", f"experiment.student_lr={LR}", f"experiment.student_weight_decay={WD}",
            "experiment.schedule.type=cosine", "experiment.schedule.lr_warmup_epochs=1",
            "experiment.schedule.min_lr=0.0", "experiment.grad_clip_norm=0.0", f"experiment.eval_batch_size={BATCH}",
            "experiment.device=cpu", "experiment.use_amp=false", "experiment.use_channels_last=true",
            # the KD (resnet20) row: Hinton KD at the paper's recipe
            "method=vanilla_kd", "experiment.ce_alpha=0.1", f"experiment.kd_alpha={KD_ALPHA}", f"experiment.tau={TAU}",
            "experiment.tau_schedule=null", "experiment.tau_start=null", "experiment.tau_end=null",
            "experiment.kd_target=teacher", "experiment.kd_teacher_index=0", "experiment.kd_max_ratio=null",
            "experiment.kd_warmup_epochs=0", "experiment.mixup_alpha=0.0", "experiment.cutmix_alpha_distill=0.0",
            "experiment.ce_label_smoothing=0.0"]


@contextlib.contextmanager
def isolated_store():
    old_cwd, old_uri = os.getcwd(), os.environ.get("MLFLOW_TRACKING_URI")
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        os.chdir(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        try:
            yield Path(tmp)
        finally:
            os.chdir(old_cwd)
            if old_uri is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_uri


def epoch_seconds_from_store(run_id: str) -> tuple[list[float], list[float]]:
    """(whole-epoch seconds from consecutive val/acc timestamps, the engine's train seconds)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    stamps = sorted((m.step, m.timestamp) for m in client.get_metric_history(run_id, "val/acc"))
    train = [m.value for m in sorted(client.get_metric_history(run_id, "epoch_time"), key=lambda m: m.step)]
    whole = [(b[1] - a[1]) / 1000.0 for a, b in zip(stamps, stamps[1:])]
    return whole, train[1:]


def pipeline_distill(root: Path, per_class: int, epochs: int, teacher_files: list[Path]) -> tuple[list, list]:
    from asib_core.pipeline.distill import run_distill

    with isolated_store():
        over = protocol_overrides(root, per_class, epochs) + [
            f"experiment.teacher1_ckpt={teacher_files[0]}", f"experiment.teacher2_ckpt={teacher_files[1]}"]
        return epoch_seconds_from_store(run_distill("sota_generic", over).run_id)


def pipeline_finetune(root: Path, per_class: int, epochs: int) -> tuple[list, list]:
    from asib_core.pipeline.finetune import run_finetune

    with isolated_store():
        over = [f"dataset.root={root}", f"dataset.train_per_class={per_class}", f"finetune_epochs={epochs}",
                "device=cpu", f"eval_batch_size={BATCH}"]
        return epoch_seconds_from_store(run_finetune("resnet20", "imagefolder", over).run_id)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=4, help="epochs per run (the first is discarded)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=500)
    args = ap.parse_args()
    os.environ.setdefault("ASIB_NO_PROGRESS", "1")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from asib_core.models import create_model
    from asib_core.pipeline.models import save_teacher

    root = extracted_root()
    data = protocol_data(root, args.per_class)
    teacher = PlainResNet(20).to(memory_format=torch.channels_last).eval()
    teacher_files = []
    with tempfile.TemporaryDirectory(prefix="bench-teachers-") as tdir:
        for name in ("resnet20", "wrn_16_2"):
            path = Path(tdir) / f"{name}.pth"
            save_teacher(create_model(name, num_classes=10, small_input=True), path, {"teacher": name})
            teacher_files.append(path)
        print(f"threads={torch.get_num_threads()} train={len(data['y'])} val={len(data['vy'])} batch={BATCH} "
              f"epochs/run={args.epochs} (first discarded) rounds={args.rounds}", flush=True)
        jobs = {
            "pipeline distill": lambda r: pipeline_distill(root, args.per_class, args.epochs, teacher_files),
            "minimal KD": lambda r: tuple(t[1:] for t in minimal_epochs(data, args.epochs, teacher, r)),
            "pipeline finetune": lambda r: pipeline_finetune(root, args.per_class, args.epochs),
            "minimal CE (resnet20)": lambda r: tuple(t[1:] for t in minimal_epochs(data, args.epochs, None, r, 20)),
        }
        names = list(jobs)
        per_round = []
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            result = {}
            for name in order:
                whole, train = jobs[name](r)
                result[name] = (statistics.median(whole), statistics.median(train))
                print(f"round {r + 1} {name:24s} whole {result[name][0]:7.2f} s/epoch"
                      f"  train {result[name][1]:7.2f} s/epoch", flush=True)
            per_round.append(result)

    def ratio(a, b, i=0):
        return statistics.median(res[a][i] / res[b][i] for res in per_round)

    print("\n| step | pipeline s/epoch | minimal s/epoch | ratio (median of rounds) | goal |")
    print("|---|---|---|---|---|")
    for step, mine, ref in (("distill (KD resnet20 -> resnet8)", "pipeline distill", "minimal KD"),
                            ("finetune (resnet20, CE)", "pipeline finetune", "minimal CE (resnet20)")):
        p = statistics.median(res[mine][0] for res in per_round)
        m = statistics.median(res[ref][0] for res in per_round)
        print(f"| {step} | {p:.2f} | {m:.2f} | **{ratio(mine, ref):.3f}** | <= 1.10 |")
    print("\n(whole epoch = training + validation pass (+ logging, LR step and checkpoint for the pipeline);"
          f" pipeline training-only ratios: distill {ratio('pipeline distill', 'minimal KD', 1):.3f},"
          f" finetune {ratio('pipeline finetune', 'minimal CE (resnet20)', 1):.3f})")


if __name__ == "__main__":
    main()
