"""Pruning on the benchmark protocol's students: student epochs spent and best validation value
of a sweep without pruning, and of the same sweep under each pruner.

    python benchmarks/bench_pruning.py --teacher1 T1.pt [--teacher2 T2.pt] [--data "OVERRIDES"]
        [--work DIR] [--n-trials 8] [--epochs 30] [--space kd_tau] [--sampler-seed 0]
        [--pruners successive_halving hyperband median] [--grid] [--verify successive_halving]
    python benchmarks/bench_pruning.py --setting digits [...]     # a small proxy, no CIFAR teachers

``--setting digits`` is the same measurement on the embedded digits (experiment quickstart:
teachers resnet20 + wrn_16_2 fine-tuned once (4 epochs) in the work directory on all the training images,
student resnet8 on 30 labelled images per class (``--per-class``), 30 epochs, KD from both teachers): the shape of
the protocol (strong teachers, a low-data student, 30 epochs) at a cost the CPU of a laptop bears.

The students are the protocol's (configs/benchmark/cifar10_lowdata.yaml `common`: resnet8,
5,000 images, 30 epochs, SGD + cosine) with the protocol's KD recipe from teacher 1
(`recipe=kd_paper` when the project has it, else vanilla KD with the same settings), and
``--data`` the overrides that reproduce the protocol's student data (what
the benchmark protocol names). The sweep searches kd_alpha and tau
(configs/sweep/kd_tau.yaml) with a random sampler, so both sweeps evaluate the same trials.

How: (1) the sweep runs without pruning (real ``-e sweep`` trials, tracked). (2) Training is
deterministic (fixed seed, ``deterministic: true``), so a pruned sweep of the same trials sees the
very curves the unpruned one recorded up to where it stops: each pruner is replayed on the recorded
validation curves (a real Optuna study with that pruner, the same study name, so Hyperband puts
each trial in the same bracket). (3) ``--verify P`` runs the pruned sweep with pruner P for real
and checks its epochs and best value against the replay. ``--grid`` also replays each pruner over a
grid of its settings (which ones would have kept the best trial, at what saving).
"""
from __future__ import annotations

import argparse
import itertools
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROTOCOL = ROOT / "configs" / "benchmark" / "cifar10_lowdata.yaml"
KD_RECIPE = ROOT / "configs" / "recipe" / "kd_paper.yaml"
#: vanilla KD with the paper's settings where the kd_paper recipe is not there yet
VANILLA_KD = ["method=vanilla_kd", "experiment.mixup_alpha=0", "experiment.cutmix_alpha_distill=0",
              "experiment.ce_label_smoothing=0", "experiment.kd_warmup_epochs=0", "experiment.use_loss_clamp=false"]


def protocol_common(epochs: int | None) -> list[str]:
    import yaml
    common = list(yaml.safe_load(PROTOCOL.read_text())["common"])
    if epochs is not None:
        common = [o for o in common if not o.startswith("experiment.student_epochs_per_stage=")]
        common.append(f"experiment.student_epochs_per_stage=[{epochs}]")
    return common


def digits_setup(args) -> tuple[str, list[str]]:
    """quickstart on digits: teachers fine-tuned once in the work directory, a low-data student."""
    from asib_core.pipeline.finetune import run_finetune
    from asib_core.pipeline.teachers import find_finetune_run

    for teacher in ("resnet20", "wrn_16_2"):
        if find_finetune_run(teacher, "digits", "all") is None:
            run_finetune(teacher, "digits", [f"finetune_epochs={args.teacher_epochs}"])
    return "quickstart", [f"experiment.dataset.train_per_class={args.per_class}",
                          f"experiment.student_epochs_per_stage=[{args.epochs or 30}]", "experiment.seed=0"]


def fixed_overrides(args) -> list[str]:
    recipe = ["recipe=kd_paper"] if KD_RECIPE.is_file() else VANILLA_KD
    teachers = [f"experiment.teacher1_ckpt={Path(args.teacher1).resolve()}"]
    if args.teacher2:
        teachers.append(f"experiment.teacher2_ckpt={Path(args.teacher2).resolve()}")
    return [*protocol_common(args.epochs), *shlex.split(args.data or ""), *recipe, *teachers,
            "experiment.kd_target=teacher", "experiment.kd_teacher_index=0", "experiment.seed=0"]


def sweep(args, name: str, pruner: str, exp: str, fixed: list[str]):
    from asib_core.sweep.runner import SweepSettings, run_sweep

    start = time.perf_counter()
    result = run_sweep(SweepSettings(exp=exp, space=args.space, n_trials=args.n_trials, study_name=name,
                                     sampler="random", sampler_seed=args.sampler_seed, pruner=pruner,
                                     overrides=fixed, out_dir=str(Path("sweeps") / name)))
    return result, time.perf_counter() - start


def load(name: str):
    import optuna

    from asib_core.sweep.storage import open_storage
    return optuna.load_study(study_name=name, storage=open_storage("").storage)


def summary(trials) -> tuple[int, float, int, int]:
    """(student epochs, best value, #pruned, best trial number) of a study's trials."""
    done = [t for t in trials if t.state.name == "COMPLETE"]
    best = max(done, key=lambda t: (t.value, -t.number))
    return (sum(len(t.intermediate_values) for t in trials), best.value,
            sum(t.state.name == "PRUNED" for t in trials), best.number)


def replay(name: str, pruner: str, curves: list, space, total_epochs: int):
    """The pruned sweep of the same trials, decided by a real Optuna pruner on the recorded curves."""
    from asib_core.sweep.study import build_pruner

    return replay_with(build_pruner(pruner, space, total_epochs), curves, name)


def replay_with(pruner, curves: list, name: str | None = None):
    import optuna

    study = optuna.create_study(study_name=name, direction="maximize", pruner=pruner)
    for curve, value in curves:          # pruners decide on the reported values alone
        trial = study.ask()
        pruned = False
        for step in sorted(curve):
            trial.report(curve[step], step)
            if trial.should_prune():
                pruned = True
                break
        if pruned:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, value)
    return study.get_trials()


def grid(curves: list, total_epochs: int, tag: str) -> list[tuple]:
    """``--grid``: the settings a pruner is tuned by, replayed on the same curves - successive
    halving and Hyperband over min_resource x reduction_factor, median and 75th-percentile over
    n_startup_trials x n_warmup_steps. Labels in the format of configs/sweep/*.yaml. Each replay
    has the study name a real pruned sweep would have (Hyperband draws a trial's bracket from it)."""
    import optuna

    pruners = optuna.pruners
    rows = []
    for m, r in itertools.product((1, 3, 5, 10, 15), (2, 3, 4)):
        rows.append((f"successive_halving {{min_resource: {m}, reduction_factor: {r}}}",
                     pruners.SuccessiveHalvingPruner(min_resource=m, reduction_factor=r)))
        rows.append((f"hyperband {{min_resource: {m}, reduction_factor: {r}}}",
                     pruners.HyperbandPruner(min_resource=m, max_resource=total_epochs, reduction_factor=r)))
    for n, w in itertools.product((2, 3, 4), (5, 10, 15)):
        rows.append((f"median {{n_startup_trials: {n}, n_warmup_steps: {w}}}",
                     pruners.MedianPruner(n_startup_trials=n, n_warmup_steps=w)))
        rows.append((f"percentile {{percentile: 75, n_startup_trials: {n}, n_warmup_steps: {w}}}",
                     pruners.PercentilePruner(75, n_startup_trials=n, n_warmup_steps=w)))
    return [(label, *summary(replay_with(pruner, curves, f"prune-{label.split()[0]}-{tag}")), "-")
            for label, pruner in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("protocol", "digits"), default="protocol")
    parser.add_argument("--teacher1", default=None, help="protocol: the teacher checkpoint the KD student learns from")
    parser.add_argument("--teacher2", default=None)
    parser.add_argument("--teacher-epochs", type=int, default=4, help="digits: the teachers' fine-tune epochs")
    parser.add_argument("--per-class", type=int, default=30, help="digits: the student's labelled images per class")
    parser.add_argument("--data", default="", help="Hydra overrides of the protocol's student data")
    parser.add_argument("--work", default="bench-pruning")
    parser.add_argument("--n-trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=None, help="student epochs (default: the protocol's)")
    parser.add_argument("--space", default="kd_tau")
    parser.add_argument("--sampler-seed", type=int, default=0)
    parser.add_argument("--pruners", nargs="*", default=["successive_halving", "hyperband", "median"])
    parser.add_argument("--grid", action="store_true", help="also replay a grid of each pruner's settings")
    parser.add_argument("--verify", default=None, help="also run the sweep with this pruner for real ('auto': the replayed pruner "
                        "with the fewest epochs at the unpruned best value)")
    args = parser.parse_args()

    from asib_core.sweep.space import load_space

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.setdefault("ASIB_NO_PROGRESS", "1")
    if args.setting == "digits":
        exp, fixed = digits_setup(args)
    elif not args.teacher1:
        parser.error("--teacher1 is required for the protocol setting (or use --setting digits)")
    else:
        exp, fixed = "sota_generic", fixed_overrides(args)
    tag = f"{args.setting}-{args.space}-n{args.n_trials}-e{args.epochs}-s{args.sampler_seed}"
    print(f"fixed overrides: {' '.join(fixed)}", flush=True)
    base_name = f"prune-none-{tag}"
    if len(load_or_none(base_name)) < args.n_trials:
        result, wall = sweep(args, base_name, "none", exp, fixed)
        print(f"unpruned sweep: {result.counts} in {wall:.0f} s (parent run {result.parent_run_id})", flush=True)
    trials = sorted(load(base_name).get_trials(), key=lambda t: t.number)
    space = load_space(args.space)
    total = len(max((t.intermediate_values for t in trials), key=len))
    for t in trials:
        if t.state.name == "COMPLETE" and abs(max(t.intermediate_values.values()) - t.value) > 1e-12:
            print(f"warning: trial {t.number}: value {t.value} is not the best of its curve", flush=True)
    curves = [(t.intermediate_values, t.value) for t in trials]
    base = summary(trials)
    rows = [("none (run)", *base, "-")]
    for pruner in args.pruners:
        name = f"prune-{pruner}-{tag}"
        rows.append((f"{pruner} (replay)", *summary(replay(name, pruner, curves, space, total)), name))
    if args.verify == "auto":   # the replayed pruner that saves most while keeping the best value
        kept = [r for r in rows[1:] if r[2] == base[1]]
        args.verify = min(kept, key=lambda r: r[1])[0].split()[0] if kept else None
    if args.grid:
        rows.extend((f"{label} (replay)", *rest) for label, *rest in grid(curves, total, tag))
    if args.verify:
        name = f"prune-{args.verify}-{tag}"
        if len(load_or_none(name)) < args.n_trials:
            result, wall = sweep(args, name, args.verify, exp, fixed)
            print(f"pruned sweep ({args.verify}): {result.counts} in {wall:.0f} s", flush=True)
        rows.append((f"{args.verify} (run)", *summary(load(name).get_trials()), name))
    print(f"\n| {args.setting}: sweep ({args.n_trials} trials of {args.space}, random sampler, seed {args.sampler_seed}, "
          f"{total} epochs max) | student epochs | fewer than unpruned | pruned trials | best val | best trial | "
          "same best |")
    print("|---|---|---|---|---|---|---|")
    for label, epochs, best, pruned, number, _ in rows:
        print(f"| {label} | {epochs} | {100 * (1 - epochs / base[0]):.1f} % | {pruned} | {100 * best:.2f} | "
              f"{number} | {'yes' if best == base[1] else 'no'} |")


def load_or_none(name: str) -> list:
    try:
        return [t for t in load(name).get_trials() if t.state.is_finished()]
    except KeyError:
        return []


if __name__ == "__main__":
    main()
