"""Speed of model.py's PRX against diffusers' PRXTransformer2DModel on this machine (CPU): forward + backward per
sample at the same small configuration, interleaved so that other load hits both alike.

    python -m tools.bench_model
"""
import time

import torch

from model import PRX, PRXConfig, load_diffusers_state_dict


def bench(steps=15, batch=4, res=256):
    from diffusers import PRXTransformer2DModel

    cfg = PRXConfig(hidden=256, depth=16, heads=4, patch=32, bottleneck=64, text_dim=128)
    torch.manual_seed(0)
    ref = PRXTransformer2DModel(in_channels=3, patch_size=32, context_in_dim=128, hidden_size=256, mlp_ratio=3.5,
                                num_heads=4, depth=16, axes_dim=[32, 32], bottleneck_size=64)
    ours = load_diffusers_state_dict(PRX(cfg), ref.state_dict())
    x, t = torch.randn(batch, 3, res, res), torch.rand(batch)
    txt, mask = torch.randn(batch, 64, 128), torch.arange(64)[None].repeat(batch, 1) < 40

    def step(fn):
        t0 = time.perf_counter()
        fn().square().mean().backward()
        return time.perf_counter() - t0

    fns = {"ref": lambda: ref(x, t, txt, mask, return_dict=False)[0], "ours": lambda: ours(x, t, txt, mask)}
    times = {k: [] for k in fns}
    for i in range(steps + 1):  # interleaved, so that load from other processes hits both alike; 1st is warm-up
        for k, fn in fns.items():
            times[k].append(step(fn))
    t_ref, t_ours = (sorted(times[k][1:])[steps // 2] / batch for k in ("ref", "ours"))  # medians
    print(f"bench fwd+bwd per sample ({res}px, batch {batch}, hidden 256, depth 16, CPU, {torch.get_num_threads()} "
          f"threads): diffusers PRX {t_ref * 1e3:.1f} ms, model.py {t_ours * 1e3:.1f} ms, ratio {t_ours / t_ref:.3f}")



if __name__ == "__main__":
    bench()
