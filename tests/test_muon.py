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


def test_stacked_newton_schulz_is_each_matrix_bit_for_bit():
    """Muon runs one Newton-Schulz per same-shape stack: each matrix comes out as it would alone (tall, wide, square):
    bit for bit in bf16 (torch.optim.Muon's precision); in the CPU track's fp32 to rounding, since an AVX-512 box's
    fp32 batched matmul rounds differently with the stack size (measured on one: <= 1.1e-6 on values ~0.1-1)."""
    g = torch.Generator().manual_seed(1)
    for shape in [(64, 170), (170, 64), (64, 64)]:
        G = torch.randn(3, *shape, generator=g)
        for dtype in (torch.bfloat16, torch.float32):
            stacked = muon.zeropower_via_newtonschulz5(G, dtype=dtype)
            assert stacked.shape == G.shape and stacked.dtype == dtype
            for x, y in zip(G, stacked):
                alone = muon.zeropower_via_newtonschulz5(x, dtype=dtype)
                assert torch.equal(alone, y) if dtype == torch.bfloat16 else torch.allclose(alone, y, rtol=0, atol=1e-5)
            s = torch.linalg.svdvals(stacked.float())  # and it orthogonalises: the bulk of singular values near 1
            assert 0.6 < s.median() < 1.2 and s.max() < 1.5 and torch.linalg.svdvals(G).max() > 10
