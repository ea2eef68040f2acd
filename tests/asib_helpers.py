"""Shared helpers of the ASIB tests (tests/test_asib_*.py); kept out of conftest.py.

* ``asib_cfg(exp, overrides)``: the finalised effective config of a seed experiment with
  digits / resnet20 + wrn_16_2 -> resnet8 and tiny sizes;
* ``tiny_data(cfg)``: real digits data (a balanced subset of the training split);
* ``trained_teacher_states(cache_dir)``: resnet20 and wrn_16_2 trained briefly on digits (cached on
  disk by pytest's cache, so only the first session pays for it, ~30-60 s on 2 busy cores);
* ``make_run(cfg, data, teachers, tmp_path)``: a TrainingRun assembled as in
  ``asib_core.pipeline.distill._fit`` (ConfigLock, state dir under tmp_path).
"""
from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from asib_core.config.effective import build_effective
from asib_core.config.finalize import finalize_config
from asib_core.config.lock import ConfigLock
from asib_core.data import build_data
from asib_core.engine.amp import Precision
from asib_core.engine.optim import student_optimizer
from asib_core.engine.runner import TrainingRun
from asib_core.engine.schedules import build_epoch_scheduler
from asib_core.methods import build_distiller
from asib_core.models import create_model
from asib_core.pipeline.distill import fit_spec

TEACHERS = ("resnet20", "wrn_16_2")
STUDENT = "resnet8"
DIM = 32           # distill_out_dim of the tests (small and fast)
TEACHER_SEED = 1234
VAL_SPLIT = 0.05   # 90 validation images: every validation pass costs three forwards

_CFG_CACHE: dict = {}


@contextmanager
def single_torch_thread():
    """Torch on one intra-op thread for the block (the tests' CPU rule), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def asib_cfg(exp: str, overrides: list[str] | tuple = (), **direct) -> dict:
    """Finalised effective config of ``exp`` (digits, small models, tiny), plus ``direct``
    key assignments applied after resolution (for keys a test sets by hand)."""
    key = (exp, tuple(overrides))
    if key not in _CFG_CACHE:
        base = ["dataset=digits", f"teacher1={TEACHERS[0]}", f"teacher2={TEACHERS[1]}", f"student={STUDENT}",
                f"experiment.distill_out_dim={DIM}", "experiment.device=cpu", "experiment.use_amp=false",
                "experiment.dataset.batch_size=32"]
        _CFG_CACHE[key] = finalize_config(build_effective(exp, base + list(overrides)))
    cfg = copy.deepcopy(_CFG_CACHE[key])
    cfg.update(direct)
    return cfg


def tiny_data(cfg: dict, per_class: int = 4, val_split: float | None = None, seed: int = 0):
    """Digits with a balanced ``per_class`` subset of the training part; the split (seed 0,
    ``VAL_SPLIT``) is the one the cached teachers were trained on, so validation images are
    never teacher-training images."""
    val_split = VAL_SPLIT if val_split is None else val_split
    dcfg = {"seed": seed, "dataset": {"name": "digits", "root": "./data", "val_split": val_split, "data_aug": 1,
                                      "batch_size": int(cfg["dataset"]["batch_size"]),
                                      "train_per_class": per_class}}
    return build_data(dcfg, "cpu")


def _train_teacher(name: str, data, epochs: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, num_classes=data.num_classes, pretrained=False, small_input=True)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = data.loader("train", batch_size=32, augment=False)
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for x, y, _ in loader:
            loss = torch.nn.functional.cross_entropy(model(x)["logit"], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model


def trained_teacher_states(cache_dir: Path, per_class: int = 16, epochs: int = 6) -> dict[str, dict]:
    """State dicts of resnet20 / wrn_16_2 trained on digits (the training part of the same
    split the tests use), cached in ``cache_dir`` so only the first session pays (~40 s)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    data = None
    for i, name in enumerate(TEACHERS):
        stem = f"{name}-pc{per_class}-ep{epochs}-vs{VAL_SPLIT}-s{TEACHER_SEED + i}"
        path = cache_dir / f"{stem}-torch{torch.__version__}.pt"
        if path.exists():
            out[name] = torch.load(path, map_location="cpu", weights_only=True)
            continue
        if data is None:
            data = tiny_data({"dataset": {"batch_size": 32}}, per_class=per_class)
        t0 = time.perf_counter()
        model = _train_teacher(name, data, epochs, TEACHER_SEED + i)
        out[name] = model.state_dict()
        torch.save(out[name], path)
        print(f"[asib tests] trained teacher {name} in {time.perf_counter() - t0:.1f}s -> {path}")
    return out


def build_models(cfg: dict, num_classes: int, teacher_states: dict | None = None):
    torch.manual_seed(int(cfg.get("seed", 0)))
    dim = int(cfg["distill_out_dim"]) if cfg.get("use_distillation_adapter") else None
    teachers = []
    for name in TEACHERS:
        t = create_model(name, num_classes=num_classes, pretrained=False, small_input=True, distill_out_dim=dim)
        if teacher_states is not None:
            missing, unexpected = t.load_state_dict(teacher_states[name], strict=False)
            assert not unexpected and all(k.startswith("distill_adapter.") for k in missing)
        t.eval()
        teachers.append(t)
    student = create_model(STUDENT, num_classes=num_classes, pretrained=False, small_input=True, distill_out_dim=dim)
    return student, teachers


def make_run(cfg: dict, data, teacher_states: dict | None, tmp_path: Path):
    """(TrainingRun, distiller) assembled as in ``pipeline.distill._fit`` (CPU, no tracker)."""
    cfg = copy.deepcopy(cfg)
    cfg["num_classes"] = int(data.num_classes)
    student, teachers = build_models(cfg, data.num_classes, teacher_states)
    distiller = build_distiller(cfg, student, teachers)
    lock = ConfigLock(cfg)
    optimizer = student_optimizer(cfg, distiller.student_parameters(), distiller.auxiliary_parameters())
    spec = fit_spec(cfg)
    scheduler = build_epoch_scheduler(optimizer, cfg.get("schedule") or {}, spec.total_epochs)
    run = TrainingRun(cfg=cfg, spec=spec, distiller=distiller, data=data, device=torch.device("cpu"),
                      precision=Precision(torch.device("cpu"), False), optimizer=optimizer, scheduler=scheduler,
                      state_dir=Path(tmp_path) / "state", lock=lock, tracker=None, title="asib-test")
    return run, distiller
