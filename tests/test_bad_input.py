"""Issue 14, item 7: bad input across the entry points, as a table.

Every case is something a user can type or point at: invalid config values (the validator),
command-line counts that are not numbers, teacher checkpoints of the wrong kind, data that
cannot train (corrupt or truncated images, class folders that differ between the splits, one
class, fewer images than one batch), places that cannot be written (the tracking store, the
checkpoint folder). For each case the entry point must

- exit with code 2,
- print no traceback (stderr and the log),
- name the offending key or file in its message,
- leave no MLflow run RUNNING in the test's own store.

The table runs in-process through each entry point's ``main(argv)`` (the same code a
command line runs); a subset also runs as real subprocesses (``python -m pipelines.X``). The
count of passing cases is the "refused clearly / tried" figure of issue 14:
``python -m pytest -q tests/test_bad_input.py``.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from tests.pipeline_helpers import run_module

TINY = ("experiment.student_epochs_per_stage=[1]", "experiment.dataset.train_per_class=20")
GOOD_TEACHERS = ("experiment.teacher1_ckpt={teachers}/resnet20.pth", "experiment.teacher2_ckpt={teachers}/wrn_16_2.pth")


def with_teacher1(path: str) -> tuple[str, ...]:
    return ("exp=quickstart", *TINY, f"experiment.teacher1_ckpt={path}", GOOD_TEACHERS[1])


def folder(name: str) -> tuple[str, ...]:
    return ("exp=quickstart", *TINY, "dataset=imagefolder", f"experiment.dataset.root={{folders}}/{name}")


@dataclass(frozen=True)
class Case:
    id: str
    module: str                      # pipelines.<entry point>
    argv: tuple[str, ...]            # formatted with the prepared inputs ({teachers}, {folders}, ...)
    needle: str                      # the key or file the message must name (formatted too)
    env: dict = field(default_factory=dict)
    prepare: str | None = None       # name of a preparation in PREPARE


Q = ("exp=quickstart",)
L1 = ("exp=L1_ib",)
FT = ("teacher=resnet20", "dataset=digits")
CASES = [
    # ---------------------------------------------------------------- config CLI: the validator
    Case("config-batch-size-0", "pipelines.config", (*Q, "experiment.dataset.batch_size=0"), "dataset.batch_size=0"),
    Case("config-batch-size-negative", "pipelines.config", (*Q, "experiment.dataset.batch_size=-1"),
         "dataset.batch_size=-1"),
    Case("config-val-split-1.5", "pipelines.config", (*Q, "experiment.dataset.val_split=1.5"), "dataset.val_split=1.5"),
    Case("config-seed-negative", "pipelines.config", (*Q, "seed=-1"), "seed=-1"),
    Case("config-ib-beta-negative", "pipelines.config", (*L1, "experiment.ib_beta=-0.001"), "ib_beta=-0.001"),
    Case("config-zero-stages", "pipelines.config", (*Q, "experiment.num_stages=0"), "num_stages=0"),
    Case("config-unknown-kd-target", "pipelines.config", (*Q, "experiment.kd_target=best"), "kd_target='best'"),
    Case("config-unknown-optimizer", "pipelines.config", (*Q, "experiment.optimizer=adamax"), "optimizer='adamax'"),
    Case("config-nan-learning-rate", "pipelines.config", (*Q, "experiment.student_lr=nan"), "student_lr=nan"),
    Case("config-eval-batch-size-0", "pipelines.config", (*Q, "experiment.eval_batch_size=0"), "eval_batch_size=0"),
    Case("config-unknown-key", "pipelines.config", (*Q, "experiment.dataset.batch_sise=64"), "dataset.batch_sise"),
    Case("config-wrong-type", "pipelines.config", (*Q, "experiment.tau=warm"), "tau='warm'"),
    Case("config-unknown-experiment", "pipelines.config", ("exp=L9_magic",), "L9_magic"),
    Case("config-min-cw-above-max-cw", "pipelines.config", (*L1, "experiment.min_cw=2.0"), "min_cw=2.0"),
    Case("config-unknown-dataset", "pipelines.config", (*Q, "experiment.dataset.name=mnist"), "dataset.name='mnist'"),
    Case("config-stage-list-length", "pipelines.config", (*Q, "experiment.student_epochs_per_stage=[1,2,3]"),
         "student_epochs_per_stage"),
    Case("config-unknown-device", "pipelines.config", (*Q, "experiment.device=gpu"), "device='gpu'"),
    # ---------------------------------------------------------------- distill
    Case("distill-batch-size-0", "pipelines.distill", (*Q, *TINY, "experiment.dataset.batch_size=0"),
         "dataset.batch_size=0"),
    Case("distill-seed-negative", "pipelines.distill", (*Q, *TINY, "seed=-1"), "seed=-1"),
    Case("distill-nproc-abc", "pipelines.distill", (*Q, *TINY, "nproc=abc"), "nproc='abc'"),
    Case("distill-nproc-0", "pipelines.distill", (*Q, *TINY, "nproc=0"), "nproc='0'"),
    Case("distill-infinite-learning-rate", "pipelines.distill", (*Q, *TINY, "experiment.student_lr=inf"),
         "student_lr=inf"),
    Case("distill-train-smaller-than-one-batch", "pipelines.distill",
         (*Q, "experiment.dataset.train_per_class=2", "experiment.dataset.batch_size=64"), "dataset.batch_size"),
    Case("distill-teacher-truncated", "pipelines.distill", with_teacher1("{teachers}/truncated.pth"), "truncated.pth"),
    Case("distill-teacher-garbage", "pipelines.distill", with_teacher1("{teachers}/garbage.pth"), "garbage.pth"),
    Case("distill-teacher-empty", "pipelines.distill", with_teacher1("{teachers}/empty.pth"), "empty.pth"),
    Case("distill-teacher-bare-state-dict", "pipelines.distill", with_teacher1("{teachers}/bare.pth"), "bare.pth"),
    Case("distill-teacher-tensor", "pipelines.distill", with_teacher1("{teachers}/tensor.pth"), "tensor.pth"),
    Case("distill-teacher-other-class-count", "pipelines.distill", with_teacher1("{teachers}/classes5.pth"),
         "classes5.pth"),
    Case("distill-teacher-other-class-count-no-meta", "pipelines.distill",
         with_teacher1("{teachers}/classes5_nometa.pth"), "classes5_nometa.pth"),
    Case("distill-teacher-other-model", "pipelines.distill", with_teacher1("{teachers}/wrn_16_2.pth"), "wrn_16_2.pth"),
    Case("distill-corrupt-jpeg", "pipelines.distill", folder("corrupt"), "broken.jpg"),
    Case("distill-truncated-jpeg", "pipelines.distill", folder("truncated"), "cut.jpg"),
    Case("distill-one-class", "pipelines.distill", folder("one_class"), "{folders}/one_class"),
    Case("distill-test-class-missing-from-train", "pipelines.distill", folder("extra_test_class"), "zebra"),
    Case("distill-train-class-missing-from-test", "pipelines.distill", folder("missing_test_class"), "'cat'"),
    Case("distill-checkpoint-dir-is-a-file", "pipelines.distill",
         (*Q, *TINY, *GOOD_TEACHERS, "experiment.checkpoint_dir={workdir}/afile/runs"), "{workdir}/afile"),
    Case("distill-store-under-a-file", "pipelines.distill", (*Q, *TINY, *GOOD_TEACHERS), "{workdir}/afile",
         env={"MLFLOW_TRACKING_URI": "sqlite:///{workdir}/afile/mlflow.db"}),
    Case("distill-read-only-store", "pipelines.distill", (*Q, *TINY, *GOOD_TEACHERS), "{workdir}/ro/mlflow.db",
         env={"MLFLOW_TRACKING_URI": "sqlite:///{workdir}/ro/mlflow.db"}, prepare="read_only_store"),
    Case("distill-read-only-checkpoint-dir", "pipelines.distill",
         (*Q, *TINY, *GOOD_TEACHERS, "experiment.checkpoint_dir={workdir}/ro_ckpt/runs"), "{workdir}/ro_ckpt",
         prepare="read_only_folder"),
    # ---------------------------------------------------------------- finetune
    Case("finetune-batch-size-0", "pipelines.finetune", (*FT, "batch_size=0"), "batch_size=0"),
    Case("finetune-nan-learning-rate", "pipelines.finetune", (*FT, "finetune_lr=nan"), "finetune_lr=nan"),
    Case("finetune-unknown-recipe", "pipelines.finetune", ("teacher=resnet99", "dataset=digits"), "resnet99"),
    Case("finetune-subset-without-overlap", "pipelines.finetune", (*FT, "subset=1"), "subset=1"),
    Case("finetune-unknown-scheduler", "pipelines.finetune", (*FT, "scheduler_type=linear"), "scheduler_type='linear'"),
    Case("finetune-zero-epochs", "pipelines.finetune", (*FT, "finetune_epochs=0"), "finetune_epochs=0"),
    Case("finetune-val-split-0", "pipelines.finetune", (*FT, "dataset.val_split=0"), "dataset.val_split=0"),
    Case("finetune-init-garbage", "pipelines.finetune",
         (*FT, "finetune_epochs=1", "dataset.train_per_class=20", "teacher_ckpt_init={teachers}/garbage.pth"),
         "garbage.pth"),
    # ---------------------------------------------------------------- main
    Case("main-nproc-abc", "pipelines.main", (*Q, "nproc=abc"), "nproc='abc'"),
    Case("main-env-manager", "pipelines.main", (*Q, "env_manager=docker"), "env_manager='docker'"),
    Case("main-negative-kd-alpha", "pipelines.main", (*Q, "experiment.kd_alpha=-1"), "kd_alpha=-1"),
    # ---------------------------------------------------------------- sweep
    Case("sweep-n-trials-abc", "pipelines.sweep", (*Q, "n_trials=abc"), "n_trials='abc'"),
    Case("sweep-n-trials-0", "pipelines.sweep", (*Q, "n_trials=0"), "n_trials='0'"),
    Case("sweep-worker-negative", "pipelines.sweep", (*Q, "worker=-1"), "worker='-1'"),
    Case("sweep-unknown-pruner", "pipelines.sweep", (*Q, "n_trials=1", "pruner=random"), "pruner='random'"),
    Case("sweep-unknown-space", "pipelines.sweep", (*Q, "n_trials=1", "space=nope"), "nope"),
    Case("sweep-invalid-override", "pipelines.sweep", (*Q, "n_trials=1", "overrides=experiment.dataset.batch_size=0"),
         "dataset.batch_size=0"),
    Case("sweep-space-outside-the-domain", "pipelines.sweep", (*Q, "n_trials=1", "space={workdir}/space.yaml"),
         "kd_alpha", prepare="space_outside_domain"),
    # ---------------------------------------------------------------- evaluate, report
    Case("evaluate-no-run-id", "pipelines.evaluate", (), "run_id"),
    Case("evaluate-unknown-run", "pipelines.evaluate", ("run_id=0123abcd",), "0123abcd"),
    Case("evaluate-failed-run", "pipelines.evaluate", ("run_id={failed_run}",), "{failed_run}",
         prepare="failed_run"),
    Case("report-unknown-option", "pipelines.report", ("colour=red",), "colour=red"),
    Case("report-unknown-experiment", "pipelines.report", ("experiment=nope",), "'nope'"),
]
SUBPROCESS_CASES = ["config-nan-learning-rate", "distill-nproc-abc", "distill-teacher-bare-state-dict",
                    "finetune-batch-size-0", "main-env-manager", "sweep-n-trials-abc", "evaluate-no-run-id",
                    "report-unknown-option"]
BY_ID = {case.id: case for case in CASES}


# --------------------------------------------------------------------------- prepared inputs

def _jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)


def _image_folder(root: Path, train: dict, test: dict) -> None:
    seed = 0
    for split, classes in (("train", train), ("test", test)):
        for cls, count in classes.items():
            for i in range(count):
                seed += 1
                _jpeg(root / split / cls / f"{i:03d}.jpg", seed)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Teacher checkpoints (good ones in the real fine-tune format, and bad ones) and image folders."""
    from asib_core.models import create_model
    from asib_core.pipeline.models import save_teacher

    base = tmp_path_factory.mktemp("bad_inputs")
    teachers = base / "teachers"
    teachers.mkdir()
    for name in ("resnet20", "wrn_16_2"):
        model = create_model(name, num_classes=10, pretrained=False, small_input=True)
        save_teacher(model, teachers / f"{name}.pth", {"teacher": name, "num_classes": 10, "dataset": "digits"})
    good = (teachers / "resnet20.pth").read_bytes()
    (teachers / "truncated.pth").write_bytes(good[: len(good) // 2])
    (teachers / "garbage.pth").write_bytes(b"this is not a checkpoint\n" * 20)
    (teachers / "empty.pth").write_bytes(b"")
    state = torch.load(teachers / "resnet20.pth", weights_only=True)["model"]
    torch.save(state, teachers / "bare.pth")
    torch.save(torch.zeros(10, 64), teachers / "tensor.pth")
    five = create_model("resnet20", num_classes=5, pretrained=False, small_input=True)
    save_teacher(five, teachers / "classes5.pth", {"teacher": "resnet20", "num_classes": 5, "dataset": "other"})
    torch.save({"model": five.state_dict()}, teachers / "classes5_nometa.pth")

    folders = base / "folders"
    two = {"cat": 6, "dog": 6}
    _image_folder(folders / "corrupt", two, two)
    (folders / "corrupt" / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    _image_folder(folders / "truncated", two, two)
    whole = (folders / "truncated" / "train" / "cat" / "000.jpg").read_bytes()
    (folders / "truncated" / "train" / "cat" / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    _image_folder(folders / "one_class", {"cat": 6}, {"cat": 2})
    _image_folder(folders / "extra_test_class", two, {**two, "zebra": 2})
    _image_folder(folders / "missing_test_class", two, {"dog": 2})
    return {"teachers": str(teachers), "folders": str(folders)}


def _read_only(path: Path) -> None:
    """Make ``path`` read-only even for root (chattr +i), or skip when this machine cannot."""
    if os.geteuid() != 0:
        path.chmod(0o555 if path.is_dir() else 0o444)
    elif shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(path)],
                                                         capture_output=True).returncode != 0:
        pytest.skip("cannot make a file read-only for root here (chattr +i not permitted)")


def _writable_again(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o755 if path.is_dir() else 0o644)


def prepare(case: Case, workdir: Path, cleanup: list) -> dict:
    """Per-case preparation; returns extra format values."""
    (workdir / "afile").write_text("a file where a folder is expected\n")
    if case.prepare == "read_only_store":
        db = workdir / "ro" / "mlflow.db"
        db.parent.mkdir()
        mlflow.set_tracking_uri(f"sqlite:///{db}")
        MlflowClient().search_experiments()             # creates the store's tables
        _read_only(db)
        cleanup.append(db)
    elif case.prepare == "read_only_folder":
        folder = workdir / "ro_ckpt"
        folder.mkdir()
        _read_only(folder)
        cleanup.append(folder)
    elif case.prepare == "space_outside_domain":
        space = {"params": {"kd_alpha": {"type": "float", "low": -0.5, "high": 0.9}}}
        (workdir / "space.yaml").write_text(yaml.safe_dump(space))
    elif case.prepare == "failed_run":
        client = MlflowClient()
        exp = client.create_experiment("digits")
        run = client.create_run(exp, tags={"step": "distill"})
        client.set_terminated(run.info.run_id, "FAILED")
        return {"failed_run": run.info.run_id}
    return {}


def running_runs(uri: str) -> list[str]:
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        return []  # the command never created its store: no run at all
    client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, "attributes.status = 'RUNNING'") if ids else []
    return [r.info.run_id for r in runs]


def stores_to_check(workdir: Path, env: dict) -> list[str]:
    """The test's own store, and the case's store when it is a readable sqlite file."""
    uris = [f"sqlite:///{workdir / 'mlflow.db'}"]
    other = env.get("MLFLOW_TRACKING_URI", "")
    if other.startswith("sqlite:///") and Path(other[len("sqlite:///"):]).is_file():
        uris.append(other)
    return uris


def assert_refused_clearly(code, stderr: str, log: str, needle: str) -> None:
    assert code == 2, f"exit code {code!r}, stderr:\n{stderr[-3000:]}"
    assert "Traceback" not in stderr, stderr[-3000:]
    assert "Traceback" not in log, log[-3000:]
    message = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, stderr[-3000:]
    assert needle in message[0], f"{needle!r} not named in: {message[0]}"


@pytest.fixture
def case_env(workdir, inputs, monkeypatch):
    """Format a case with the prepared inputs and this test's work directory."""
    cleanup: list[Path] = []
    monkeypatch.delenv("ASIB_WORKDIR", raising=False)   # `main` sets it for its chained steps

    def make(case: Case) -> tuple[list[str], str, dict]:
        values = {**inputs, "workdir": str(workdir), **prepare(case, workdir, cleanup)}
        env = {k: v.format(**values) for k, v in case.env.items()}
        mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
        return [a.format(**values) for a in case.argv], case.needle.format(**values), env

    yield make
    for path in cleanup:
        _writable_again(path)


# --------------------------------------------------------------------------- the table

def test_the_table_is_large_and_covers_every_entry_point():
    assert len(CASES) >= 40 and len(BY_ID) == len(CASES)
    modules = {case.module for case in CASES}
    assert modules == {f"pipelines.{m}" for m in ("config", "distill", "finetune", "main", "sweep", "evaluate",
                                                  "report")}
    assert set(SUBPROCESS_CASES) <= set(BY_ID)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_clearly(case, case_env, workdir, capsys, caplog, monkeypatch):
    argv, needle, env = case_env(case)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    entry = importlib.import_module(case.module)
    with pytest.raises(SystemExit) as info:
        entry.main(argv)
    _, stderr = capsys.readouterr()
    assert_refused_clearly(info.value.code, stderr, caplog.text, needle)
    for uri in stores_to_check(workdir, env):
        assert running_runs(uri) == [], uri


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_is_refused_clearly_from_the_command_line(case_id, case_env, workdir):
    case = BY_ID[case_id]
    argv, needle, _ = case_env(case)
    out = run_module(case.module, argv, workdir, timeout=300)
    assert_refused_clearly(out.returncode, out.stderr, "", needle)
    assert running_runs(f"sqlite:///{workdir / 'mlflow.db'}") == []
