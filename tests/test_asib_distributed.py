"""Issue 13 item 9: under data parallelism the ASIB A-step keeps IB_MBM, the synergy head and
the trained teacher parts identical on every rank. Two gloo ranks on CPU, spawned in-process
(no torchrun pipeline), each run one A-step on its own shard of tiny digits."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from asib_core.engine.distributed import DistContext
from tests.asib_helpers import asib_cfg, make_run, tiny_data

WORLD = 2


def _a_step_on_rank(rank: int, tmp: str) -> None:
    from asib_core.methods.asib.a_step import AStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=rank, world_size=WORLD)
    try:
        cfg = asib_cfg("L3_ib_cccp_tadapt", ["experiment.num_stages=1", "experiment.student_epochs_per_stage=[1]",
                                             "experiment.teacher_adapt_epochs=1",
                                             "experiment.use_teacher_finetuning=true",
                                             "experiment.train_distill_adapter_only=false",
                                             "experiment.dataset.batch_size=16"])
        run, d = make_run(cfg, tiny_data(cfg, per_class=2, val_split=0.02), None, f"{tmp}/rank{rank}",
                          dist=DistContext(rank=rank, world_size=WORLD))
        x = next(iter(run.train_loader))[2]
        if rank == 1:            # a rank-local start (e.g. a different init): the A-step starts from rank 0's
            with torch.no_grad():
                for p in d.ib_mbm.parameters():
                    p.add_(0.5)
        before = {k: v.clone() for k, v in d.state_dict().items()}
        AStep(d, 0, run).run()
        torch.save({"state": d.state_dict(), "before": before, "first_idx": x, "gate": d.gate.syn_acc},
                   f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_a_step_modules_stay_identical_on_two_gloo_ranks(tmp_path):
    mp.spawn(_a_step_on_rank, args=(str(tmp_path),), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert set(r0["first_idx"].tolist()).isdisjoint(r1["first_idx"].tolist())      # different shards
    trained = [k for k in r0["state"] if k.startswith(("ib_mbm.", "synergy_head.", "teachers."))]
    moved = [k for k in trained if not torch.equal(r0["state"][k], r0["before"][k])]
    assert any(k.startswith("ib_mbm.") for k in moved) and any(".distill_adapter." in k for k in moved)
    assert any(k.startswith("teachers.") and "running_mean" in k for k in moved)    # fine-tuned teacher BN
    different = [k for k in trained if not torch.equal(r0["state"][k], r1["state"][k])]
    assert not different, different[:5]
    assert r0["gate"] == r1["gate"]
