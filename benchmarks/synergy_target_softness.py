"""How soft is the B-step's synergy target next to the ensemble's? (issue 13)

Loads a finished ASIB run's state (``<state dir>/last.pt``: student, IB_MBM, synergy head,
adapters), computes on the validation split (``--split train``: the student's training subset,
unaugmented, the images the B-step actually distils on and the A-step fitted the synergy to) the
targets the B-step would give, and prints per
target its top-1, mean max-probability and mean entropy (nats; uniform over C classes = ln C):
each teacher and their ensemble at ``tau``, the synergy as the B-step uses it
(``softmax(synergy_logit_scale * z / tau_syn)``), and the synergy at ``tau`` and at 1.

Two more questions about the synergy target, on the same images:

* Its *shape* next to the ensemble's: ``KL(ensemble at tau || target)`` and how often the two
  rank the same class second (the "dark knowledge" a KD target carries beyond its top-1), with
  the two teachers' second-choice agreement as the reference.
* How much it depends on the student's query: the same IB_MBM and head queried by a freshly
  initialised student (fresh random weights: the kind of query the first stage's A-step fitted
  them to) instead of the run's trained one. If the target barely changes, the student's query
  drifting during a B-step cannot be what spoils it.

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

from asib_core.methods.asib.targets import entropy_matching_scale, mean_entropy as entropy
from asib_core.pipeline.models import build_student
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
    ap.add_argument("--split", choices=("val", "train"), default="val",
                    help="val: images no teacher and no synergy trained on; train: the student's training "
                         "subset (no augmentation), where both were fitted")
    args = ap.parse_args()
    cfg, data, distiller = build_probe(args)
    distiller.load_checkpoint_state(torch.load(args.state, map_location="cpu", weights_only=True)["model"])
    distiller.eval()
    loader = (data.loader("val", batch_size=256) if args.split == "val"
              else data.loader("train", batch_size=256, train=False, augment=False))
    inputs = frozen_inputs(distiller, loader)
    s, tau, y, t = distiller.settings, float(cfg["tau"]), inputs["y"], inputs["t_logits"]
    with torch.no_grad():
        z = distiller.synergy_head(distiller.ib_mbm(inputs["q"], inputs["tokens"], sample=False).mu)
        fresh_q = build_student(cfg, int(data.num_classes)).eval()
        q_fresh = torch.cat([fresh_q(x)[s.feat_kd_key].float() for x, *_ in loader])
        z_fresh = distiller.synergy_head(distiller.ib_mbm(q_fresh, inputs["tokens"], sample=False).mu)

    def show(name: str, p: torch.Tensor) -> None:
        print(f"{name:58s} top-1 {100 * float((p.argmax(1) == y).float().mean()):6.2f} %  "
              f"max-p {float(p.max(1).values.mean()):.3f}  entropy {entropy(p):.3f}")

    split = "validation split" if args.split == "val" else "training subset (no augmentation)"
    print(f"{split}, {len(y)} images; entropy of the uniform distribution {math.log(z.shape[1]):.3f}")
    teachers = F.softmax(t / tau, 2)
    ens = teachers.mean(0)
    tau_syn = s.tau_syn or tau
    used = distiller.synergy_scale()
    target, fresh_target = (F.softmax(used * logits / tau_syn, 1) for logits in (z, z_fresh))
    syn_tau = F.softmax(z / tau, 1)
    for i in range(t.shape[0]):
        show(f"teacher{i + 1} at tau {tau:g}", teachers[i])
    show(f"ensemble at tau {tau:g}", ens)
    show(f"synergy as the B-step uses it (scale {used:.3g}, tau_syn {tau_syn:g})", target)
    show(f"synergy at tau {tau:g}", syn_tau)
    show("synergy at tau 1", F.softmax(z, 1))
    show("ensemble at tau 1", F.softmax(t, 2).mean(0))
    show("synergy, fresh student's query, as the B-step uses it", fresh_target)

    def second(p: torch.Tensor) -> torch.Tensor:
        return p.topk(2, dim=1).indices[:, 1]

    def compare(name: str, p: torch.Tensor, ref: torch.Tensor, ref_name: str) -> None:
        kl = float((ref * (ref.clamp_min(1e-12).log() - p.clamp_min(1e-12).log())).sum(1).mean())
        print(f"{name:58s} KL({ref_name} || it) {kl:.4f}  same second choice "
              f"{100 * float((second(p) == second(ref)).float().mean()):6.2f} %")

    print(f"shape against the ensemble at tau {tau:g} (second choice: the class ranked second)")
    compare("teacher1 at tau, against teacher2 at tau", teachers[0], teachers[1], "teacher2")
    compare("synergy as the B-step uses it", target, ens, "ensemble")
    compare(f"synergy at tau {tau:g}", syn_tau, ens, "ensemble")
    compare("synergy with a fresh student's query, against the run's", fresh_target, target, "run's")
    scale = entropy_matching_scale(z, tau, entropy(ens))
    print(f"synergy_logit_scale at which the synergy at tau {tau:g} has the ensemble's mean entropy "
          f"({entropy(ens):.3f}): {scale:.3f}")
    print(f"top-1 agreement of the two queries' synergies: "
          f"{100 * float((z.argmax(1) == z_fresh.argmax(1)).float().mean()):.2f} %")


if __name__ == "__main__":
    main()
