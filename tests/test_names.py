"""Issue 15: names a person can trust (the experiment's name, one metric name per quantity,
one MLflow experiment for every kind of run, --help on every entry point)."""
from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = ["config", "distill", "evaluate", "finetune", "main", "report", "sweep", "docs", "benchmark", "archive"]


def test_experiment_next_to_exp_is_refused(workdir, capsys):
    """Before: `exp=quickstart experiment=L1_ib` built L1_ib and labelled it quickstart."""
    from pipelines.config import main

    with pytest.raises(SystemExit) as exc:
        main(["exp=quickstart", "experiment=L1_ib"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "exp=L1_ib" in err and "Traceback" not in err


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_entry_point_answers_help(workdir, capsys, name, flag):
    module = importlib.import_module(f"pipelines.{name}")
    with pytest.raises(SystemExit) as exc:
        module.main([flag])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and f"pipelines.{name}" in out
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"].get(name, {})
    for param in spec.get("parameters", {}):
        assert re.search(rf"\b{param}\b", out), (name, param)
    assert not (workdir / "mlflow.db").exists()  # nothing ran


def test_runs_go_where_mlflow_run_puts_them(workdir, monkeypatch):
    from asib_core.tracking import configure_tracking, experiment_name

    configure_tracking()
    assert experiment_name() == "Default"          # `mlflow run` without --experiment-name
    import mlflow
    exp_id = mlflow.create_experiment("cifar100")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", exp_id)  # what `mlflow run --experiment-name cifar100` sets
    assert experiment_name() == "cifar100"


def test_one_name_for_test_accuracy():
    """`test/acc` is the test accuracy everywhere; no code, test or page uses `top1` for it."""
    offenders = []
    for folder in ("asib_core", "pipelines", "tests", "benchmarks", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md") and path.name != "test_names.py":
                if re.search(r"test/top1|eval/top1|_top1\b|test_top1", path.read_text(encoding="utf-8")):
                    offenders.append(str(path.relative_to(ROOT)))
    assert not offenders
