"""Distillation methods: one module each, one registry."""
from asib_core.contract import Batch, Distiller, TrainContext
from .registry import build_distiller, get_method, list_methods, register_method

__all__ = ["Batch", "Distiller", "TrainContext", "build_distiller", "get_method",
           "list_methods", "register_method"]
