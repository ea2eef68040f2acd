"""Schedules against hand-computed values: the LR of every recipe after k steps, the temperature
and KD ramp per epoch, the loss clamp (soft and hard) and the KD cap.

Each LR is read from a real optimiser after its scheduler was stepped k times, in the order the
runner steps them (epoch scheduler, then the plateau scheduler with the validation accuracy).
"""
from __future__ import annotations

import math

import pytest
import torch

from asib_core.config.errors import ConfigError
from asib_core.engine.finetune_schedules import build_finetune_schedulers
from asib_core.engine.loop import clamp_binding_message
from asib_core.engine.schedules import build_epoch_scheduler, kd_cap, kd_ramp, loss_clamp, tau_for_epoch

BASE = 0.1


def optimizer() -> torch.optim.SGD:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)


def epoch_lrs(schedule: dict, total: int, steps: int) -> list[float]:
    opt = optimizer()
    sched = build_epoch_scheduler(opt, schedule, total)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    return lrs


def finetune_lrs(steps: int, val_acc: float = 0.5, **cfg) -> list[float]:
    opt = optimizer()
    scheds = build_finetune_schedulers(opt, {"finetune_lr": BASE, **cfg}, steps_per_epoch=1)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        if scheds.batch is not None:
            scheds.batch.step()
        if scheds.epoch is not None:
            scheds.epoch.step()
        if scheds.plateau is not None:
            scheds.plateau.step(val_acc)
    return lrs


# -- distillation (schedule.type) ------------------------------------------------------------
def test_distill_cosine_warms_up_to_the_base_lr_then_reaches_min_lr():
    lrs = epoch_lrs({"type": "cosine", "lr_warmup_epochs": 2, "min_lr": 0.001}, total=10, steps=12)
    # warm-up: 1/3, 2/3 of the base; cosine over 8 epochs from 0.1 to 0.001, half way at epoch 6
    expected = [BASE / 3, 2 * BASE / 3, 0.1,
                *(0.001 + 0.099 * 0.5 * (1 + math.cos(math.pi * a / 8)) for a in range(1, 8)),
                0.001, 0.001]
    assert lrs == pytest.approx(expected, abs=1e-12)
    assert lrs[6] == pytest.approx(0.0505)


def test_distill_step_schedule_halves_every_3_epochs_down_to_min_lr():
    lrs = epoch_lrs({"type": "step", "step_size": 3, "gamma": 0.5, "min_lr": 0.02}, total=12, steps=12)
    assert lrs == pytest.approx([0.1] * 3 + [0.05] * 3 + [0.025] * 3 + [0.02] * 3)


def test_distill_none_schedule_is_flat_after_warm_up():
    lrs = epoch_lrs({"type": "none", "lr_warmup_epochs": 1}, total=5, steps=5)
    assert lrs == pytest.approx([0.05, 0.1, 0.1, 0.1, 0.1])


# -- fine-tune recipes (scheduler_type) --------------------------------------------------------
def test_finetune_cosine_with_warm_up():
    lrs = finetune_lrs(11, scheduler_type="cosine", finetune_epochs=10, warmup_epochs=2, min_lr=0.001)
    assert lrs[:3] == pytest.approx([BASE / 3, 2 * BASE / 3, 0.1])
    assert lrs[6] == pytest.approx(0.0505) and lrs[10] == pytest.approx(0.001)


def test_finetune_multistep_milestones_count_from_the_start():
    lrs = finetune_lrs(9, scheduler_type="multistep", finetune_epochs=9, warmup_epochs=2)
    # default milestones [3, 6], gamma 0.1
    assert lrs == pytest.approx([BASE / 3, 2 * BASE / 3, 0.1, 0.01, 0.01, 0.01, 0.001, 0.001, 0.001])


def test_finetune_sgdr_restarts_at_3_and_9():
    lrs = finetune_lrs(10, scheduler_type="cosine_warm_restarts", finetune_epochs=9)  # period 3, x2
    half = lambda pos, length: 0.1 * 0.5 * (1 + math.cos(math.pi * pos / length))  # noqa: E731
    expected = [half(0, 3), half(1, 3), half(2, 3)] + [half(p, 6) for p in range(6)] + [0.1]
    assert lrs == pytest.approx(expected)
    assert lrs[1] == pytest.approx(0.075) and lrs[2] == pytest.approx(0.025) and lrs[3] == 0.1


def test_finetune_plateau_halves_after_6_flat_epochs_that_follow_the_warm_up():
    lrs = finetune_lrs(17, scheduler_type="reduce_on_plateau", finetune_epochs=20, warmup_epochs=2,
                       min_lr=0.03)
    # LR used at epoch e; plateau epochs counted from epoch 2: best at 2, 6 bad ones (3-8) -> halve
    # for epoch 9, 6 more bad (9-14) -> 0.025, floored at min_lr 0.03
    assert lrs == pytest.approx([BASE / 3, 2 * BASE / 3] + [0.1] * 7 + [0.05] * 6 + [0.03] * 2)


def test_finetune_onecycle_per_batch():
    opt = optimizer()
    sched = build_finetune_schedulers(opt, {"finetune_lr": BASE, "scheduler_type": "onecycle",
                                            "finetune_epochs": 10, "warmup_epochs": 2}, steps_per_epoch=10).batch
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    low, final = BASE / 25, BASE / 25 / 1e4   # torch's div_factor 25, final_div_factor 1e4
    # 100 steps, warm-up share 2/10: the peak at step 19, then cosine down to `final` at step 99
    assert lrs[0] == pytest.approx(low) and lrs[19] == pytest.approx(BASE)
    assert lrs[9] == pytest.approx(BASE + (low - BASE) / 2 * (1 + math.cos(math.pi * 9 / 19)))
    assert lrs[59] == pytest.approx(final + (BASE - final) / 2)
    assert lrs[99] == pytest.approx(final)


# -- temperature, KD ramp, clamp, cap ----------------------------------------------------------
def test_temperature_schedules():
    assert [tau_for_epoch({"tau_start": 4, "tau_end": 1}, e, 4) for e in (0, 1, 2, 3, 9)] == [4, 3, 2, 1, 1]
    assert [tau_for_epoch({"tau_schedule": [2, 6]}, e, 3) for e in range(3)] == [2, 4, 6]
    assert tau_for_epoch({"tau": 3.5}, 7, 10) == 3.5 and tau_for_epoch({}, 0, 10) == 4.0
    with pytest.raises(ConfigError, match="set both"):
        tau_for_epoch({"tau_start": 4}, 0, 4)


def test_kd_ramp():
    assert [kd_ramp({"kd_warmup_epochs": 4}, e) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert kd_ramp({}, 0) == 1.0


@pytest.mark.parametrize("mode,value,grad", [("soft", 100.0, 0.4), ("hard", 100.0, 0.0)])
def test_loss_clamp_above_the_cap(mode, value, grad):
    cfg = {"use_loss_clamp": True, "loss_clamp_max": 100.0, "loss_clamp_mode": mode,
           "loss_clamp_warmup_epochs": 2}
    w = torch.tensor(250.0, requires_grad=True)
    out, clamped = loss_clamp(w * 1.0, cfg, epoch=2)
    out.backward()
    assert clamped and float(out) == pytest.approx(value) and float(w.grad) == pytest.approx(grad)
    # below the cap, during its warm-up or switched off: untouched
    for loss, epoch, c in ((torch.tensor(99.0), 2, cfg), (torch.tensor(250.0), 1, cfg),
                           (torch.tensor(250.0), 5, {**cfg, "use_loss_clamp": False})):
        same, flag = loss_clamp(loss, c, epoch)
        assert same is loss and not flag


def test_a_clamp_that_binds_on_every_batch_is_named_with_its_scale_and_largest_term():
    """L4 on the low-data protocol: the feature-KD term put every batch over the cap of 20, and the
    soft clamp scaled each gradient by about 20 / 48; the message says so, naming feat_kd."""
    cfg = {"use_loss_clamp": True, "loss_clamp_max": 20.0, "loss_clamp_mode": "soft"}
    metrics = {"loss": 20.0, "ce": 1.4, "kd": 0.6, "feat_kd": 46.0, "acc": 0.2, "clamp_ratio": 1.0,
               "img_per_s": 200.0, "epoch_time": 25.0}
    message = clamp_binding_message(metrics, cfg, epoch=8)
    assert message is not None
    assert "epoch 9" in message and "loss_clamp_max=20" in message and "before the clamp 48" in message
    assert f"scaled by about {20 / 48:.2f}" in message and "largest term is feat_kd (46)" in message
    # a clamp that caps some batches only (outliers, its purpose) is not reported
    assert clamp_binding_message({**metrics, "clamp_ratio": 0.64}, cfg, epoch=8) is None
    assert clamp_binding_message({**metrics, "clamp_ratio": 0.0}, cfg, epoch=8) is None


def test_kd_cap_scales_kd_to_ratio_times_ce():
    """The raw terms are compared: CE 0.25 at weight 0.5 is 0.5, KD 2.7 at weight 0.9 is 3.0."""
    cfg, weights = {"kd_max_ratio": 2.0, "kd_warmup_epochs": 1}, (0.5, 0.9)
    losses = {"ce": torch.tensor(0.25), "kd": torch.tensor(2.7)}
    capped, factor = kd_cap(losses, cfg, 1, weights)
    assert factor == pytest.approx(1 / 3) and float(capped["kd"]) == pytest.approx(0.9)  # raw KD 1.0 = 2 x 0.5
    assert float(capped["ce"]) == 0.25 and float(losses["kd"]) == pytest.approx(2.7)  # the input is kept
    under = {"ce": torch.tensor(0.25), "kd": torch.tensor(0.81)}                        # raw KD 0.9 < 1.0
    assert kd_cap(under, cfg, 1, weights) == (under, 1.0)
    assert kd_cap(losses, cfg, 0, weights) == (losses, 1.0)                             # KD warm-up
    assert kd_cap(losses, {}, 3, weights) == (losses, 1.0)                              # no cap
    assert kd_cap(losses, cfg, 1, (0.5, 0.0)) == (losses, 1.0)                          # KD off
