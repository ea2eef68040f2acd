"""Cross-entropy only: the no-distillation baseline of every comparison."""
from __future__ import annotations

from asib_core.contract import Distiller
from .registry import register_method


@register_method("ce")
class CEOnly(Distiller):
    """Plain cross-entropy (weight 1; ce_alpha/kd_alpha weight distillation methods only)."""

    needs_teachers = False

    def __init__(self, student, teachers, cfg):
        super().__init__(student, [], cfg)
        self.ce_alpha = 1.0
