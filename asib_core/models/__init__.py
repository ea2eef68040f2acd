"""Models of asib-kd: one registry, one feature-dict wrapper for every network.

>>> from asib_core.models import create_model
>>> model = create_model("resnet20", num_classes=100)
>>> out = model(images)  # dict: feat_4d_layer1..3, preact_4d_layer1..3, feat_4d, feat_2d, logit

See docs/models.md for every name, its source, stages and small-input adaptation.
"""

from . import zoo as _zoo  # noqa: F401  (registers every model)
from .checkpoint import load_state, save_state
from .feature_model import Backbone, DistillAdapter, FeatureModel, Stage
from .pretrained import PRETRAINED_DIR_ENV, PretrainedWeightsUnavailable
from .registry import (
    ROLES,
    ModelInfo,
    count_parameters,
    create_model,
    list_models,
    model_info,
    register_model,
)

__all__ = [
    "PRETRAINED_DIR_ENV",
    "ROLES",
    "Backbone",
    "DistillAdapter",
    "FeatureModel",
    "ModelInfo",
    "PretrainedWeightsUnavailable",
    "Stage",
    "count_parameters",
    "create_model",
    "list_models",
    "load_state",
    "model_info",
    "register_model",
    "save_state",
]
