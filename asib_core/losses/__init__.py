"""Loss functions of asib-kd: ASIB pieces and the classic KD baselines.

Every loss is a plain function of tensors (documented formula, shapes, reduction and paper
in its docstring); the CRD memory is the only stateful part (``CRDMemory`` / ``CRDLoss``
modules). Shared conventions (``reduction`` values, float32 upcast) are described in
``asib_core/losses/_common.py``.

Modules: ``logit`` (KD, soft-target KD, DKD, multi-teacher KD), ``targets`` (ensemble
targets and per-sample teacher weights), ``feature`` (FitNet, AT, AB, FT, SimKD, ReviewKD),
``crd`` (CRD), ``sskd`` (SSKD), ``asib`` (IB KL, CCCP, feature KD, certainty weights).
"""

from .asib import certainty_weights, cccp_loss, feature_kd_loss, gaussian_kl
from .crd import CRDEmbed, CRDLoss, CRDMemory, crd_nce_loss
from .feature import (
    ab_loss,
    ab_multi_layer_loss,
    at_loss,
    at_map,
    at_multi_layer_loss,
    fitnet_loss,
    ft_factor,
    ft_loss,
    nonnegative_fit_floor,
    reviewkd_hcl_loss,
    simkd_loss,
)
from .logit import dkd_loss, kd_loss, multi_teacher_kd_loss, soft_target_kd_loss
from .sskd import (
    sskd_keep_index,
    sskd_similarity,
    sskd_similarity_kl,
    sskd_ss_ce_loss,
    sskd_transformed_kd,
)
from .targets import (
    avg_target,
    camkd_teacher_weights,
    entropy_teacher_weights,
    weighted_conf_target,
)

__all__ = [
    # logit
    "kd_loss",
    "soft_target_kd_loss",
    "dkd_loss",
    "multi_teacher_kd_loss",
    # targets / weights
    "avg_target",
    "weighted_conf_target",
    "entropy_teacher_weights",
    "camkd_teacher_weights",
    # feature
    "fitnet_loss",
    "nonnegative_fit_floor",
    "at_map",
    "at_loss",
    "at_multi_layer_loss",
    "ab_loss",
    "ab_multi_layer_loss",
    "ft_factor",
    "ft_loss",
    "simkd_loss",
    "reviewkd_hcl_loss",
    # crd
    "crd_nce_loss",
    "CRDMemory",
    "CRDEmbed",
    "CRDLoss",
    # sskd
    "sskd_similarity",
    "sskd_keep_index",
    "sskd_similarity_kl",
    "sskd_transformed_kd",
    "sskd_ss_ce_loss",
    # asib
    "gaussian_kl",
    "cccp_loss",
    "feature_kd_loss",
    "certainty_weights",
]
