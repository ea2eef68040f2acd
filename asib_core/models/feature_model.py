"""The common wrapper: every registered model is a :class:`FeatureModel`.

A backbone is described by a stem and an ordered list of :class:`Stage` modules. The wrapper
adds a fresh linear classifier and, optionally, the distillation adapter, and returns the
feature dictionary documented in ``docs/models.md``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint
from torch import nn


class Stage(nn.Sequential):
    """An ordered run of backbone modules forming one stage.

    When ``final_act`` is given it is appended as the last module and the stage can report
    its pre-activation map (the input of that activation). Otherwise the pre-activation map is
    an alias of the output.
    """

    def __init__(self, *modules: nn.Module, final_act: nn.Module | None = None) -> None:
        if final_act is not None:
            if getattr(final_act, "inplace", False):
                raise ValueError("a stage's final activation must not be in-place")
            modules = (*modules, final_act)
        super().__init__(*modules)
        self.has_preact = final_act is not None

    def forward_with_preact(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(pre-activation map, output map)``."""
        if not self.has_preact:
            out = self(x)
            return out, out
        last = len(self) - 1
        for index, module in enumerate(self):
            if index == last:
                return x, module(x)
            x = module(x)
        raise RuntimeError("empty stage")  # pragma: no cover - a stage always has a module


def detached_activation(module: nn.Module, attr: str) -> nn.Module:
    """Move ``module.<attr>`` (an activation) out of ``module`` and return a non-in-place copy.

    ``module.<attr>`` is replaced by :class:`nn.Identity`, so the module then returns its
    pre-activation output; the returned copy is used as a stage's ``final_act``.
    """
    act = copy.deepcopy(getattr(module, attr))
    if hasattr(act, "inplace"):
        act.inplace = False
    setattr(module, attr, nn.Identity())
    return act


@dataclass
class Backbone:
    """What a family builder returns: the stem, the stages and their output channels."""

    stem: nn.Module
    stages: list[Stage]
    stage_channels: list[int]
    weights_source: str | None = None
    notes: dict[str, str] = field(default_factory=dict)


class DistillAdapter(nn.Sequential):
    """``Linear(F, H) -> ReLU -> Linear(H, D)`` applied to the pooled feature."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None) -> None:
        hidden = hidden_dim if hidden_dim is not None else max(in_dim // 2, out_dim)
        super().__init__(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        self.in_dim = in_dim
        self.hidden_dim = hidden
        self.out_dim = out_dim


class FeatureModel(nn.Module):
    """Backbone (stem + stages) + linear classifier (+ optional distillation adapter).

    ``forward(x)`` returns a dict with, for ``i = 1..num_stages``:

    * ``feat_4d_layer{i}``: output map of stage ``i`` (after its final activation);
    * ``preact_4d_layer{i}``: the same map before the stage's final activation, or an alias
      of ``feat_4d_layer{i}`` when the stage has none;

    and ``feat_4d`` (last map), ``feat_2d`` (its global average pool, ``[B, F]``), ``logit``
    (``classifier(dropout(feat_2d))``, ``[B, num_classes]``) and, only when the model has a
    distillation adapter, ``distill_feat`` (``[B, D]``).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        num_classes: int,
        distill_out_dim: int | None = None,
        distill_hidden_dim: int | None = None,
        drop_rate: float = 0.0,
        name: str = "",
    ) -> None:
        super().__init__()
        if len(backbone.stages) != len(backbone.stage_channels):
            raise ValueError("one channel count per stage is required")
        self.model_name = name
        #: gradient (activation) checkpointing of the stages in training (saves memory)
        self.activation_checkpointing = False
        self.weights_source = backbone.weights_source
        self.stem = backbone.stem
        self.num_stages = len(backbone.stages)
        self.stage_channels = list(backbone.stage_channels)
        for index, stage in enumerate(backbone.stages, start=1):
            if not isinstance(stage, Stage):
                raise TypeError(f"stage {index} must be a Stage, got {type(stage).__name__}")
            self.add_module(f"layer{index}", stage)
        self.num_features = self.stage_channels[-1]
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.classifier = nn.Linear(self.num_features, num_classes)
        if distill_out_dim is not None:
            self.distill_adapter: DistillAdapter | None = DistillAdapter(
                self.num_features, distill_out_dim, distill_hidden_dim
            )
        else:
            self.distill_adapter = None

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def distill_dim(self) -> int:
        """Width of ``distill_feat`` when there is an adapter, else of ``feat_2d``."""
        if self.distill_adapter is not None:
            return self.distill_adapter.out_dim
        return self.num_features

    def stages(self) -> list[Stage]:
        return [getattr(self, f"layer{i}") for i in range(1, self.num_stages + 1)]

    def stage_modules(self) -> list[tuple[str, nn.Module]]:
        """The backbone in forward order: ``[("stem", m), ("layer1", m), ...]``.

        The classifier, the head dropout and the distillation adapter are not included.
        """
        named: list[tuple[str, nn.Module]] = [("stem", self.stem)]
        named.extend((f"layer{i}", stage) for i, stage in enumerate(self.stages(), start=1))
        return named

    def feature_keys(self) -> list[str]:
        """Keys of the dict returned by :meth:`forward`, in order."""
        keys = []
        for i in range(1, self.num_stages + 1):
            keys += [f"feat_4d_layer{i}", f"preact_4d_layer{i}"]
        keys += ["feat_4d", "feat_2d", "logit"]
        if self.distill_adapter is not None:
            keys.append("distill_feat")
        return keys

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh ``Linear(F, num_classes)``."""
        device = self.classifier.weight.device
        self.classifier = nn.Linear(self.num_features, num_classes).to(device)

    def forward_maps(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run stem and stages only; returns the per-stage maps and ``feat_4d``."""
        out: dict[str, torch.Tensor] = {}
        x = self.stem(x)
        use_ckpt = self.training and self.activation_checkpointing and torch.is_grad_enabled()
        for i, stage in enumerate(self.stages(), start=1):
            if use_ckpt:  # recompute the stage in backward instead of storing its activations
                pre, x = checkpoint(stage.forward_with_preact, x, use_reentrant=False)
            else:
                pre, x = stage.forward_with_preact(x)
            out[f"feat_4d_layer{i}"] = x
            out[f"preact_4d_layer{i}"] = pre
        out["feat_4d"] = x
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.forward_maps(x)
        feat_2d = out["feat_4d"].mean(dim=(2, 3))
        out["feat_2d"] = feat_2d
        out["logit"] = self.classifier(self.head_drop(feat_2d))
        if self.distill_adapter is not None:
            out["distill_feat"] = self.distill_adapter(feat_2d)
        return out

