"""Tests of the CRD loss pieces (asib_core.losses.crd) against hand / NumPy computations."""

import math

import numpy as np
import pytest
import torch

from asib_core.losses import CRDLoss, CRDMemory, crd_nce_loss


def t64(a):
    return torch.tensor(np.asarray(a, dtype=np.float64), dtype=torch.float64)


def np_l2n(x):
    return np.array([r / math.sqrt(sum(v * v for v in r)) for r in x])


def np_nce(P, n_data, eps=1e-7):
    """P: [B, K+1], column 0 positive; mean over anchors of the NCE loss."""
    B, K1 = P.shape
    K = K1 - 1
    c = K / n_data
    total = 0.0
    for b in range(B):
        lb = math.log(P[b, 0] / (P[b, 0] + c + eps))
        for k in range(1, K1):
            lb += math.log(c / (P[b, k] + c + eps))
        total += -lb
    return total / B


def test_crd_nce_loss_hand_example():
    pos = [0.5, 0.02]
    neg = [[0.1, 0.3], [0.001, 0.2]]
    N, eps = 10, 1e-7
    c = 2 / 10  # K / N
    l0 = -(math.log(0.5 / (0.5 + c + eps)) + math.log(c / (0.1 + c + eps))
           + math.log(c / (0.3 + c + eps)))
    l1 = -(math.log(0.02 / (0.02 + c + eps)) + math.log(c / (0.001 + c + eps))
           + math.log(c / (0.2 + c + eps)))
    got = crd_nce_loss(t64(pos), t64(neg), N)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-12)
    # eps = 0 variant
    got0 = crd_nce_loss(t64(pos), t64(neg), N, eps=0.0)
    l00 = -(math.log(0.5 / 0.7) + math.log(0.2 / 0.3) + math.log(0.2 / 0.5))
    l10 = -(math.log(0.02 / 0.22) + math.log(0.2 / 0.201) + math.log(0.2 / 0.4))
    assert got0.item() == pytest.approx((l00 + l10) / 2, rel=1e-12)


def _setup_crd(rng, score_mode="auto"):
    N, d, Ds, Dt, K, T, mom = 5, 3, 4, 2, 2, 0.5, 0.5
    crd = CRDLoss(Ds, Dt, N, feat_dim=d, nce_k=K, nce_t=T, momentum=mom,
                  score_mode=score_mode).double()
    Ws, bs = rng.normal(size=(d, Ds)), rng.normal(size=d)
    Wt, bt = rng.normal(size=(d, Dt)), rng.normal(size=d)
    Ms, Mt = np_l2n(rng.normal(size=(N, d))), np_l2n(rng.normal(size=(N, d)))
    with torch.no_grad():
        crd.embed_s.linear.weight.copy_(t64(Ws))
        crd.embed_s.linear.bias.copy_(t64(bs))
        crd.embed_t.linear.weight.copy_(t64(Wt))
        crd.embed_t.linear.bias.copy_(t64(bt))
        crd.memory.memory_s.copy_(t64(Ms))
        crd.memory.memory_t.copy_(t64(Mt))
    return crd, dict(N=N, T=T, mom=mom, Ws=Ws, bs=bs, Wt=Wt, bt=bt, Ms=Ms, Mt=Mt)


def _np_crd_step(p, fs, ft, idx, neg, Zs=None, Zt=None):
    vs = np_l2n(fs @ p["Ws"].T + p["bs"])
    vt = np_l2n(ft @ p["Wt"].T + p["bt"])
    cidx = np.concatenate([np.asarray(idx)[:, None], np.asarray(neg)], axis=1)
    B, K1 = cidx.shape
    es = np.zeros((B, K1))
    et = np.zeros((B, K1))
    for b in range(B):
        for j in range(K1):
            es[b, j] = math.exp(sum(vs[b] * p["Mt"][cidx[b, j]]) / p["T"])
            et[b, j] = math.exp(sum(vt[b] * p["Ms"][cidx[b, j]]) / p["T"])
    if Zs is None:
        Zs = es.mean() * p["N"]
        Zt = et.mean() * p["N"]
    loss = np_nce(es / Zs, p["N"]) + np_nce(et / Zt, p["N"])
    Ms, Mt = p["Ms"].copy(), p["Mt"].copy()
    for b, i in enumerate(idx):
        Ms[i] = np_l2n((p["mom"] * p["Ms"][i] + (1 - p["mom"]) * vs[b])[None])[0]
        Mt[i] = np_l2n((p["mom"] * p["Mt"][i] + (1 - p["mom"]) * vt[b])[None])[0]
    return loss, Zs, Zt, Ms, Mt


@pytest.mark.parametrize("score_mode", ["matmul", "gather"])
def test_crd_loss_matches_hand_computation_two_steps(score_mode):
    rng = np.random.default_rng(7)
    crd, p = _setup_crd(rng, score_mode)
    idx, neg = [1, 3], [[0, 2], [4, 0]]
    fs, ft = rng.normal(size=(2, 4)), rng.normal(size=(2, 2))
    loss, Zs, Zt, Ms, Mt = _np_crd_step(p, fs, ft, idx, neg)
    got = crd(t64(fs), t64(ft), torch.tensor(idx), torch.tensor(neg))
    assert got.item() == pytest.approx(loss, rel=1e-10)
    assert crd.memory.z_s.item() == pytest.approx(Zs, rel=1e-6)  # float32 buffer
    assert crd.memory.z_t.item() == pytest.approx(Zt, rel=1e-6)
    np.testing.assert_allclose(crd.memory.memory_s.numpy(), Ms, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(crd.memory.memory_t.numpy(), Mt, rtol=1e-12, atol=1e-14)
    # gradient reaches both embedding heads (not the memory)
    got.backward()
    assert crd.embed_s.linear.weight.grad.abs().sum() > 0
    assert crd.embed_t.linear.weight.grad.abs().sum() > 0
    assert not crd.memory.memory_s.requires_grad

    # second step: Z stays fixed (from the first batch), the updated memory is used
    p2 = dict(p, Ms=Ms, Mt=Mt)
    idx2, neg2 = [0, 4], [[1, 3], [2, 2]]
    fs2, ft2 = rng.normal(size=(2, 4)), rng.normal(size=(2, 2))
    Zs32, Zt32 = crd.memory.z_s.item(), crd.memory.z_t.item()
    loss2, *_ = _np_crd_step(p2, fs2, ft2, idx2, neg2, Zs=Zs32, Zt=Zt32)
    got2 = crd(t64(fs2), t64(ft2), torch.tensor(idx2), torch.tensor(neg2))
    assert got2.item() == pytest.approx(loss2, rel=1e-10)
    assert crd.memory.z_s.item() == Zs32


def test_crd_score_modes_agree():
    rng = np.random.default_rng(3)
    a, _ = _setup_crd(rng, "matmul")
    b = CRDLoss(4, 2, 5, feat_dim=3, nce_k=2, nce_t=0.5, score_mode="gather").double()
    b.load_state_dict(a.state_dict())
    fs, ft = t64(rng.normal(size=(3, 4))), t64(rng.normal(size=(3, 2)))
    idx, neg = torch.tensor([0, 1, 2]), torch.tensor([[3, 4], [0, 2], [1, 1]])
    assert a(fs, ft, idx, neg).item() == pytest.approx(b(fs, ft, idx, neg).item(), rel=1e-12)


def test_negative_sampling_exact_mode_other_classes_only():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0, 1, 2])  # pools: 7, 7, 6 other-class samples
    mem = CRDMemory(feat_dim=4, n_data=10, nce_k=3, labels=labels)
    assert mem.max_negatives() == 6
    idx = torch.tensor([0, 2, 4]).repeat(1000)
    g = torch.Generator().manual_seed(0)
    neg = mem.sample_negatives(idx, generator=g)
    assert neg.shape == (3000, 3)
    for i in (0, 2, 4):
        rows = neg[idx == i]
        others = [j for j in range(10) if labels[j] != labels[i]]
        assert all(len(set(r)) == 3 for r in rows.tolist())  # no repeats within a draw
        assert set(rows.flatten().tolist()) == set(others)  # only (and all) other-class samples
        counts = np.bincount(rows.flatten().tolist(), minlength=10)[others]
        expected = 3000 / len(others)
        assert np.all(np.abs(counts - expected) < 0.15 * expected)  # roughly uniform
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(neg, mem.sample_negatives(idx, generator=g2))
    full = mem.sample_negatives(torch.tensor([4]), k=6)  # the whole pool of a class-2 anchor
    assert sorted(full[0].tolist()) == [j for j in range(10) if labels[j] != 2]
    with pytest.raises(ValueError, match="nce_k=7"):
        mem.sample_negatives(idx, k=7)
    with pytest.raises(ValueError, match="nce_k=3000"):
        CRDMemory(feat_dim=4, n_data=10, nce_k=3000, labels=labels)


def test_negative_sampling_without_labels_excludes_anchor():
    mem = CRDMemory(feat_dim=4, n_data=6, nce_k=5)
    idx = torch.tensor([0, 3, 5])
    neg = mem.sample_negatives(idx, generator=torch.Generator().manual_seed(1))
    for b, i in enumerate(idx.tolist()):
        assert sorted(neg[b].tolist()) == sorted(set(range(6)) - {i})


def test_memory_rows_are_unit_norm_and_state_dict_round_trip():
    labels = torch.arange(20) % 4
    crd = CRDLoss(6, 5, 20, feat_dim=8, nce_k=7, labels=labels)
    norms = crd.memory.memory_s.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-6)
    fs, ft = torch.randn(4, 6), torch.randn(4, 5)
    crd(fs, ft, torch.tensor([0, 1, 2, 3])).backward()
    sd = crd.state_dict()
    assert "memory.labels" in sd and "memory.z_s" in sd
    fresh = CRDLoss(6, 5, 20, feat_dim=8, nce_k=7)  # no labels given
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.memory.labels, labels)
    assert fresh.memory.z_s.item() == crd.memory.z_s.item()
    neg = fresh.memory.sample_negatives(torch.tensor([0, 5]))
    assert torch.all(labels[neg[0]] != 0) and torch.all(labels[neg[1]] != 1)
    # Z is not re-estimated after loading
    z = fresh.memory.z_s.item()
    fresh(fs, ft, torch.tensor([4, 5, 6, 7]))
    assert fresh.memory.z_s.item() == z


def test_crd_under_cpu_autocast_is_finite():
    crd = CRDLoss(6, 5, 30, feat_dim=8, nce_k=10, nce_t=0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = crd(torch.randn(4, 6), torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    assert torch.isfinite(loss)
    loss.backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_crd_memory_follows_cuda_device():
    crd = CRDLoss(6, 5, 30, feat_dim=8, nce_k=10, labels=torch.arange(30) % 3)
    crd.embed_s.cuda()
    crd.embed_t.cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        loss = crd(torch.randn(4, 6, device="cuda"), torch.randn(4, 5, device="cuda"),
                   torch.tensor([0, 1, 2, 3]))
    assert loss.is_cuda and torch.isfinite(loss)
    assert crd.memory.memory_s.is_cuda and crd.memory.labels.is_cuda
    loss.backward()
