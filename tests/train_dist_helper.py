"""A few optimizer steps of train.py's trainer on a tiny two-stage schedule (REPA, then SPRINT + mixed captions),
then the weights (rank 0) and a distributed-Muon-only step on an odd number of matrices. Launched by
tests/test_train.py both as one process and under `torchrun --standalone --nproc_per_node=2` (gloo):
the results must agree (world-size invariance).

    python -m tests.train_dist_helper OUT  # or: torchrun --standalone --nproc_per_node=2 -m tests.train_dist_helper OUT
"""
import dataclasses
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import muon
import train

# global batch 8, micro-batch 2: one process accumulates 4 micro-batches, each of two processes 2
TRACK = dataclasses.replace(train.CPU, warmup=2, scene_pool=256, stages=(
    train.Stage("repa", 32, 2, 8, 2, 0.0, 0.5, 0.0, 0.0, (1.0, 1.0), "scenes"),
    train.Stage("sprint", 32, 2, 8, 2, 0.5, 0.0, 0.75, 0.5, (1.0, 0.0), "scenes")))


def muon_matrices():
    """5 matrices of one shape (not a multiple of the world size: a rank sends zeros) + 1 of another."""
    g = torch.Generator().manual_seed(7)
    shapes = [(24, 16)] * 5 + [(16, 40)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    grads = [[torch.randn(s, generator=g) for s in shapes] for _ in range(3)]
    return params, grads


def main(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    run = train.setup(os.environ, track=TRACK)
    run.id = "dist"
    for k, end in enumerate(train.stage_ends(run.tr)):  # train.main's spine, without logs, grids and checkpoints
        train.enter_stage(run, k)
        train.train_stage(run, end, tqdm(disable=True), kill_at="")
    params, grads = muon_matrices()
    opt = muon.Muon(params, lr=0.02, weight_decay=0.1, rank=run.rank, world=run.world)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    if run.rank == 0:
        save_file({k: v.contiguous() for k, v in run.model.state_dict().items()}, str(out / "model.safetensors"))
        save_file({f"p{i}": p.detach() for i, p in enumerate(params)}, str(out / "muon.safetensors"))
    if run.world > 1:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
