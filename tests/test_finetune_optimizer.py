"""Issue 12 item 1: fine-tuning selects SGD (momentum, Nesterov) or AdamW by `finetune_optimizer`;
the image-folder teacher recipes are the benchmark protocol's CIFAR recipe."""
from __future__ import annotations

import pytest
import torch

from asib_core.config import ConfigError
from asib_core.pipeline.finetune import finetune_config, finetune_optimizer

PROTOCOL = {"finetune_optimizer": "sgd", "finetune_lr": 0.1, "finetune_momentum": 0.9, "finetune_nesterov": True,
            "finetune_weight_decay": 5e-4, "batch_size": 128, "finetune_epochs": 20, "warmup_epochs": 1,
            "scheduler_type": "cosine", "min_lr": 0.0, "label_smoothing": 0.0, "finetune_use_cutmix": False}


@pytest.mark.parametrize("teacher", ["resnet20", "wrn_16_2"])
def test_imagefolder_recipes_are_the_protocols_cifar_recipe(teacher):
    cfg = finetune_config(teacher, "imagefolder", [])
    assert {k: cfg[k] for k in PROTOCOL} == PROTOCOL
    assert cfg["dataset"]["val_split"] == 0.1 and cfg["dataset"]["split_seed"] == 42
    assert cfg["dataset"]["data_aug"] == 1


def test_sgd_recipe_builds_nesterov_sgd_with_its_values():
    cfg = finetune_config("resnet20", "imagefolder", ["finetune_lr=0.05", "finetune_momentum=0.8"])
    opt = finetune_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))])
    assert type(opt) is torch.optim.SGD
    group = opt.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.05, 0.8, True, 5e-4)
    plain = finetune_optimizer(finetune_config("resnet20", "imagefolder", ["finetune_nesterov=false"]),
                               [torch.nn.Parameter(torch.zeros(3))])
    assert plain.param_groups[0]["nesterov"] is False


def test_adamw_is_the_default_of_recipes_that_do_not_choose():
    cfg = finetune_config("resnet20", "digits", [])
    assert cfg["finetune_optimizer"] == "adamw"
    opt = finetune_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))])
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["lr"] == cfg["finetune_lr"]


@pytest.mark.parametrize("override, named", [
    ("finetune_optimizer=rmsprop", "finetune_optimizer='rmsprop'"),
    ("finetune_momentum=0.5", "finetune_momentum=0.5"),      # no effect under AdamW: refused
    ("finetune_nesterov=false", "finetune_nesterov=False"),
])
def test_unknown_optimizer_and_sgd_keys_under_adamw_are_refused(override, named):
    with pytest.raises(ConfigError, match=named.replace("(", r"\(")):
        finetune_config("resnet20", "digits", [override])
