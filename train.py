"""
train.py: the staged speedrun trainer for a pixel-space PRX-1.2B text-to-image denoiser.

    torchrun --standalone --nproc_per_node=auto train.py

Track: "record" (CUDA: one node of 8 x H100 80 GB, 24 h) or "cpu" (the same four stages in miniature, a budget of
training FLOPs: ~7 min on 2 cores); default record if CUDA is available, else cpu; SPEEDRUN_TRACK=record|cpu|mini
picks one (mini: the GPU miniature, minutes on one GPU). The file is the experiment: every hyperparameter is in the
tables below. Optional env:
  SPEEDRUN_OUT          output root (default "."): logs/<run-id>.txt, logs/<run-id>-samples/, checkpoints/<run-id>/
  SPEEDRUN_CACHE        data preparation kept between runs (default <repo>/cache): the CPU track's teacher and text
  SPEEDRUN_RESUME       "latest" or a run id: continue that run from its last checkpoint (exact next sample and step)
  SPEEDRUN_STEPS_SCALE  multiply every stage's step count (and the warmup, and the FLOP budget) by this factor
  SPEEDRUN_VARIANT      an ablation of the cpu track (VARIANTS: one lever changed); SPEEDRUN_SEED its seed
  SPEEDRUN_RUN_ID, SPEEDRUN_CKPT_EVERY, SPEEDRUN_TIME_CAP_S   override the run id / checkpoint period / wall-clock cap
  SPEEDRUN_KILL_AT      "<step>:TERM" or "<step>:KILL": the process signals itself after that step (fault injection)
  SPEEDRUN_DRY_RUN      a world size (e.g. 32): print the record track's plan at that many GPUs (plan.dry_run), exit
"""

import bisect
import ctypes
import dataclasses
import hashlib
import itertools
import json
import math
import os
import platform
import resource
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

import checkpoint
import data
import eval as evaluation
import losses
import model
import muon as muon_lib
import plan
import record
import scenes
import text

HERE = Path(__file__).resolve().parent

# ======================================================================================================================
# Hyperparameters and the stage tables (the file is the experiment)


@dataclass(frozen=True)
class Stage:
    name: str
    res: int  # training resolution (px, square)
    steps: int
    batch: int  # global batch, fixed whatever the world size: gradient accumulation fills it
    max_micro: int  # largest per-device micro-batch (the log's micro: is the one used)
    p_short: float  # share of samples captioned with the short prompt: 0 = long captions only, 0.5 = mixed
    repa: float  # REPA loss weight; 0 = off (teacher freed, projector out of the optimizer)
    sprint_drop: float  # SPRINT token-drop ratio in the middle blocks: 0 (dense) or 0.75
    path_drop: float  # SPRINT path-drop probability per sample (keeps path-drop guidance usable at sampling)
    lr_mult: tuple  # LR multiplier at the stage's first and last step, linear in between: (1, 0) is the cooldown
    source: str  # data source (data.SOURCES key)
    tread: float = 0.0  # TREAD: share of the tokens routed around the blocks cfg.tread_start:tread_end (0 = off)
    ema_restart: bool = False  # the EMA restarts from the weights at the stage's start (a fine-tune's own average)
    shift: float = 0.0  # > 0: this stage's own fixed time shift (as Track.shift_fixed) instead of the track's rule


@dataclass(frozen=True)
class Track:
    name: str
    preset: str  # model.PRESETS key
    stages: tuple
    text_encoder: str  # text.TextEncoder name or path; "cpu_track" = text.TextEncoder.cpu_track()
    teacher_id: str  # REPA teacher for transformers' from_pretrained; "scenes" = scenes.scene_teacher (CPU, offline)
    shift_base: int  # resolution where the SD3 time shift is 1: a = res / shift_base (sampler uses the same a)
    shift_fixed: float = 0.0  # > 0: PRX Part 3's fixed shift (3.0), its uniform draws unshifted (model.training_time)
    pred: str = "x"  # the network's output: "x" (JiT's x-prediction) or "v" (velocity; same network, same loss)
    irepa: bool = False  # iREPA: a 3x3 conv projector and spatially normalised teacher tokens (model.repa_loss)
    contrastive: float = 0.0  # Contrastive Flow Matching's weight (PRX: 0.05; model.flow_matching_loss)
    dino_loss: float = 0.0  # PRX Part 3's DINO feature loss weight (0.01): the REPA teacher on pooled features
    lpips: float = 0.0  # PRX Part 3's LPIPS weight (0.1; losses.py; needs VGG16 from the hub: record track)
    lr: float = 1e-4  # AdamW lr; Muon reuses it through Moonshot's match_rms_adamw scaling
    warmup: int = 1000  # linear LR warmup steps, then constant
    betas: tuple = (0.9, 0.95)  # PRX baseline AdamW
    adam_eps: float = 1e-8  # not PRX's 1e-15: that turns rounding-level gradients (~1e-12, e.g. the time MLP while
    # adaLN is still ~0) into full +-lr sign steps, so 1 and 8 processes (other summation order) would part ways
    weight_decay: float = 0.0
    momentum: float = 0.95  # Muon
    muon: bool = True  # Muon for the hidden matrices (False: AdamW for every parameter)
    bf16_weights: bool = False  # True: weights rounded to bf16 after every step (PRX's bug; FP32 master weights off)
    ns_dtype: str = "bfloat16"  # Muon's Newton-Schulz precision (bf16 as torch.optim.Muon; CPUs lack fast bf16 matmul)
    clip: float = 0.2  # gradient-norm clip (PRX)
    ema: float = 0.999  # EMA decay, applied every ema_every steps
    ema_every: int = 10
    caption_drop: float = 0.1  # -> the "" embedding, the null condition of CFG
    projector_width: int = 2048  # REPA MLP width
    seed: int = 0
    ckpt_every: int = 2000  # steps between checkpoints (plus every stage end, SIGTERM and the time cap)
    time_cap_s: float = 24 * 3600.0  # the record track's budget; on the CPU track a safety net (3x its reference)
    flop_budget: float = math.nan  # the CPU track's budget: training FLOPs (compute_plan); nan = none (record track)
    peak_flops: float = 989e12  # the step line's mfu: NVIDIA's dense bf16 spec of an H100 SXM; nan = none (CPU)
    workers: int = 8
    sample_steps: int = 50  # sampler steps of the stage-end grids
    text_len: int = 256  # text padded to this many tokens (one compiled shape); 0 = pad to the longest in the batch
    scene_pool: int = 0  # CPU track: train on this many procedural scenes, their captions encoded once before the
    # clock starts (data preparation, cached under <out>/cache); 0 = an endless stream encoded live
    variant: str = "baseline"  # VARIANTS key (ablations in miniature); set by SPEEDRUN_VARIANT


PRX = "prx-data"  # PRX Part 3's three sources, each read once per epoch (data.MIXES): FLUX-Reason-6M, flux_generated,
# midjourney-v6-llava, ~8.6 M images: the 133 M images of the stages below are ~15 epochs (PRX: ~13)
# The 24 h plan (`SPEEDRUN_DRY_RUN=8 python train.py` prints it; =32 for 4 nodes): step counts from measured
# throughput (MEASURED_IMG_S: train.py's loop on one H100) in images / (GPUs x rate) = 3.4 + 10.1 + 4.8 + 2.5 h at
# 8 GPUs, + ~10 min of compilation, checkpoints and grids = 21.0 h: 12 % margin to the 24 h cap (5.2 h at 32 GPUs).
# ASSUMED until measured: linear scaling over GPUs and nodes, the loader keeps up, text comes from the cache, the
# three sources decode as fast as mj-llava did.
RECORD = Track(
    name="record", preset="prx-1.2b-pixel", text_encoder="google/t5gemma-2b-2b-ul2",
    teacher_id="facebook/dinov2-with-registers-base",  # DINOv3 (gated): "facebook/dinov3-vitl16-pretrain-lvd1689m"
    shift_base=256,
    stages=(
        #     name        res    steps   batch max_micro p_short repa sprint_drop path_drop lr_mult     source
        Stage("burn-in",  512,  25_000,  1024, 64,       0.0,    0.5, 0.0,        0.0,      (1.0, 1.0), PRX),
        Stage("main",     512,  80_000,  1024, 64,       0.0,    0.0, 0.0,        0.0,      (1.0, 1.0), PRX),
        Stage("high-res", 1024, 40_000,  512,  32,       0.0,    0.0, 0.75,       0.1,      (1.0, 1.0), PRX),
        Stage("sft",      1024, 10_000,  512,  16,       0.5,    0.0, 0.0,        0.1,      (1.0, 0.0), "sft-mix"),
    ))  # sft-mix: prx-data + 5 % Alchemist (data.MIXES)
# The same four stages in miniature: a 0.65 M-parameter PRX (width 64, 8 px patches, RoPE interpolated to an 8x8
# grid: at this budget 4x the images of the 2.4 M `tiny` beat its width, records/cpu/NOTES.md), procedural scenes,
# 64 px (8x8 tokens) then 96 px (12x12). Its budget is compute, not time: flop_budget training FLOPs (compute_plan;
# ~7 min on a 2-core box); the wall clock is reported, and capped at ~3x that only as a safety net. Why each setting:
# README, "CPU track" (t shift 4x the SD3 rule: flat synthetic scenes keep their layout visible at noise levels where
# photos lose it; RoPE interpolation: raw positions put a 96 px image on angles a few high-res steps cannot learn;
# the 96 px stage dense, not SPRINT: at 144 tokens SPRINT lost at equal clock: records/cpu/ablations-2026-11-27).
CPU = Track(
    name="cpu", preset="cpu", text_encoder="cpu_track", teacher_id="scenes", shift_base=16,
    lr=3e-3, warmup=50, clip=1.0, ema=0.98, ema_every=1, projector_width=256, ckpt_every=100, time_cap_s=1200.0,
    flop_budget=2.0e13,
    peak_flops=float("nan"), workers=0, sample_steps=8, ns_dtype="float32", text_len=0, scene_pool=8192,
    stages=(
        #     name        res  steps batch max_micro p_short repa sprint_drop path_drop lr_mult     source
        Stage("burn-in",  64,  516,  32,   32,       0.0,    0.5, 0.0,        0.0,      (1.0, 1.0), "scenes"),
        Stage("main",     64,  1351, 32,   32,       0.0,    0.0, 0.0,        0.0,      (1.0, 1.0), "scenes"),
        Stage("high-res", 96,  180,  32,   32,       0.0,    0.0, 0.0,        0.0,      (1.0, 1.0), "scenes"),
        Stage("sft",      96,  155,  32,   32,       0.5,    0.0, 0.0,        0.1,      (1.0, 0.0), "scenes",
              shift=1.5),  # its own low shift: more low-noise steps, cleaner flat colours (records/cpu/NOTES.md)
    ))
# The GPU miniature (SPEEDRUN_TRACK=mini; `python -m tools.gpu_mini` trains and scores it): the CPU track's scenes,
# caption pool, teacher and adherence checker on the record track's GPU path (bf16 autocast, compiled blocks, bf16
# Newton-Schulz, SPRINT), 16 px patches at 128 then 256 px (8x8 then 16x16 tokens: the record's grids halved). Sized
# by ESTIMATE, not yet by a run: 2.4e16 planned FLOPs, ~3 min on one H100/H200 if it sustains 150 TFLOP/s.
MINI = dataclasses.replace(
    CPU, name="mini", preset="mini", lr=1e-3, warmup=200, ema=0.995, ns_dtype="bfloat16", flop_budget=math.nan,
    peak_flops=989e12, time_cap_s=900.0, ckpt_every=10**6, workers=8, text_len=48, stages=(
        Stage("burn-in",  128, 600,  256, 256, 0.0, 0.5, 0.0,  0.0, (1.0, 1.0), "scenes"),
        Stage("main",     128, 1800, 256, 256, 0.0, 0.0, 0.0,  0.0, (1.0, 1.0), "scenes"),
        Stage("high-res", 256, 600,  256, 256, 0.0, 0.0, 0.75, 0.1, (1.0, 1.0), "scenes"),
        Stage("sft",      256, 250,  256, 256, 0.5, 0.0, 0.0,  0.1, (1.0, 0.0), "scenes")))
TRACKS = {"record": RECORD, "cpu": CPU, "mini": MINI}
# Ablations in miniature (PRX's table on the CPU track): each variant changes exactly one lever of the CPU track.
# SPEEDRUN_VARIANT=<name> picks one; `python ablate.py` trains and scores them all. Rows: Track fields, then Stage
# fields per stage index. Every variant spends the baseline's planned FLOPs (fit_budget: the main stage's steps take up
# the difference); sprint-hires trains the record track's SPRINT stage, as many sparse steps as the dense ones cost.
CPU_CFG = model.PRESETS[CPU.preset]
VARIANTS = {
    "baseline": ({}, {}),
    "no-repa": ({}, {0: {"repa": 0.0}}),  # the burn-in trains without REPA
    "repa-always": ({}, {k: {"repa": 0.5} for k in (1, 2, 3)}),  # REPA kept on to the end
    "adamw-only": ({"muon": False}, {}),  # AdamW for every parameter
    "short-captions": ({}, {k: {"p_short": 1.0} for k in range(4)}),  # short captions throughout
    "long-only": ({}, {3: {"p_short": 0.0}}),  # no mixed long/short fine-tune
    "sprint-hires": ({}, {2: {"sprint_drop": 0.75, "path_drop": 0.1, "steps": round(  # ~32 text tokens
        CPU.stages[2].steps * model.train_flops(CPU_CFG, 96, 32) / model.train_flops(CPU_CFG, 96, 32, 0.75))}}),
    "bf16-weights": ({"bf16_weights": True}, {}),  # weights stored in bf16
    "tread": ({}, {k: {"tread": 0.5} for k in range(4)}),  # TREAD routing (50 % of tokens) in every stage
    "irepa": ({"irepa": True}, {}),  # iREPA's conv projector and spatial normalisation in the burn-in
    "contrastive-fm": ({"contrastive": 0.05}, {}),  # Contrastive Flow Matching, PRX's weight
    "v-pred": ({"pred": "v"}, {}),  # v-prediction instead of JiT's x-prediction
    "dino-loss": ({"dino_loss": 0.01}, {}),  # PRX Part 3's DINO feature loss (the scene teacher), every stage
    "ema-restart": ({}, {3: {"ema_restart": True}}),  # the fine-tune's EMA starts from the fine-tune's first weights
    "prx-shift": ({"shift_fixed": 3.0}, {3: {"shift": 0.0}}),  # PRX's fixed time shift 3.0 in every stage
    "sft-shift-rule": ({}, {3: {"shift": 0.0}}),  # the fine-tune at the track's resolution rule (6), not at 1.5
}


def apply_variant(tr: Track, name: str) -> Track:
    fields, per_stage = VARIANTS[name]
    stages = tuple(dataclasses.replace(s, **per_stage.get(k, {})) for k, s in enumerate(tr.stages))
    return dataclasses.replace(tr, stages=stages, variant=name, **fields)


def env_value(env, key, kind, default, choices=None, minimum=None):
    """One environment setting, or a one-line error naming the bad value and what is valid (no traceback)."""
    raw = env.get(key) or default
    if choices is not None and raw not in choices:
        raise SystemExit(f"train.py: {key}={raw!r} is not one of: {', '.join(choices)}")
    try:
        value = kind(raw)
    except ValueError:
        raise SystemExit(f"train.py: {key}={raw!r} is not a valid {kind.__name__}") from None
    if minimum is not None and not value >= minimum:  # also refuses nan
        raise SystemExit(f"train.py: {key}={raw!r} must be >= {minimum}")
    return value


def select_track(env=os.environ) -> Track:
    name = env_value(env, "SPEEDRUN_TRACK", str, "record" if torch.cuda.is_available() else "cpu", TRACKS)
    tr = TRACKS[name]
    variant = env_value(env, "SPEEDRUN_VARIANT", str, "baseline", VARIANTS)
    if variant != "baseline":
        if name != "cpu":
            raise SystemExit(f"train.py: SPEEDRUN_VARIANT={variant!r} is for the cpu track (ablations in miniature)")
        tr = apply_variant(tr, variant)
    scale = env_value(env, "SPEEDRUN_STEPS_SCALE", float, "1", minimum=1e-9)
    if scale != 1:
        stages = tuple(dataclasses.replace(s, steps=max(1, round(s.steps * scale))) for s in tr.stages)
        most = max(a.steps / b.steps for a, b in zip(stages, tr.stages))  # the budget scales too (rounding: upwards)
        tr = dataclasses.replace(tr, warmup=max(1, round(tr.warmup * scale)), flop_budget=tr.flop_budget * most,
                                 stages=stages)
    ov = {k: env_value(env, v, t, None, minimum=m) for k, v, t, m in (
        ("ckpt_every", "SPEEDRUN_CKPT_EVERY", int, 1), ("time_cap_s", "SPEEDRUN_TIME_CAP_S", float, 0),
        ("seed", "SPEEDRUN_SEED", int, 0)) if env.get(v)}
    return dataclasses.replace(tr, **ov)


def stage_ends(tr: Track) -> list[int]:
    """The step count at the end of each stage (the one place stage boundaries are computed)."""
    return list(itertools.accumulate(s.steps for s in tr.stages))


def stage_at(tr: Track, step: int) -> int:
    """Index of the stage that trains step `step` (0-based); len(stages) once the run is over."""
    return bisect.bisect_right(stage_ends(tr), step)


def lr_at(tr: Track, step: int) -> float:
    """Linear warmup, then each stage's multiplier line (constant, or the linear cooldown to 0 of the last stage)."""
    k = min(stage_at(tr, step), len(tr.stages) - 1)
    s0 = stage_ends(tr)[k] - tr.stages[k].steps
    a, b = tr.stages[k].lr_mult
    frac = min(1.0, (step - s0) / max(1, tr.stages[k].steps - 1))  # the stage's last step runs at its end value
    return tr.lr * min(1.0, (step + 1) / tr.warmup) * (a + (b - a) * frac)


# ======================================================================================================================
# World-size invariance: every random draw of a sample comes from (seed, step, global sample index)


def sample_key(seed: int, step: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{index}".encode()).digest()[:8], "little") >> 1


class Draws(NamedTuple):
    t: torch.Tensor  # [B] timesteps
    eps: torch.Tensor  # [B, 3, res, res] noise
    drop: list  # [B] bool: caption dropped to ""
    path_drop: torch.Tensor | None  # [B] bool: SPRINT path-drop (None when the stage has none)
    keep: torch.Tensor | None  # [B, Nk] SPRINT's or TREAD's kept token indices (None when dense)


def fixed_shift(tr: Track, st: Stage) -> float:
    """The fixed time shift a stage trains and samples its grids at: its own, else the track's; 0 = the SD3 rule."""
    return st.shift or tr.shift_fixed


def draw_samples(run, index, step) -> Draws:
    """Timesteps, noise, caption/path drops and SPRINT / TREAD kept indices of one micro-batch, one torch.Generator per
    sample seeded from its global index: 1, 2, 4 or 8 processes (any micro-batch split) draw the same numbers."""
    st, dev = run.stage, run.device
    gh = st.res // run.cfg.patch
    a = st.res / run.tr.shift_base  # SD3 resolution shift a = sqrt(pixels) ratio
    t, cap, pd, keep, eps = [], [], [], [], []
    for i in index.tolist():
        key = sample_key(run.tr.seed, step, i)
        g = torch.Generator().manual_seed(key)
        u, z = torch.rand(4, generator=g), torch.randn(1, generator=g)
        t.append(model.training_time(u[:2], z, a, fixed_shift(run.tr, st)))
        cap.append(bool(u[2] < run.tr.caption_drop))
        pd.append(bool(u[3] < st.path_drop))
        if st.sprint_drop or st.tread:
            keep.append(model.tread_keep_indices(1, gh * gh, st.tread, generator=g) if st.tread else
                        model.sprint_keep_indices(1, gh, gh, generator=g))
        gd = torch.Generator(dev).manual_seed(key ^ 1)
        eps.append(torch.randn(3, st.res, st.res, generator=gd, device=dev))
    return Draws(torch.tensor(t, device=dev), torch.stack(eps), cap,
                 torch.tensor(pd, device=dev) if st.path_drop else None, torch.cat(keep).to(dev) if keep else None)


# ======================================================================================================================
# Setup: processes, model, optimizers, EMA, stages


@dataclass
class Run:
    """Everything a run holds, declared once. setup() fills the first block; the second changes as it trains."""
    tr: Track  # hyperparameters and stage table
    out: Path  # output root: logs/<id>.txt, logs/<id>-samples/, checkpoints/<id>/
    cache: Path  # data preparation kept between runs (the CPU track's scene teacher and caption cache)
    id: str = ""  # run id
    rank: int = 0
    world: int = 1
    device: torch.device | None = None
    amp: torch.dtype | None = None  # bf16 autocast on CUDA; None: FP32 throughout (CPU)
    peak_measured: float = math.nan  # this card's bf16 matmul FLOP/s (the step line's mfu_measured)
    enc: object = None  # frozen text encoder (text.TextEncoder)
    cfg: object = None  # model.PRXConfig
    model: nn.Module = None  # FP32 master weights
    ema: nn.Module = None  # EMA of the weights (what is sampled and evaluated)
    adamw: torch.optim.Optimizer = None
    muon: torch.optim.Optimizer | None = None  # None for the adamw-only ablation
    teacher_path: str = ""  # where the REPA teacher is loaded from
    scene_text: Path | None = None  # CPU track: the caption cache of its scene pool
    lock: object = None  # rank 0: the open run-directory lock file
    logf: object = None  # rank 0: the open log file
    # changes while the run trains
    step: int = 0  # optimizer steps done
    k: int = 0  # index of the current stage
    stage: Stage | None = None
    loader: object = None  # data.Loader of the current stage
    batches: object = None  # its iterator (made at the stage's first batch, after a resume has set the position)
    micro: int = 0  # per-device micro-batch of the current stage
    accum: int = 1  # micro-batches per step
    teacher: nn.Module | None = None  # the frozen REPA teacher, while REPA is on
    projector: nn.Module | None = None  # the REPA projector (AdamW group "repa"), while REPA is on
    critics: dict = dataclasses.field(default_factory=dict)  # frozen nets of the perceptual losses: "dino", "lpips"
    t0: float = 0.0  # wall clock at this process's start of training
    elapsed0: float = 0.0  # training clock carried over from the checkpoint resumed
    flags: dict = dataclasses.field(default_factory=dict)  # set by the SIGTERM handler
    writer: checkpoint.Writer | None = None  # the checkpoint write in flight (rank 0 writes)
    ns_flops: float = 0.0  # Muon's Newton-Schulz FLOPs per step (every matrix once, whatever the world size)
    aux_flops: float = 0.0  # REPA's and the perceptual losses' FLOPs per sample in the current stage (aux_flops)
    flops: float = 0.0  # training FLOPs so far (the log's running total; the CPU track's budget counts these)
    text_max: int = 0  # the most text tokens a batch can carry (text_bound): the plan's upper bound


def init_process(env=os.environ, track=None) -> Run:
    """A Run with its process settled: the track, torchrun's process group, the device; checks that cost nothing."""
    run = Run(tr=track or select_track(env), out=Path(env.get("SPEEDRUN_OUT", ".")).resolve(), t0=time.time(),
              cache=Path(env.get("SPEEDRUN_CACHE", HERE / "cache")).resolve())
    missing = data.missing_sources(sorted({st.source for st in run.tr.stages} - {"scenes"}))
    if missing:  # now, not at the stage that reads it hours later
        raise SystemExit(f"train.py: no data for source(s) {', '.join(missing)} under {data.DATA_ROOT}: run "
                         f"`python prepare.py --sources {' '.join(missing)}` first (README, Data)")
    run.writer = checkpoint.Writer(log=lambda line: log(run, line))
    if "TORCHELASTIC_RUN_ID" in env and sys.platform == "linux":  # a torchrun worker must not outlive its launcher
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM (save, exit) when the parent dies
        if os.getppid() == 1:  # the launcher died before the call above
            os.kill(os.getpid(), signal.SIGTERM)
    run.rank, run.world, local = evaluation.init_distributed(env)
    for st in run.tr.stages:  # every stage's global batch splits over this world size, or one line now
        plan.micro_batching(st, run.world)
    cuda = torch.cuda.is_available() and run.tr.name != "cpu"
    run.device = torch.device("cuda", local) if cuda else torch.device("cpu")
    torch.set_flush_denormal(True)  # CPU: denormal values appearing after some steps slow matmuls up to ~50x
    if cuda:
        torch.cuda.set_device(run.device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    run.amp = torch.bfloat16 if cuda else None  # FP32 master weights; bf16 only inside autocast
    return run


def setup(env=os.environ, track=None, run=None) -> Run:
    """The minutes before the first step: text encoder, model, EMA, optimizers, the FLOP plan, data preparation."""
    run = run or init_process(env, track)
    cuda = run.device.type == "cuda"
    if cuda:
        run.peak_measured = plan.peak_matmul_flops(run.device)  # this card's bf16 matmul peak, beside the spec's
    run.enc = text.TextEncoder.from_name(run.tr.text_encoder, run.device)
    run.cfg = dataclasses.replace(model.PRESETS[run.tr.preset], text_dim=run.enc.dim, pred=run.tr.pred)
    torch.manual_seed(run.tr.seed)  # every rank builds the same initial weights
    run.model = model.PRX(run.cfg).to(run.device)
    run.ema = model.PRX(run.cfg).to(run.device).eval().requires_grad_(False)  # EMA of the weights, FP32
    run.ema.load_state_dict(run.model.state_dict())
    if cuda:  # regional compilation: the 16 blocks share one compiled code object, compiled once per stage shape
        for blk in run.model.blocks:
            blk.compile()
    tr = run.tr
    adamw_params = run.model.adamw_params() + ([] if tr.muon else run.model.muon_params())
    run.adamw = torch.optim.AdamW([{"params": adamw_params, "name": "model"}], lr=tr.lr, betas=tr.betas,
                                  eps=tr.adam_eps, weight_decay=tr.weight_decay, fused=cuda or None)
    run.muon = muon_lib.Muon(run.model.muon_params(), lr=tr.lr, weight_decay=tr.weight_decay, momentum=tr.momentum,
                    rank=run.rank, world=run.world, ns_dtype=getattr(torch, tr.ns_dtype)) if tr.muon else None
    run.teacher_path = tr.teacher_id
    run.ns_flops, run.text_max = plan.muon_step_flops(run, tr), plan.text_bound(run)
    if tr.variant != "baseline" and math.isfinite(tr.flop_budget):  # an ablation spends the baseline's compute
        base = select_track(dict(env, SPEEDRUN_VARIANT="baseline"))
        run.tr = tr = plan.fit_budget(tr, plan.compute_plan(run), sum(plan.compute_plan(run, base)))
    plan.check_budget(run, plan.compute_plan(run))  # before the data preparation's minutes
    if tr.scene_pool:  # the CPU track's data preparation (caption cache, REPA teacher), outside the clock, cached
        repa = [s.res for s in tr.stages if s.repa]
        grid = repa[0] // run.cfg.patch if repa and tr.teacher_id == "scenes" else 0  # the burn-in's token grid
        scenes.cpu_track_data(run.cache, tr.seed, tr.scene_pool, run.enc, grid, run.rank, run.world)
        if run.world > 1:
            dist.barrier()
        run.scene_text, teacher = scenes.cpu_track_paths(run.cache, tr.seed, tr.scene_pool, run.enc.name, grid)
        run.teacher_path = str(teacher) if teacher else tr.teacher_id
    if run.tr.lpips and run.rank == 0:  # the lpips wheel's weights, downloaded once into the cache
        losses.fetch_lin_weights(run.cache)
    if run.tr.lpips and run.world > 1:
        dist.barrier()
    run.critics = losses.load_critics(run.tr.dino_loss, run.tr.lpips, run.teacher_path, run.cache, run.device)
    return run


def repa_on(run, st):
    """REPA's burn-in (Yu et al. 2024): the frozen teacher loaded, a trainable projector in AdamW's group "repa"."""
    from transformers import AutoModel
    tr = run.tr
    run.teacher = AutoModel.from_pretrained(run.teacher_path).to(run.device).eval().requires_grad_(False)
    d_teacher = run.teacher.config.hidden_size
    run.projector = losses.make_projector(run.cfg.hidden, tr.projector_width, d_teacher, tr.seed + 1, tr.irepa)
    run.projector.to(run.device)
    run.adamw.add_param_group({"params": list(run.projector.parameters()), "name": "repa"})
    note = " (trained once on the procedural scenes: scenes.scene_teacher)" if tr.teacher_id == "scenes" else ""
    log(run, f"repa: teacher {run.teacher_path}{note} d_teacher:{d_teacher} weight:{st.repa} "
             f"block:{run.cfg.repa_block}{' iREPA' if tr.irepa else ''}")


def drop_param_group(opt, name):
    """Remove AdamW's param group `name` and the state of its parameters (the optimizer no longer sees them)."""
    for g in [g for g in opt.param_groups if g.get("name") == name]:
        for p in g["params"]:
            opt.state.pop(p, None)
    opt.param_groups = [g for g in opt.param_groups if g.get("name") != name]


def repa_off(run):
    """HASTE: REPA helps early, then constrains; the teacher and projector leave with their cost."""
    drop_param_group(run.adamw, "repa")
    run.teacher = run.projector = None
    if run.device.type == "cuda":
        torch.cuda.empty_cache()
    log(run, "repa: off; teacher freed, projector removed from the optimizer")


def stage_loader(run, k, st):
    """Stage k's data: the previous loader's workers ended (with its data report), the new one at this rank's share,
    reading the caption cache when one exists (`python prepare.py --cache`; the CPU track's is built in setup)."""
    if run.loader is not None:
        run.loader.close()
        sd = run.loader.state_dict()
        log(run, f"data: rows skipped (bad) {sd['skipped']}, long caption missing or failed (short used) "
                 f"{sd['caption_fallbacks']}, shards skipped {sd['bad_files']}")
    source, cache = st.source, data.text_cache_dir(st.source) if st.source != "scenes" else None
    if st.source == "scenes" and run.tr.scene_pool:  # the pool and its caption cache, built in setup
        source, cache = scenes.SceneDataset(run.tr.seed, run.tr.scene_pool), run.scene_text
    run.micro, run.accum = plan.micro_batching(st, run.world)
    run.loader = data.make_loader(source, st.res, run.micro, run.rank, run.world, run.tr.seed * 1000 + k,
                                  st.p_short, run.tr.workers, cache_dir=cache)
    run.batches = None
    return cache


def enter_stage(run, k):
    """Switch to stage k: REPA on or off as the stage table says, the EMA restarted if asked, its data loader."""
    st = run.tr.stages[k]
    run.k, run.stage, run.aux_flops = k, st, plan.aux_flops(run, st)
    if st.repa and run.teacher is None:
        repa_on(run, st)
    if not st.repa and run.teacher is not None:
        repa_off(run)
    if st.ema_restart and run.step == stage_ends(run.tr)[k] - st.steps:  # not on a resume inside the stage
        run.ema.load_state_dict(run.model.state_dict())
        log(run, "ema: restarted from the weights at the stage's start")
    cache = stage_loader(run, k, st)
    log(run, f"stage:{k + 1} name:{st.name} res:{st.res} steps:{st.steps} batch:{st.batch} micro:{run.micro} "
             f"accum:{run.accum} p_short:{st.p_short} repa:{st.repa or 'off'} sprint_drop:{st.sprint_drop} "
             f"path_drop:{st.path_drop} lr_mult:{st.lr_mult[0]}->{st.lr_mult[1]} source:{st.source} "
             f"text:{'cache' if cache else 'live'}", console=True)


# ======================================================================================================================
# The training step


def next_batch(run):
    if run.batches is None:
        run.batches = iter(run.loader)
    try:
        return next(run.batches)
    except StopIteration:  # a finite loader: start its next epoch
        run.batches = iter(run.loader)
        return next(run.batches)


def sync_grads(run, params):
    """Manual all-reduce after accumulation (modded-nanogpt) rather than DDP: exact (the summed gradient of the global
    batch), no find_unused_parameters for the stage-dependent parameters (REPA projector, SPRINT fusion), one
    reduction per step whatever the accumulation. A parameter unused on every rank keeps grad None (optimizers skip
    it); one unused on some ranks only is zero-filled there, so that all ranks reduce the same tensors."""
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=run.device)
    if run.world > 1:
        dist.all_reduce(used, op=dist.ReduceOp.MAX)
    live = [p for p, u in zip(params, used.tolist()) if u]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if run.world > 1:  # one flat all-reduce per bucket of <= 64M values, not one per tensor (~100 small ones)
        bucket, size = [], 0
        for p in live + [None]:
            if bucket and (p is None or size + p.numel() > 2**26):
                flat = torch.cat([q.grad.flatten() for q in bucket])
                dist.all_reduce(flat)
                for q, g in zip(bucket, flat.split([q.numel() for q in bucket])):
                    q.grad.copy_(g.view_as(q.grad))
                bucket, size = [], 0
            if p is not None:
                bucket.append(p)
                size += p.numel()
    return live


def train_step(run):
    """One optimizer step over the global batch: accumulate, all-reduce, clip, AdamW + Muon, EMA."""
    st, step = run.stage, run.step
    G = st.batch  # the global batch
    params = list(run.model.parameters()) + (list(run.projector.parameters()) if run.projector else [])
    fm_sum = repa_sum = aux_sum = served = torch.zeros((), device=run.device)
    txt_len, flops, tr = 0, 0.0, run.tr
    for _ in range(run.accum):
        batch = next_batch(run)
        if len(batch["index"]) == 0:  # every row of this micro-batch was bad (skipped and counted by data.py)
            continue
        x0 = batch["image"].to(run.device, non_blocking=True).float().div(127.5).sub(1)
        d = draw_samples(run, batch["index"], step)
        txt, mask = run.enc.condition(batch, d.drop, run.device, run.tr.text_len)
        with torch.autocast(run.device.type, dtype=run.amp or torch.bfloat16, enabled=run.amp is not None):
            out = model.flow_matching_loss(run.model, x0, d.eps, d.t, txt, mask, None if st.tread else d.keep,
                                           d.path_drop, bool(st.repa), d.keep if st.tread else None, tr.contrastive)
            aux = losses.aux_losses(out, x0, run.critics, run.tr, st.res // run.cfg.patch)
            loss = out.fm.sum() + aux.sum()
            if st.repa:
                y = losses.teacher_tokens(run.teacher, x0, st.res // run.cfg.patch)
                rl = losses.repa_loss(run.projector, out.h, y, out.kept, tr.irepa)
                loss = loss + st.repa * rl.sum()
                repa_sum = repa_sum + rl.detach().sum()
        (loss / G).backward()  # sum over the global batch / G = the global mean, whatever the split
        fm_sum, aux_sum = fm_sum + out.fm.detach().sum(), aux_sum + aux.detach().sum()
        served = served + len(out.fm)
        txt_len = txt.shape[1]
        flops += len(out.fm) * (model.train_flops(run.cfg, st.res, txt_len, st.sprint_drop, st.tread) + run.aux_flops)
    stop = float(stop_reason(run) is not None)  # decided by every rank, agreed on in the all-reduce below
    stats = torch.stack([fm_sum, repa_sum, aux_sum, served, torch.tensor(stop, device=run.device)]).double()
    stats = torch.cat([stats, torch.tensor([flops], dtype=torch.float64, device=run.device)])  # float64: exact sums
    if run.world > 1:
        dist.all_reduce(stats)
    fm_sum, repa_sum, aux_sum, n, stop, flops = stats.tolist()
    run.flops += flops + run.ns_flops
    n = max(n, 1.0)
    loss = fm_sum / n
    repa = repa_sum / n
    if not (math.isfinite(loss) and math.isfinite(repa)):
        raise FloatingPointError(f"non-finite loss at step {step + 1} (loss {loss}, repa {repa})")
    live = sync_grads(run, params)
    if n != G:  # skipped bad rows: the mean over the samples actually served
        torch._foreach_mul_([p.grad for p in live], G / n)
    gnorm = torch.nn.utils.clip_grad_norm_(live, run.tr.clip).item()
    lr = lr_at(run.tr, step)
    for opt in filter(None, (run.adamw, run.muon)):
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        opt.zero_grad(set_to_none=True)
    if run.tr.bf16_weights:  # the ablation of FP32 master weights: updates below bf16's resolution are lost
        with torch.no_grad():
            for p in params:
                p.copy_(p.to(torch.bfloat16))
    run.step += 1
    if run.step % run.tr.ema_every == 0:  # EMA of the FP32 weights (the only buffer, the SPRINT mask token, is fixed)
        torch._foreach_lerp_(list(run.ema.parameters()), list(run.model.parameters()), 1 - run.tr.ema)
    return {"loss": loss, "repa": repa if st.repa else None, "lr": lr, "gnorm": gnorm, "stop": stop > 0,
            "txt_len": txt_len, "aux": aux_sum / n if tr.contrastive or run.critics else None}


# ======================================================================================================================
# Logging: the log is the record (sources + hashes, environment, one greppable line per step)


def log(run, line, console=False):
    if run.rank == 0:
        if run.logf:
            run.logf.write(line + "\n")
            run.logf.flush()
        if console:
            tqdm.write(line)


def write_header(run):
    if run.rank != 0:
        return
    record.write_sources(run.logf, run.tr)  # the code as run, the commit, the data (record.py: the log format)
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    log(run, f"python:{platform.python_version()} torch:{torch.__version__} cuda:{torch.version.cuda} "
             f"gpus:{','.join(gpus) or 'none'} world:{run.world} device:{run.device.type} "
             f"threads:{torch.get_num_threads()} host_cpus:{os.cpu_count()}")
    n = sum(p.numel() for p in run.model.parameters())
    log(run, f"track:{run.tr.name} variant:{run.tr.variant} run:{run.id} model:{run.tr.preset} params:{n} "
             f"text_encoder:{run.tr.text_encoder} (dim {run.enc.dim}) teacher:{run.tr.teacher_id} "
             f"time_cap_s:{run.tr.time_cap_s:.0f}", console=True)
    measured = (f"measured {run.peak_measured / 1e12:.0f} TFLOP/s (bf16 8192^3 matmul on this card; mfu_measured)"
                if math.isfinite(run.peak_measured) else "not measured (no CUDA)")
    spec = run.tr.peak_flops / 1e12
    log(run, f"peak: spec {spec:.0f} TFLOP/s (H100 SXM dense bf16; the step line's mfu), {measured}")
    log(run, f"machine: {json.dumps(record.machine())}")
    log(run, f"hyper: {dataclasses.replace(run.tr, stages=())}")
    flops = plan.compute_plan(run)
    for k, st in enumerate(run.tr.stages):
        log(run, f"plan: stage {k + 1} {st} flops<={flops[k]:.4e}")
    log(run, f"compute: planned <= {sum(flops):.4e} training FLOPs, budget {run.tr.flop_budget:.4e}", console=True)


def step_line(run, m, dt):
    st, G = run.stage, run.stage.batch
    flops = G * model.train_flops(run.cfg, st.res, m["txt_len"], st.sprint_drop, st.tread)
    mfu = flops / (dt * run.world * run.tr.peak_flops)  # against the spec's peak (header line "peak:")
    meas = flops / (dt * run.world * run.peak_measured)  # against this card's measured matmul peak
    mem = (torch.cuda.max_memory_allocated() if run.device.type == "cuda" else
           resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 1e9
    repa = f" repa:{m['repa']:.4f}" if m["repa"] is not None else ""
    repa += f" aux:{m['aux']:.4f}" if m["aux"] is not None else ""
    seen = sum(s.batch * min(s.steps, max(0, run.step - end + s.steps))  # images trained on so far
               for s, end in zip(run.tr.stages, stage_ends(run.tr)))
    return (f"step:{run.step}/{stage_ends(run.tr)[-1]} stage:{run.k + 1} loss:{m['loss']:.4f}{repa} lr:{m['lr']:.1e} "
            f"gnorm:{m['gnorm']:.2f} ms:{dt * 1e3:.0f} img/s:{G / dt:.1f} mfu:{mfu:.3f}"
            f"{f' mfu_measured:{meas:.3f}' if math.isfinite(meas) else ''} mem_gb:{mem:.1f} seen:{seen} "
            f"flops:{run.flops:.4e}")


def binned_val_loss(run):
    """The EMA weights' validation loss binned by t (eval.binned_val_loss) on the stage's held-out batch, logged."""
    st = run.stage
    images, captions = data.validation_batch(st.source, st.res, evaluation.VAL_N)
    txt, mask = run.enc.condition({"caption": captions}, [False] * len(captions), run.device, run.tr.text_len)
    bins = evaluation.binned_val_loss(run.ema, images, txt, mask, run.micro, run.tr.seed + 7, run.amp is not None)
    log(run, f"val_loss: stage:{run.k + 1} res:{st.res} " + " ".join(f"t{t}:{v:.4f}" for t, v in bins.items()) +
        f" mean:{sum(bins.values()) / len(bins):.4f}", console=True)


def stage_grid(run):
    """Fixed-prompt grid of the EMA weights at the stage's resolution (the sampler of model.py, via eval.py)."""
    path = run.out / "logs" / f"{run.id}-samples" / f"stage{run.k + 1}-{run.stage.name}.png"
    evaluation.sample_grid(run.ema, run.enc, evaluation.grid_prompts(run.tr.name), run.stage.res, str(path),
                           steps=run.tr.sample_steps,
                           shift=fixed_shift(run.tr, run.stage) or run.stage.res / run.tr.shift_base)
    log(run, f"sample_grid:{path}", console=True)


# ======================================================================================================================
# Main loop


def maybe_kill(run, kill_at):
    """SPEEDRUN_KILL_AT="<step>:TERM|KILL": deterministic fault injection after that step (a write in flight lands)."""
    if kill_at and int(kill_at.split(":")[0]) == run.step:
        run.writer.wait()
        os.kill(os.getpid(), getattr(signal, "SIG" + kill_at.split(":")[1]))


def stop_reason(run) -> str | None:
    """Why the run must stop early, or None: SIGTERM (preemption: save and exit 0), or the wall-clock cap (on the CPU
    track a safety net: save, and exit 3)."""
    if run.flags:
        return "SIGTERM"
    if time.time() - run.t0 + run.elapsed0 >= run.tr.time_cap_s:
        return f"wall-clock cap {run.tr.time_cap_s:.0f} s reached: the run is incomplete and not a valid record"
    return None


def train_stage(run, end, bar, kill_at):
    """Optimizer steps until step `end` (the stage's last), periodic checkpoints between; returns why the run must
    stop early (SIGTERM, the wall-clock cap) or None."""
    while run.step < end:
        t_step = time.perf_counter()
        m = train_step(run)
        line = step_line(run, m, time.perf_counter() - t_step)
        log(run, line)
        bar.update(1)
        bar.set_postfix_str(line.split(" ", 2)[2][:60])
        if run.step % run.tr.ckpt_every == 0 and run.step < end:
            checkpoint.save(run, "periodic", log)
        if m["stop"]:
            return stop_reason(run) or "another rank stopped"
        if run.step < end:
            maybe_kill(run, kill_at)
    return None


def settle_run_id(run, env) -> str:
    """The run's id: the one a resume names, SPEEDRUN_RUN_ID, or a new one that every rank agrees on."""
    rid = checkpoint.resume_id(env) or env.get("SPEEDRUN_RUN_ID")
    box = [rid or f"{run.tr.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"]
    if rid is None and run.world > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def start_or_resume(run, ckpt, contents):
    """The log opened; a new run writes its header, a resume restores everything in one place: weights, EMA, step,
    clock and RNG, then the stage it continues with its data position, projector and optimizer states."""
    if run.rank == 0:
        (run.out / "logs").mkdir(parents=True, exist_ok=True)
        run.logf = open(run.out / "logs" / f"{run.id}.txt", "a")  # noqa: SIM115 (open for the whole run)
    run.t0 = time.time()
    if ckpt is None:
        return write_header(run)
    log(run, f"resume: {record.source_hashes()}")
    state = checkpoint.restore_weights(run, contents)
    log(run, f"resumed from {ckpt} at step:{run.step} elapsed_s:{run.elapsed0:.1f}", console=True)
    if run.step < stage_ends(run.tr)[-1]:
        enter_stage(run, stage_at(run.tr, run.step))
        checkpoint.restore_stage(run, state)


def end_of_stage(run, k, why, kill_at) -> int | None:
    """After stage k's steps: its grid, validation loss and checkpoint when complete; the exit code if the run stops
    here (SIGTERM: 0, an expected stop; the wall-clock cap: 3), else None."""
    if run.step == stage_ends(run.tr)[k]:
        if run.rank == 0:
            stage_grid(run)
            binned_val_loss(run)
        checkpoint.save(run, f"end of stage {k + 1}", log)
        maybe_kill(run, kill_at)
    if why and run.step < stage_ends(run.tr)[-1]:
        checkpoint.save(run, why, log)
        log(run, f"STOP: {why}; saved at step {run.step}; resume with SPEEDRUN_RESUME={run.id}", console=True)
        return 0 if run.flags else 3
    return None


def finish(run, bar, code) -> int:
    """Nothing is lost: the last write lands, the loader's workers end, `done:` is logged, the lock is freed."""
    bar.close()
    run.writer.wait()
    if run.loader is not None:
        run.loader.close()
    if run.step >= stage_ends(run.tr)[-1]:
        wall = time.time() - run.t0 + run.elapsed0
        log(run, f"done: track:{run.tr.name} steps:{run.step} wall_s:{wall:.1f} flops:{run.flops:.6e} (the clock "
                 f"covers everything after setup: data, teacher, sample grids, checkpoints)", console=True)
    if run.rank == 0:
        run.logf.close()
        run.lock.close()  # the run directory is free again (a process's exit frees it too)
    if run.world > 1:
        dist.destroy_process_group()
    return code


def main(env=os.environ):
    if env.get("SPEEDRUN_DRY_RUN"):  # the record track's plan at a world size, no training
        tr = select_track(dict(env, SPEEDRUN_TRACK=env.get("SPEEDRUN_TRACK") or "record"))
        if tr.name != "record":
            raise SystemExit("train.py: SPEEDRUN_DRY_RUN plans the record track (its stages at a number of GPUs)")
        return plan.dry_run(tr, env_value(env, "SPEEDRUN_DRY_RUN", int, "8", minimum=1))
    run = init_process(env)
    run.id = settle_run_id(run, env)
    run.lock = checkpoint.lock_run(run.out, run.id, run.rank)  # before the minutes of setup: one run per folder
    resume = checkpoint.find_resume_checkpoint(run.out, run.id) if env.get("SPEEDRUN_RESUME") else (None, None)
    setup(env, run=run)
    start_or_resume(run, *resume)
    signal.signal(signal.SIGTERM, lambda *_: run.flags.update(sigterm=True))  # SIGTERM: save, then exit cleanly
    kill_at, code = env.get("SPEEDRUN_KILL_AT", ""), None
    bar = tqdm(total=stage_ends(run.tr)[-1], initial=run.step, disable=run.rank != 0, desc=f"{run.tr.name} track",
               dynamic_ncols=True)
    for k in range(stage_at(run.tr, run.step), len(run.tr.stages)):  # the spine: stage by stage
        if run.stage is None or run.k != k:  # (a resume entered its stage already)
            enter_stage(run, k)
        try:
            code = end_of_stage(run, k, train_stage(run, stage_ends(run.tr)[k], bar, kill_at), kill_at)
        except FloatingPointError as e:
            last = checkpoint.latest_checkpoint(checkpoint.checkpoint_dir(run.out, run.id))
            log(run, f"STOP: {e}; the run stops here, last good checkpoint: {last}", console=True)
            code = 1
        if code is not None:
            break
    return finish(run, bar, code or 0)


if __name__ == "__main__":
    try:
        code = main()
    except checkpoint.CheckpointError as e:  # e.g. a full disk: one line naming the previous checkpoint (logged)
        print(f"train.py: STOP: {e}", file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is written and closed (log, last checkpoint, loader workers, process group): skip the interpreter's
    # teardown of CUDA state, pinned buffers and compiled-code caches, which took 7-13 s after `done:` on a GPU.
    os._exit(code)
