"""
muon.py: Muon (Keller Jordan 2024), distributed as in modded-nanogpt, with Moonshot's lr scaling: the optimizer of
the denoiser's hidden matrices (train.py gives AdamW the rest).
"""

import math

import torch
import torch.distributed as dist


def zeropower_via_newtonschulz5(G, steps=5, eps=1e-7, dtype=torch.bfloat16):
    """Quintic Newton-Schulz orthogonalisation of one matrix [m, n] or a stack [k, m, n], in bf16 the exact op sequence
    of torch.optim.Muon (torch 2.9+; on CPU a bf16 stack gives each matrix's result bit for bit, an fp32 one to
    rounding: AVX-512 kernels round with the stack size; tested)."""
    if G.ndim == 2:
        return zeropower_via_newtonschulz5(G[None], steps, eps, dtype)[0]
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.to(dtype)
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X.div(X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))  # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = torch.baddbmm(X, torch.baddbmm(A, A, A, beta=b, alpha=c), X, beta=a)
    return X.mT if G.size(-2) > G.size(-1) else X


def ns_flops(shape, steps=5) -> int:
    """FLOPs of zeropower_via_newtonschulz5 on one matrix: per step X X^T, A A, B X (m <= n after transpose)."""
    m, n = sorted(shape)
    return steps * (2 * m * m * n + 2 * m * m * m + 2 * m * m * n)


class Muon(torch.optim.Optimizer):
    """Muon with Moonshot's match_rms_adamw scaling ("Muon is Scalable for LLM Training", Liu et al. 2025):
    step lr * 0.2 * sqrt(max(rows, cols)), so Muon reuses AdamW's lr and weight decay.
    Distributed like modded-nanogpt: every rank keeps the momentum of every matrix (an elementwise update, and a
    checkpoint that any world size can load), but runs Newton-Schulz only on its 1/world share of each same-shape
    bucket (one batched Newton-Schulz per shape); the updates are all-gathered, all of a step's in one call. With one
    process this is exactly torch.optim.Muon(adjust_lr_fn="match_rms_adamw") (bit for bit on CPU, tested)."""

    def __init__(self, params, lr=1e-4, weight_decay=0.0, momentum=0.95, nesterov=True, ns_steps=5, eps=1e-7,
                 rank=0, world=1, ns_dtype=torch.bfloat16):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
                                      "ns_steps": ns_steps, "eps": eps})
        self.rank, self.world, self.ns_dtype = rank, world, ns_dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, wd, mom = group["lr"], group["weight_decay"], group["momentum"]
            buckets, mine = {}, []
            for p in group["params"]:  # grads are None on every rank alike (see sync_grads)
                if p.grad is not None:
                    buckets.setdefault(tuple(p.shape), []).append(p)
            for shape, ps in buckets.items():
                updates = []
                for p in ps:  # Nesterov momentum in torch.optim.Muon's lerp form
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                    buf.lerp_(p.grad, 1 - mom)
                    updates.append(p.grad.lerp(buf, mom) if group["nesterov"] else buf)
                share = updates[self.rank::self.world]  # this rank's matrices: rank, rank + world, ...
                slots = -(-len(ps) // self.world)  # every rank sends as many (zeros where it has none left)
                out = ps[0].new_zeros((slots, *shape), dtype=self.ns_dtype)
                if share:  # one batched Newton-Schulz per shape, not one per matrix
                    out[:len(share)] = zeropower_via_newtonschulz5(torch.stack(share), group["ns_steps"], group["eps"],
                                                                   self.ns_dtype)
                mine.append(out.flatten())
            if not mine:
                continue
            flat = torch.cat(mine)  # one all-gather of every update per step: gloo pays ~1 ms per call
            outs = [flat] if self.world == 1 else [torch.empty_like(flat) for _ in range(self.world)]
            if self.world > 1:
                dist.all_gather(outs, flat)
            sections = [(shape, ps, -(-len(ps) // self.world)) for shape, ps in buckets.items()]
            sizes = [slots * math.prod(shape) for shape, _, slots in sections]
            for r, o in enumerate(outs):
                for (shape, ps, slots), part in zip(sections, o.split(sizes)):
                    for j, u in enumerate(part.view(slots, *shape)[:len(ps[r::self.world])]):
                        p = ps[j * self.world + r]
                        p.mul_(1 - lr * wd)
                        p.add_(u, alpha=-lr * 0.2 * math.sqrt(max(p.shape[0], p.shape[1])))
