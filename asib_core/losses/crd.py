"""Contrastive Representation Distillation (CRD): NCE loss, memory banks, full loss module.

Reference: Tian, Krishnan, Isola, "Contrastive Representation Distillation", ICLR 2020.

Overview (one training step, batch of B samples with dataset indices ``idx``)::

    v_s = l2n(W_s f_s),  v_t = l2n(W_t f_t)                    # [B, feat_dim] embeddings
    negatives n_bk, k = 1..K, distinct within a row (exact mode: dataset samples of another
    class than sample b)
    student-anchored scores  P^s_bk = exp(<v_s,b, M_t[j]> / T) / Z_s, j in {idx_b, n_b1..n_bK}
    teacher-anchored scores  P^t_bk = exp(<v_t,b, M_s[j]> / T) / Z_t
    loss = NCE(P^s) + NCE(P^t)
    M_s[idx] <- l2n(mom * M_s[idx] + (1 - mom) * v_s);  same for M_t with v_t

``M_s``/``M_t`` are the student/teacher memory banks (``[n_data, feat_dim]``), ``Z_s``/``Z_t``
are fixed at the first batch to ``n_data * mean(exp(<., .>/T))`` so that ``P`` approximates a
probability over the dataset. The positive of each anchor is the *other* modality's memory
entry of the same sample.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ._common import l2_normalize, upcast

__all__ = ["crd_nce_loss", "CRDMemory", "CRDEmbed", "CRDLoss"]

#: most random keys drawn at once when sampling negatives (anchors are processed in row chunks
#: of ``SAMPLING_CHUNK_ELEMENTS // n_data``: 64 MiB of float32 keys, even for ImageNet-size banks)
SAMPLING_CHUNK_ELEMENTS = 1 << 24


def crd_nce_loss(
    pos_scores: Tensor,
    neg_scores: Tensor,
    n_data: int,
    eps: float = 1e-7,
) -> Tensor:
    """NCE loss of CRD for one anchor modality.

    Formula (per anchor b, K = ``neg_scores.shape[1]`` negatives, noise prob ``Pn = 1/N``)::

        loss_b = - [ log( P_b0 / (P_b0 + K Pn + eps) )
                     + sum_k log( K Pn / (P_bk + K Pn + eps) ) ]
        loss   = mean_b loss_b

    Args:
        pos_scores: ``[B]`` positive scores ``P_b0 = exp(<v_b, m_pos>/T) / Z``.
        neg_scores: ``[B, K]`` negative scores ``P_bk = exp(<v_b, m_k>/T) / Z``.
        n_data: N, the dataset size (number of memory entries).
        eps: stabiliser in the denominators (1e-7 as in the reference code).

    Returns:
        scalar (mean over anchors).
    """
    pos = upcast(pos_scores).reshape(-1)
    neg = upcast(neg_scores)
    if neg.dim() != 2 or neg.shape[0] != pos.shape[0]:
        raise ValueError(f"neg_scores must be [B, K] with B={pos.shape[0]}, got {tuple(neg.shape)}")
    K = neg.shape[1]
    noise = K / float(n_data)  # K * Pn
    log_d1 = torch.log(pos / (pos + noise + eps))
    log_d0 = torch.log(noise / (neg + noise + eps))
    per_anchor = -(log_d1 + log_d0.sum(dim=1))
    return per_anchor.sum() / max(per_anchor.shape[0], 1)


class CRDMemory(nn.Module):
    """Two momentum memory banks for CRD plus negative sampling and NCE score computation.

    Buffers (saved in ``state_dict``, so a resumed run continues with the same memory):
        ``memory_s``, ``memory_t``: ``[n_data, feat_dim]`` L2-normalised rows (random init).
        ``z_s``, ``z_t``: scalar normalisers, ``-1`` until fixed at the first ``forward``.
        ``labels`` (only after :meth:`set_labels`): ``[n_data]`` int64 dataset labels; with
        labels, negatives are drawn uniformly from samples of *other* classes (CRD "exact"
        mode); without labels, uniformly from all samples except the anchor itself. Either
        way the K negatives of one anchor are distinct (drawn without replacement, as
        RepDistiller's ``np.random.choice(cls_negative[target], k, replace=False)`` in
        dataset/cifar100.py), so K may not exceed the smallest pool (:meth:`max_negatives`).

    The module keeps its buffers on the device of the embeddings given to :meth:`forward`
    (moves itself on first use if needed). Memory updates are out-of-place (the buffer is
    replaced by an updated copy) so the autograd graph of the current step stays valid.

    Args:
        feat_dim: embedding size (128).
        n_data: dataset size N.
        nce_k: number of negatives K per anchor (16384).
        nce_t: temperature T (0.07).
        momentum: memory momentum (0.5): ``new = l2n(momentum * old + (1 - momentum) * v)``.
        labels: optional ``[n_data]`` labels for exact-mode sampling.
        score_mode: ``"auto"`` | ``"matmul"`` | ``"gather"``: how scores are computed;
            ``matmul`` scores the anchors against the whole bank (``[B, N]``) and gathers,
            ``gather`` gathers ``[B, K+1, d]`` rows first. Same values; ``auto`` picks the
            smaller intermediate (``matmul`` when ``N <= (K + 1) * feat_dim``).
    """

    def __init__(
        self,
        feat_dim: int,
        n_data: int,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        labels: Optional[Tensor] = None,
        score_mode: str = "auto",
    ) -> None:
        super().__init__()
        if n_data < 2:
            raise ValueError("CRDMemory needs n_data >= 2")
        if not nce_t > 0:
            raise ValueError("nce_t must be > 0")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError("momentum must be in [0, 1]")
        if score_mode not in ("auto", "matmul", "gather"):
            raise ValueError(f"score_mode must be auto|matmul|gather, got {score_mode!r}")
        self.feat_dim = int(feat_dim)
        self.n_data = int(n_data)
        self.nce_k = int(nce_k)
        self.nce_t = float(nce_t)
        self.momentum = float(momentum)
        self.score_mode = score_mode
        self.register_buffer("memory_s", l2_normalize(torch.randn(n_data, feat_dim), dim=1))
        self.register_buffer("memory_t", l2_normalize(torch.randn(n_data, feat_dim), dim=1))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        # optional exact-mode state; None buffers are skipped by state_dict until set
        self.register_buffer("labels", None)
        self.register_buffer("_class_count", None, persistent=False)
        self._z_ready = False  # python-side cache of "z_s and z_t are fixed" (avoids a sync)
        if labels is not None:
            self.set_labels(labels)
        else:
            self._check_k(self.nce_k)

    # ------------------------------------------------------------------ sampling
    def set_labels(self, labels: Tensor) -> None:
        """Register dataset labels (``[n_data]``) for exact-mode (other-class) negatives."""
        labels = torch.as_tensor(labels).long().reshape(-1).to(self.memory_s.device)
        if labels.shape[0] != self.n_data:
            raise ValueError(f"labels must have n_data={self.n_data} entries, got {labels.shape[0]}")
        counts = torch.bincount(labels)
        if (counts == self.n_data).any():
            raise ValueError("exact-mode sampling needs at least two classes")
        self.labels = labels
        self._class_count = counts
        self._check_k(self.nce_k)

    def max_negatives(self) -> int:
        """Most distinct negatives every anchor has: ``n_data`` minus the largest class's count
        (exact mode), ``n_data - 1`` without labels."""
        if self.labels is None:
            return self.n_data - 1
        return self.n_data - int(self._class_count.max())

    def _check_k(self, k: int) -> None:
        if k > self.max_negatives():
            raise ValueError(
                f"nce_k={k} distinct negatives per anchor, but the smallest pool of negatives holds "
                f"{self.max_negatives()} samples (n_data={self.n_data}); use nce_k <= {self.max_negatives()}"
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "labels"
        if key in state_dict and self.labels is None:
            self.set_labels(state_dict[key])  # so the labels buffer exists to be loaded
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.labels is not None:
            self.set_labels(self.labels)  # rebuild the derived (non-persistent) index
        self._z_ready = False

    def sample_negatives(self, idx: Tensor, k: Optional[int] = None,
                         generator: Optional[torch.Generator] = None) -> Tensor:
        """Draw ``[B, k]`` negative dataset indices for anchors ``idx``, distinct within a row.

        With labels: uniform over the samples whose label differs from ``labels[idx_b]``;
        without labels: uniform over ``{0..N-1} \\ {idx_b}``; in both cases without replacement
        (the ``k`` smallest of independent uniform keys, the excluded samples' keys pushed above 1).
        """
        k = self.nce_k if k is None else int(k)
        self._check_k(k)
        idx = idx.long().reshape(-1).to(self.memory_s.device)
        rows = max(1, SAMPLING_CHUNK_ELEMENTS // self.n_data)  # bounds the [rows, N] key matrix
        return torch.cat([self._distinct_negatives(part, k, generator) for part in idx.split(rows)])

    def _distinct_negatives(self, idx: Tensor, k: int, generator: Optional[torch.Generator]) -> Tensor:
        dev = self.memory_s.device
        keys = torch.rand(idx.shape[0], self.n_data, device=dev, generator=generator)
        if self.labels is not None:
            excluded = self.labels.unsqueeze(0) == self.labels[idx].unsqueeze(1)
        else:
            excluded = torch.arange(self.n_data, device=dev).unsqueeze(0) == idx.unsqueeze(1)
        keys = keys.masked_fill(excluded, 2.0)
        return keys.topk(k, dim=1, largest=False, sorted=False).indices

    # ------------------------------------------------------------------ scores
    def _exp_scores(self, anchor: Tensor, memory: Tensor, cidx: Tensor) -> Tensor:
        """exp(<anchor_b, memory[cidx_bj]> / T), ``[B, K+1]``."""
        mode = self.score_mode
        if mode == "auto":
            mode = "matmul" if self.n_data <= cidx.shape[1] * self.feat_dim else "gather"
        # float32 at least and outside autocast: exp(1/0.07) ~ 1.6e6 overflows float16
        anchor = upcast(anchor)
        mem = memory.to(anchor.dtype)
        with torch.autocast(device_type=anchor.device.type, enabled=False):
            if mode == "matmul":
                dots = (anchor @ mem.t()).gather(1, cidx)
            else:
                dots = torch.einsum("bkd,bd->bk", mem[cidx], anchor)
            return torch.exp(dots / self.nce_t)

    def forward(
        self,
        v_s: Tensor,
        v_t: Tensor,
        idx: Tensor,
        neg_idx: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """Scores for both anchors, then the momentum update of both banks.

        Args:
            v_s, v_t: ``[B, feat_dim]`` L2-normalised student / teacher embeddings.
            idx: ``[B]`` dataset indices of the batch.
            neg_idx: optional ``[B, K]`` negative indices (else :meth:`sample_negatives`).

        Returns:
            ``(out_s, out_t)``, each ``[B, K+1]`` normalised scores ``exp(<.,.>/T) / Z``;
            column 0 is the positive. ``out_s``: student embedding vs teacher memory;
            ``out_t``: teacher embedding vs student memory.
        """
        if self.memory_s.device != v_s.device:
            self.to(v_s.device)
        idx = idx.long().reshape(-1).to(v_s.device)
        if neg_idx is None:
            neg_idx = self.sample_negatives(idx)
        neg_idx = neg_idx.long().to(v_s.device)
        cidx = torch.cat([idx.unsqueeze(1), neg_idx], dim=1)  # [B, K+1]

        exp_s = self._exp_scores(v_s, self.memory_t, cidx)
        exp_t = self._exp_scores(v_t, self.memory_s, cidx)
        if not self._z_ready:
            with torch.no_grad():
                if self.z_s.item() < 0:
                    self.z_s.fill_(exp_s.detach().mean().item() * self.n_data)
                if self.z_t.item() < 0:
                    self.z_t.fill_(exp_t.detach().mean().item() * self.n_data)
            self._z_ready = True
        out_s = exp_s / self.z_s.to(exp_s.dtype)
        out_t = exp_t / self.z_t.to(exp_t.dtype)
        self.update(v_s, v_t, idx)
        return out_s, out_t

    @torch.no_grad()
    def update(self, v_s: Tensor, v_t: Tensor, idx: Tensor) -> None:
        """``M[idx] <- l2n(momentum * M[idx] + (1 - momentum) * v)`` for both banks (out-of-place)."""
        idx = idx.long().reshape(-1).to(self.memory_s.device)
        m = self.momentum
        for name, v in (("memory_s", v_s), ("memory_t", v_t)):
            bank = getattr(self, name)
            rows = bank[idx] * m + v.detach().to(bank.dtype) * (1.0 - m)
            setattr(self, name, bank.index_copy(0, idx, l2_normalize(rows, dim=1)))


class CRDEmbed(nn.Module):
    """CRD embedding head: flatten, ``Linear(in_dim, feat_dim)``, L2-normalise per sample."""

    def __init__(self, in_dim: int, feat_dim: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, feat_dim)

    def forward(self, x: Tensor) -> Tensor:
        return l2_normalize(self.linear(x.flatten(1)), dim=1)


class CRDLoss(nn.Module):
    """Complete CRD loss: embeddings + memory + student- and teacher-anchored NCE terms.

    ``loss = crd_nce_loss(out_s[:, 0], out_s[:, 1:], N) + crd_nce_loss(out_t[:, 0], out_t[:, 1:], N)``
    (see :class:`CRDMemory` for ``out_s``/``out_t``). The embedding heads are trainable and
    must be added to the student optimiser; the caller applies the CRD weight (0.8).

    Args:
        student_dim, teacher_dim: sizes of the (pooled, flattened) student/teacher features.
        n_data: training-set size; ``idx`` passed to forward must be in ``[0, n_data)``.
        feat_dim, nce_k, nce_t, momentum: 128, 16384, 0.07, 0.5 by default (kd-reference.md).
        labels: optional ``[n_data]`` training labels for exact-mode negatives.
        eps: NCE stabiliser.

    ``forward(f_s, f_t, idx, neg_idx=None) -> scalar``; ``f_t`` normally comes from the frozen
    teacher (the gradient reaches only ``embed_t``).
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        n_data: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        labels: Optional[Tensor] = None,
        eps: float = 1e-7,
        score_mode: str = "auto",
    ) -> None:
        super().__init__()
        self.embed_s = CRDEmbed(student_dim, feat_dim)
        self.embed_t = CRDEmbed(teacher_dim, feat_dim)
        self.memory = CRDMemory(feat_dim, n_data, nce_k, nce_t, momentum, labels, score_mode)
        self.eps = float(eps)

    def forward(self, f_s: Tensor, f_t: Tensor, idx: Tensor,
                neg_idx: Optional[Tensor] = None) -> Tensor:
        v_s = self.embed_s(upcast(f_s))
        v_t = self.embed_t(upcast(f_t))
        out_s, out_t = self.memory(v_s, v_t, idx, neg_idx)
        n = self.memory.n_data
        loss_s = crd_nce_loss(out_s[:, 0], out_s[:, 1:], n, self.eps)
        loss_t = crd_nce_loss(out_t[:, 0], out_t[:, 1:], n, self.eps)
        return loss_s + loss_t
