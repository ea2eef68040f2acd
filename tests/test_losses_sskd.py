"""Tests of the SSKD loss math (asib_core.losses.sskd) against NumPy loops."""

import math

import numpy as np
import pytest
import torch

from asib_core.losses import (
    sskd_keep_index,
    sskd_similarity,
    sskd_similarity_kl,
    sskd_ss_ce_loss,
    sskd_transformed_kd,
)


def t64(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64)


def np_softmax_row(z):
    m = max(z)
    e = [math.exp(v - m) for v in z]
    return np.array(e) / sum(e)


def np_kl_row(q, p):
    return sum(qc * math.log(qc / pc) for qc, pc in zip(q, p) if qc > 0)


def np_cos(aug, orig):
    out = np.zeros((aug.shape[0], orig.shape[0]))
    for m in range(aug.shape[0]):
        for b in range(orig.shape[0]):
            out[m, b] = sum(aug[m] * orig[b]) / (math.sqrt(sum(aug[m] ** 2))
                                                 * math.sqrt(sum(orig[b] ** 2)))
    return out


def np_keep(scores, target, ratio):
    ranks = [sum(1 for c in range(scores.shape[1]) if scores[r, c] > scores[r, target[r]])
             for r in range(scores.shape[0])]
    correct = [r for r in range(len(ranks)) if ranks[r] == 0]
    wrong = sorted([r for r in range(len(ranks)) if ranks[r] > 0], key=lambda r: (ranks[r], r))
    return sorted(correct + wrong[:int(len(wrong) * ratio)])


def test_keep_index_hand_example():
    # rows: 0 correct, 1 rank 1, 2 correct, 3 rank 2, 4 rank 1, 5 rank 2
    scores = np.array([
        [3.0, 1.0, 0.0],
        [2.0, 3.0, 0.0],
        [0.0, 1.0, 5.0],
        [1.0, 2.0, 3.0],
        [0.0, 3.0, 2.0],
        [2.0, 1.0, 0.5],
    ])
    target = torch.tensor([0, 0, 2, 0, 2, 2])
    # 4 wrong rows, keep int(0.75 * 4) = 3: ranks 1 (rows 1, 4) then rank 2, lower index (3)
    assert sskd_keep_index(t64(scores), target, 0.75).tolist() == [0, 1, 2, 3, 4]
    assert sskd_keep_index(t64(scores), target, 0.0).tolist() == [0, 2]
    assert sskd_keep_index(t64(scores), target, 1.0).tolist() == [0, 1, 2, 3, 4, 5]
    assert sskd_keep_index(t64(scores), target, 0.5).tolist() == [0, 1, 2, 4]


def test_similarity_is_cosine():
    rng = np.random.default_rng(0)
    orig, aug = rng.normal(size=(3, 4)), rng.normal(size=(6, 4))
    np.testing.assert_allclose(sskd_similarity(t64(orig), t64(aug)).numpy(), np_cos(aug, orig),
                               rtol=1e-12)


@pytest.mark.parametrize("ratio", [0.75, 0.0, 1.0])
def test_similarity_kl(ratio):
    rng = np.random.default_rng(11)
    B, R, T = 4, 3, 0.5
    so, sa = rng.normal(size=(B, 5)), rng.normal(size=(B * R, 5))
    to, ta = rng.normal(size=(B, 6)), rng.normal(size=(B * R, 6))
    Ss, St = np_cos(sa, so), np_cos(ta, to)
    pos = [m // R for m in range(B * R)]  # grouped layout: image 0's 3 rotations first
    kept = np_keep(St, pos, ratio)
    ref = sum(T * T * np_kl_row(np_softmax_row(St[m] / T), np_softmax_row(Ss[m] / T))
              for m in kept) / max(len(kept), 1)
    got = sskd_similarity_kl(t64(so), t64(sa), t64(to), t64(ta), temperature=T,
                             keep_wrong_ratio=ratio)
    assert got.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)
    # explicit positive index (rotation-major layout) changes the assignment
    pos2 = torch.arange(B).repeat(R)
    kept2 = np_keep(St, pos2.tolist(), ratio)
    ref2 = sum(T * T * np_kl_row(np_softmax_row(St[m] / T), np_softmax_row(Ss[m] / T))
               for m in kept2) / max(len(kept2), 1)
    got2 = sskd_similarity_kl(t64(so), t64(sa), t64(to), t64(ta), temperature=T,
                              keep_wrong_ratio=ratio, positive_index=pos2)
    assert got2.item() == pytest.approx(ref2, rel=1e-10, abs=1e-12)


def test_similarity_kl_gradient_only_student():
    rng = np.random.default_rng(2)
    so = t64(rng.normal(size=(2, 3))).requires_grad_()
    sa = t64(rng.normal(size=(6, 3))).requires_grad_()
    to = t64(rng.normal(size=(2, 3))).requires_grad_()
    ta = t64(rng.normal(size=(6, 3))).requires_grad_()
    sskd_similarity_kl(so, sa, to, ta, keep_wrong_ratio=1.0).backward()
    assert so.grad is not None and sa.grad is not None
    assert to.grad is None and ta.grad is None


@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_transformed_kd(ratio):
    rng = np.random.default_rng(5)
    M, C, T = 9, 4, 4.0
    s, t = rng.normal(size=(M, C)) * 2, rng.normal(size=(M, C)) * 2
    y = rng.integers(0, C, size=M)
    kept = np_keep(t, y.tolist(), ratio)
    ref = sum(T * T * np_kl_row(np_softmax_row(t[m] / T), np_softmax_row(s[m] / T))
              for m in kept) / len(kept)
    got = sskd_transformed_kd(t64(s), t64(t), torch.tensor(y), temperature=T,
                              keep_wrong_ratio=ratio)
    assert got.item() == pytest.approx(ref, rel=1e-10)


def test_ss_ce_loss():
    rng = np.random.default_rng(9)
    B, R, T = 3, 3, 0.5
    orig, aug = rng.normal(size=(B, 4)), rng.normal(size=(B * R, 4))
    S = np_cos(aug, orig)
    ref = sum(-math.log(np_softmax_row(S[m] / T)[m // R]) for m in range(B * R)) / (B * R)
    got = sskd_ss_ce_loss(t64(orig), t64(aug), temperature=T)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    with pytest.raises(ValueError):
        sskd_ss_ce_loss(t64(orig), t64(aug[:7]))
