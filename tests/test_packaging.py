"""conda.yaml declares the same dependencies as pyproject.toml; MLproject declares every parameter."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~ \[]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_conda_yaml_matches_pyproject_pins():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    conda_reqs = {_name(r): r.replace(" ", "") for r in pip_section if not r.startswith("-e")}
    py_reqs = {_name(r): r.replace(" ", "") for r in project["dependencies"]}
    assert conda_reqs == py_reqs
    python = next(d for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert python.split("=")[1] in ("3.11", "3.12")
    assert "mlflow==3.17.2" in py_reqs.values() and "hydra-core==1.3.8" in py_reqs.values()


def test_mlproject_declares_every_parameter_of_its_commands():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    assert spec["conda_env"] == "conda.yaml"
    for name, entry in spec["entry_points"].items():
        used = set(re.findall(r"\{(\w+)\}", entry["command"]))
        assert used == set(entry.get("parameters", {})), name
        module = entry["command"].split()[2]
        assert (ROOT / (module.replace(".", "/") + ".py")).exists(), module
