"""Device-side batch iterator: whole dataset on the device, vectorised augmentation.

:class:`DeviceBatchLoader` replaces ``DataLoader`` + per-image PIL transforms. The ``uint8``
images are copied to the device once (NCHW); every batch is a gather, a batched random crop
and flip, and a fused normalisation, all on the device.

Determinism. Everything random in an epoch (the permutation, crop offsets, flips) is drawn
up front on the CPU from a ``torch.Generator`` seeded with ``epoch_seed(seed, epoch)``, for
every position of the *global* epoch order, and then moved to the device. The stream is
therefore identical on CPU and GPU, for every ``world_size``, and for a given
``(seed, epoch)``.

Sharding rule (``world_size`` W, ``rank`` r, per-rank batch B, N samples):

* the global order is a seeded permutation of ``0..N-1`` (training) or ``0..N-1`` itself
  (evaluation);
* ``drop_last=True`` (training default): the order is truncated to ``N - N % W`` positions;
  rank r takes positions ``r, r+W, r+2W, ...`` and then only whole batches of B, i.e.
  ``floor(floor(N / W) / B)`` batches per rank. Step s of all ranks together covers global
  positions ``s*B*W .. (s+1)*B*W - 1``: one global batch of ``B*W`` samples, no sample twice;
* ``drop_last=False`` (evaluation default): no truncation and no padding; rank r takes
  positions ``r, r+W, ...`` (ranks differ by at most one sample) and its last batch may be
  smaller. Every sample is seen exactly once across ranks, so sums of correct predictions and
  counts reduced over ranks give exact metrics.

Epochs. ``iter(loader)`` uses the current epoch and then advances it by one, so a loop that
never calls :meth:`DeviceBatchLoader.set_epoch` still gets a new permutation per pass; call
``set_epoch(e)`` before iterating for exact control (resume).
"""

from __future__ import annotations

import hashlib
import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import ArrayDataset


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed derived from ``(seed, epoch)`` by SHA-256."""
    digest = hashlib.sha256(f"asib-kd/batches/{int(seed)}/{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _to_nchw_uint8(images, device: torch.device) -> torch.Tensor:
    """numpy ``[N,H,W,3]`` or torch ``[N,3,H,W]``/``[N,H,W,3]`` uint8 -> NCHW uint8 on device."""
    if isinstance(images, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(images))
        hwc = True
    elif isinstance(images, torch.Tensor):
        t = images
        hwc = t.ndim == 4 and t.shape[1] != 3 and t.shape[-1] == 3
    else:
        raise TypeError(f"images must be a numpy array or a torch tensor, got {type(images)}")
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"images must be uint8 4-D, got {t.dtype} {tuple(t.shape)}")
    t = t.to(device)
    if hwc:
        t = t.permute(0, 3, 1, 2)
    return t.contiguous()


class DeviceBatchLoader:
    """Iterate over ``(x, y, idx)`` batches of a dataset held on ``device``.

    Args:
        ds_or_arrays: an :class:`ArrayDataset`, or ``(images, labels)`` where images are numpy
            ``uint8 [N,H,W,3]`` or torch ``uint8 [N,3,H,W]`` (a tensor already on ``device``
            is used without a copy).
        batch_size: samples per batch *per rank*.
        train: shuffle every epoch and (by default) drop the last partial batch.
        augment: random crop (zero padding ``crop_padding``) + horizontal flip; train only.
        mean, std: per-channel constants for pixels in [0, 1]; default: the dataset's.
        device: where images, labels and batches live.
        seed: base seed of the per-epoch generators.
        drop_last: default ``train``.
        channels_last: return ``x`` in ``torch.channels_last`` memory format.
        rank, world_size: shard of this process (see module docstring).
        return_index: yield ``idx`` (dataset indices, for memory banks) as the third element.
        crop_padding: zero padding of the random crop (4 = the CIFAR recipe).
        batch_threads: on a CPU device, torch intra-op threads used while assembling a batch
            (restored before the batch is yielded); ``None`` leaves torch's setting. The
            per-batch work is small (about 0.4 MB in, 1.5 MB out), so threading gains little,
            while on an oversubscribed machine it made batches several times slower.

    Yields:
        ``x`` float32 ``[B,3,H,W]`` normalised, ``y`` int64 ``[B]``, ``idx`` int64 ``[B]``.
    """

    def __init__(
        self,
        ds_or_arrays: ArrayDataset | Sequence,
        batch_size: int,
        *,
        train: bool,
        augment: bool,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        drop_last: bool | None = None,
        channels_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        return_index: bool = True,
        crop_padding: int = 4,
        batch_threads: int | None = 1,
    ) -> None:
        self.device = torch.device(device)
        if isinstance(ds_or_arrays, ArrayDataset):
            images, labels = ds_or_arrays.images, ds_or_arrays.labels
            mean = ds_or_arrays.mean if mean is None else mean
            std = ds_or_arrays.std if std is None else std
        else:
            images, labels = ds_or_arrays
        if mean is None or std is None:
            raise ValueError("mean and std are required when raw arrays are given")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if augment and not train:
            raise ValueError("augmentation is for training loaders only (train=False, augment=True)")
        if crop_padding < 0:
            raise ValueError("crop_padding must be >= 0")

        self.images = _to_nchw_uint8(images, self.device)
        if isinstance(labels, torch.Tensor):
            self.labels = labels.to(self.device, torch.int64).reshape(-1)
        else:
            self.labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)).reshape(-1).to(self.device)
        if self.images.shape[0] != self.labels.shape[0]:
            raise ValueError("images and labels differ in length")
        if self.images.shape[1] != 3:
            raise ValueError("images must have 3 channels")

        std_t = torch.tensor([float(s) for s in std], dtype=torch.float32)
        mean_t = torch.tensor([float(m) for m in mean], dtype=torch.float32)
        # x_norm = (u8 / 255 - mean) / std = u8 * scale + shift
        self._scale = (1.0 / (255.0 * std_t)).view(1, 3, 1, 1).to(self.device)
        self._shift = (-mean_t / std_t).view(1, 3, 1, 1).to(self.device)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)

        self.batch_size = int(batch_size)
        self.train = bool(train)
        self.augment = bool(augment)
        self.seed = int(seed)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.channels_last = bool(channels_last)
        self.rank, self.world_size = int(rank), int(world_size)
        self.return_index = bool(return_index)
        self.crop_padding = int(crop_padding)
        self.batch_threads = batch_threads if self.device.type == "cpu" else None
        self.epoch = 0
        self._positions, self._num_batches = self._shard_positions()

    # ------------------------------------------------------------------ sizes and sharding
    @property
    def dataset_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return int(self._positions.numel())

    def __len__(self) -> int:
        return self._num_batches

    def _shard_positions(self) -> tuple[torch.Tensor, int]:
        n, w, b = self.dataset_size, self.world_size, self.batch_size
        if self.drop_last:
            pos = torch.arange(self.rank, n - n % w, w)
            batches = pos.numel() // b
            return pos[: batches * b], batches
        pos = torch.arange(self.rank, n, w)
        return pos, math.ceil(pos.numel() / b)

    # ------------------------------------------------------------------ epoch plan
    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch`` for the next iteration (then it advances by one per iteration)."""
        self.epoch = int(epoch)

    def epoch_plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """This rank's indices (and crop/flip parameters when augmenting) for ``epoch``, on CPU.

        Keys: ``idx`` (dataset indices in yield order) and, with augmentation, ``dy``/``dx``
        (crop offsets in the padded image, 0..2*padding) and ``flip`` (bool).
        """
        n = self.dataset_size
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
        order = torch.randperm(n, generator=gen) if self.train else torch.arange(n)
        plan = {"idx": order[self._positions]}
        if self.augment:
            span = 2 * self.crop_padding + 1
            plan["dy"] = torch.randint(0, span, (n,), generator=gen)[self._positions]
            plan["dx"] = torch.randint(0, span, (n,), generator=gen)[self._positions]
            plan["flip"] = (torch.randint(0, 2, (n,), generator=gen) == 1)[self._positions]
        return plan

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch = self.epoch
        self.epoch += 1
        plan = {k: v.to(self.device, non_blocking=True) for k, v in self.epoch_plan(epoch).items()}
        return self._batches(plan)

    def _batches(self, plan: dict[str, torch.Tensor]) -> Iterator[tuple[torch.Tensor, ...]]:
        b = self.batch_size
        for s in range(self._num_batches):
            sl = slice(s * b, (s + 1) * b)
            with _intra_op_threads(self.batch_threads):
                idx = plan["idx"][sl]
                u8 = self.images.index_select(0, idx)
                if self.augment:
                    u8 = random_crop_flip(
                        u8, plan["dy"][sl], plan["dx"][sl], plan["flip"][sl], self.crop_padding
                    )
                x = self.normalize(u8)
                y = self.labels.index_select(0, idx)
            yield (x, y, idx) if self.return_index else (x, y)

    def normalize(self, u8: torch.Tensor) -> torch.Tensor:
        """``uint8 [B,3,H,W]`` -> float32 ``(u8/255 - mean)/std``, channels_last if asked."""
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = u8.to(dtype=torch.float32, memory_format=fmt)
        return x.mul_(self._scale).add_(self._shift)


@contextmanager
def _intra_op_threads(n: int | None):
    """Temporarily use ``n`` torch intra-op threads (no-op for None or the current value)."""
    previous = torch.get_num_threads()
    if n is None or n == previous:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def random_crop_flip(
    u8: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """Batched random crop with zero padding, then horizontal flip, on ``[B,C,H,W]``.

    Sample i is cropped from the zero-padded image at rows ``dy[i] .. dy[i]+H-1`` and columns
    ``dx[i] .. dx[i]+W-1`` (``dy, dx`` in ``0..2*padding``; ``padding`` = no shift) and then
    mirrored left-right where ``flip[i]``. Implemented as one gather over a strided window
    view (no per-sample Python loop).
    """
    b, c, h, w = u8.shape
    if padding > 0:
        padded = F.pad(u8, (padding, padding, padding, padding))
        windows = padded.unfold(2, h, 1).unfold(3, w, 1)  # [B, C, 2p+1, 2p+1, H, W] view
        out = windows[torch.arange(b, device=u8.device), :, dy, dx]  # [B, C, H, W]
    else:
        out = u8.clone()
    # torch.where instead of boolean-mask indexing: no host-device sync on GPUs.
    return torch.where(flip.view(b, 1, 1, 1), out.flip(-1), out)

