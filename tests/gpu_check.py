"""
GPU readiness check: does the record track run, fit and reach its speed on one GPU?

    python tests/gpu_check.py            # on a CUDA GPU: the 1.2B preset at the record track's micro-batches
                                         # (no pip install there: the device image's torch 2.11 + transformers do)
    python tests/gpu_check.py --cpu      # anywhere: the tiny preset at the CPU track's sizes, in seconds

For each stage of train.RECORD (512 px + REPA teacher, 512 px, 1024 px SPRINT, 1024 px dense fine-tune) it runs a
few compiled training steps on random inputs at the stage's per-GPU micro-batch, with the real optimizers
(train.Muon + AdamW), and prints step time, images/s, TFLOP/s and MFU (model.train_flops over the time, against a
bf16 matmul peak measured on the same card), peak memory, and the share of an 8-GPU optimizer step spent in the
Muon update, the REPA teacher and the text encoder (live T5Gemma-2B encoder, or reading cached embeddings).
Then the sampler: one 1024 px image, 50 Euler steps with CFG. Last, a table.

Nothing is downloaded (the device has no network): the text encoder and the teacher are built from their configs
with random weights; their cost is that of the real checkpoints, their outputs are not. A distributed-Muon cost
model (Newton-Schulz FLOPs against model FLOPs per step, world sizes 1 and 8) is printed first, without a GPU.
"""

import argparse
import dataclasses
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval as evaluation
import model
import train


def ns_flops(shape, steps=5):
    """FLOPs of train.zeropower_via_newtonschulz5 on one matrix: per step X X^T, A A, B X (m <= n after transpose)."""
    m, n = sorted(shape)
    return steps * (2 * m * m * n + 2 * m * m * m + 2 * m * m * n)


def muon_cost_model(cfg, stages, worlds=(1, 8), txt_len=256):
    """Newton-Schulz FLOPs per step on the busiest rank (matrices of one shape are split round-robin across ranks,
    as train.Muon does) against the model FLOPs per step per rank."""
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in model.PRX(cfg).muon_params()]
    buckets = {}
    for s in shapes:
        buckets[s] = buckets.get(s, 0) + 1
    rows = []
    for w in worlds:
        ns = sum(math.ceil(n / w) * ns_flops(s) for s, n in buckets.items())
        for st in stages:
            fwd_bwd = st.batch * model.train_flops(cfg, st.res, txt_len, st.drop) / w
            rows.append((w, st.name, ns, fwd_bwd, ns / (ns + fwd_bwd)))
    return rows


def peak_matmul_flops(device, dtype):
    n = 8192 if device.type == "cuda" else 512
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 20 if device.type == "cuda" else 5
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, reps):
    """Median seconds of fn() over reps calls, after one untimed call (compilation, allocator warm-up)."""
    fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def build_text_encoder(device, dtype, cpu):
    """T5Gemma-2B encoder (the record track's) from its config, random weights; tiny on the CPU run."""
    from transformers import T5GemmaConfig, T5GemmaEncoderModel

    kw = {} if not cpu else {"encoder": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                                              "num_key_value_heads": 1, "head_dim": 32, "intermediate_size": 128,
                                              "vocab_size": 1000}}
    with torch.device(device):
        enc = T5GemmaEncoderModel(T5GemmaConfig(is_encoder_decoder=False, **kw))
    return enc.to(dtype).eval().requires_grad_(False)


def build_teacher(device, cpu):
    """DINOv2-with-registers, the record track's REPA teacher size (base), from its config."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    kw = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072}
    if cpu:
        kw = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128}
    with torch.device(device):
        t = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(patch_size=14, num_register_tokens=4, **kw))
    return t.eval().requires_grad_(False)


def bench_stage(net, fwd, cfg, st, micro, opts, teacher, projector, enc, device, amp, reps, node_gpus=8):
    """One stage: fwd+bwd of one micro-batch (with the teacher when REPA is on), the optimizer step, the text encoder
    and the cache read, each timed alone; shares are of an optimizer step of the node's global batch."""
    L = 256
    x0 = torch.rand(micro, 3, st.res, st.res, device=device) * 2 - 1
    eps, t = torch.randn_like(x0), torch.rand(micro, device=device)
    txt, mask = torch.randn(micro, L, cfg.text_dim, device=device), torch.ones(micro, L, dtype=torch.bool, device=device)
    gh = st.res // cfg.patch
    keep = model.sprint_keep_indices(micro, gh, gh, device=device) if st.drop else None
    path_drop = (torch.rand(micro, device=device) < st.path_drop) if st.path_drop else None
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    state = {}

    def fwd_bwd():
        with ctx:
            fm, h, kept = train.flow_matching_loss(fwd, x0, eps, t, txt, mask, keep, path_drop, bool(st.repa))
            loss = fm.mean()
            if st.repa:
                y = train.teacher_tokens(teacher, x0, gh)
                loss = loss + st.repa * train.repa_loss(projector, h, y, kept).mean()
        loss.backward()
        state["loss"] = loss.item()

    def teacher_only():
        with ctx:
            train.teacher_tokens(teacher, x0, gh)

    def opt_step():
        for o in opts:
            o.step()

    def muon_only():
        opts[1].step()

    ids = torch.randint(0, enc.config.encoder.vocab_size, (micro, L), device=device)

    def encode():
        with torch.no_grad(), ctx:
            return enc(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:  # cached embeddings: bf16 rows read from disk, copied to the device
        path = os.path.join(tmp, "emb.safetensors")
        save_file({"emb": torch.randn(micro, L, cfg.text_dim, dtype=torch.bfloat16)}, path)
        t_cache = timed(lambda: load_file(path)["emb"].to(device), device, reps)
    t_fb = timed(fwd_bwd, device, reps)  # grads accumulate: harmless for timing, and the optimizer sees real grads
    t_opt = timed(opt_step, device, reps)
    t_muon = timed(muon_only, device, reps)
    t_teacher = timed(teacher_only, device, reps) if st.repa else 0.0
    t_enc = timed(encode, device, reps)
    accum = max(1, st.batch // (node_gpus * micro))  # micro-batches per GPU per optimizer step on the node
    step = accum * t_fb + t_opt
    flops = model.train_flops(cfg, st.res, L, st.drop)
    return {"stage": st.name, "res": st.res, "micro": micro, "fb_ms": t_fb * 1e3, "img_s": micro / t_fb,
                "tflops": flops * micro / t_fb / 1e12, "step_s": step, "muon_share_1gpu": t_muon / step,
                "teacher_share": accum * t_teacher / step, "text_share": accum * t_enc / (step + accum * t_enc),
                "cache_share": accum * t_cache / (step + accum * t_cache), "loss": state["loss"],
                "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
                "fp32": all(p.dtype == torch.float32 for p in net.parameters())}


def main(argv=None):
    ap = argparse.ArgumentParser(description="GPU readiness check of the record track (tiny preset with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="run the tiny preset on the CPU")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    torch.set_flush_denormal(True)  # on CPUs, denormals appearing after a few optimizer steps slow matmuls ~50x
    track = train.CPU if cpu else train.RECORD
    cfg = model.PRESETS[track.preset]
    if cpu:
        cfg = dataclasses.replace(cfg, text_dim=64)
    gpu = torch.cuda.get_device_name() if not cpu else "none (CPU run, tiny preset)"
    print(f"gpu_check: device {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, preset {track.preset}")

    print("\nDistributed Muon cost model (Newton-Schulz FLOPs on the busiest rank vs model FLOPs per rank per step):")
    for w, name, ns, fb, share in muon_cost_model(model.PRESETS[train.RECORD.preset], train.RECORD.stages):
        print(f"  world {w}  {name:9s} NS {ns:.3e}  model {fb:.3e}  Muon share {100 * share:.2f} %")

    peak = peak_matmul_flops(device, torch.bfloat16 if not cpu else torch.float32)
    print(f"\nmeasured matmul peak: {peak / 1e12:.3g} TFLOP/s ({'bf16' if not cpu else 'fp32'})")

    torch.manual_seed(0)
    net = model.PRX(cfg).to(device)
    with torch.no_grad():  # trained-like weights: zero-init gates would make every block the identity
        for p in net.parameters():
            if p.ndim >= 1 and p.abs().sum() == 0:
                p.normal_(0, 0.02)
    fwd = net  # regional compilation as in train.py: one compiled block serves all 16
    if not cpu:
        for blk in net.blocks:
            blk.compile()
    teacher = build_teacher(device, cpu)
    projector = train.make_projector(cfg.hidden, track.projector, teacher.config.hidden_size, 0).to(device)
    adamw = torch.optim.AdamW(net.adamw_params() + list(projector.parameters()), lr=track.lr, betas=track.betas,
                              eps=track.adam_eps, fused=not cpu or None)
    opts = (adamw, train.Muon(net.muon_params(), lr=track.lr, momentum=track.momentum))
    enc = build_text_encoder(device, torch.bfloat16 if not cpu else torch.float32, cpu)
    rows = []
    for st in track.stages:
        micro = st.micro if not cpu else 2
        while True:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            try:
                rows.append(bench_stage(net, fwd, cfg, st, micro, opts, teacher, projector, enc, device, not cpu,
                                        args.reps))
                break
            except torch.OutOfMemoryError:
                pass  # cleaned up below, outside the handler, where the failed attempt's tensors are released
            for o in opts:
                o.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            print(f"  {st.name}: out of memory at micro-batch {micro}, halving")
            micro //= 2
            if micro == 0:
                raise RuntimeError(f"{st.name}: out of memory even at micro-batch 1")
        for o in opts:
            o.zero_grad(set_to_none=True)
        r = rows[-1]
        print(f"  {r['stage']}: {r['fb_ms']:.1f} ms per micro-batch of {micro}, loss {r['loss']:.4f}")

    # The sampler: one image, 50 Euler steps, CFG 3.5 (two forwards per step), EMA-style eval model = net
    res = 1024 if not cpu else 64
    enc_txt, enc_mask = torch.randn(1, 64, cfg.text_dim, device=device), torch.ones(1, 64, dtype=torch.bool,
                                                                                      device=device)
    null_txt, null_mask = torch.zeros_like(enc_txt), torch.arange(64, device=device)[None] < 1  # "" : 1 token
    noise = torch.randn(1, 3, res, res, device=device)
    net.eval()

    def sample():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not cpu):
            evaluation.sample(fwd, enc_txt, enc_mask, null_txt, null_mask, noise, steps=50,
                              cfg_scale=3.5, shift=res / train.RECORD.shift_base)

    t_sample = timed(sample, device, 1)
    peak_s = f"{peak / 1e12:.3g} TFLOP/s {'bf16' if not cpu else 'fp32'} matmul"
    print(f"\nSummary ({gpu}, torch {torch.__version__}, peak {peak_s}; shares are of one 8-GPU optimizer step)")
    print("| stage | res | micro | ms/micro | img/s/GPU | TFLOP/s | MFU | peak GB | Muon 1-GPU | REPA teacher "
          "| T5Gemma live | cache read | loss | FP32 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['res']} | {r['micro']} | {r['fb_ms']:.1f} | {r['img_s']:.1f} | {r['tflops']:.3g} "
              f"| {100 * r['tflops'] * 1e12 / peak:.1f} % | {r['mem_gb']:.1f} | {100 * r['muon_share_1gpu']:.1f} % "
              f"| {100 * r['teacher_share']:.1f} % | {100 * r['text_share']:.1f} % | {100 * r['cache_share']:.1f} % "
              f"| {r['loss']:.3f} | {r['fp32']} |")
    dense = {r["res"]: r for r in rows if r["stage"] in ("sft", "main")}
    sprint = next(r for r in rows if r["stage"] == "high-res")
    print(f"SPRINT speed-up at {sprint['res']} px: {sprint['img_s'] / dense[sprint['res']]['img_s']:.2f}x images/s "
          f"of the dense stage (target >= 1.8x)")
    print(f"sampler: one {res} px image, 50 Euler steps, CFG 3.5: {t_sample:.2f} s")
    return rows


if __name__ == "__main__":
    main()
