"""Accuracy evidence on the real CIFAR-10 JPEGs of ../shared/data, through the pipeline.

Every run sits in the MLflow store of the work directory (default ``evidence/``,
git-ignored): ``mlflow ui --backend-store-uri sqlite:///evidence/mlflow.db``. The teachers
are fine-tuned once in that store and found there by every later run.

    python benchmarks/evidence.py baselines [--epochs 15] [--per-class 500]
    python benchmarks/evidence.py ladder    [--seeds 0 1 2] [--stages 2] [--epochs 6]
    python benchmarks/evidence.py sweep     [--exp L1_ib] [--n-trials 10] [--epochs 8] [--gate 0.5]

``baselines``: one small teacher (resnet20) trained once, student resnet8, the same budget
for CE-only and each of the ten methods (exp sota_generic, kd_target teacher).
``ladder``: two teachers (resnet20 + resnet14) -> resnet8; CE-only, avg-KD (L0 semantics)
and L1-L4 at one budget over several seeds.
``sweep``: the Optuna sweep of ``-e sweep`` on the ladder's teachers and student, once with
the median pruner and once without (same trials and sampler seed), and the experiment's own
values at the same budget: best validation accuracy against the default, epochs spent.
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


#: the fine-tune recipes' seed (42), which also seeds their validation split: every student
#: run holds out the same validation images as the teachers did, so no image the teachers
#: trained on is ever a validation image
SPLIT_SEED = 42


def data_overrides(root: Path, per_class: int) -> list[str]:
    return ["dataset=imagefolder", f"experiment.dataset.root={root}",
            f"experiment.dataset.train_per_class={per_class}", "experiment.dataset.batch_size=128",
            "experiment.dataset.val_split=0.1", f"experiment.dataset.split_seed={SPLIT_SEED}",
            "experiment.eval_batch_size=128", "experiment.device=auto", "experiment.use_amp=false"]


#: short schedules' warm-ups (the seed's are sized for 20-epoch stages)
SHORT_WARMUPS = ["experiment.schedule.lr_warmup_epochs=1", "experiment.loss_clamp_warmup_epochs=1",
                 "experiment.kd_warmup_epochs=1"]


def two_teacher_setup(args) -> list[str]:
    """Enter the work directory, fine-tune resnet20 and resnet14 once, and return the overrides
    of every ladder and sweep run: data, the two teachers, student resnet8."""
    root = extracted_root()
    enter(Path(args.work or "evidence").resolve())
    teachers(root, ["resnet20", "resnet14"], args.teacher_per_class, args.teacher_epochs)
    return [*data_overrides(root, args.per_class), "teacher1=resnet20", "teacher2=resnet14", "student=resnet8"]


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
    stages = args.stages
    common = [*two_teacher_setup(args), f"experiment.num_stages={stages}",
              f"experiment.student_epochs_per_stage=[{','.join([str(args.epochs)] * stages)}]", *SHORT_WARMUPS]
    if args.gate is not None:
        common.append(f"experiment.enable_kd_after_syn_acc={args.gate}")
    suffix = (f", gate {args.gate:g}" if args.gate is not None else "") + (", PPF off" if args.ppf_off else "")
    results: dict[str, list[dict]] = {}
    for label, exp, extra in LADDER:
        if args.rungs and not any(r in label for r in args.rungs):
            continue
        for seed in args.seeds:
            over = [*common, *extra, f"experiment.seed={seed}", *ladder_fixups(exp, stages, args.a_epochs)]
            if args.ppf_off and exp != "L4_full" and not extra:
                over.append("experiment.use_partial_freeze=false")
            m = distill(exp, over)
            results.setdefault(label + suffix, []).append(m)
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
    """Shorten the seed's per-stage lists and A-steps to the evidence budget (L0 keeps its
    seed value: no A-step)."""
    out = []
    if exp != "L0_baseline":
        out += [f"experiment.teacher_adapt_epochs={a_epochs}", f"experiment.ib_epochs_per_stage={a_epochs}"]
    if exp == "L4_full":
        sched = ",".join(["-1"] * (stages // 2) + ["1"] * (stages - stages // 2))
        out += [f"experiment.{r}_freeze_level_schedule=[{sched}]" for r in ("student", "teacher1", "teacher2")]
    if exp in ("L1_ib", "L2_cccp", "L3_ib_cccp_tadapt", "L4_full"):
        out += [f"experiment.synergy_only_epochs={max(1, a_epochs // 2)}"]
    return out


def sweep(args) -> None:
    """The same sweep twice (median pruner, then none: same trials, sampler and seed) and the
    experiment's own values at the same budget; prints best vs default and epochs spent."""
    import optuna
    from mlflow.tracking import MlflowClient

    from asib_core.sweep.runner import SweepSettings, run_sweep
    from asib_core.sweep.storage import open_storage

    fixed = [*two_teacher_setup(args), "experiment.num_stages=1", f"experiment.student_epochs_per_stage=[{args.epochs}]",
             f"experiment.teacher_adapt_epochs={args.a_epochs}", f"experiment.ib_epochs_per_stage={args.a_epochs}",
             f"experiment.synergy_only_epochs={max(1, args.a_epochs // 2)}", *SHORT_WARMUPS, "experiment.seed=0"]
    if args.gate is not None:
        fixed.append(f"experiment.enable_kd_after_syn_acc={args.gate}")
    if args.ppf_off:
        fixed.append("experiment.use_partial_freeze=false")
    default = distill(args.exp, fixed)
    print(f"default config: val {default['val/best_acc']:.4f} test {default['test/acc']:.4f}", flush=True)
    rows = []
    for pruner in ("median", "none"):
        name = f"evidence-{args.exp}-{args.space}-{pruner}-n{args.n_trials}"
        start = time.perf_counter()
        res = run_sweep(SweepSettings(exp=args.exp, space=args.space, n_trials=args.n_trials, study_name=name,
                                      sampler_seed=args.sampler_seed, pruner=pruner, overrides=fixed,
                                      out_dir=str(Path("sweeps") / name)))
        wall = time.perf_counter() - start
        study = optuna.load_study(study_name=name, storage=open_storage("").storage)
        epochs = sum(len(t.intermediate_values) for t in study.trials)
        best = study.best_trial
        best_run = best.user_attrs.get("mlflow_run_id") or (res.best.run_id if res.best else None)
        test = MlflowClient().get_run(best_run).data.metrics.get("test/acc") if best_run else float("nan")
        arts = [a.path for a in MlflowClient().list_artifacts(res.parent_run_id, "plots")]
        rows.append((pruner, res.counts, best.value, test, best.params, epochs, wall, res.parent_run_id, arts))
        print(f"pruner={pruner}: {res.counts} best val {best.value:.4f} (test {test:.4f}) {best.params} "
              f"epochs {epochs} wall {wall:.0f} s parent run {res.parent_run_id} plots {arts}", flush=True)
    print(f"\n| sweep ({args.n_trials} trials, sampler seed {args.sampler_seed}) | trial states | best val | "
          "its test | best params | student epochs | wall s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| default config (no search) | - | {100 * default['val/best_acc']:.2f} | "
          f"{100 * default['test/acc']:.2f} | - | {int(default['epochs_trained'])} | {default['wall_s']:.0f} |")
    for pruner, counts, value, test, params, epochs, wall, _, _ in rows:
        shown = ", ".join(f"{k}={v:.3g}" for k, v in params.items())
        states = ", ".join(f"{n} {k.lower()}" for k, n in counts.items() if n)
        print(f"| pruner {pruner} | {states} | {100 * value:.2f} | {100 * test:.2f} | {shown} | {epochs} | {wall:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    for name in ("baselines", "ladder", "sweep"):
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
    sub.choices["ladder"].add_argument(
        "--ppf-off", action="store_true",
        help="L0-L3 with use_partial_freeze=false passed explicitly (their effective value since base "
             "counts as set at experiment level, docs/asib.md section 5); L4 keeps its own schedule")
    sw = sub.choices["sweep"]
    sw.add_argument("--exp", default="L1_ib")
    sw.add_argument("--space", default="default")
    sw.add_argument("--n-trials", type=int, default=10)
    sw.add_argument("--sampler-seed", type=int, default=0)
    sw.add_argument("--a-epochs", type=int, default=2)
    sw.add_argument("--gate", type=float, default=None, help="enable_kd_after_syn_acc (default: the seed's)")
    sw.add_argument("--ppf-off", action="store_true", help="use_partial_freeze=false (see ladder --ppf-off)")
    args = parser.parse_args()
    {"baselines": baselines, "ladder": ladder, "sweep": sweep}[args.what](args)


if __name__ == "__main__":
    main()
