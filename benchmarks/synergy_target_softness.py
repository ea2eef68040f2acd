"""How soft is the B-step's synergy target next to the ensemble's? (issue 13)

Loads a finished ASIB run's state (``<state dir>/last.pt``: student, IB_MBM, synergy head,
adapters), computes on the validation split the targets the B-step would give, and prints per
target its top-1, mean max-probability and mean entropy (nats; uniform over C classes = ln C):
each teacher and their ensemble at ``tau``, the synergy as the B-step uses it
(``softmax(synergy_logit_scale * z / tau_syn)``), and the synergy at ``tau`` and at 1.

    python benchmarks/synergy_target_softness.py --state checkpoints/runs/distill-<id>/last.pt \\
        --teacher1 T1.pth --teacher2 T2.pth --exp L1_ib \\
        --data "experiment.dataset.root=<CIFAR-10 image folder>" --set "<the row's overrides>"

Prints figures, asserts nothing.
"""
from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from synergy_split_probe import build_probe, frozen_inputs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state", required=True, help="an ASIB run's last.pt (its state directory)")
    ap.add_argument("--teacher1", required=True)
    ap.add_argument("--teacher2", required=True)
    ap.add_argument("--exp", default="L1_ib")
    ap.add_argument("--data", default="", help="Hydra overrides for the data (quoted, space separated)")
    ap.add_argument("--set", default="", help="the run's own overrides (quoted, space separated)")
    ap.add_argument("--benchmark", default="cifar10_lowdata", help="whose `common` overrides to start from")
    args = ap.parse_args()
    cfg, data, distiller = build_probe(args)
    distiller.load_checkpoint_state(torch.load(args.state, map_location="cpu", weights_only=True)["model"])
    distiller.eval()
    val = frozen_inputs(distiller, data.loader("val", batch_size=256))
    s, tau, y, t = distiller.settings, float(cfg["tau"]), val["y"], val["t_logits"]
    with torch.no_grad():
        z = distiller.synergy_head(distiller.ib_mbm(val["q"], val["tokens"], sample=False).mu)

    def show(name: str, p: torch.Tensor) -> None:
        entropy = float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())
        print(f"{name:58s} top-1 {100 * float((p.argmax(1) == y).float().mean()):6.2f} %  "
              f"max-p {float(p.max(1).values.mean()):.3f}  entropy {entropy:.3f}")

    print(f"validation split, {len(y)} images; entropy of the uniform distribution {math.log(z.shape[1]):.3f}")
    for i in range(t.shape[0]):
        show(f"teacher{i + 1} at tau {tau:g}", F.softmax(t[i] / tau, 1))
    show(f"ensemble at tau {tau:g}", F.softmax(t / tau, 2).mean(0))
    tau_syn = s.tau_syn or tau
    show(f"synergy as the B-step uses it (scale {s.synergy_logit_scale:g}, tau_syn {tau_syn:g})",
         F.softmax(s.synergy_logit_scale * z / tau_syn, 1))
    show(f"synergy at tau {tau:g}", F.softmax(z / tau, 1))
    show("synergy at tau 1", F.softmax(z, 1))
    show("ensemble at tau 1", F.softmax(t, 2).mean(0))


if __name__ == "__main__":
    main()
