"""muon.py: distributed Muon is torch.optim.Muon on one process; its Newton-Schulz FLOPs."""
from pathlib import Path

import torch

import muon

ROOT = Path(__file__).resolve().parents[1]


def test_muon_matches_torch_muon():
    """One process: the same update as torch.optim.Muon(adjust_lr_fn="match_rms_adamw"), bit for bit (same bf16
    Newton-Schulz op sequence), over tall, wide and square matrices, with weight decay and Nesterov momentum."""
    g = torch.Generator().manual_seed(0)
    shapes = [(48, 16), (16, 48), (32, 32), (48, 16)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = muon.Muon(ours, lr=0.02, weight_decay=0.1, momentum=0.95)
    opt_ref = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                               adjust_lr_fn="match_rms_adamw")
    start = [p.detach().clone() for p in ours]
    for _ in range(4):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        opt_ref.step()
    for p, q, s in zip(ours, ref, start):
        assert not torch.equal(p, s)
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["momentum_buffer"], opt_ref.state[q]["momentum_buffer"])
