"""Accuracy evidence on the real CIFAR-10 JPEGs of ../shared/data, through the pipeline.

Every run sits in the MLflow store of the work directory (default ``evidence/``,
git-ignored): ``mlflow ui --backend-store-uri sqlite:///evidence/mlflow.db``. The teachers
are fine-tuned once in that store and found there by every later run.

    python benchmarks/evidence.py baselines [--epochs 15] [--per-class 500]
    python benchmarks/evidence.py ladder    [--seeds 0 1 2] [--stages 2] [--epochs 6]

``baselines``: one small teacher (resnet20) trained once, student resnet8, the same budget
for CE-only and each of the ten methods (exp sota_generic, kd_target teacher).
``ladder``: two teachers (resnet20 + resnet14) -> resnet8; CE-only, avg-KD (L0 semantics)
and L1-L4 at one budget over several seeds.
Prints a Markdown table of validation accuracy (best epoch) and test accuracy of the
best-on-validation student.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_data import extracted_root  # noqa: E402

BASELINES = ["ce", "vanilla_kd", "fitnet", "at", "ab", "ft", "crd", "dkd", "reviewkd", "simkd", "sskd"]
LADDER = [("CE-only", "L0_baseline", ["method=ce"]), ("avg-KD (L0)", "L0_baseline", []),
          ("L1 IB", "L1_ib", []), ("L2 CCCP", "L2_cccp", []), ("L3 IB+CCCP+T-adapt", "L3_ib_cccp_tadapt", []),
          ("L4 full", "L4_full", [])]


def enter(work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work.resolve() / 'mlflow.db'}"
    os.environ.setdefault("ASIB_NO_PROGRESS", "1")


def data_overrides(root: Path, per_class: int) -> list[str]:
    return ["dataset=imagefolder", f"experiment.dataset.root={root}",
            f"experiment.dataset.train_per_class={per_class}", "experiment.dataset.batch_size=128",
            "experiment.dataset.val_split=0.1", "experiment.eval_batch_size=1000", "experiment.device=auto",
            "experiment.use_amp=false"]


def teachers(root: Path, names: list[str], per_class: int, epochs: int) -> None:
    from asib_core.pipeline.finetune import run_finetune
    from asib_core.pipeline.teachers import find_finetune_run

    for name in names:
        if find_finetune_run(name, "imagefolder", "all") is None:
            run_finetune(name, "imagefolder", [f"dataset.root={root}", f"dataset.train_per_class={per_class}",
                                               f"finetune_epochs={epochs}"])


def distill(exp: str, overrides: list[str]) -> dict:
    from asib_core.pipeline.distill import run_distill

    start = time.perf_counter()
    result = run_distill(exp, overrides)
    return {**result.metrics, "wall_s": time.perf_counter() - start, "run_id": result.run_id}


def baselines(args) -> None:
    root = extracted_root()
    enter(Path(args.work or "evidence").resolve())
    teachers(root, ["resnet20"], args.teacher_per_class, args.teacher_epochs)
    common = [*data_overrides(root, args.per_class), "teacher1=resnet20", "teacher2=resnet20", "student=resnet8",
              "experiment.kd_target=teacher", f"experiment.student_epochs_per_stage=[{args.epochs}]",
              "experiment.student_lr=0.05", "experiment.mixup_alpha=0", "experiment.cutmix_alpha_distill=0",
              "experiment.ce_label_smoothing=0", f"experiment.seed={args.seed}"]
    rows = []
    for method in args.methods or BASELINES:
        m = distill("sota_generic", [*common, f"method={method}"])
        rows.append((method, m))
        print(f"{method:>10}: val {m['val/best_acc']:.4f} test {m['test/acc']:.4f} ({m['wall_s']:.0f} s)", flush=True)
    ce = dict(rows)["ce"]["test/acc"] if "ce" in dict(rows) else None
    print("\n| method | val top-1 (best epoch) | test top-1 (val-selected) | test - CE | wall s |")
    print("|---|---|---|---|---|")
    for method, m in rows:
        diff = f"{100 * (m['test/acc'] - ce):+.2f}" if ce is not None else ""
        print(f"| {method} | {100 * m['val/best_acc']:.2f} | {100 * m['test/acc']:.2f} | {diff} | {m['wall_s']:.0f} |")


def ladder(args) -> None:
    root = extracted_root()
    enter(Path(args.work or "evidence").resolve())
    teachers(root, ["resnet20", "resnet14"], args.teacher_per_class, args.teacher_epochs)
    stages = args.stages
    common = [*data_overrides(root, args.per_class), "teacher1=resnet20", "teacher2=resnet14", "student=resnet8",
              f"experiment.num_stages={stages}",
              f"experiment.student_epochs_per_stage=[{','.join([str(args.epochs)] * stages)}]",
              f"experiment.teacher_adapt_epochs={args.a_epochs}", f"experiment.ib_epochs_per_stage={args.a_epochs}",
              "experiment.schedule.lr_warmup_epochs=1", "experiment.loss_clamp_warmup_epochs=1",
              "experiment.kd_warmup_epochs=1"]
    if args.gate is not None:
        common.append(f"experiment.enable_kd_after_syn_acc={args.gate}")
    results: dict[str, list[dict]] = {}
    for label, exp, extra in LADDER:
        if args.rungs and not any(r in label for r in args.rungs):
            continue
        for seed in args.seeds:
            over = [*common, *extra, f"experiment.seed={seed}", *ladder_fixups(exp, stages, args.a_epochs)]
            m = distill(exp, over)
            results.setdefault(label, []).append(m)
            print(f"{label:>20} seed {seed}: val {m['val/best_acc']:.4f} test {m['test/acc']:.4f} "
                  f"({m['wall_s']:.0f} s) {gate_summary(m['run_id'])}", flush=True)
    print("\n| rung | val top-1 mean ± sd | test top-1 mean ± sd | seeds | wall s (mean) |")
    print("|---|---|---|---|---|")
    for label, runs in results.items():
        val = [100 * r["val/best_acc"] for r in runs]
        test = [100 * r["test/acc"] for r in runs]
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
        print(f"| {label} | {statistics.mean(val):.2f} ± {sd(val):.2f} | {statistics.mean(test):.2f} ± "
              f"{sd(test):.2f} | {len(runs)} | {statistics.mean(r['wall_s'] for r in runs):.0f} |")


def gate_summary(run_id: str) -> str:
    """Synergy accuracy and gate state of an ASIB run (what decides its KD target)."""
    from mlflow.tracking import MlflowClient

    metrics = MlflowClient().get_run(run_id).data.metrics
    keys = ("gate/syn_acc", "gate/open", "kd/syn_ratio")
    return " ".join(f"{k}={metrics[k]:.3f}" for k in keys if k in metrics)


def ladder_fixups(exp: str, stages: int, a_epochs: int) -> list[str]:
    """Shorten the seed's per-stage lists to the evidence budget's number of stages."""
    out = []
    if exp == "L4_full":
        sched = ",".join(["-1"] * (stages // 2) + ["1"] * (stages - stages // 2))
        out += [f"experiment.{r}_freeze_level_schedule=[{sched}]" for r in ("student", "teacher1", "teacher2")]
    if exp in ("L1_ib", "L2_cccp", "L3_ib_cccp_tadapt", "L4_full"):
        out += [f"experiment.synergy_only_epochs={max(1, a_epochs // 2)}"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("baselines", "ladder"):
        p = sub.add_parser(name)
        p.add_argument("--work", default=None)
        p.add_argument("--per-class", type=int, default=500)
        p.add_argument("--teacher-per-class", type=int, default=1000)
        p.add_argument("--teacher-epochs", type=int, default=12)
        p.add_argument("--epochs", type=int, default=15 if name == "baselines" else 6)
    sub.choices["baselines"].add_argument("--methods", nargs="*")
    sub.choices["baselines"].add_argument("--seed", type=int, default=0)
    sub.choices["ladder"].add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    sub.choices["ladder"].add_argument("--stages", type=int, default=2)
    sub.choices["ladder"].add_argument("--a-epochs", type=int, default=2)
    sub.choices["ladder"].add_argument("--rungs", nargs="*", help="only rungs whose label contains one of these")
    sub.choices["ladder"].add_argument("--gate", type=float, default=None,
                                       help="enable_kd_after_syn_acc for every rung (default: the seed's)")
    args = parser.parse_args()
    baselines(args) if args.what == "baselines" else ladder(args)


if __name__ == "__main__":
    main()
