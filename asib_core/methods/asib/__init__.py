"""ASIB: Adaptive Synergy Information-Bottleneck distillation (issue 6, docs/asib.md).

Modules: ``settings`` (every ASIB key, validated), ``ib_mbm`` (IB_MBM + synergy head),
``a_step`` (teacher / IB adaptation per stage, CCCP), ``targets`` (B-step KD targets, gate),
``ppf`` (partial freezing), ``distiller`` (the registered methods ``asib`` and ``asib_stage``).
"""
from .distiller import ASIB, ASIBStage
from .ib_mbm import IBMBM, IBOutput, SynergyHead
from .settings import ASIBSettings

__all__ = ["ASIB", "ASIBStage", "ASIBSettings", "IBMBM", "IBOutput", "SynergyHead"]
