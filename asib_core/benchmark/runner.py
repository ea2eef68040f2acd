"""Run a benchmark: teachers once, then every selected row x seed through ``run_distill``.

Top-down: load the protocol -> select rows and seeds -> compose every row (a bad row stops the
command before any training) -> teachers (fine-tuned once, reused by identity) -> their
evaluation -> the plan (each run's identity; runs the store has FINISHED are reused, not run
again) -> the runs, one progress line each with elapsed time and ETA -> the results page.
Every run is tagged ``asib.benchmark`` (the benchmark's name) and ``asib.bench_row``.
"""
from __future__ import annotations

import logging
import os
import platform
import time
from dataclasses import dataclass, field

from mlflow.tracking import MlflowClient

from asib_core.code_version import code_version
from asib_core.config import resolve_experiment
from asib_core.config.errors import ConfigError
from asib_core.methods import get_method
from asib_core.pipeline.chain import reusable_run
from asib_core.pipeline.common import git_commit, setup_logging
from asib_core.pipeline.distill import run_distill, run_identity
from asib_core.report.writers import clock
from asib_core.tracking import configure_tracking, experiment_name, open_run
from asib_core.tracking.environ import scoped_environ

from .spec import (BENCH_TAG, COMMAND_TAG, MACHINE_TAG, ROW_TAG, Benchmark, Row, load_benchmark, select_rows,
                   select_seeds)
from .teachers import Teacher, data_root, evaluate_teachers, pinned_path, plan_teachers, train_teachers

log = logging.getLogger("asib.benchmark")
ROLES = ("teacher1", "teacher2")


@dataclass
class PlannedRun:
    row: Row
    seed: int
    overrides: list[str]
    identity: str | None = None          # None: its teachers are not trained yet (dry run)
    run_id: str | None = None            # a FINISHED run of this identity (reused) or the new run
    reused: bool = False
    metrics: dict = field(default_factory=dict)


@dataclass
class BenchmarkResult:
    bench: Benchmark
    runs: list[PlannedRun]
    teachers: list[Teacher]
    parent_run_id: str | None = None
    page: object = None                  # asib_core.report.benchmark.Page when the report ran


def machine() -> str:
    """CPU model, core count and torch version (and the GPU when one is visible)."""
    import torch

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    text = f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def row_overrides(bench: Benchmark, row: Row, root: str | None, seed: int) -> list[str]:
    data = [f"experiment.dataset.root={root}"] if root else []
    return [*bench.common, *data, *row.overrides, f"experiment.seed={seed}"]


def teacher_roles(cfg: dict) -> list[tuple[str, str]]:
    """(role, teacher name) of each teacher the row's method distils from (none for CE-only)."""
    if not get_method(cfg["method_name"]).needs_teachers:
        return []
    return [(r, cfg[r]["name"]) for r in ROLES if (cfg.get(r) or {}).get("name")]


def check_rows(bench: Benchmark, rows: list[Row], root: str | None, seed: int) -> dict[str, dict]:
    """Compose every row once (any error names the row) and check its teachers are the
    benchmark's; returns ``{row name: config}``."""
    names = [t.get("teacher") for t in bench.teachers]
    configs = {}
    for row in rows:
        try:
            cfg = resolve_experiment(row.exp, row_overrides(bench, row, root, seed)).cfg
        except ConfigError as exc:
            raise ConfigError(f"benchmark {bench.key}, row {row.name!r} (exp {row.exp}, overrides "
                              f"{' '.join(row.overrides) or '(none)'}): {exc}") from None
        foreign = [name for _, name in teacher_roles(cfg) if name not in names]
        if foreign:
            raise ConfigError(f"benchmark {bench.key}, row {row.name!r} distils from {', '.join(foreign)}, "
                              f"which the benchmark does not train (its teachers: {', '.join(names)}); "
                              "add it to `teachers:` or change the row.")
        configs[row.name] = cfg
    return configs


def plan_runs(bench, rows, seeds, root, configs, teachers: list[Teacher]) -> list[PlannedRun]:
    """Every row x seed with its overrides (teacher checkpoints pinned) and, once the teachers
    exist, its identity and the FINISHED run that already has it."""
    by_name = {t.name: t for t in teachers}
    plan = []
    for row in rows:
        roles = teacher_roles(configs[row.name])
        for seed in seeds:
            over = row_overrides(bench, row, root, seed)
            ready = all(by_name[name].path is not None for _, name in roles)
            item = PlannedRun(row, seed, over)
            if ready:
                item.overrides = over + [f"experiment.{role}_ckpt={by_name[name].path}" for role, name in roles]
                cfg = resolve_experiment(row.exp, item.overrides).cfg
                item.identity = run_identity(cfg, [by_name[name].path for _, name in roles])
                found = reusable_run("distill", item.identity)
                if found is not None:
                    item.run_id, item.reused, item.metrics = found.info.run_id, True, dict(found.data.metrics)
            plan.append(item)
    return plan


class Progress:
    """One line per run: its result, the elapsed time and an ETA from the mean wall time of the
    runs trained in this invocation."""

    def __init__(self, plan: list[PlannedRun], echo):
        self.total, self.echo = len(plan), echo
        self.todo = sum(not p.reused for p in plan)
        self.walls: list[float] = []
        self.start = time.perf_counter()

    def line(self, k: int, item: PlannedRun, wall: float | None) -> None:
        if wall is not None:
            self.walls.append(wall)
            self.todo -= 1
        how = "reused" if wall is None else f"trained in {clock(wall)}"
        acc = item.metrics.get("test/acc")
        result = f", test {100 * acc:.2f} %, val {100 * item.metrics.get('val/best_acc', float('nan')):.2f} %" \
            if acc is not None else ""
        left = f"{self.todo} run{'' if self.todo == 1 else 's'}"
        eta = (f"ETA {clock(self.todo * sum(self.walls) / len(self.walls))} for {left}"
               if self.walls and self.todo else "ETA after the first trained run" if self.todo else "done")
        self.echo(f"[{k}/{self.total}] {item.row.name} seed {item.seed}: {how}{result} (run {item.run_id}) | "
                  f"elapsed {clock(time.perf_counter() - self.start)}, {eta}")


def run_benchmark(name: str, rows: str = "", seeds: str = "", *, dry_run: bool = False, report: bool = True,
                  out_dir: str = "docs/results", command: str = "", teacher_runs: dict[str, str] | None = None,
                  archive: str = "", echo=print) -> BenchmarkResult:
    """``archive``: a folder rewritten with the benchmark's runs as a run archive after the
    teachers' evaluation and after every trained run (empty: none)."""
    setup_logging()
    bench = load_benchmark(name)
    chosen, seed_list = select_rows(bench, rows), select_seeds(bench, seeds)
    configure_tracking()
    root = data_root(bench, extract=not dry_run)
    configs = check_rows(bench, chosen, root, seed_list[0])     # a bad row stops here: nothing trained
    teachers = plan_teachers(bench, root, teacher_runs)
    if dry_run:
        for teacher in teachers:
            if teacher.run_id is not None:
                teacher.path = _pinned_path(bench, teacher)
        plan = plan_runs(bench, chosen, seed_list, root, configs, teachers)
        _print_plan(bench, teachers, plan, echo)
        return BenchmarkResult(bench, plan, teachers)
    tags = {BENCH_TAG: bench.name, MACHINE_TAG: machine(), COMMAND_TAG: command or f"benchmark name={bench.key}"}
    parent_tags = {**tags, "step": "benchmark", "exp": bench.key, "method": "benchmark", "git_commit": git_commit(),
                   "asib.code_version": code_version()}
    with open_run(experiment=experiment_name(), run_name=f"benchmark {bench.name}", tags=parent_tags) as parent:
        parent_experiment = MlflowClient().get_experiment(parent.experiment_id).name
        # the steps are runs of their own under the parent, not the run `mlflow run` made for it
        with scoped_environ(MLFLOW_RUN_ID=None, MLFLOW_EXPERIMENT_NAME=parent_experiment):
            result = _execute(bench, chosen, seed_list, root, configs, teachers, parent.run_id, tags, echo,
                              Archiver(bench, archive, echo))
            result.parent_run_id = parent.run_id
            if report:
                from asib_core.report.benchmark import write_page
                result.page = write_page(bench, out_dir)
                for path in result.page.files:
                    MlflowClient().log_artifact(parent.run_id, str(path), "results")
                echo(f"results page: {result.page.markdown}")
    return result


def _execute(bench, rows, seeds, root, configs, teachers, parent_id, tags, echo, archiver) -> BenchmarkResult:
    train_teachers(bench, teachers, parent_id, echo)
    first = next(iter(configs.values()))
    evaluate_teachers(bench, teachers, first, parent_id, tags, echo)
    archiver.save()
    plan = plan_runs(bench, rows, seeds, root, configs, teachers)
    progress = Progress(plan, echo)
    client = MlflowClient()
    for k, item in enumerate(plan, start=1):
        run_tags = {**tags, ROW_TAG: item.row.name}
        if item.reused:
            known = client.get_run(item.run_id).data.tags
            for key in (BENCH_TAG, ROW_TAG):            # a run made outside the benchmark joins it
                if key not in known:
                    client.set_tag(item.run_id, key, run_tags[key])
            progress.line(k, item, None)
            continue
        start = time.perf_counter()
        result = run_distill(item.row.exp, item.overrides, parent_run_id=parent_id, extra_tags=run_tags)
        item.run_id, item.metrics = result.run_id, result.metrics
        progress.line(k, item, time.perf_counter() - start)
        archiver.save()
    return BenchmarkResult(bench, plan, teachers)


class Archiver:
    """Keeps a run archive of the benchmark current while it runs (nothing without a folder)."""

    def __init__(self, bench: Benchmark, out: str, echo):
        self.bench, self.out, self.echo = bench, out, echo

    def save(self) -> None:
        if self.out:
            from .archive import export_benchmark

            result = export_benchmark(self.bench, self.out)
            self.echo(f"archive: {result.runs} runs in {result.out}")


def _pinned_path(bench: Benchmark, teacher: Teacher):
    """A dry run pins nothing: the checkpoint an earlier real run left, if it is there."""
    path = pinned_path(bench, teacher.run_id)[1]
    return path if path.is_file() else None


def _print_plan(bench: Benchmark, teachers: list[Teacher], plan: list[PlannedRun], echo) -> None:
    echo(f"benchmark {bench.name}: {bench.title}")
    for t in teachers:
        echo(f"  teacher {t.name}: " + (f"reuse finetune run {t.run_id}" if t.run_id else "to fine-tune"))
    for item in plan:
        state = (f"reuse run {item.run_id}" if item.reused else
                 "to run" if item.identity else "to run (after its teachers)")
        echo(f"  {item.row.name} seed {item.seed}: {state}")
    echo(f"{sum(not p.reused for p in plan)} of {len(plan)} runs to train (dry run: nothing started)")
