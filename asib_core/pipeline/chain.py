"""The ``main`` entry point: finetune (each teacher) -> distill -> evaluate, chained.

Each step is launched with ``mlflow.run`` as a nested run under one parent run. A step
is **reused** when a FINISHED run with the same identity exists (``asib.identity``
tag: the config hash plus the values the hash leaves out that change the result,
the content hashes of the teacher checkpoints and the version of the code), so a second
``main`` with the same experiment and code trains nothing again; ``force=true`` runs every
step again. With ``baseline=ce`` the same student is also
trained with cross-entropy alone, and the parent run reports both accuracies.
"""
from __future__ import annotations

import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from asib_core.config import identity_hash, resolve_experiment
from asib_core.methods import get_method
from asib_core.tracking import configure_tracking, experiment_name, open_run, search_finished
from asib_core.tracking.environ import scoped_environ
from asib_core.tracking.owners import OWNER_TAG, owner_id

from .common import run_tags, setup_logging, teacher_names
from .distill import run_identity
from .finetune import finetune_config
from .teachers import class_subset_tag, resolve_teachers

log = logging.getLogger("asib.main")
PROJECT_DIR = Path(__file__).resolve().parents[2]


@dataclass
class ChainResult:
    parent_run_id: str
    steps: dict = field(default_factory=dict)     # name -> run id
    reused: dict = field(default_factory=dict)    # name -> bool
    metrics: dict = field(default_factory=dict)

    def verdict(self) -> str | None:
        """One sentence: the distilled student's test accuracy against the baseline's (None
        without a baseline run)."""
        ours = self.metrics.get("distill/test_acc")
        name, base = next(((k.split("/")[0], v) for k, v in self.metrics.items()
                           if k.startswith("baseline_") and k.endswith("/test_acc")), (None, None))
        if ours is None or base is None:
            return None
        gap = 100 * (ours - base)
        word = "above" if gap > 0 else "below" if gap < 0 else "equal to"
        return (f"the distilled student reaches {100 * ours:.1f} % test accuracy, {abs(gap):.1f} points "
                f"{word} the same student trained by {name.removeprefix('baseline_')} alone ({100 * base:.1f} %)")


def reusable_run(step: str, identity: str, *, force: bool = False):
    """The newest FINISHED ``step`` run with this identity (config, teacher files and code
    version), or None: none exists, or ``force`` asks for the step to run again."""
    if force:
        return None
    runs = search_finished(f"tags.step = '{step}' and tags.`asib.identity` = '{identity}'")
    return runs[0] if runs else None


def _launch(entry_point: str, parameters: dict, parent_id: str, experiment_id: str, env_manager: str,
            run_name: str) -> str:
    client = MlflowClient()
    # owned by this process until the step attaches to it (a kill in between: closed as an orphan)
    child = client.create_run(experiment_id, run_name=run_name,
                              tags={"mlflow.parentRunId": parent_id, OWNER_TAG: owner_id()})
    submitted = mlflow.projects.run(str(PROJECT_DIR), entry_point=entry_point, parameters=parameters,
                                    env_manager=env_manager, run_id=child.info.run_id,
                                    experiment_id=experiment_id, synchronous=True)
    submitted.wait()
    resumed = client.get_run(child.info.run_id).data.tags.get("asib.resumed_into")
    return resumed or child.info.run_id


def _finetune_overrides(cfg: dict, index: int) -> list[str]:
    """The class subset of an overlap experiment's teacher (nothing otherwise)."""
    if class_subset_tag(cfg, index) == "all":
        return []
    return [f"overlap_pct={cfg['overlap_pct']}", f"subset={index}", f"seed={cfg['seed']}"]


def run_main(exp: str, overrides: list[str], *, env_manager: str = "local", baseline: str = "ce",
             nproc: int = 1, finetune_overrides: list[str] = (), force: bool = False) -> ChainResult:
    setup_logging()
    configure_tracking()
    # chained steps work where main was started; the caller's environment is left as it was
    with scoped_environ(ASIB_WORKDIR=os.getcwd()):
        return _run_chain(exp, overrides, env_manager, baseline, nproc, list(finetune_overrides), force)


def _run_chain(exp: str, overrides: list[str], env_manager: str, baseline: str, nproc: int,
               finetune_overrides: list[str], force: bool) -> ChainResult:
    resolved = resolve_experiment(exp, overrides)       # refuse a bad config before any work
    cfg = resolved.cfg
    dataset = cfg["dataset"]["name"]
    result = ChainResult(parent_run_id="")
    tags = run_tags(cfg, "main", resolved.sha256, teachers="+".join(teacher_names(cfg)),
                    student=cfg["model"]["student"]["name"])
    with open_run(experiment=experiment_name(), run_name=f"{exp} main", tags=tags) as parent:
        result.parent_run_id = parent.run_id
        exp_id = parent.experiment_id

        def step(name: str, entry: str, params: dict, identity: str, step_tag: str, title: str) -> str:
            found = reusable_run(step_tag, identity, force=force)
            if found is not None:
                log.info("reusing %s run %s", name, found.info.run_id)
                result.reused[name] = True
                run_id = found.info.run_id
            else:
                result.reused[name] = False
                run_id = _launch(entry, params, parent.run_id, exp_id, env_manager, title)
            result.steps[name] = run_id
            parent.set_tags({f"asib.step.{name}": run_id, f"asib.reused.{name}": result.reused[name]})
            return run_id

        if get_method(cfg["method_name"]).needs_teachers:
            for index, role in enumerate(("teacher1", "teacher2"), start=1):
                if not cfg.get(role, {}).get("name") or _explicit_ckpt(cfg, role):
                    continue
                teacher = cfg[role]["name"]
                ft_over = _finetune_overrides(cfg, index) + list(finetune_overrides)
                ft_cfg = finetune_config(teacher, dataset, ft_over)
                step(f"finetune_{role}", "finetune",
                     {"teacher": teacher, "dataset": dataset, "overrides": shlex.join(ft_over)},
                     identity_hash(ft_cfg), "finetune", f"finetune {teacher} on {dataset}")
        for name, over in chain_variants(cfg["method_name"], overrides, baseline):
            vcfg = resolve_experiment(exp, over).cfg
            sources = resolve_teachers(vcfg) if get_method(vcfg["method_name"]).needs_teachers else []
            identity = run_identity(vcfg, [s.path for s in sources])
            run_id = step(name, "distill", {"exp": exp, "overrides": shlex.join(over), "nproc": nproc},
                          identity, "distill", f"{exp} {vcfg['method_name']}")
            eval_id = step(f"evaluate_{name}", "evaluate", {"run_id": run_id}, f"evaluate-{run_id}",
                           "evaluate", f"evaluate {name}")
            metrics = MlflowClient().get_run(eval_id).data.metrics
            result.metrics[f"{name}/test_acc"] = metrics.get("test/acc", float("nan"))
        parent.log_metrics(result.metrics, step=0)
        _log_summary(parent.run_id, result)
    return result


def chain_variants(method: str, overrides: list[str], baseline: str) -> list[tuple[str, list[str]]]:
    """The distill runs of a chain: the experiment's own, then the same setup with the baseline
    method (``baseline=none``, or a baseline equal to the method, adds none)."""
    variants = [("distill", list(overrides))]
    if baseline and baseline != "none" and method != baseline:
        variants.append((f"baseline_{baseline}", [*overrides, f"method={baseline}"]))
    return variants


def _explicit_ckpt(cfg: dict, role: str) -> bool:
    path = cfg.get(f"{role}_ckpt")
    return bool(path) and Path(path).exists()


def _log_summary(run_id: str, result: ChainResult) -> None:
    lines = ["| step | run id | reused |", "|---|---|---|"]
    lines += [f"| {name} | {rid} | {result.reused.get(name)} |" for name, rid in result.steps.items()]
    lines += ["", "| result | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in result.metrics.items()]
    verdict = result.verdict()
    if verdict:
        lines += ["", verdict[0].upper() + verdict[1:] + "."]
    MlflowClient().log_text(run_id, "\n".join(lines) + "\n", "summary.md")
