"""
muon.py: Muon (Keller Jordan 2024), distributed as in modded-nanogpt, with Moonshot's lr scaling: the optimizer of
the denoiser's hidden matrices (train.py gives AdamW the rest).
"""

import math

import torch
import torch.distributed as dist


def zeropower_via_newtonschulz5(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """Quintic Newton-Schulz orthogonalisation, in bf16 the exact op sequence of torch.optim.Muon (torch 2.9+)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    if G.size(0) > G.size(1):
        X = X.T
    X = X.div(X.norm().clamp(min=eps))  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.T
        X = torch.addmm(X, torch.addmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.T if G.size(0) > G.size(1) else X


def ns_flops(shape, steps=5) -> int:
    """FLOPs of zeropower_via_newtonschulz5 on one matrix: per step X X^T, A A, B X (m <= n after transpose)."""
    m, n = sorted(shape)
    return steps * (2 * m * m * n + 2 * m * m * m + 2 * m * m * n)


class Muon(torch.optim.Optimizer):
    """Muon with Moonshot's match_rms_adamw scaling ("Muon is Scalable for LLM Training", Liu et al. 2025):
    step lr * 0.2 * sqrt(max(rows, cols)), so Muon reuses AdamW's lr and weight decay.
    Distributed like modded-nanogpt: every rank keeps the momentum of every matrix (an elementwise update, and a
    checkpoint that any world size can load), but runs Newton-Schulz only on its 1/world share of each same-shape
    bucket; the bf16 updates are all-gathered. With one process this is exactly
    torch.optim.Muon(adjust_lr_fn="match_rms_adamw")."""

    def __init__(self, params, lr=1e-4, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5, eps=1e-7,
                 rank=0, world=1, ns_dtype=torch.bfloat16):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                                      "ns_steps": ns_steps, "eps": eps})
        self.rank, self.world, self.ns_dtype = rank, world, ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            buckets, pending = {}, []
            for p in group["params"]:  # grads are None on every rank alike (see sync_grads)
                if p.grad is not None:
                    buckets.setdefault(tuple(p.shape), []).append(p)
            for shape, ps in buckets.items():
                for i in range(0, len(ps), self.world):
                    chunk, updates = ps[i:i + self.world], []
                    for p in chunk:  # Nesterov momentum in torch.optim.Muon's lerp form
                        buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                        buf.lerp_(p.grad, 1 - mom)
                        updates.append(p.grad.lerp(buf, mom) if group["nesterov"] else buf)
                    if self.rank < len(chunk):
                        mine = zeropower_via_newtonschulz5(updates[self.rank], group["ns_steps"], group["eps"],
                                                           self.ns_dtype).contiguous()  # NCCL gathers contiguous
                    else:  # this rank has no matrix in the last chunk: it sends zeros
                        mine = ps[0].new_zeros(shape, dtype=self.ns_dtype)
                    if self.world == 1:
                        pending.append((chunk, [mine], None))
                    else:
                        outs = [torch.empty_like(mine) for _ in range(self.world)]
                        pending.append((chunk, outs, dist.all_gather(outs, mine, async_op=True)))
            for chunk, outs, handle in pending:
                if handle is not None:
                    handle.wait()
                for p, o in zip(chunk, outs):
                    p.mul_(1 - lr * wd)
                    p.add_(o, alpha=-lr * 0.2 * math.sqrt(max(p.shape[0], p.shape[1])))
