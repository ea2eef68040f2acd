"""A benchmark's runs as a run archive (asib_core.tracking.archive): what `pipelines.archive
export benchmark=NAME` writes, and what `pipelines.benchmark ... archive=DIR` rewrites after the
teachers' evaluation and after every run it trains."""
from __future__ import annotations

from pathlib import Path

from asib_core.tracking.archive import ExportResult, export_matching

from .spec import BENCH_TAG, Benchmark


def default_archive_dir(bench: Benchmark) -> Path:
    return Path("docs/results") / f"{bench.name}-runs"


def benchmark_filter(bench: Benchmark) -> str:
    """The benchmark's FINISHED runs, its report runs left out (they only read the others)."""
    return f"tags.`{BENCH_TAG}` = '{bench.name}' and attributes.status = 'FINISHED' and tags.step != 'report'"


def export_benchmark(bench: Benchmark, out: str | Path, artifacts: str = "teachers") -> ExportResult:
    """Archive the benchmark's runs and every run they name (teachers, parents) in ``out``."""
    return export_matching(benchmark_filter(bench), out, artifacts)
