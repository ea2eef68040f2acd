"""Issue 15: run reuse cannot return a stale result: the identity includes the code version,
and force=true runs a step again."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.pipeline_helpers import ROOT

PRINT_IDENTITY = "from asib_core.config import identity_hash; print(identity_hash({'seed': 1}, {'t': 'x'}))"


def _identity_under(code_root) -> str:
    out = subprocess.run([sys.executable, "-c", PRINT_IDENTITY], cwd=code_root, capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(code_root)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_identity_changes_with_the_code_even_uncommitted(tmp_path):
    from asib_core.config import identity_hash

    copy = tmp_path / "code"
    for folder in ("asib_core", "pipelines", "configs"):
        shutil.copytree(ROOT / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    here = identity_hash({"seed": 1}, {"t": "x"})
    assert _identity_under(copy) == here            # the same code (outside git): the same identity
    loop = copy / "asib_core" / "engine" / "loop.py"
    loop.write_text(loop.read_text() + "\n# an edit that no commit records\n")
    assert _identity_under(copy) != here            # other code: a run of this code is not reused


def test_code_version_covers_configs(tmp_path):
    from asib_core.code_version import code_version

    for folder in ("asib_core", "configs"):
        (tmp_path / folder).mkdir()
    (tmp_path / "asib_core" / "a.py").write_text("x = 1\n")
    (tmp_path / "configs" / "base.yaml").write_text("seed: 1\n")
    before = code_version(tmp_path)
    (tmp_path / "configs" / "base.yaml").write_text("seed: 2\n")
    code_version.cache_clear()
    assert code_version(tmp_path) != before


def test_code_version_leaves_out_benchmark_protocols(tmp_path):
    """A protocol only lists runs (their effective configs are hashed into their identities):
    a new row must not make the finished runs of the other rows unreusable."""
    from asib_core.code_version import code_version

    (tmp_path / "configs" / "benchmark").mkdir(parents=True)
    (tmp_path / "configs" / "experiment").mkdir()
    (tmp_path / "configs" / "experiment" / "x.yaml").write_text("kd_alpha: 0.9\n")
    protocol = tmp_path / "configs" / "benchmark" / "p.yaml"
    protocol.write_text("rows: [{name: a}]\n")
    code_version.cache_clear()
    before = code_version(tmp_path)
    protocol.write_text("rows: [{name: a}, {name: b}]\n")
    code_version.cache_clear()
    assert code_version(tmp_path) == before
    (tmp_path / "configs" / "experiment" / "x.yaml").write_text("kd_alpha: 0.5\n")
    code_version.cache_clear()
    assert code_version(tmp_path) != before


def test_force_runs_a_finished_step_again(workdir):
    from mlflow.tracking import MlflowClient

    from asib_core.pipeline.chain import reusable_run
    from asib_core.tracking import configure_tracking

    configure_tracking()
    client = MlflowClient()
    run = client.create_run("0", tags={"step": "distill", "asib.identity": "abc"})
    client.set_terminated(run.info.run_id, "FINISHED")
    assert reusable_run("distill", "abc").info.run_id == run.info.run_id
    assert reusable_run("distill", "abc", force=True) is None
    assert reusable_run("distill", "abd") is None


def test_main_refuses_a_force_that_is_not_true_or_false(workdir, capsys):
    from pipelines.main import main

    with pytest.raises(SystemExit) as exc:
        main(["exp=quickstart", "force=yes"])
    assert exc.value.code == 2 and "force='yes' is not allowed" in capsys.readouterr().err


def test_main_reuses_finished_steps_of_the_same_identity_in_process(workdir):
    """The chain's reuse path end to end without launching a step: a FINISHED distill run and its
    evaluate run with the identities main computes are taken as they are."""
    from mlflow.tracking import MlflowClient

    from asib_core.config import resolve_experiment
    from asib_core.pipeline.chain import run_main
    from asib_core.pipeline.distill import run_identity
    from asib_core.tracking import configure_tracking

    over = ["method=ce"]   # no teachers: no finetune step
    configure_tracking()
    client = MlflowClient()
    identity = run_identity(resolve_experiment("quickstart", over).cfg, [])
    distill = client.create_run("0", tags={"step": "distill", "asib.identity": identity}).info.run_id
    evaluate = client.create_run("0", tags={"step": "evaluate", "asib.identity": f"evaluate-{distill}"}).info.run_id
    client.log_metric(evaluate, "test/acc", 0.5)
    for run_id in (distill, evaluate):
        client.set_terminated(run_id, "FINISHED")
    result = run_main("quickstart", over, baseline="none")
    assert result.steps == {"distill": distill, "evaluate_distill": evaluate}
    assert all(result.reused.values()) and result.metrics == {"distill/test_acc": 0.5}
