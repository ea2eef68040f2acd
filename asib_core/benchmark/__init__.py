"""Benchmark protocols (configs/benchmark/*.yaml) run end to end: teachers once, every row x seed
through the distillation step (finished runs reused), the results page from the store."""
from .spec import Benchmark, Row, list_benchmarks, load_benchmark, select_rows, select_seeds

__all__ = ["Benchmark", "Row", "list_benchmarks", "load_benchmark", "select_rows", "select_seeds"]
