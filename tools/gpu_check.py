"""
GPU readiness check: does the record track run, fit and reach its speed on one GPU? One script, about 8 minutes.

    python -m tools.gpu_check [--out DIR]   # on a CUDA GPU: the 1.2B preset at the record track's micro-batches
                                            # (no pip install there: the device image's torch 2.11 + transformers do)
    python -m tools.gpu_check --cpu         # anywhere: the tiny preset at small sizes, in seconds

In order:
1. Build anywhere: model.PRX(cfg) under torch.device("cuda") and torch.device("meta").
2. train.py's real loop (train.main in a child process): the record track's four stages at their real global batch
   and micro-batch, a few steps each, on procedural scenes, with step lines, the stage-end sample grids and the
   background checkpoints (stall and write times are in the log), then how long the process takes to exit after
   `done:` and whether any loader worker outlived it. The log's sources are left out; --out keeps the log + grids.
3. Masked attention: the text padding mask against the kernels SDPA can use (default choice, model.py's backend
   order, no mask, FlexAttention with a block mask), forward + backward, and how far each is from the math kernel.
4. Per stage (512 px + REPA teacher, 512 px, 1024 px SPRINT, 1024 px dense fine-tune): compiled fwd+bwd of one
   micro-batch on random inputs with the real optimizers: time, images/s, TFLOP/s, MFU against a bf16 matmul peak
   measured on the same card, peak memory, and the share of an 8-GPU optimizer step spent in the Muon update, the
   REPA teacher and the text encoder (live T5Gemma-2B encoder, or reading cached embeddings). Then the sampler: one
   1024 px image, 50 Euler steps with CFG. Last, a table.

Nothing is downloaded (the device has no network): the text encoders and the teacher are built from their configs
with random weights (the loop's T5Gemma has the real width and one layer; a word-level tokenizer is built here);
their cost is that of the real checkpoints (the loop's encoder: far less), their outputs are not. A distributed-Muon
cost model (Newton-Schulz FLOPs against model FLOPs per step, world sizes 1 and 8) is printed too, without a GPU.
"""

import argparse
import dataclasses
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import losses
import model
import muon
import plan
import train


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
        ns = sum(math.ceil(n / w) * muon.ns_flops(s) for s, n in buckets.items())
        for st in stages:
            fwd_bwd = st.batch * model.train_flops(cfg, st.res, txt_len, st.sprint_drop) / w
            rows.append((w, st.name, ns, fwd_bwd, ns / (ns + fwd_bwd)))
    return rows


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
    txt = torch.randn(micro, L, cfg.text_dim, device=device)
    mask = torch.ones(micro, L, dtype=torch.bool, device=device)
    gh = st.res // cfg.patch
    keep = model.sprint_keep_indices(micro, gh, gh, device=device) if st.sprint_drop else None
    path_drop = (torch.rand(micro, device=device) < st.path_drop) if st.path_drop else None
    ctx = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    state = {}

    def fwd_bwd():
        with ctx:
            fm, h, kept = model.flow_matching_loss(fwd, x0, eps, t, txt, mask, keep, path_drop, bool(st.repa))[:3]
            loss = fm.mean()
            if st.repa:
                y = losses.teacher_tokens(teacher, x0, gh)
                loss = loss + st.repa * losses.repa_loss(projector, h, y, kept).mean()
        loss.backward()
        state["loss"] = loss.item()

    def teacher_only():
        with ctx:
            losses.teacher_tokens(teacher, x0, gh)

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
    flops = model.train_flops(cfg, st.res, L, st.sprint_drop)
    return {"stage": st.name, "res": st.res, "micro": micro, "fb_ms": t_fb * 1e3, "img_s": micro / t_fb,
                "tflops": flops * micro / t_fb / 1e12, "step_s": step, "muon_share_1gpu": t_muon / step,
                "teacher_share": accum * t_teacher / step, "text_share": accum * t_enc / (step + accum * t_enc),
                "cache_share": accum * t_cache / (step + accum * t_cache), "loss": state["loss"],
                "mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan"),
                "fp32": all(p.dtype == torch.float32 for p in net.parameters())}


# ---------------------------------------------------------------------------------------------- 1. build anywhere


def build_anywhere(cfg, devices):
    """model.PRX must build under any device context (sharded or deferred initialisation)."""
    for dev in devices:
        with torch.device(dev):
            net = model.PRX(cfg)
        where = {t.device.type for t in list(net.parameters()) + list(net.buffers())}
        print(f"build under torch.device({dev!r}): every tensor on {sorted(where)}")
        del net
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the loop's child process needs the memory


# ---------------------------------------------------------------------------------------------- 2. the real loop


def save_text_encoder(path, width, cpu):
    """A T5Gemma saved like the hub checkpoint (encoder + decoder, 1 layer each, the real width on a GPU) and a
    word-level tokenizer built here, so that text.TextEncoder loads it through the record track's code path."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5GemmaConfig, T5GemmaModel

    sub = {"vocab_size": 1000, "hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": 1,
           "num_attention_heads": 2 if cpu else 8, "num_key_value_heads": 1, "head_dim": 16 if cpu else 256,
           "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1}
    T5GemmaModel(T5GemmaConfig(encoder=sub, decoder=sub, vocab_size=1000)).save_pretrained(path)
    words = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"w{i}" for i in range(996)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])  # as Gemma
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                            unk_token="<unk>").save_pretrained(path)


def print_time(fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        fn(*a, **k)
        print(f"loop: {fn.__name__} {time.perf_counter() - t:.1f} s", flush=True)
    return wrapper


def loop_child(cpu, out, steps):
    """Runs in the child: train.main on train.RECORD with `steps` steps per stage and scenes as every source."""
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-loop-"))
    save_text_encoder(tmp / "t5gemma", 32 if cpu else 2304, cpu)
    build_teacher("cpu", cpu).save_pretrained(tmp / "dino")
    stages = tuple(dataclasses.replace(s, steps=steps, source="scenes") for s in train.RECORD.stages)
    if cpu:  # the same stages in miniature
        stages = tuple(dataclasses.replace(s, res=s.res // 8, batch=8, max_micro=4) for s in stages)
    train.TRACKS["record"] = dataclasses.replace(
        train.RECORD, stages=stages, text_encoder=str(tmp / "t5gemma"), teacher_id=str(tmp / "dino"), warmup=2,
        sample_steps=8, ckpt_every=10**9, **({"preset": "tiny", "workers": 2} if cpu else {}))
    for name in ("enter_stage", "stage_grid"):  # time them (instrumentation of this check only)
        setattr(train, name, print_time(getattr(train, name)))
    env = dict(os.environ, SPEEDRUN_TRACK="record", SPEEDRUN_OUT=str(tmp / "out"), SPEEDRUN_RUN_ID="loop")
    t = time.perf_counter()
    code = train.main(env)
    t_main = time.perf_counter()
    print(f"loop: train.main returned {code} after {t_main - t:.1f} s", flush=True)
    log = (tmp / "out" / "logs" / "loop.txt").read_text().split("==== end of sources ====")[-1]
    print(log, flush=True)
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "loop-log.txt").write_text(log)
        for png in sorted((tmp / "out" / "logs" / "loop-samples").glob("*.png")):
            shutil.copy(png, Path(out) / f"loop-{png.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"loop: this check's own bookkeeping (log, grids, rmtree) took {time.perf_counter() - t_main:.1f} s",
          flush=True)
    return code


def run_loop(cpu, out, steps):
    """The loop in a child process, so that the time from `done:` to the process's exit is measured."""
    cmd = [sys.executable, "-m", "tools.gpu_check", "--loop-child", "--steps", str(steps)] + \
        (["--cpu"] if cpu else []) + (["--out", str(out)] if out else [])
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=Path(__file__).resolve().parents[1])
    lines, t_done = [], None
    for line in child.stdout:
        print(line, end="", flush=True)
        lines.append(line)
        if line.startswith("done:"):
            t_done = time.perf_counter()
    try:
        code = child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        code = child.wait()
    exit_s = time.perf_counter() - t_done if t_done else float("nan")
    print(f"loop: exit code {code}, process gone {exit_s:.1f} s after `done:`")
    return {"code": code, "exit_s": exit_s, "log": "".join(lines)}


# ---------------------------------------------------------------------------------------------- 3. masked attention


def attention_check(device, cpu, reps):
    """Image queries over [text ; image] keys with the text padding mask (100 real text tokens of 256): each
    kernel's fwd+bwd time and its largest difference from the math kernel (the exact reference)."""
    shapes = [(2, 16, 8, 2, 16)] if cpu else [(64, 256, 256, 28, 64), (32, 1024, 256, 28, 64), (32, 256, 256, 28, 64)]
    rows = []
    for shape in shapes:
        rows += attention_shape(*shape, device, cpu, reps)
    return rows


def attention_shape(B, N, L, heads, hd, device, cpu, reps):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dt = torch.float32 if cpu else torch.bfloat16
    g = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(B, heads, n, hd, device=device, dtype=dt, generator=g).requires_grad_()
               for n in (N, L + N, L + N))
    real = torch.ones(B, L + N, dtype=torch.bool, device=device)
    real[:, min(100, L - 1):L] = False
    mask = real[:, None, None, :]

    def sdpa(m=mask, order=None):
        if order is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        with sdpa_kernel(order, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)

    state = {}

    def flex():  # FlexAttention: a compiled kernel that skips the fully padded key blocks
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        if not state:
            state["mask"] = create_block_mask(lambda b, h, qi, ki: real[b, ki], B, None, N, L + N, device=device)
            state["fn"] = torch.compile(flex_attention)
        return state["fn"](q, k, v, block_mask=state["mask"])

    variants = {"default, mask": sdpa, "model.py order, mask": lambda: sdpa(order=model.MASKED_SDPA_ORDER),
                "no mask (not exact)": lambda: sdpa(m=None)}
    if not cpu:
        variants["flex, block mask"] = flex
    ref = sdpa(order=[SDPBackend.MATH]).float()
    rows, flops = [], 4 * B * heads * N * (L + N) * hd * 3.5  # fwd + bwd (2.5x)
    for name, fn in variants.items():
        try:
            t = timed(lambda fn=fn: fn().sum().backward(), device, reps)
            rows.append((f"B{B} N{N} L{L}", name, t * 1e3, flops / t / 1e12, (fn().float() - ref).abs().max().item()))
        except Exception as e:  # noqa: BLE001 (a kernel that refuses these inputs on this card: say so, go on)
            rows.append((f"B{B} N{N} L{L}", f"{name}: n/a ({type(e).__name__}: {str(e)[:80]})", *[float("nan")] * 3))
        print(f"  attention {rows[-1][0]} {rows[-1][1]}: {rows[-1][2]:.2f} ms fwd+bwd, {rows[-1][3]:.0f} TFLOP/s, "
              f"max |diff| vs math {rows[-1][4]:.2e}", flush=True)
    return rows


def block_attention_check(device, cpu, reps):
    """The attention kernel a model.Block really runs at 512 px (batch 64, 256 padded text tokens), eager and
    compiled, with and without model.py's backend order: fwd+bwd time and the attention kernels the profiler saw."""
    from torch.nn.attention import sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    cfg = model.PRESETS["tiny" if cpu else train.RECORD.preset]
    B, gh, L = (2, 4, 8) if cpu else (64, 16, 256)
    torch.manual_seed(0)
    blk = model.Block(cfg).to(device)
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.02)
    x, txt = torch.randn(B, gh * gh, cfg.hidden, device=device), torch.randn(B, L, cfg.hidden, device=device)
    vec = torch.randn(B, cfg.hidden, device=device)
    ang = model.rope_angles(model.grid_positions(gh, gh, device), cfg.head_dim, cfg.theta)[None, None]
    real = torch.ones(B, L + gh * gh, dtype=torch.bool, device=device)
    real[:, min(100, L - 1):L] = False
    for compiled in (False, True):
        for ordered in (False, True):
            torch._dynamo.reset()  # a fresh compilation under each setting
            f = torch.compile(blk) if compiled else blk

            def fb(f=f, ordered=ordered):
                with torch.autocast(device.type, torch.bfloat16, enabled=not cpu):
                    if ordered:
                        with sdpa_kernel(model.MASKED_SDPA_ORDER, set_priority=True):
                            out = f(x, txt, vec, ang.cos(), ang.sin(), real[:, None, None])
                    else:
                        out = f(x, txt, vec, ang.cos(), ang.sin(), real[:, None, None])
                out.float().sum().backward()

            t = timed(fb, device, reps)
            with profile(activities=[ProfilerActivity.CPU] + ([] if cpu else [ProfilerActivity.CUDA])) as prof:
                fb()
            names = sorted({e.key[:70] for e in prof.key_averages() if any(
                s in e.key.lower() for s in ("attention", "fmha", "flash", "cudnn", "sdpa", "mha"))})
            print(f"  block fwd+bwd {'compiled' if compiled else 'eager   '} "
                  f"{'model.py order' if ordered else 'default order '}: {t * 1e3:.1f} ms; kernels {names[:6]}",
                  flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description="GPU readiness check of the record track (tiny preset with --cpu)")
    ap.add_argument("--cpu", action="store_true", help="run the tiny preset on the CPU")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps per stage in the real loop")
    ap.add_argument("--out", default=os.environ.get("OUT"), help="folder for the loop's log and sample grids")
    ap.add_argument("--skip-stages", action="store_true", help="leave out part 4 (the per-stage benchmarks)")
    ap.add_argument("--loop-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cpu = args.cpu or not torch.cuda.is_available()
    if args.loop_child:  # ends as train.py's __main__ does: flush, then os._exit (no interpreter teardown)
        code = loop_child(cpu, args.out, args.steps)
        sys.stdout.flush()
        os._exit(code)
    device = torch.device("cpu" if cpu else "cuda")
    torch.set_flush_denormal(True)  # on CPUs, denormals appearing after a few optimizer steps slow matmuls ~50x
    track = train.CPU if cpu else train.RECORD
    cfg = model.PRESETS[track.preset]
    if cpu:
        cfg = dataclasses.replace(cfg, text_dim=64)
    gpu = torch.cuda.get_device_name() if not cpu else "none (CPU run, tiny preset)"
    print(f"gpu_check: device {gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}, preset {track.preset}")
    t_start = time.perf_counter()
    build_anywhere(model.PRESETS[train.RECORD.preset], ["meta"] + ([] if cpu else ["cuda"]))
    print(f"\n2. train.py's loop, {args.steps} steps per stage", flush=True)
    loop = run_loop(cpu, args.out, args.steps)
    print(f"\n3. masked attention (after {time.perf_counter() - t_start:.0f} s)", flush=True)
    block_attention_check(device, cpu, args.reps)
    attention = attention_check(device, cpu, args.reps)
    if args.skip_stages:
        return {"loop": loop, "attention": attention}
    print(f"\n4. per stage (after {time.perf_counter() - t_start:.0f} s)", flush=True)

    print("\nDistributed Muon cost model (Newton-Schulz FLOPs on the busiest rank vs model FLOPs per rank per step):")
    for w, name, ns, fb, share in muon_cost_model(model.PRESETS[train.RECORD.preset], train.RECORD.stages):
        print(f"  world {w}  {name:9s} NS {ns:.3e}  model {fb:.3e}  Muon share {100 * share:.2f} %")

    peak = plan.peak_matmul_flops(device, torch.float32, 512, 5) if cpu else plan.peak_matmul_flops(device)
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
    projector = losses.make_projector(cfg.hidden, track.projector_width, teacher.config.hidden_size, 0).to(device)
    adamw = torch.optim.AdamW(net.adamw_params() + list(projector.parameters()), lr=track.lr, betas=track.betas,
                              eps=track.adam_eps, fused=not cpu or None)
    opts = (adamw, muon.Muon(net.muon_params(), lr=track.lr, momentum=track.momentum))
    enc = build_text_encoder(device, torch.bfloat16 if not cpu else torch.float32, cpu)
    rows = []
    for st in track.stages:
        micro = st.max_micro if not cpu else 2
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
            model.sample(fwd, enc_txt, enc_mask, null_txt, null_mask, noise, steps=50,
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
    print(f"gpu_check: done in {time.perf_counter() - t_start:.0f} s")
    return {"stages": rows, "loop": loop, "attention": attention}


if __name__ == "__main__":
    out = main()
    sys.exit(out if isinstance(out, int) else 0)
