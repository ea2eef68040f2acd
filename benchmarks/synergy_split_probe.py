"""Can the synergy beat the teachers' ensemble, and on which data must it learn to? (issue 13)

The A-step trains the synergy (IB_MBM + head on the teachers' features, queried by the frozen
student) on the student's training images. In the benchmark protocol the teachers trained on
those very images, so there their features are nearly separable and they rarely err: a synergy
fitted there learns little about *when* each teacher is wrong, which is what it would need to
beat their ensemble. This script tests that explanation directly.

It builds an ASIB experiment's distiller exactly as ``distill`` does (teachers from their
checkpoints, a freshly initialised student as the first A-step sees it), computes the frozen
student's query and the teachers' tokens once (eval mode, no augmentation) for the training
subset and the validation split, and then trains IB_MBM + synergy head from the same initial
weights, with the A-step's optimiser (AdamW, ``a_step_lr``, ``ib_mbm_lr_factor``,
``a_step_weight_decay``) on the synergy cross-entropy alone, for ``--epochs`` epochs on

  (a) the training subset (what the A-step does), and
  (b) half A of the validation split (images no teacher trained on),

and prints, per epoch, both synergies' top-1 on validation half B next to each teacher's, the
ensemble's (the B-step's ensemble target at temperature 1) and the oracle's on half B. Half B is
never trained on by either synergy.

Two more questions it answers on the same halves:

* ``--student run.pt``: the query of a *trained* student (a distill run's ``model/student.pt``),
  as a later stage's A-step sees it, instead of a freshly initialised one. Keys the file lacks
  (e.g. an avg-KD student has no ``distill_adapter``) keep their fresh weights and are listed.
* Does *any* learned per-sample combination of the two teachers beat their mean? Two
  low-capacity combiners of the teachers' log-probabilities (no image, no query) are fitted on the
  same two sources: ``gate`` (a linear layer gives per-sample teacher weights; the mixture of
  probabilities starts as exactly the ensemble) and ``stack`` (a linear layer from both teachers'
  log-probabilities to the logits). If neither beats the ensemble on half B, the ceiling is in the
  teachers' outputs and the data size, not in the synergy's architecture.

    python benchmarks/synergy_split_probe.py --teacher1 T1.pth --teacher2 T2.pth \\
        --data "experiment.dataset.root=<CIFAR-10 image folder>" [--exp L1_ib] [--epochs 30] \\
        [--student <distill run>/artifacts/model/student.pt]

The overrides after ``--data`` (and ``--set``) are Hydra overrides on top of the low-data
protocol's common ones (configs/benchmark/cifar10_lowdata.yaml). Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import shlex
import time

import torch
import torch.nn.functional as F

from asib_core.benchmark import load_benchmark
from asib_core.config import resolve_experiment
from asib_core.config.finalize import finalize_with_runtime
from asib_core.data import build_data
from asib_core.methods import build_distiller
from asib_core.methods.asib.targets import ensemble_target
from asib_core.methods.teacher_cache import teacher_features
from asib_core.pipeline.models import build_student, load_teacher
from asib_core.pipeline.teachers import resolve_teachers


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher1", required=True, help="teacher1 checkpoint (.pth)")
    ap.add_argument("--teacher2", required=True, help="teacher2 checkpoint (.pth)")
    ap.add_argument("--data", default="", help="Hydra overrides for the data (quoted, space separated)")
    ap.add_argument("--set", default="", help="more Hydra overrides (quoted, space separated)")
    ap.add_argument("--exp", default="L1_ib", help="the ASIB experiment whose synergy is probed")
    ap.add_argument("--benchmark", default="cifar10_lowdata", help="whose `common` overrides to start from")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--student", default="", help="a distill run's model/student.pt whose student queries "
                    "(default: a freshly initialised student, as the first A-step sees it)")
    ap.add_argument("--combiner-steps", type=int, default=300, help="full-batch steps of each combiner")
    return ap.parse_args()


def load_trained_student(student: torch.nn.Module, path: str) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)["deploy"]["student"]
    result = student.load_state_dict(state, strict=False)
    print(f"student weights from {path}; kept fresh: {list(result.missing_keys) or 'none'}; "
          f"ignored: {list(result.unexpected_keys) or 'none'}")


def build_probe(args: argparse.Namespace, *extra: str):
    """``(cfg, data, distiller)`` of ``args.exp`` as ``distill`` builds them: the benchmark's common
    overrides, then ``--data``, ``--set`` and ``extra``; the teachers from ``--teacher1/2``; the
    student freshly initialised, or from ``args.student`` when the caller has one."""
    overrides = [*load_benchmark(args.benchmark).common, *shlex.split(args.data), *shlex.split(args.set),
                 f"experiment.teacher1_ckpt={args.teacher1}", f"experiment.teacher2_ckpt={args.teacher2}", *extra]
    cfg = resolve_experiment(args.exp, overrides).cfg
    data = build_data(cfg, torch.device("cpu"))
    sources = resolve_teachers(cfg)
    finalize_with_runtime(cfg, num_classes=int(data.num_classes), **{f"{s.role}_ckpt": str(s.path) for s in sources})
    teachers = [load_teacher(cfg, s.role, s.path, data.num_classes)[0].eval() for s in sources]
    student = build_student(cfg, data.num_classes)
    if getattr(args, "student", ""):
        load_trained_student(student, args.student)
    return cfg, data, build_distiller(cfg, student, teachers).eval()


@torch.no_grad()
def frozen_inputs(distiller, loader) -> dict[str, torch.Tensor]:
    """The student's query, the teachers' tokens and logits, and the labels of every sample."""
    key = distiller.settings.feat_kd_key
    parts: dict[str, list] = {"q": [], "tokens": [], "t_logits": [], "y": []}
    for x, y, *_ in loader:
        feats = teacher_features(distiller.teachers, x)
        parts["q"].append(distiller.student(x)[key].float())
        parts["tokens"].append(torch.stack([t.float() for t in distiller.tokens_from_features(feats)], 1))
        parts["t_logits"].append(torch.stack([t.float() for t in distiller.teacher_logits(feats)], 0))
        parts["y"].append(y)
    return {k: torch.cat(v, 1 if k == "t_logits" else 0) for k, v in parts.items()}


def subset(inputs: dict, rows: torch.Tensor) -> dict:
    return {k: (v[:, rows] if k == "t_logits" else v[rows]) for k, v in inputs.items()}


def reference_accuracies(distiller, cfg: dict, held_out: dict) -> dict[str, float]:
    logits = list(held_out["t_logits"])
    y = held_out["y"]
    right = [lg.argmax(1) == y for lg in logits]
    out = {f"teacher{i + 1}": float(r.float().mean()) for i, r in enumerate(right)}
    ens = ensemble_target(distiller.ensemble_mode, cfg, logits, 1.0)[0]
    out["ensemble"] = float((ens.argmax(1) == y).float().mean())
    out["oracle"] = float(torch.stack(right).any(0).float().mean())
    return out


def train_synergy(distiller, initial: dict, train: dict, held_out: dict, epochs: int, batch_size: int,
                  seed: int) -> list[tuple[float, float]]:
    """A fresh IB_MBM + head (``initial`` weights) trained on ``train``; per epoch (train top-1,
    held-out top-1)."""
    s = distiller.settings
    ib, head = distiller.ib_mbm, distiller.synergy_head
    ib.load_state_dict(initial["ib_mbm"])
    head.load_state_dict(initial["head"])
    opt = torch.optim.AdamW([
        {"params": list(ib.parameters()), "lr": s.a_step_lr * s.ib_mbm_lr_factor},
        {"params": list(head.parameters()), "lr": s.a_step_lr}], weight_decay=s.a_step_weight_decay)
    gen = torch.Generator().manual_seed(seed)
    n = train["y"].shape[0]
    curve = []
    for _ in range(epochs):
        ib.train()
        head.train()
        correct = 0
        for rows in torch.randperm(n, generator=gen).split(batch_size):
            out = ib(train["q"][rows], train["tokens"][rows])
            logits = head(out.z)
            loss = F.cross_entropy(logits, train["y"][rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            correct += int((logits.argmax(1) == train["y"][rows]).sum())
        ib.eval()
        head.eval()
        with torch.no_grad():
            pred = head(ib(held_out["q"], held_out["tokens"], sample=False).mu).argmax(1)
        curve.append((correct / n, float((pred == held_out["y"]).float().mean())))
    return curve


class Combiner(torch.nn.Module):
    """A per-sample combination of the teachers' log-probabilities ``[K, N, C]``.

    ``gate``: softmax(linear(features)) weights the teachers' probabilities; zero-initialised, so it
    starts as the probability mean. ``stack``: linear(features) are the logits."""

    def __init__(self, kind: str, teachers: int, classes: int):
        super().__init__()
        self.kind = kind
        self.layer = torch.nn.Linear(teachers * classes, teachers if kind == "gate" else classes)
        torch.nn.init.zeros_(self.layer.weight)
        torch.nn.init.zeros_(self.layer.bias)

    def forward(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the combination, ``[N, C]``."""
        feats = log_probs.permute(1, 0, 2).flatten(1)
        if self.kind == "stack":
            return F.log_softmax(self.layer(feats), 1)
        weights = F.log_softmax(self.layer(feats), 1).t().unsqueeze(2)
        return torch.logsumexp(weights + log_probs, 0)


def train_combiner(kind: str, train: dict, held_out: dict, steps: int) -> list[float]:
    """Held-out top-1 every ``steps // 30`` full-batch AdamW steps of a combiner fitted on ``train``."""
    lp_train, lp_held = (F.log_softmax(d["t_logits"], 2) for d in (train, held_out))
    comb = Combiner(kind, lp_train.shape[0], lp_train.shape[2])
    opt = torch.optim.AdamW(comb.parameters(), lr=0.05, weight_decay=1e-4)
    curve = []
    for step in range(1, steps + 1):
        loss = F.nll_loss(comb(lp_train), train["y"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // 30) == 0:
            with torch.no_grad():
                curve.append(float((comb(lp_held).argmax(1) == held_out["y"]).float().mean()))
    return curve


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    cfg, data, distiller = build_probe(args, f"experiment.seed={args.seed}")
    start = time.perf_counter()
    bs = args.batch_size
    train = frozen_inputs(distiller, data.loader("train", batch_size=bs, train=False, augment=False))
    val = frozen_inputs(distiller, data.loader("val", batch_size=bs))
    order = torch.randperm(val["y"].shape[0], generator=torch.Generator().manual_seed(args.seed))
    half_a, half_b = subset(val, order[: len(order) // 2]), subset(val, order[len(order) // 2:])
    print(f"{args.exp}: {train['y'].shape[0]} training images, validation halves of {half_a['y'].shape[0]} "
          f"and {half_b['y'].shape[0]}; frozen inputs in {time.perf_counter() - start:.0f} s")
    ref = reference_accuracies(distiller, cfg, half_b)
    print("validation half B: " + ", ".join(f"{k} {100 * v:.2f} %" for k, v in ref.items()))
    for label, part in (("training subset", train), ("half A", half_a)):
        print(f"  teachers on {label}: " + ", ".join(
            f"{k} {100 * v:.2f} %" for k, v in reference_accuracies(distiller, cfg, part).items()))
    initial = {"ib_mbm": copy.deepcopy(distiller.ib_mbm.state_dict()),
               "head": copy.deepcopy(distiller.synergy_head.state_dict())}
    curves = {label: train_synergy(distiller, initial, part, half_b, args.epochs, bs, args.seed)
              for label, part in (("train", train), ("valA", half_a))}
    print(f"\nsynergy top-1 (%) on validation half B by epoch (ensemble {100 * ref['ensemble']:.2f}, "
          f"best teacher {100 * max(ref['teacher1'], ref['teacher2']):.2f}, oracle {100 * ref['oracle']:.2f}); "
          "in brackets its top-1 on its own training data")
    print("epoch | trained on the training subset | trained on validation half A")
    for e, ((tr_a, ho_a), (tr_b, ho_b)) in enumerate(zip(curves["train"], curves["valA"]), start=1):
        print(f"{e:5d} | {100 * ho_a:6.2f} ({100 * tr_a:6.2f}) | {100 * ho_b:6.2f} ({100 * tr_b:6.2f})")
    for label, curve in curves.items():
        best = max(h for _, h in curve)
        print(f"{label}: best {100 * best:.2f} %, last {100 * curve[-1][1]:.2f} %, "
              f"best - ensemble {100 * (best - ref['ensemble']):+.2f} points")
    print("\nlow-capacity combiners of the teachers' log-probabilities, top-1 (%) on validation half B")
    for kind in ("gate", "stack"):
        for label, part in (("training subset", train), ("half A", half_a)):
            curve = train_combiner(kind, part, half_b, args.combiner_steps)
            print(f"{kind:5s} fitted on {label:15s}: best {100 * max(curve):.2f}, last {100 * curve[-1]:.2f}, "
                  f"best - ensemble {100 * (max(curve) - ref['ensemble']):+.2f} points")


if __name__ == "__main__":
    main()
