"""Mixup / CutMix batch operations and the mixed cross-entropy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import asib_core.data as D
from asib_core.data.mixing import cutmix_box, sample_beta


def _batch(b=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, 32, 32, generator=g), torch.arange(b) % 5


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_no_mixing_returns_batch_unchanged():
    x, y = _batch()
    m = D.mix_batch(x, y, mixup_alpha=0.0, cutmix_alpha=0.0, generator=_gen())
    assert m.x is x and m.y_a is y and m.y_b is y and m.lam == 1.0 and m.mode == "none"


def test_mixup_is_convex_combination_with_partner():
    x, y = _batch()
    x0 = x.clone()
    m = D.mix_batch(x, y, mixup_alpha=0.4, cutmix_alpha=0.0, generator=_gen(1))
    assert m.mode == "mixup" and 0.0 < m.lam < 1.0
    assert sorted(m.perm.tolist()) == list(range(8))
    torch.testing.assert_close(m.x, m.lam * x + (1 - m.lam) * x[m.perm])
    assert torch.equal(m.y_a, y) and torch.equal(m.y_b, y[m.perm])
    assert torch.equal(x, x0)  # input untouched


def test_cutmix_box_and_lambda():
    x, y = _batch()
    mixed_seeds = 0
    for seed in range(20):
        m = D.mix_batch(x, y, mixup_alpha=0.0, cutmix_alpha=1.0, generator=_gen(seed))
        assert m.mode == "cutmix"
        y1, y2, x1, x2 = m.box
        assert 0 <= y1 <= y2 <= 32 and 0 <= x1 <= x2 <= 32
        inside = torch.zeros(32, 32, dtype=torch.bool)
        inside[y1:y2, x1:x2] = True
        assert torch.equal(m.x[..., inside], x[m.perm][..., inside])
        assert torch.equal(m.x[..., ~inside], x[..., ~inside])
        assert m.lam == pytest.approx(1 - inside.sum().item() / 1024)
        assert torch.equal(m.y_b, y[m.perm])
        mixed_seeds += 0 < m.lam < 1
    # lam ~ Beta(1, 1): a box that is empty (lam 1) or the whole image (lam 0) is rare
    assert mixed_seeds >= 16, mixed_seeds


def test_cutmix_box_side_is_sqrt_of_one_minus_lambda():
    interior = 0
    for lam in (0.0, 0.19, 0.5, 0.75, 0.96, 1.0):
        side = int(32 * np.sqrt(1 - lam))
        for seed in range(10):
            y1, y2, x1, x2 = cutmix_box(32, 32, lam, _gen(seed))
            g = _gen(seed)  # the same draws: the box's centre
            cy, cx = int(torch.randint(0, 32, (), generator=g)), int(torch.randint(0, 32, (), generator=g))
            for lo, hi, c in ((y1, y2, cy), (x1, x2, cx)):
                assert hi - lo <= side
                if side // 2 <= c <= 32 - side + side // 2:  # centre far enough from the borders
                    assert (lo, hi) == (c - side // 2, c - side // 2 + side), (lam, seed, c, lo, hi)
                    interior += 0 < side < 32
                else:
                    assert lo == 0 or hi == 32  # clipped at that border
    assert interior >= 10, interior


def test_both_alphas_switch_per_batch_about_half():
    x, y = _batch(4)
    g = _gen(0)
    modes = [D.mix_batch(x, y, mixup_alpha=0.2, cutmix_alpha=1.0, generator=g).mode for _ in range(400)]
    share = modes.count("cutmix") / len(modes)
    assert set(modes) == {"mixup", "cutmix"} and 0.4 < share < 0.6


def test_deterministic_under_seeded_generator():
    x, y = _batch()
    a = [D.mix_batch(x, y, mixup_alpha=0.2, cutmix_alpha=1.0, generator=g) for g in [_gen(7)] for _ in range(5)]
    b = [D.mix_batch(x, y, mixup_alpha=0.2, cutmix_alpha=1.0, generator=g) for g in [_gen(7)] for _ in range(5)]
    for p, q in zip(a, b):
        assert p.mode == q.mode and p.lam == q.lam and torch.equal(p.x, q.x) and torch.equal(p.perm, q.perm)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 2.0])
def test_beta_sampler_moments(alpha):
    g = _gen(11)
    draws = np.array([sample_beta(alpha, alpha, g) for _ in range(3000)])
    assert ((draws >= 0) & (draws <= 1)).all()
    assert abs(draws.mean() - 0.5) < 0.03
    assert abs(draws.var() - 1 / (4 * (2 * alpha + 1))) < 0.015


def test_mixed_cross_entropy():
    x, y = _batch()
    logits = torch.randn(8, 5, generator=_gen(3))
    m = D.mix_batch(x, y, mixup_alpha=1.0, cutmix_alpha=0.0, generator=_gen(4))
    expected = m.lam * F.cross_entropy(logits, m.y_a, label_smoothing=0.1) + (1 - m.lam) * F.cross_entropy(
        logits, m.y_b, label_smoothing=0.1
    )
    torch.testing.assert_close(D.mixed_cross_entropy(logits, m, label_smoothing=0.1), expected)
    plain = D.mix_batch(x, y, mixup_alpha=0, cutmix_alpha=0, generator=_gen())
    torch.testing.assert_close(D.mixed_cross_entropy(logits, plain), F.cross_entropy(logits, y))
