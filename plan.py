"""
plan.py: the compute of a training schedule, before any step: the FLOPs each stage plans (the CPU track's budget is a
number of them), the refusal of a schedule over budget, an ablation variant fitted to the baseline's FLOPs, the
micro-batching of a fixed global batch at a world size, and the dry run that prints a record plan at N GPUs.
train.py calls it with its Run and Track objects (fields: tr, cfg, model, enc, teacher_path, text_max).
"""
import dataclasses
import math
import time

import torch

import data
import losses
import model
import muon as muon_lib
import scenes


def aux_flops(run, st, tr=None) -> float:
    """FLOPs per training sample beside the denoiser: REPA (the frozen teacher's forward, the projector's forward +
    backward) and the perceptual losses (their networks' forward on both images, backward to the prediction), counted
    by torch.utils.flop_counter on meta tensors (the config only: no weights, no compute)."""
    from transformers import AutoConfig, AutoModel
    tr = tr or run.tr
    if not (st.repa or tr.dino_loss or tr.lpips):
        return 0.0
    grid = st.res // run.cfg.patch
    conf = scenes.teacher_config(grid) if tr.teacher_id == "scenes" else AutoConfig.from_pretrained(run.teacher_path)
    conf._attn_implementation = "eager"  # attention as matmuls that the counter sees
    n = grid * grid  # tokens at the REPA tap: SPRINT's / TREAD's kept ones when the tap is in their span
    lo, hi = (run.cfg.tread_start, run.cfg.tread_end) if st.tread else (run.cfg.sparse_start, run.cfg.sparse_end)
    if (st.sprint_drop or st.tread) and lo < run.cfg.repa_block <= hi:
        n = n - min(max(round(n * st.tread), 1), n - 1) if st.tread else round(n * (1 - st.sprint_drop))
    total = 0
    with torch.device("meta"):
        teacher = AutoModel.from_config(conf).requires_grad_(False)
        x = torch.empty(1, 3, st.res, st.res, requires_grad=True)
        if st.repa:
            proj = losses.make_projector(run.cfg.hidden, tr.projector_width, conf.hidden_size, 0, conv=tr.irepa)
            h = torch.empty(1, run.cfg.hidden, grid, grid) if tr.irepa else torch.empty(1, n, run.cfg.hidden)
            size = grid * conf.patch_size
            total += (model.counted_flops(teacher, pixel_values=torch.empty(1, 3, size, size)) +
                      3 * model.counted_flops(proj, h))
        if tr.dino_loss:
            loss = lambda: losses.dino_feature_loss(teacher, x, x.detach(), grid).sum().backward()
            total += model.counted_flops(loss)
        if tr.lpips:
            net = losses.LPIPS().requires_grad_(False)
            total += model.counted_flops(lambda: losses.lpips_loss(net, x, x.detach()).sum().backward())
    return total


def muon_step_flops(run, tr) -> int:
    """Muon's Newton-Schulz per step: every hidden matrix once, whatever the world size (each rank does its share)."""
    return sum(muon_lib.ns_flops(p.shape) for p in run.model.muon_params()) if tr.muon else 0


def text_bound(run) -> int:
    """The most text tokens a batch can carry: tr.text_len, else the longest caption of the CPU track's pool."""
    if run.tr.text_len or not run.tr.scene_pool:
        return run.tr.text_len or run.enc.max_len
    caps = [c for _, *cs in scenes.SceneDataset(run.tr.seed, run.tr.scene_pool).iter_captions() for c in cs]
    return max(len(ids) for ids in run.enc.tok(caps, truncation=True, max_length=run.enc.max_len)["input_ids"])


def compute_plan(run, tr=None) -> list[float]:
    """Each stage's training FLOPs, planned before any step: steps x (global batch x (denoiser forward + backward as
    model.train_flops counts them + REPA) + Muon's Newton-Schulz). An upper bound: text at its longest (the step
    lines count each batch's real length). Not counted: the EMA and the optimizers' elementwise updates, the losses'
    elementwise terms (contrastive), the stage-end grids and validation loss (no training)."""
    tr = tr or run.tr
    L, ns = run.text_max, muon_step_flops(run, tr)
    return [st.steps * (st.batch * (model.train_flops(run.cfg, st.res, L, st.sprint_drop, st.tread) +
                                    aux_flops(run, st, tr)) + ns) for st in tr.stages]


def fit_budget(tr, plan, target):
    """`tr` with its main stage (index 1) lengthened or shortened so that its plan spends `target` FLOPs (the
    baseline's plan) without exceeding it: every ablation variant trains on the same compute as the baseline."""
    k, st = 1, tr.stages[1]
    steps = st.steps + math.floor((target - sum(plan)) / (plan[k] / st.steps))
    stages = tuple(dataclasses.replace(s, steps=max(1, steps)) if i == k else s for i, s in enumerate(tr.stages))
    return dataclasses.replace(tr, stages=stages)


def check_budget(run, plan):
    if sum(plan) > run.tr.flop_budget:  # nan (no budget) never refuses
        raise SystemExit(f"train.py: the {run.tr.name} track's stages plan {sum(plan):.4g} training FLOPs, over its "
                         f"budget of {run.tr.flop_budget:.4g} (Track.flop_budget); shorten the stage table")


def micro_batching(st, world) -> tuple[int, int]:
    """(micro-batch, accumulation) per GPU: the fewest micro-batches of at most st.max_micro that split the stage's
    per-GPU share of its fixed global batch evenly."""
    per = st.batch // world
    if st.batch % world:  # checked for every stage at setup
        raise SystemExit(f"train.py: stage {st.name}'s global batch {st.batch} does not split over {world} processes; "
                         f"use a world size that divides it (1, 2, 4, 8 nodes of 8 GPUs)")
    accum = math.ceil(per / st.max_micro)
    while per % accum:
        accum += 1
    return per // accum, accum


def peak_matmul_flops(device, dtype=torch.bfloat16, n=8192, reps=20):
    """Dense matmul FLOP/s of this device (after 3 warm-ups): mfu_measured's denominator (train.py, gpu_check)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


# img/s per GPU of train.py's loop in each record stage, measured on one H100 (records/gpu-checks/2026-11-26, torch
# 2.11), less the measured share of reading cached text: the dry run's time estimates (linear scaling ASSUMED)
MEASURED_IMG_S = (273 * 0.956, 290 * 0.971, 150 * 0.984, 71 * 0.989)


def dry_run(tr, world):
    """The plan of every stage at `world` GPUs, printed: what changes with the world size, nothing trained."""
    cfg = model.PRESETS[tr.preset]  # T5Gemma-2B's width
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in model.PRX(cfg).muon_params()]
    buckets = {sh: shapes.count(sh) for sh in shapes}
    mine = sum(muon_lib.ns_flops(sh) * math.ceil(n / world) for sh, n in buckets.items())  # the busiest rank's share
    rows = {n: data.SOURCES[n]["rows"] * (1 - data.HELDOUT_PERMILLE / 1000) for n in data.SOURCES}
    total_h = 0.0
    print(f"dry run: track {tr.name}, {world} GPUs, {len(shapes)} Muon matrices in {len(buckets)} shapes; Newton-"
          f"Schulz on the busiest rank: {mine / sum(muon_lib.ns_flops(sh) for sh in shapes):.0%} of all (1/world = "
          f"{1 / world:.0%})")
    for k, st in enumerate(tr.stages):
        micro, accum = micro_batching(st, world)
        images = st.steps * st.batch
        epochs, rate = images / sum(rows[n] for n in data.leaves(st.source)), MEASURED_IMG_S[k]
        hours = images / (world * rate) / 3600
        total_h += hours
        flops = model.train_flops(cfg, st.res, tr.text_len or 32, st.sprint_drop, st.tread)
        print(f"  stage {k + 1} {st.name} {st.res} px: global batch {st.batch} = {world} x {st.batch // world} "
              f"(micro {micro} x accum {accum}), {st.steps} steps, {images / 1e6:.1f} M images ({epochs:.1f} epochs "
              f"of {st.source}), {flops / 1e12:.2f} TFLOP per image, ~{hours:.2f} h at {rate:.0f} img/s per GPU")
    print(f"  total ~{total_h:.1f} h of training (ESTIMATE: one H100's measured rates x {world}, linear scaling "
          f"assumed), budget {tr.time_cap_s / 3600:.0f} h")
    return 0
