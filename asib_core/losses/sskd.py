"""SSKD loss math (Knowledge Distillation Meets Self-Supervision).

Reference: Xu, Liu, Li, Loy, "Knowledge Distillation Meets Self-Supervision", ECCV 2020.

Setting: every image of a batch of B originals also appears transformed (3 rotations in the
reference), giving M = R * B transformed rows. The method (not this module) does the rotation
bookkeeping and calls:

* :func:`sskd_transformed_kd` - KD (T = 4) between student and teacher *class* logits on the
  transformed images, on the rows kept by the teacher's error ranking (weight 2.7);
* :func:`sskd_similarity_kl` - KD (T = 0.5) between the student's and the teacher's
  similarity rows "transformed image vs every original" computed from the self-supervision
  head embeddings, keeping all correctly matched rows and 75 % of the wrong ones (weight 10);
* :func:`sskd_ss_ce_loss` - the contrastive-prediction CE used to train the teacher's
  self-supervision head before distillation.

Row layout convention: ``positive_index[m]`` is the index (0..B-1) of the original image of
transformed row m. By default rows are grouped per image (``m // R``), i.e. the transformed
rows are ordered image 0's R transforms, then image 1's, ... Pass ``positive_index``
explicitly for any other layout.

Row selection ("error-level ranking"): for each row, the rank of the correct answer is the
number of candidates the teacher scores strictly higher than it (0 = teacher correct). All
rank-0 rows are kept; of the wrong rows, the ``floor(keep_wrong_ratio * n_wrong)`` rows with
the smallest rank (ties: lower row index first) are kept.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import check_temperature, l2_normalize, upcast
from .logit import kd_loss

__all__ = [
    "sskd_similarity",
    "sskd_keep_index",
    "sskd_similarity_kl",
    "sskd_transformed_kd",
    "sskd_ss_ce_loss",
]


def sskd_similarity(orig_emb: Tensor, aug_emb: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarities ``S[m, b] = <l2n(aug_m), l2n(orig_b)>``, shape ``[M, B]``."""
    a = l2_normalize(upcast(aug_emb).flatten(1), dim=1, eps=eps)
    o = l2_normalize(upcast(orig_emb).flatten(1), dim=1, eps=eps)
    return a @ o.t()


def _default_positive_index(B: int, M: int, device) -> Tensor:
    if B == 0 or M % B != 0:
        raise ValueError(f"cannot infer the row layout: M={M} is not a multiple of B={B}; "
                         "pass positive_index")
    return torch.arange(B, device=device).repeat_interleave(M // B)


@torch.no_grad()
def sskd_keep_index(teacher_scores: Tensor, target: Tensor, keep_wrong_ratio: float) -> Tensor:
    """Rows kept by SSKD's error-level ranking (see the module docstring).

    Args:
        teacher_scores: ``[M, C]`` teacher logits or similarities (higher = more likely).
        target: ``[M]`` index of the correct column per row.
        keep_wrong_ratio: fraction of the wrong rows to keep, in [0, 1].

    Returns:
        sorted int64 indices of the kept rows.
    """
    if not 0.0 <= float(keep_wrong_ratio) <= 1.0:
        raise ValueError("keep_wrong_ratio must be in [0, 1]")
    scores = upcast(teacher_scores)
    target = target.long().reshape(-1).to(scores.device)
    correct_score = scores.gather(1, target.unsqueeze(1))
    rank = (scores > correct_score).sum(dim=1)  # 0 = correct
    wrong = rank > 0
    n_wrong = int(wrong.sum().item())
    n_keep_wrong = int(n_wrong * float(keep_wrong_ratio))
    kept_correct = torch.nonzero(~wrong, as_tuple=True)[0]
    wrong_rows = torch.nonzero(wrong, as_tuple=True)[0]
    order = torch.argsort(rank[wrong_rows], stable=True)
    kept_wrong = wrong_rows[order[:n_keep_wrong]]
    return torch.sort(torch.cat([kept_correct, kept_wrong]))[0]


def sskd_similarity_kl(
    student_orig_emb: Tensor,
    student_aug_emb: Tensor,
    teacher_orig_emb: Tensor,
    teacher_aug_emb: Tensor,
    temperature: float = 0.5,
    keep_wrong_ratio: float = 0.75,
    positive_index: Optional[Tensor] = None,
) -> Tensor:
    """SSKD self-supervision (similarity) KD term.

    Formula::

        S_s = sskd_similarity(student_orig_emb, student_aug_emb)        # [M, B]
        S_t = sskd_similarity(teacher_orig_emb, teacher_aug_emb)        # [M, B], detached
        kept = sskd_keep_index(S_t, positive_index, keep_wrong_ratio)
        loss = T^2 * mean_{m in kept} KL( softmax(S_t[m] / T) || softmax(S_s[m] / T) )

    Args:
        student_orig_emb, teacher_orig_emb: ``[B, d_s]`` / ``[B, d_t]`` self-supervision
            head outputs on the original images.
        student_aug_emb, teacher_aug_emb: ``[M, d_s]`` / ``[M, d_t]`` on the transformed
            images.
        temperature: T (0.5 in the reference).
        keep_wrong_ratio: 0.75 in the reference.
        positive_index: ``[M]`` original index of every transformed row (default grouped).

    Returns a scalar; 0 when no row is kept. The caller applies the weight (10).
    """
    check_temperature(temperature)
    S_s = sskd_similarity(student_orig_emb, student_aug_emb)
    S_t = sskd_similarity(teacher_orig_emb, teacher_aug_emb).detach()
    if positive_index is None:
        positive_index = _default_positive_index(S_s.shape[1], S_s.shape[0], S_s.device)
    kept = sskd_keep_index(S_t, positive_index, keep_wrong_ratio)
    return kd_loss(S_s[kept], S_t[kept], temperature, reduction="batchmean")


def sskd_transformed_kd(
    student_aug_logits: Tensor,
    teacher_aug_logits: Tensor,
    target_aug: Tensor,
    temperature: float = 4.0,
    keep_wrong_ratio: float = 1.0,
) -> Tensor:
    """SSKD KD on the transformed images' class predictions.

    Formula::

        kept = sskd_keep_index(teacher_aug_logits, target_aug, keep_wrong_ratio)
        loss = T^2 * mean_{m in kept} KL( softmax(t_m / T) || softmax(s_m / T) )

    Args:
        student_aug_logits, teacher_aug_logits: ``[M, C]`` class logits on transformed images.
        target_aug: ``[M]`` class labels of the transformed rows (the original's label).
        temperature: T (4 in the reference).
        keep_wrong_ratio: 1.0 in the reference (keep every row).

    Returns a scalar; 0 when no row is kept. The caller applies the weight (2.7).
    """
    check_temperature(temperature)
    kept = sskd_keep_index(teacher_aug_logits.detach(), target_aug, keep_wrong_ratio)
    return kd_loss(student_aug_logits[kept], teacher_aug_logits[kept], temperature,
                   reduction="batchmean")


def sskd_ss_ce_loss(
    orig_emb: Tensor,
    aug_emb: Tensor,
    temperature: float = 0.5,
    positive_index: Optional[Tensor] = None,
) -> Tensor:
    """Contrastive-prediction loss that trains a self-supervision head (teacher pre-stage).

    Formula::

        S = sskd_similarity(orig_emb, aug_emb)                      # [M, B]
        loss = mean_m CE( S[m] / T, positive_index[m] )

    i.e. every transformed image must pick its own original among the B originals.
    """
    T = check_temperature(temperature)
    S = sskd_similarity(orig_emb, aug_emb)
    if positive_index is None:
        positive_index = _default_positive_index(S.shape[1], S.shape[0], S.device)
    return F.cross_entropy(S / T, positive_index.long().to(S.device))
