"""The run's own files outside MLflow, and the run-level keys ``log_level`` and ``results_dir``.

``configs/hydra.yaml`` (a seed file) says where a run's results go: ``hydra.run.dir`` (the seed's
``${experiment.results_dir}/${now:%Y%m%d_%H%M%S}``) is resolved against the run's config when it
finishes, and the run writes there ``config.yaml`` (the effective config), ``history.json`` (its
per-epoch metrics) and ``summary.json`` (run id, exp_id, final metrics). ``hydra.job.chdir`` must be
false: runs keep their working directory (relative paths in the configs are relative to it). The
pipelines use Hydra's compose API, so nothing else of Hydra's run settings applies; any other key
in that file is refused rather than silently ignored.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from asib_core.config.compose import config_dir
from asib_core.config.errors import ConfigError

LOGGERS = ("asib", "asib_core")
HYDRA_KEYS = {"hydra.run.dir", "hydra.job.chdir"}


def apply_log_level(cfg: dict) -> None:
    """``log_level``: the level of the project's loggers (``asib.*``, ``asib_core.*``)."""
    level = str(cfg.get("log_level") or "INFO").upper()
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)


def hydra_settings() -> dict:
    """``configs/hydra.yaml``, checked: ``{"run_dir": <pattern>, "chdir": False}``."""
    path = config_dir() / "hydra.yaml"
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    flat = {k: v for k, v in _leaves(raw)}
    unknown = sorted(set(flat) - HYDRA_KEYS)
    if unknown:
        raise ConfigError(f"{path}: {', '.join(unknown)} is not applied by the pipelines (they use Hydra's compose "
                          f"API); only {', '.join(sorted(HYDRA_KEYS))} are. Remove it.")
    if flat.get("hydra.job.chdir", False) is not False:
        raise ConfigError(f"{path}: hydra.job.chdir={flat['hydra.job.chdir']!r}: runs keep their working directory "
                          "(relative paths in the configs are relative to it); set it to false.")
    return {"run_dir": str(flat.get("hydra.run.dir") or "${experiment.results_dir}"), "chdir": False}


def _leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def results_folder(cfg: dict, run_id: str) -> Path:
    """``hydra.run.dir`` resolved for this run (``experiment.*`` = the run's keys, ``now`` = the
    finishing time, as Hydra's resolver); a folder that already exists gets the run id's first 8
    characters appended."""
    tree = OmegaConf.create({"experiment": {"results_dir": cfg["results_dir"], "exp_id": cfg.get("exp_id")},
                             "run_dir": hydra_settings()["run_dir"]})
    if not OmegaConf.has_resolver("now"):
        OmegaConf.register_new_resolver("now", lambda pattern: datetime.now().strftime(pattern))
    try:
        folder = Path(str(OmegaConf.to_container(tree, resolve=True)["run_dir"]))
    except OmegaConfBaseException as exc:
        raise ConfigError(f"configs/hydra.yaml: hydra.run.dir does not resolve for this run: {exc}") from None
    return folder.with_name(f"{folder.name}_{run_id[:8]}") if folder.exists() else folder


def write_results(cfg: dict, run_id: str, metrics: dict, history: list) -> Path:
    """The run's files in its results folder (created when missing); returns the folder."""
    folder = results_folder(cfg, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=True), encoding="utf-8")
    (folder / "history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    summary = {"run_id": run_id, "exp_id": cfg.get("exp_id"), "metrics": metrics}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    return folder
