"""The one model registry of asib-kd.

Builders are registered with :func:`register_model`; :func:`create_model` turns a registered
name into a :class:`~asib_core.models.feature_model.FeatureModel`. The registrations
themselves live in :mod:`asib_core.models.zoo`, imported by the package ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .feature_model import Backbone, FeatureModel

ROLES = ("teacher", "student", "cifar")
SOURCES = ("timm", "torchvision", "asib_core")

BuilderFn = Callable[..., Backbone]


@dataclass(frozen=True)
class ModelInfo:
    """Static facts about a registered model (no model is built to answer them)."""

    name: str
    role: str
    family: str
    source: str
    source_id: str
    default_pretrained: bool
    num_features: int
    stage_channels: tuple[int, ...]
    default_kwargs: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def num_stages(self) -> int:
        return len(self.stage_channels)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "family": self.family,
            "source": self.source,
            "source_id": self.source_id,
            "default_pretrained": self.default_pretrained,
            "num_features": self.num_features,
            "stage_channels": list(self.stage_channels),
            "num_stages": self.num_stages,
            "default_kwargs": dict(self.default_kwargs),
            "description": self.description,
        }


_REGISTRY: dict[str, tuple[ModelInfo, BuilderFn]] = {}


def register_model(
    name: str,
    *,
    role: str,
    family: str,
    source: str = "timm",
    source_id: str | None = None,
    default_pretrained: bool = False,
    stage_channels: tuple[int, ...] = (),
    default_kwargs: dict[str, Any] | None = None,
    description: str = "",
) -> Callable[[BuilderFn], BuilderFn]:
    """Decorator registering ``builder(*, info, pretrained, small_input, pretrained_file, **kw)``.

    The builder returns a :class:`Backbone`; ``stage_channels`` states its per-stage output
    channels so that :func:`model_info` can answer without building the model.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if not stage_channels:
        raise ValueError(f"register_model({name!r}): stage_channels is required")

    def decorator(builder: BuilderFn) -> BuilderFn:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        info = ModelInfo(
            name=name,
            role=role,
            family=family,
            source=source,
            source_id=source_id or name,
            default_pretrained=default_pretrained,
            num_features=stage_channels[-1],
            stage_channels=tuple(stage_channels),
            default_kwargs=dict(default_kwargs or {}),
            description=description,
        )
        _REGISTRY[name] = (info, builder)
        return builder

    return decorator


def _lookup(name: str) -> tuple[ModelInfo, BuilderFn]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown model name {name!r}; known names: {known}") from None


def list_models(role: str | None = None) -> list[str]:
    """Registered names (sorted), optionally only those of one role."""
    if role is not None and role not in ROLES:
        raise ValueError(f"role must be one of {ROLES} or None, got {role!r}")
    return sorted(n for n, (info, _) in _REGISTRY.items() if role is None or info.role == role)


def model_info(name: str) -> ModelInfo:
    """Role, family, source library and id, default ``pretrained``, feature widths."""
    return _lookup(name)[0]


def _check_positive_int(value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def create_model(
    name: str,
    *,
    num_classes: int,
    pretrained: bool = False,
    small_input: bool = True,
    pretrained_file: str | None = None,
    distill_out_dim: int | None = None,
    distill_hidden_dim: int | None = None,
    **kwargs: Any,
) -> FeatureModel:
    """Build a registered model wrapped in the common feature-dict interface.

    Args:
        name: a registered name (see :func:`list_models`).
        num_classes: width of the fresh linear classifier.
        pretrained: load pretrained backbone weights; raises
            :class:`~asib_core.models.pretrained.PretrainedWeightsUnavailable` when they cannot
            be had (never a silent random init).
        small_input: adapt the stem to 32x32 inputs (family-specific, see docs/models.md).
        pretrained_file: local weight file overriding the library's download (needs
            ``pretrained=True``).
        distill_out_dim: if given, add the distillation adapter with output width ``D``.
        distill_hidden_dim: hidden width ``H`` of the adapter (default ``max(F // 2, D)``).
        kwargs: ``drop_rate`` (dropout before the classifier, default from the registration,
            else 0) and family options passed to the builder (e.g. timm's ``drop_path_rate``).
    """
    info, builder = _lookup(name)
    _check_positive_int(num_classes, "num_classes")
    if distill_out_dim is not None:
        _check_positive_int(distill_out_dim, "distill_out_dim")
    if distill_hidden_dim is not None:
        if distill_out_dim is None:
            raise ValueError("distill_hidden_dim needs distill_out_dim")
        _check_positive_int(distill_hidden_dim, "distill_hidden_dim")
    if pretrained_file is not None and not pretrained:
        raise ValueError(
            f"pretrained_file={pretrained_file!r} was given for {name!r} but pretrained=False; "
            "set pretrained=True to load it (or drop the file)"
        )
    options = {**info.default_kwargs, **kwargs}
    drop_rate = float(options.pop("drop_rate", 0.0))
    backbone = builder(
        info=info,
        pretrained=bool(pretrained),
        small_input=bool(small_input),
        pretrained_file=None if pretrained_file is None else str(pretrained_file),
        **options,
    )
    model = FeatureModel(
        backbone,
        num_classes=num_classes,
        distill_out_dim=distill_out_dim,
        distill_hidden_dim=distill_hidden_dim,
        drop_rate=drop_rate,
        name=name,
    )
    if model.stage_channels != list(info.stage_channels):
        raise RuntimeError(
            f"{name}: built stage channels {model.stage_channels} differ from the registered "
            f"{list(info.stage_channels)}"
        )
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
