"""Device choice and mixed precision (AMP only on CUDA; bf16 needs no GradScaler)."""
from __future__ import annotations

import contextlib
import logging

import torch

from asib_core.config.errors import ConfigError

log = logging.getLogger(__name__)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str | None) -> torch.device:
    """``auto`` / ``cuda`` use CUDA when present, else the CPU (said once in the log)."""
    requested = (requested or "auto").lower()
    if requested in ("auto", "cuda") or requested.startswith("cuda:"):
        if torch.cuda.is_available():
            device = torch.device("cuda" if requested == "auto" else requested)
            log.info("device: %s (%s)", device, torch.cuda.get_device_name(device))
            return device
        log.warning("device: CUDA not available, using the CPU (device=%s requested)", requested)
        return torch.device("cpu")
    if requested == "cpu":
        log.info("device: cpu")
        return torch.device("cpu")
    raise ConfigError(f"device='{requested}' is not known; use auto, cuda, cuda:N or cpu.")


class Precision:
    """Autocast context + optional GradScaler from ``use_amp`` / ``amp_dtype``."""

    def __init__(self, device: torch.device, use_amp: bool, amp_dtype: str = "bfloat16"):
        if amp_dtype not in _DTYPES:
            raise ConfigError(f"amp_dtype='{amp_dtype}' is not known; use bfloat16 or float16.")
        self.device = device
        self.dtype = _DTYPES[amp_dtype]
        self.enabled = bool(use_amp) and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.enabled and self.dtype == torch.float16)

    def disable(self) -> None:
        self.enabled = False
        self.scaler = torch.amp.GradScaler("cuda", enabled=False)

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def autocast_for(precision: Precision | None):
    """``precision``'s autocast context; without a Precision, CPU autocast switched off."""
    return precision.autocast() if precision is not None else torch.autocast("cpu", enabled=False)
