"""Throughput of augmented training batches: DeviceBatchLoader vs. a per-image pipeline.

Data: the real CIFAR-10 JPEG set (``../shared/data/cifar10-jpeg.tar.gz`` next to the checkout, ``$ASIB_SHARED_DIR``, or
``$ASIB_CIFAR10_JPEG_TAR``), extracted once into ``<cache>/cifar10-jpeg/`` (``<cache>`` =
``$ASIB_CACHE_DIR`` or ``~/.cache/asib-kd``) and decoded once through the package's cache.

Measured (batch 128, training augmentation: random crop 32 with padding 4 + horizontal
flip, normalisation):

* ``DeviceBatchLoader`` on ``--device`` (default cpu) over full epochs of the 50,000
  training images;
* torchvision ``ImageFolder`` + ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip``,
  ``ToTensor``, ``Normalize`` in a ``DataLoader`` with ``--workers`` worker processes
  (default 2), ``--batches`` batches (default 100) after the first one (worker start-up
  excluded).

Prints both rates and their ratio; no assertions.

    python benchmarks/bench_data.py [--device cuda] [--epochs 2] [--batches 100]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asib_core.data import DeviceBatchLoader, load_split  # noqa: E402
from asib_core.data.archive import unpacked_tarball  # noqa: E402
from asib_core.paths import cifar10_jpeg_tarball  # noqa: E402

TARBALL = cifar10_jpeg_tarball()


def extracted_root() -> Path:
    """``<cache>/cifar10-jpeg/cifar10``, extracting the tarball on first use."""
    return unpacked_tarball(TARBALL, "cifar10-jpeg") / "cifar10"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_device_loader(ds, device: torch.device, epochs: int, batch_size: int,
                        batch_threads: int | None = 1) -> dict:
    t0 = time.perf_counter()
    loader = DeviceBatchLoader(ds, batch_size, train=True, augment=True, device=device, seed=0,
                               batch_threads=batch_threads)
    sync(device)
    setup = time.perf_counter() - t0
    for i, _ in enumerate(loader):  # warm-up epoch slice (allocator, kernels)
        if i == 20:
            break
    rates, cpu_rates = [], []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        n = 0
        for x, y, idx in loader:
            n += x.shape[0]
        sync(device)
        rates.append(n / (time.perf_counter() - t0))
        cpu_rates.append(n / max(time.process_time() - c0, 1e-9))
    # img per CPU-second: what one fully available core delivers (less sensitive to other load)
    return {"img_per_s": max(rates), "epoch_rates": rates, "img_per_cpu_s": max(cpu_rates),
            "setup_s": setup, "batches": len(loader)}


def bench_per_image(root: Path, mean, std, workers: int, batches: int, batch_size: int) -> dict:
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    tf = transforms.Compose([
        transforms.RandomCrop(32, padding=4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean, std),
    ])
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up excluded
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        x, y = next(it)
        n += x.shape[0]
    rate = n / (time.perf_counter() - t0)
    del it
    return {"img_per_s": rate, "batches": batches, "workers": workers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads for the whole process (0: leave the default)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    root = extracted_root()
    t0 = time.perf_counter()
    train = load_split("imagefolder", root, "train")
    load_s = time.perf_counter() - t0
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}, load avg {os.getloadavg()[0]:.2f}, "
          f"torch {torch.__version__}, device {device}")
    print(f"train split: {len(train)} images, loaded in {load_s:.2f} s (decoded once, then cached)")

    fast = bench_device_loader(train, device, args.epochs, args.batch_size)
    print(f"DeviceBatchLoader ({device}, batch {args.batch_size}, crop+flip+normalise): "
          f"{fast['img_per_s']:,.0f} img/s (best of {args.epochs} full epochs of {fast['batches']} "
          f"batches: {', '.join(f'{r:,.0f}' for r in fast['epoch_rates'])}; setup {fast['setup_s']:.2f} s; "
          f"{fast['img_per_cpu_s']:,.0f} img per CPU-second)")
    result = {"device_loader": fast, "device": str(device), "cpus": os.cpu_count()}
    if device.type == "cpu" and torch.get_num_threads() > 1:
        multi = bench_device_loader(train, device, args.epochs, args.batch_size, batch_threads=None)
        print(f"  same with batch_threads=None ({torch.get_num_threads()} intra-op threads): "
              f"{multi['img_per_s']:,.0f} img/s ({multi['img_per_cpu_s']:,.0f} img per CPU-second)")
        result["device_loader_all_threads"] = multi
    if not args.skip_baseline:
        slow = bench_per_image(root, train.mean, train.std, args.workers, args.batches, args.batch_size)
        print(f"ImageFolder + per-image transforms (DataLoader, {args.workers} workers): "
              f"{slow['img_per_s']:,.0f} img/s over {args.batches} batches")
        print(f"ratio: {fast['img_per_s'] / slow['img_per_s']:.1f}x")
        result["per_image"] = slow
        result["ratio"] = fast["img_per_s"] / slow["img_per_s"]
    print(f"load avg after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
