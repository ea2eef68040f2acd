"""Tests of asib_core.losses (logit, target, feature and ASIB losses).

Every expected value is computed independently from the formula in float64 NumPy with
explicit loops over samples / classes (never with the function under test or the torch
helper it uses). CRD and SSKD are in test_losses_crd.py / test_losses_sskd.py.
"""

import math

import numpy as np
import pytest
import torch

import asib_core.losses as L
from asib_core.losses import (
    ab_loss,
    ab_multi_layer_loss,
    at_loss,
    at_map,
    at_multi_layer_loss,
    avg_target,
    camkd_teacher_weights,
    cccp_loss,
    certainty_weights,
    dkd_loss,
    entropy_teacher_weights,
    feature_kd_loss,
    fitnet_loss,
    ft_factor,
    ft_loss,
    gaussian_kl,
    kd_loss,
    multi_teacher_kd_loss,
    reviewkd_hcl_loss,
    simkd_loss,
    soft_target_kd_loss,
    weighted_conf_target,
)

RTOL = 1e-9
ATOL = 1e-11


# ----------------------------------------------------------------------------- numpy refs
def np_softmax_row(z):
    z = np.asarray(z, dtype=np.float64)
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return np.array([v / s for v in e])


def np_kl_row(q, p):
    """sum_c q_c log(q_c / p_c) with 0 log 0 = 0, explicit loop."""
    total = 0.0
    for qc, pc in zip(q, p):
        if qc > 0:
            total += qc * math.log(qc / pc)
    return total


def np_kd_per_sample(s, t, T):
    return np.array([T * T * np_kl_row(np_softmax_row(t[b] / T), np_softmax_row(s[b] / T))
                     for b in range(s.shape[0])])


def t64(a, grad=False):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64, requires_grad=grad)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual.detach() if torch.is_tensor(actual) else actual,
                                          dtype=np.float64),
                               np.asarray(expected, dtype=np.float64), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- package
def test_package_reexports_everything():
    for name in L.__all__:
        assert hasattr(L, name), name
    from asib_core.losses import kd_loss as k  # noqa: F401  (the documented import path)
    expected = {"kd_loss", "soft_target_kd_loss", "dkd_loss", "at_map", "at_loss", "ab_loss",
                "ab_multi_layer_loss", "fitnet_loss", "ft_loss", "crd_nce_loss", "CRDMemory",
                "CRDLoss", "simkd_loss", "reviewkd_hcl_loss", "sskd_similarity_kl",
                "sskd_transformed_kd", "gaussian_kl", "cccp_loss", "feature_kd_loss",
                "certainty_weights", "weighted_conf_target", "avg_target"}
    assert expected <= set(L.__all__)


# ----------------------------------------------------------------------------- KD
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_loss_matches_formula_all_reductions(rng, T):
    s = rng.normal(size=(3, 5)) * 3
    t = rng.normal(size=(3, 5)) * 3
    ref = np_kd_per_sample(s, t, T)
    close(kd_loss(t64(s), t64(t), T, reduction="none"), ref)
    close(kd_loss(t64(s), t64(t), T), ref.mean())
    close(kd_loss(t64(s), t64(t), T, reduction="batchmean"), ref.mean())
    close(kd_loss(t64(s), t64(t), T, reduction="sum"), ref.sum())


def test_kd_loss_temperature_changes_value(rng):
    s = rng.normal(size=(2, 4))
    t = rng.normal(size=(2, 4))
    v1 = kd_loss(t64(s), t64(t), 1.0).item()
    v4 = kd_loss(t64(s), t64(t), 4.0).item()
    assert v1 != pytest.approx(v4)
    close(v4, np_kd_per_sample(s, t, 4.0).mean())


def test_kd_loss_zero_for_equal_logits(rng):
    z = rng.normal(size=(4, 7)) * 5
    assert abs(kd_loss(t64(z), t64(z), 4.0).item()) < 1e-12
    assert abs(kd_loss(t64(z), t64(z + 3.0), 2.0).item()) < 1e-12  # shift-invariant softmax


@pytest.mark.parametrize("T", [1.0, 3.0])
def test_kd_loss_gradient_closed_form(rng, T):
    B, C = 3, 6
    s_np = rng.normal(size=(B, C))
    t_np = rng.normal(size=(B, C))
    s = t64(s_np, grad=True)
    t = t64(t_np, grad=True)
    kd_loss(s, t, T).backward()
    expected = np.zeros((B, C))
    for b in range(B):
        p = np_softmax_row(s_np[b] / T)
        q = np_softmax_row(t_np[b] / T)
        expected[b] = T * (p - q) / B
    close(s.grad, expected, rtol=1e-8, atol=1e-12)
    assert t.grad is None  # target detached by default


def test_kd_loss_target_gradient_when_not_detached(rng):
    s = t64(rng.normal(size=(2, 3)), grad=True)
    t = t64(rng.normal(size=(2, 3)), grad=True)
    kd_loss(s, t, 2.0, detach_target=False).backward()
    assert t.grad is not None and torch.any(t.grad != 0)


def test_kd_loss_validation_and_half_precision(rng):
    s = t64(rng.normal(size=(2, 3)))
    with pytest.raises(ValueError):
        kd_loss(s, s, 4.0, reduction="mean")
    with pytest.raises(ValueError):
        kd_loss(s, s, 0.0)
    with pytest.raises(ValueError):
        kd_loss(s, s[:, :2], 1.0)
    s16 = torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float16)
    t16 = torch.tensor(rng.normal(size=(2, 3)), dtype=torch.float16)
    out = kd_loss(s16, t16, 4.0)
    assert out.dtype == torch.float32
    close(out, np_kd_per_sample(s16.double().numpy(), t16.double().numpy(), 4.0).mean(),
          rtol=1e-5, atol=1e-7)


def test_kd_loss_empty_batch_is_zero():
    e = torch.zeros(0, 5, dtype=torch.float64)
    assert kd_loss(e, e, 4.0).item() == 0.0


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_soft_target_kd_loss_with_zero_probabilities(rng, T):
    s = rng.normal(size=(3, 4))
    q = np.array([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 1.0, 0.0]])
    ref = np.array([T * T * np_kl_row(q[b], np_softmax_row(s[b] / T)) for b in range(3)])
    close(soft_target_kd_loss(t64(s), t64(q), T, reduction="none"), ref)
    close(soft_target_kd_loss(t64(s), t64(q), T), ref.mean())
    close(soft_target_kd_loss(t64(s), t64(q), T, reduction="sum"), ref.sum())
    sg = t64(s, grad=True)
    soft_target_kd_loss(sg, t64(q), T).backward()
    assert torch.isfinite(sg.grad).all()


# ----------------------------------------------------------------------------- DKD
def np_dkd_parts(s, t, y, T):
    """TCKD, NCKD per sample from the definitions (exact renormalisation over non-targets)."""
    tckd, nckd = [], []
    for b in range(s.shape[0]):
        p = np_softmax_row(s[b] / T)
        q = np_softmax_row(t[b] / T)
        yb = int(y[b])
        bs = [p[yb], sum(p[c] for c in range(len(p)) if c != yb)]
        bt = [q[yb], sum(q[c] for c in range(len(q)) if c != yb)]
        tckd.append(T * T * np_kl_row(bt, bs))
        others = [c for c in range(len(p)) if c != yb]
        ps = [p[c] / bs[1] for c in others]
        qt = [q[c] / bt[1] for c in others]
        nckd.append(T * T * np_kl_row(qt, ps))
    return np.array(tckd), np.array(nckd)


@pytest.mark.parametrize("T", [1.0, 2.0])
def test_dkd_three_class_hand_example(T):
    s = np.array([[2.0, 1.0, 0.0]])
    t = np.array([[3.0, 0.0, 1.0]])
    y = np.array([0])
    # hand computation for this single sample
    p = np.exp(s[0] / T) / np.exp(s[0] / T).sum()
    q = np.exp(t[0] / T) / np.exp(t[0] / T).sum()
    b_s = np.array([p[0], p[1] + p[2]])
    b_t = np.array([q[0], q[1] + q[2]])
    tckd = T * T * (b_t[0] * np.log(b_t[0] / b_s[0]) + b_t[1] * np.log(b_t[1] / b_s[1]))
    ps = np.array([p[1], p[2]]) / (p[1] + p[2])
    qt = np.array([q[1], q[2]]) / (q[1] + q[2])
    nckd = T * T * (qt[0] * np.log(qt[0] / ps[0]) + qt[1] * np.log(qt[1] / ps[1]))

    total, tc, nc = dkd_loss(t64(s), t64(t), torch.tensor(y), alpha=1.0, beta=8.0,
                             temperature=T, return_parts=True)
    close(tc, tckd)
    close(nc, nckd)
    close(total, tckd + 8.0 * nckd)
    # DKD identity: KD = TCKD + (1 - q_y) * NCKD
    kd = kd_loss(t64(s), t64(t), T).item()
    close(kd, tckd + (1.0 - q[0]) * nckd)


def test_dkd_random_batch_alpha_beta_and_reductions(rng):
    B, C, T = 4, 6, 4.0
    s = rng.normal(size=(B, C)) * 2
    t = rng.normal(size=(B, C)) * 2
    y = np.array([0, 3, 5, 3])
    tc_ref, nc_ref = np_dkd_parts(s, t, y, T)
    yt = torch.tensor(y)
    tot, tc, nc = dkd_loss(t64(s), t64(t), yt, alpha=0.5, beta=2.0, temperature=T,
                           reduction="none", return_parts=True)
    close(tc, tc_ref)
    close(nc, nc_ref)
    close(tot, 0.5 * tc_ref + 2.0 * nc_ref)
    close(dkd_loss(t64(s), t64(t), yt, 0.5, 2.0, T), (0.5 * tc_ref + 2.0 * nc_ref).mean())
    close(dkd_loss(t64(s), t64(t), yt, 0.5, 2.0, T, reduction="sum"),
          (0.5 * tc_ref + 2.0 * nc_ref).sum())


def test_dkd_masking_ignores_target_logit_in_nckd(rng):
    s = rng.normal(size=(2, 5))
    t = rng.normal(size=(2, 5))
    y = torch.tensor([1, 4])
    _, _, nc1 = dkd_loss(t64(s), t64(t), y, return_parts=True, reduction="none")
    s2, t2 = s.copy(), t.copy()
    s2[0, 1] += 7.0
    t2[1, 4] -= 5.0
    _, _, nc2 = dkd_loss(t64(s2), t64(t2), y, return_parts=True, reduction="none")
    close(nc1, nc2, rtol=1e-9, atol=1e-12)


def test_dkd_saturated_target_is_finite():
    # float32, T = 1: the student's non-target mass exp(-120) underflows in probability space
    s = torch.tensor([[120.0, -120.0, 0.0]], requires_grad=True)
    t = torch.tensor([[80.0, 0.0, -40.0]])
    loss = dkd_loss(s, t, torch.tensor([0]), temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ----------------------------------------------------------------------------- targets
def test_avg_target_plain_weighted_and_logit_space(rng):
    t1 = rng.normal(size=(3, 4)) * 2
    t2 = rng.normal(size=(3, 4)) * 2
    T = 2.0
    ref = np.array([(np_softmax_row(t1[b] / T) + np_softmax_row(t2[b] / T)) / 2 for b in range(3)])
    close(avg_target([t64(t1), t64(t2)], T), ref)
    close(avg_target(torch.stack([t64(t1), t64(t2)]), T), ref)
    ref_w = np.array([0.75 * np_softmax_row(t1[b] / T) + 0.25 * np_softmax_row(t2[b] / T)
                      for b in range(3)])
    close(avg_target([t64(t1), t64(t2)], T, weights=torch.tensor([3.0, 1.0])), ref_w)
    ref_l = np.array([np_softmax_row((0.5 * t1[b] + 0.5 * t2[b]) / T) for b in range(3)])
    close(avg_target([t64(t1), t64(t2)], T, space="logit"), ref_l)


@pytest.mark.parametrize("space", ["prob", "logit"])
def test_weighted_conf_target(rng, space):
    t1 = rng.normal(size=(4, 5)) * 3
    t2 = rng.normal(size=(4, 5))
    T, Tc = 4.0, 1.0
    probs, w = weighted_conf_target([t64(t1), t64(t2)], T, confidence_temperature=Tc, space=space)
    for b in range(4):
        a1 = max(np_softmax_row(t1[b] / Tc))
        a2 = max(np_softmax_row(t2[b] / Tc))
        w1, w2 = a1 / (a1 + a2), a2 / (a1 + a2)
        close(w[b], [w1, w2])
        if space == "prob":
            ref = w1 * np_softmax_row(t1[b] / T) + w2 * np_softmax_row(t2[b] / T)
        else:
            ref = np_softmax_row((w1 * t1[b] + w2 * t2[b]) / T)
        close(probs[b], ref)
    assert not probs.requires_grad and not w.requires_grad


def test_weighted_conf_target_single_teacher(rng):
    t1 = rng.normal(size=(2, 3))
    probs, w = weighted_conf_target([t64(t1)], 2.0)
    close(w, np.ones((2, 1)))
    close(probs, np.array([np_softmax_row(t1[b] / 2.0) for b in range(2)]))


def test_entropy_and_camkd_teacher_weights(rng):
    K, B, C = 3, 2, 4
    ts = [rng.normal(size=(B, C)) * 2 for _ in range(K)]
    y = np.array([1, 3])
    w_e = entropy_teacher_weights([t64(t) for t in ts])
    w_c = camkd_teacher_weights([t64(t) for t in ts], torch.tensor(y))
    for b in range(B):
        H = []
        ce = []
        for i in range(K):
            p = np_softmax_row(ts[i][b])
            H.append(-sum(pc * math.log(pc) for pc in p))
            ce.append(-math.log(p[y[b]]))
        close(w_e[b], [1 - h / sum(H) for h in H])
        sm = np.exp(ce) / np.exp(ce).sum()
        close(w_c[b], [(1 - sm[i]) / (K - 1) for i in range(K)])
    close(w_c.sum(dim=1), np.ones(B))


def test_multi_teacher_kd_loss(rng):
    B, C, T = 3, 4, 4.0
    s = rng.normal(size=(B, C))
    t1 = rng.normal(size=(B, C))
    t2 = rng.normal(size=(B, C))
    k1 = np_kd_per_sample(s, t1, T)
    k2 = np_kd_per_sample(s, t2, T)
    close(multi_teacher_kd_loss(t64(s), [t64(t1), t64(t2)], T), ((k1 + k2) / 2).mean())
    w = rng.uniform(size=(B, 2))
    close(multi_teacher_kd_loss(t64(s), [t64(t1), t64(t2)], T, weights=t64(w), reduction="none"),
          w[:, 0] * k1 + w[:, 1] * k2)
    close(multi_teacher_kd_loss(t64(s), [t64(t1), t64(t2)], T, weights=torch.tensor([0.2, 0.8], dtype=torch.float64),
                                reduction="sum"), (0.2 * k1 + 0.8 * k2).sum())


# ----------------------------------------------------------------------------- FitNet / SimKD
def np_mse(a, b):
    a = np.asarray(a).ravel()
    b = np.asarray(b).ravel()
    return sum((x - y) ** 2 for x, y in zip(a, b)) / a.size


def test_nonnegative_fit_floor_is_the_mse_left_by_the_best_relu_output(rng):
    """mean(min(t, 0)^2), and no non-negative prediction gets under it: the clipped target
    max(t, 0) reaches it exactly, zeros and random non-negative maps stay above."""
    t = rng.normal(size=(2, 3, 4, 4))
    floor = float(L.nonnegative_fit_floor(t64(t)))
    close(floor, sum(min(v, 0.0) ** 2 for v in t.ravel()) / t.size)
    close(float(fitnet_loss(t64(np.maximum(t, 0)), t64(t))), floor)
    for guess in (np.zeros_like(t), np.abs(rng.normal(size=t.shape))):
        assert float(fitnet_loss(t64(guess), t64(t))) > floor
    assert float(L.nonnegative_fit_floor(t64(np.abs(t)))) == 0.0


def test_fitnet_and_simkd_mse(rng):
    a = rng.normal(size=(2, 3, 4, 4))
    b = rng.normal(size=(2, 3, 4, 4))
    close(fitnet_loss(t64(a), t64(b)), np_mse(a, b))
    close(simkd_loss(t64(a), t64(b)), np_mse(a, b))
    with pytest.raises(ValueError):
        fitnet_loss(t64(a), t64(b[:, :2]))
    sg = t64(a, grad=True)
    tg = t64(b, grad=True)
    simkd_loss(sg, tg).backward()
    assert tg.grad is None
    close(sg.grad, 2 * (a - b) / a.size)


# ----------------------------------------------------------------------------- AT
def np_at_map(f, p=2):
    B, C, H, W = f.shape
    out = np.zeros((B, H * W))
    for b in range(B):
        v = np.zeros(H * W)
        for h in range(H):
            for w in range(W):
                v[h * W + w] = sum(abs(f[b, c, h, w]) ** p for c in range(C)) / C
        out[b] = v / math.sqrt(sum(x * x for x in v))
    return out


def np_block_pool(f, size):
    B, C, H, W = f.shape
    kh, kw = H // size[0], W // size[1]
    out = np.zeros((B, C, size[0], size[1]))
    for i in range(size[0]):
        for j in range(size[1]):
            out[:, :, i, j] = f[:, :, i * kh:(i + 1) * kh, j * kw:(j + 1) * kw].mean(axis=(2, 3))
    return out


def test_at_map_matches_formula(rng):
    f = rng.normal(size=(2, 3, 2, 3))
    close(at_map(t64(f)), np_at_map(f))
    close(at_map(t64(f), p=3), np_at_map(f, p=3))


def test_at_loss_same_size(rng):
    fs = rng.normal(size=(2, 3, 4, 4))
    ft = rng.normal(size=(2, 5, 4, 4))  # channels may differ
    a_s, a_t = np_at_map(fs), np_at_map(ft)
    close(at_loss(t64(fs), t64(ft)), ((a_s - a_t) ** 2).mean())


def test_at_loss_different_spatial_sizes(rng):
    fs = rng.normal(size=(2, 3, 8, 8))
    ft = rng.normal(size=(2, 4, 4, 4))
    ref = ((np_at_map(np_block_pool(fs, (4, 4))) - np_at_map(ft)) ** 2).mean()
    close(at_loss(t64(fs), t64(ft)), ref)
    # teacher larger than student: the teacher map is pooled
    ref2 = ((np_at_map(ft) - np_at_map(np_block_pool(fs, (4, 4)))) ** 2).mean()
    close(at_loss(t64(ft), t64(fs)), ref2)
    close(at_multi_layer_loss([(t64(fs), t64(ft)), (t64(ft), t64(fs))]), ref + ref2)


# ----------------------------------------------------------------------------- AB
def np_ab(s, t, m):
    total = 0.0
    for sv, tv in zip(s.ravel(), t.ravel()):
        if sv > -m and tv <= 0:
            total += (sv + m) ** 2
        if sv <= m and tv > 0:
            total += (sv - m) ** 2
    return total / s.shape[0]


def test_ab_loss_four_sign_regions():
    m = 1.0
    # one element per case; batch of 2, 1 channel, 1 x 4
    s = np.array([[[[0.5, -2.0, 0.5, 3.0]]], [[[-1.0, 1.0, 0.0, -0.5]]]])
    t = np.array([[[[-1.0, -1.0, 2.0, 2.0]]], [[[0.0, 0.1, 0.0, 0.3]]]])
    # case by case (hand):
    #   t<=0, s>-m  : (s+m)^2 -> (0.5+1)^2 = 2.25
    #   t<=0, s<=-m : 0       -> s=-2
    #   t>0,  s<=m  : (s-m)^2 -> (0.5-1)^2 = 0.25
    #   t>0,  s>m   : 0       -> s=3
    #   boundaries: s=-1,t=0 -> 0 ; s=1,t=0.1 -> (1-1)^2=0 ; s=0,t=0 -> 1 ; s=-0.5,t=0.3 -> 2.25
    hand = (2.25 + 0.0 + 0.25 + 0.0 + 0.0 + 0.0 + 1.0 + 2.25) / 2
    assert np_ab(s, t, m) == pytest.approx(hand)
    close(ab_loss(t64(s), t64(t), m), hand)
    # gradient: 2 (s + m) / B in the "off" region, 2 (s - m) / B in the "on" region, else 0
    sg = t64(s, grad=True)
    ab_loss(sg, t64(t), m).backward()
    g = np.array([[[[2 * 1.5, 0.0, 2 * -0.5, 0.0]]], [[[0.0, 0.0, 2 * 1.0, 2 * -1.5]]]]) / 2
    close(sg.grad, g)


def test_ab_loss_margin_and_random(rng):
    s = rng.normal(size=(3, 2, 3, 3)) * 2
    t = rng.normal(size=(3, 2, 3, 3))
    for m in (0.5, 1.0, 2.0):
        close(ab_loss(t64(s), t64(t), m), np_ab(s, t, m))


def test_ab_multi_layer_weights_and_scaling(rng):
    pairs = [(rng.normal(size=(2, 2, 4, 4)), rng.normal(size=(2, 2, 4, 4))) for _ in range(3)]
    # n = 3: weights 2^(0-2)=1/4, 2^(1-2)=1/2, 2^(2-2)=1 ; times 3/1000
    ref = (0.25 * np_ab(*pairs[0], 1.0) + 0.5 * np_ab(*pairs[1], 1.0) + np_ab(*pairs[2], 1.0))
    ref = ref / 1000 * 3
    close(ab_multi_layer_loss([(t64(a), t64(b)) for a, b in pairs], margin=1.0), ref)


# ----------------------------------------------------------------------------- FT
def np_normalize_rows(x):
    x = x.reshape(x.shape[0], -1)
    return np.array([r / math.sqrt(sum(v * v for v in r)) for r in x])


def test_ft_loss_paper_form(rng):
    fs = rng.normal(size=(2, 3, 2, 2))
    ft = rng.normal(size=(2, 3, 2, 2)) * 5
    d = np_normalize_rows(fs) - np_normalize_rows(ft)
    close(ft_loss(t64(fs), t64(ft)), np.abs(d).mean())
    close(ft_loss(t64(fs), t64(ft), p=2), (d ** 2).mean())
    close(ft_factor(t64(fs)), np_normalize_rows(fs))
    # scale invariance of the normalised factors
    close(ft_loss(t64(fs * 3.0), t64(ft)), np.abs(d).mean())


def test_ft_loss_channel_mean_square_mode(rng):
    fs = rng.normal(size=(2, 3, 2, 2))
    ft = rng.normal(size=(2, 4, 2, 2))
    ms = (fs ** 2).mean(axis=1)
    mt = (ft ** 2).mean(axis=1)
    ref = np.abs(np_normalize_rows(ms) - np_normalize_rows(mt)).mean()
    close(ft_loss(t64(fs), t64(ft), mode="channel_mean_square"), ref)


# ----------------------------------------------------------------------------- ReviewKD
def test_reviewkd_hcl_loss(rng):
    shapes = [(2, 3, 8, 8), (2, 3, 4, 4), (2, 3, 1, 1)]
    fs = [rng.normal(size=sh) for sh in shapes]
    ft = [rng.normal(size=sh) for sh in shapes]
    # h = 8: pools 4, 2, 1 with weights 1/2, 1/4, 1/8
    l8 = (np_mse(fs[0], ft[0])
          + 0.5 * np_mse(np_block_pool(fs[0], (4, 4)), np_block_pool(ft[0], (4, 4)))
          + 0.25 * np_mse(np_block_pool(fs[0], (2, 2)), np_block_pool(ft[0], (2, 2)))
          + 0.125 * np_mse(np_block_pool(fs[0], (1, 1)), np_block_pool(ft[0], (1, 1)))
          ) / (1 + 0.5 + 0.25 + 0.125)
    # h = 4: pool 4 skipped (not < 4); pools 2, 1 with weights 1/2, 1/4
    l4 = (np_mse(fs[1], ft[1])
          + 0.5 * np_mse(np_block_pool(fs[1], (2, 2)), np_block_pool(ft[1], (2, 2)))
          + 0.25 * np_mse(np_block_pool(fs[1], (1, 1)), np_block_pool(ft[1], (1, 1)))
          ) / (1 + 0.5 + 0.25)
    l1 = np_mse(fs[2], ft[2])
    close(reviewkd_hcl_loss([t64(a) for a in fs], [t64(b) for b in ft]), l8 + l4 + l1)
    close(reviewkd_hcl_loss([t64(fs[1])], [t64(ft[1])]), l4)


# ----------------------------------------------------------------------------- ASIB parts
def np_gauss_kl(mu, lv):
    out = []
    for b in range(mu.shape[0]):
        out.append(0.5 * sum(m * m + math.exp(v) - v - 1 for m, v in zip(mu[b], lv[b])))
    return np.array(out)


def test_gaussian_kl_zero_at_standard_normal():
    mu = torch.zeros(4, 8, dtype=torch.float64)
    lv = torch.zeros(4, 8, dtype=torch.float64)
    assert gaussian_kl(mu, lv).item() == 0.0
    assert torch.all(gaussian_kl(mu, lv, reduction="none") == 0)


def test_gaussian_kl_closed_form_and_reductions(rng):
    mu = rng.normal(size=(3, 5))
    lv = rng.normal(size=(3, 5))
    ref = np_gauss_kl(mu, lv)
    close(gaussian_kl(t64(mu), t64(lv), reduction="none"), ref)
    close(gaussian_kl(t64(mu), t64(lv)), ref.mean())
    close(gaussian_kl(t64(mu), t64(lv), reduction="sum"), ref.sum())
    assert np.all(ref >= 0)


def test_gaussian_kl_clips():
    mu = np.array([[30.0, 0.0]])
    lv = np.array([[0.0, 20.0]])
    # logvar clipped to 10 first; then per-element terms clipped to 100
    e1 = min(0.5 * (900.0 + 1 - 0 - 1), 100.0)
    e2 = min(0.5 * (0 + math.exp(10.0) - 10.0 - 1), 100.0)
    close(gaussian_kl(t64(mu), t64(lv), logvar_clip=10.0, element_clip=100.0), e1 + e2)
    close(gaussian_kl(t64(mu), t64(lv), logvar_clip=10.0),
          0.5 * 900.0 + 0.5 * (math.exp(10.0) - 11.0))


def test_cccp_loss_value_and_gradient_only_into_synergy(rng):
    B, C, tau = 3, 5, 4.0
    z_np = rng.normal(size=(B, C)) * 2
    s_np = rng.normal(size=(B, C)) * 2
    ref = np.array([tau * tau * np_kl_row(np_softmax_row(s_np[b] / tau),
                                          np_softmax_row(z_np[b] / tau)) for b in range(B)])
    z = t64(z_np, grad=True)
    s = t64(s_np, grad=True)
    loss = cccp_loss(z, s, tau)
    close(loss, ref.mean())
    close(cccp_loss(t64(z_np), t64(s_np), tau, reduction="none"), ref)
    loss.backward()
    assert s.grad is None  # student is the detached target
    g = np.array([tau * (np_softmax_row(z_np[b] / tau) - np_softmax_row(s_np[b] / tau)) / B
                  for b in range(B)])
    close(z.grad, g, rtol=1e-8, atol=1e-12)


def np_feat(s, t, clip=None, beta=None, clip_mode="element", feat_red="sum"):
    out = []
    for b in range(s.shape[0]):
        vals = []
        for sv, tv in zip(s[b].ravel(), t[b].ravel()):
            d = sv - tv
            if clip is not None and clip_mode == "element":
                d = max(-clip, min(clip, d))
            if beta is None:
                e = d * d
            elif abs(d) < beta:
                e = 0.5 * d * d / beta
            else:
                e = abs(d) - 0.5 * beta
            vals.append(e)
        v = sum(vals) if feat_red == "sum" else sum(vals) / len(vals)
        if clip is not None and clip_mode == "sample":
            v = min(v, clip)
        out.append(v)
    return np.array(out)


def test_feature_kd_loss_mse_and_reductions(rng):
    s = rng.normal(size=(3, 6))
    t = rng.normal(size=(3, 6))
    ref = np_feat(s, t)
    close(feature_kd_loss(t64(s), t64(t), reduction="none"), ref)
    close(feature_kd_loss(t64(s), t64(t)), ref.mean())
    close(feature_kd_loss(t64(s), t64(t), reduction="sum"), ref.sum())
    close(feature_kd_loss(t64(s), t64(t), reduction="mean"), ref.mean() / 6)
    close(feature_kd_loss(t64(s), t64(t), reduction="none", feature_reduction="mean"), ref / 6)


def test_feature_kd_loss_huber_and_clipping(rng):
    s = rng.normal(size=(3, 2, 2, 2)) * 2
    t = rng.normal(size=(3, 2, 2, 2))
    close(feature_kd_loss(t64(s), t64(t), huber_beta=0.5, reduction="none"),
          np_feat(s, t, beta=0.5))
    close(feature_kd_loss(t64(s), t64(t), huber_beta=0.0, reduction="none"),
          np.array([np.abs(s[b] - t[b]).sum() for b in range(3)]))
    close(feature_kd_loss(t64(s), t64(t), clip=0.3, reduction="none"), np_feat(s, t, clip=0.3))
    close(feature_kd_loss(t64(s), t64(t), clip=0.3, huber_beta=0.2, reduction="none"),
          np_feat(s, t, clip=0.3, beta=0.2))
    close(feature_kd_loss(t64(s), t64(t), clip=5.0, clip_mode="sample", reduction="none"),
          np_feat(s, t, clip=5.0, clip_mode="sample"))
    # element clipping: elements beyond the clip get no gradient
    sg = t64(np.array([[0.1, 2.0]]), grad=True)
    feature_kd_loss(sg, t64(np.zeros((1, 2))), clip=1.0).backward()
    close(sg.grad, [[0.2, 0.0]])
    with pytest.raises(ValueError):
        feature_kd_loss(t64(s), t64(t), clip=0.0)


def test_feature_kd_loss_target_gradient_flag(rng):
    s = t64(rng.normal(size=(2, 3)), grad=True)
    t = t64(rng.normal(size=(2, 3)), grad=True)
    feature_kd_loss(s, t).backward()
    assert t.grad is not None  # A-step: mu is trained through this term
    t2 = t64(rng.normal(size=(2, 3)), grad=True)
    feature_kd_loss(s, t2, detach_target=True).backward()
    assert t2.grad is None


def test_certainty_weights(rng):
    lv = rng.normal(size=(4, 3))
    m = np.array([sum(math.exp(-v) for v in lv[b]) / 3 for b in range(4)])
    close(certainty_weights(t64(lv), 0.0, 100.0, normalize=False), m)
    rel = m / m.mean()
    close(certainty_weights(t64(lv), 0.5, 1.5), np.clip(rel, 0.5, 1.5))
    g = np.array([math.exp(-sum(lv[b]) / 3) for b in range(4)])
    close(certainty_weights(t64(lv), 0.1, 1.0, normalize=False, mode="exp_neg_mean_logvar"),
          np.clip(g, 0.1, 1.0))
    lvg = t64(lv, grad=True)
    assert not certainty_weights(lvg, 0.1, 1.5).requires_grad
    # lower variance -> larger weight
    w = certainty_weights(t64([[-1.0, -1.0], [1.0, 1.0]]), 0.0, 10.0)
    assert w[0] > w[1]
