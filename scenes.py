"""scenes.py: the CPU track's world: procedural coloured shapes on plain backgrounds, their long and short captions,
the prompt-adherence checker of the evaluation, and the REPA teacher trained on them once (data preparation). It
stands in for the hub datasets so that the whole pipeline trains and is scored on a laptop, offline.
"""
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import text

# ======================================================================================================================
# Scenes: what they hold, their captions, the seeded generator


COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 215, 50),
           "white": (245, 245, 245)}
BACKGROUNDS = {"black": (15, 15, 15), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.25, "large": 0.42}  # half-extent as a fraction of a grid cell
CELLS = ("top left", "top", "top right", "left", "centre", "right", "bottom left", "bottom", "bottom right")
HELDOUT_PAIRS = {("green", "circle"), ("yellow", "square"), ("red", "triangle")}  # never produced for training


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple  # of (colour, shape, size, cell index in the 3x3 grid); colours are distinct in a scene

    @property
    def long_caption(self):
        parts = [f"a {s} {c} {sh} {'in the' if CELLS[k] == 'centre' else 'at the'} {CELLS[k]}"
                 for c, sh, s, k in self.objects]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        return f"{body[0].upper()}{body[1:]}, on a plain {self.background} background."

    @property
    def short_caption(self):
        return ", ".join(f"{c} {sh}" for c, sh, _, _ in self.objects)


def _random_scene(rng, allow):
    n = int(rng.integers(1, 4))
    cells, cols = rng.choice(9, n, replace=False), rng.choice(len(COLOURS), n, replace=False)
    objs = []
    for k, ci in zip(cells, cols):
        colour = list(COLOURS)[ci]
        shapes = [s for s in SHAPES if allow((colour, s))]
        objs.append((colour, shapes[int(rng.integers(len(shapes)))], list(SIZES)[int(rng.integers(2))], int(k)))
    return Scene(list(BACKGROUNDS)[int(rng.integers(2))], tuple(objs))


MEMO_BYTES = 2**28  # the renders a SceneDataset keeps per process (the GPU miniature's 256 px pool: none)


@dataclass
class SceneDataset:
    """Seeded: scene(i) is a pure function of (seed, i). Training scenes avoid HELDOUT_PAIRS. Infinite, or a finite
    pool of `pool` scenes served like a hub source (epochs in a seeded order), whose captions can then be encoded
    once into a text cache (build_cache) instead of live at every step."""
    seed: int = 0
    pool: int | None = None

    def __post_init__(self):
        self.num_rows = self.total_rows = self.pool  # None: infinite
        self.fingerprint, self.bad = f"scenes-{self.seed}-{self.pool}", []
        self.memo = {}  # (row, res) -> what load returns: a pool is served for many epochs; drawn and rendered once

    def scene(self, i):
        return _random_scene(np.random.default_rng([self.seed, int(i)]), lambda p: p not in HELDOUT_PAIRS)

    def load(self, row, res):
        if (row, res) in self.memo:
            return self.memo[row, res]
        s = self.scene(row)
        out = render_scene(s, res), s.long_caption, s.short_caption
        if self.pool and self.pool * 3 * res * res <= MEMO_BYTES:  # the CPU track's pool: 8192 x 96 px = 226 MB
            self.memo[row, res] = out
        return out

    def order(self, seed, epoch):
        return np.random.default_rng([seed, epoch]).permutation(self.pool)

    def iter_captions(self):
        for i in range(self.pool):
            s = self.scene(i)
            yield i, s.long_caption, s.short_caption


def heldout_scenes(n, seed=1234):
    """n evaluation scenes whose first object is a held-out (colour, shape) pair."""
    out, pairs = [], sorted(HELDOUT_PAIRS)
    for i in range(n):
        rng = np.random.default_rng([seed, i, 7])
        s = _random_scene(rng, lambda p: True)
        colour, shape = pairs[i % len(pairs)]
        rest = tuple(o for o in s.objects[1:] if o[0] != colour)
        out.append(Scene(s.background, ((colour, shape, s.objects[0][2], s.objects[0][3]),) + rest))
    return out


def scenes_hash() -> str:
    """What the training log and the evaluation's cache keys record of the scenes: a hash of the generator's
    parameters."""
    params = (COLOURS, BACKGROUNDS, SHAPES, SIZES, CELLS, sorted(HELDOUT_PAIRS))
    return hashlib.sha256(repr(params).encode()).hexdigest()[:16]


# ======================================================================================================================
# Rendering and the prompt-adherence checker


def _shape_mask(shape, cy, cx, h, yy, xx):
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= h * h
    if shape == "square":
        return (np.abs(yy - cy) <= h) & (np.abs(xx - cx) <= h)
    return (yy >= cy - h) & (yy <= cy + h) & (np.abs(xx - cx) <= (yy - (cy - h)) / 2)  # apex up


def render_scene(scene, res) -> torch.Tensor:
    """uint8 [3, res, res] at any resolution (pixel-centre sampling)."""
    yy, xx = np.mgrid[0:res, 0:res] + 0.5
    img = np.full((res, res, 3), BACKGROUNDS[scene.background], np.uint8)
    cell = res / 3
    for colour, shape, size, k in scene.objects:
        m = _shape_mask(shape, (k // 3 + 0.5) * cell, (k % 3 + 0.5) * cell, SIZES[size] * cell, yy, xx)
        img[m] = COLOURS[colour]
    return torch.from_numpy(img).permute(2, 0, 1).contiguous()


def check_scene(img, scene, positions=True) -> dict:
    """Which attributes of each asked-for object are right: colour (dominant foreground colour in its cell),
    position (>= half of that colour's pixels, and their centroid, in the cell), shape (fill ratio of the
    colour's bounding box in the cell: square ~1, circle ~0.79, triangle ~0.5). Returns per-attribute
    fractions of objects, and `all` = fraction of objects with every attribute right. positions=False checks a
    short caption, which names no position or size: colour and shape are judged in the cell holding most of that
    colour's pixels, wherever it is."""
    a, res = torch.as_tensor(img).permute(1, 2, 0).numpy().astype(np.float32), img.shape[-1]
    pal = np.array(list(COLOURS.values()) + [BACKGROUNDS[scene.background]], np.float32)
    cls = ((a[:, :, None, :] - pal) ** 2).sum(-1).argmin(-1)  # nearest palette colour per pixel
    cell = res / 3
    names = list(COLOURS)
    ok = {"colour": [], "shape": [], "position": [], "all": []}
    min_px = 0.3 * 0.5 * (2 * SIZES["small"] * cell) ** 2

    def cell_of(y, x):  # index in the 3x3 grid of pixel (y, x)
        return (y // cell * 3 + x // cell).astype(int)
    for colour, shape, _, k in scene.objects:
        ci = names.index(colour)
        ys, xs = np.nonzero(cls == ci)
        if not positions and len(ys):  # position not asked: the cell where the model put most of this colour
            k = int(np.bincount(cell_of(ys, xs), minlength=9).argmax())
        r0, c0 = int(k // 3 * cell), int(k % 3 * cell)  # the cell's top-left pixel
        box = cls[r0:int(r0 + cell), c0:int(c0 + cell)]
        counts = np.bincount(box.ravel(), minlength=len(pal))[:len(names)]
        col_ok = counts.argmax() == ci and counts[ci] >= min_px
        pos_ok = not positions or (len(ys) >= min_px and (cell_of(ys, xs) == k).mean() >= 0.5
                                   and cell_of(ys.mean(), xs.mean()) == k)
        by, bx = np.nonzero(box == ci)
        fill = len(by) / ((by.max() - by.min() + 1) * (bx.max() - bx.min() + 1)) if len(by) >= min_px else 0
        shape_ok = shape == ("square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle" if fill > 0.35 else "")
        for key, v in zip(ok, (col_ok, shape_ok, pos_ok, col_ok and shape_ok and pos_ok)):
            ok[key].append(bool(v))
    return {k: float(np.mean(v)) for k, v in ok.items() if positions or k != "position"}


# ======================================================================================================================
# The CPU track's REPA teacher: trained once on the scenes


def scene_labels(scene, grid, sub=8) -> torch.Tensor:
    """Per-token targets on a grid x grid token map: the majority colour class (5 colours, then background) and
    shape class (0 none, then SHAPES) of each token's pixels. -> long [grid * grid, 2]."""
    res = grid * sub
    yy, xx = np.mgrid[0:res, 0:res] + 0.5
    colour = np.full((res, res), len(COLOURS))  # background class
    shape = np.zeros((res, res), int)  # no shape
    cell = res / 3
    for c, sh, size, k in scene.objects:
        m = _shape_mask(sh, (k // 3 + 0.5) * cell, (k % 3 + 0.5) * cell, SIZES[size] * cell, yy, xx)
        colour[m], shape[m] = list(COLOURS).index(c), 1 + SHAPES.index(sh)
    out = []
    for lab, n in ((colour, len(COLOURS) + 1), (shape, len(SHAPES) + 1)):
        onehot = np.eye(n, dtype=np.int32)[lab].reshape(grid, sub, grid, sub, n).sum((1, 3))
        out.append(torch.from_numpy(onehot.argmax(-1).reshape(-1)))
    return torch.stack(out, -1)


def teacher_config(grid):
    """The architecture of the CPU track's REPA teacher: a tiny DINOv2 with registers, 14 px patches on a grid."""
    from transformers import Dinov2WithRegistersConfig
    return Dinov2WithRegistersConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128,
                                     patch_size=14, image_size=grid * 14, num_register_tokens=4)


def scene_teacher(path, steps=600, batch=32, grid=8, seed=0) -> str:
    """The CPU track's REPA teacher, trained once during data preparation (outside the clock) and cached at `path`:
    a tiny DINOv2-with-registers whose patch tokens learn, from rendered scenes, each token's colour and shape, so
    that its features carry what the scenes are made of, as DINO's carry what photos are made of (DINO is trained
    once on natural images). Seeded and single-threaded: the same weights whatever the process's thread count. It
    never sees the evaluation or the held-out compositions, and it is not an evaluation network (aligning to
    Inception would game FID)."""
    from transformers import Dinov2WithRegistersModel
    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same weights whatever the process's thread count (one summation order)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Dinov2WithRegistersModel(teacher_config(grid))
        head = torch.nn.Linear(64, len(COLOURS) + 1 + len(SHAPES) + 1)
        opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=3e-3)
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)  # DINO's input normalisation
        std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
        ds, nc = SceneDataset(seed + 99), len(COLOURS) + 1

        def batch_of(start, n):
            scenes = [ds.scene(start + j) for j in range(n)]
            x = torch.stack([render_scene(s, grid * 14) for s in scenes]).float() / 255
            return (x - mean) / std, torch.stack([scene_labels(s, grid) for s in scenes])

        for step in tqdm(range(steps), desc="REPA teacher (once)"):
            x, y = batch_of(step * batch, batch)
            logits = head(net(pixel_values=x).last_hidden_state[:, 5:])  # patch tokens (after CLS + 4 registers)
            loss = F.cross_entropy(logits[..., :nc].flatten(0, 1), y[..., 0].flatten()) + \
                F.cross_entropy(logits[..., nc:].flatten(0, 1), y[..., 1].flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            x, y = batch_of(10**9, 256)  # fresh scenes
            pred = head(net(pixel_values=x).last_hidden_state[:, 5:])
            obj = y[..., 1] > 0  # tokens of an object (most tokens are background)
            acc = [(pred[..., s].argmax(-1) == y[..., i])[obj].float().mean().item() for i, s in
                   enumerate((slice(0, nc), slice(nc, None)))]
    torch.set_num_threads(threads)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    tmp.mkdir(parents=True, exist_ok=True)  # not net.save_pretrained: transformers writes only on distributed rank 0
    net.config.save_pretrained(tmp)
    save_file(net.state_dict(), str(tmp / "model.safetensors"))
    (tmp / "teacher.json").write_text(json.dumps({"steps": steps, "batch": batch, "seed": seed,
                                                  "object_token_accuracy": {"colour": acc[0], "shape": acc[1]}}))
    try:
        os.rename(tmp, path)  # atomic: a concurrent run never sees half a teacher
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


# ======================================================================================================================
# The CPU track's data preparation (captions encoded once, the REPA teacher trained once), cached


def cpu_track_paths(cache: Path, seed: int, pool: int, encoder_name: str, repa_grid: int) -> tuple[Path, Path | None]:
    """Where the CPU track's preparation lives under `cache`: its pool's caption cache (per seed, pool size and text
    encoder) and its REPA teacher (per token grid; None without REPA)."""
    captions = cache / f"scenes-{seed}-{pool}-text-{hashlib.sha256(encoder_name.encode()).hexdigest()[:8]}"
    teacher = cache / f"scene-teacher-dinov2-with-registers-tiny-grid{repa_grid}-1thread" if repa_grid else None
    return captions, teacher


def cpu_track_data(cache: Path, seed: int, pool: int, encoder, repa_grid: int, rank=0, world=1):
    """The CPU track's data preparation, outside the clock and cached (a second run finds it): the captions of its
    pool of `pool` procedural scenes encoded once, and the REPA teacher trained once on scenes at the burn-in's
    token grid (scene_teacher). With several processes the work is shared: the long captions on rank 1, the
    short ones and the teacher on rank 0 (each single-threaded under torchrun); the caller waits for all."""
    captions, teacher = cpu_track_paths(cache, seed, pool, encoder.name, repa_grid)
    ds = SceneDataset(seed, pool)
    jobs = [lambda: text.build_cache(ds, encoder, captions, kinds=("long",)),
            lambda: text.build_cache(ds, encoder, captions, kinds=("short",))]
    if teacher is not None:
        jobs.append(lambda: scene_teacher(teacher, grid=repa_grid))
    todo = not all((captions / f"{k}-{0:09d}.safetensors").exists() for k in ("long", "short")) or (
        teacher is not None and not (teacher / "config.json").exists())
    if todo and rank == 0:
        print(f"CPU track: preparing its data once under {cache} (caption cache, REPA teacher); later runs reuse it",
              flush=True)
    mine = jobs if world == 1 else jobs[1:] if rank == 0 else jobs[:1] if rank == 1 else []
    for job in mine:
        job()
