"""data.py: every byte the trainer and the evaluation consume, as they consume it.

The record track's hub sources (long/short-caption parquet datasets), read in bounded blocks by ParquetSource (or
from the training-ready shards prepare.py writes), mixtures of sources, and the deterministic, sharded, resumable
loader. The frozen text encoder and its caption cache are text.py, the CPU track's procedural scenes scenes.py;
downloading and every other one-off preparation is prepare.py.
"""
import hashlib
import io
import itertools
import json
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

import scenes
import text

DATA_ROOT = Path(os.environ.get("SPEEDRUN_DATA", "datasets"))
HELDOUT_DIR = Path(__file__).resolve().parent / "heldout"  # committed id lists (written by `python prepare.py`)
HELDOUT_PERMILLE = 10  # 1 % of rows, chosen by a hash of the row id: ~9.9 K images of midjourney-v6-llava
# what bad input raises (PIL: OSError/SyntaxError/DecompressionBombError; pyarrow: ArrowException; missing keys)
BAD_INPUT = (OSError, ValueError, KeyError, TypeError, SyntaxError, EOFError, pa.ArrowException,
             Image.DecompressionBombError)

# ======================================================================================================================
# Sources (one line per dataset) and the held-out rule


# Columns come from public code that reads each dataset, not from the cards: midjourney-v6-llava (id, image, prompt,
# llava, llava_status); FLUX-Reason-6M (id, image as {bytes, path}, eight caption_* kinds of which caption_detail,
# the "generation chain of thought", is the one always present, and caption_original the prompt; 1180 shards
# fluxdb-*.parquet in four folders, 5,890,279 rows, 823 GB, as a public unpacking script counted them);
# flux_generated (data/train-*.parquet, 271 shards, image as {bytes, path}, caption "caption_caption", no id column:
# rows are named <shard>:<row>) from a public pipeline that reads PRX's three sources. alchemist ships a CSV (img_key,
# url, prompt) whose images are fetched from their URLs. The loader checks every shard's columns and names what is
# missing. est_gb: ESTIMATES where not counted (image count x ~1 MB); the hub's file listing gives the exact sizes.
SOURCES = {
    "mj-llava": {"repo": "brivangl/midjourney-v6-llava", "files": ["data/*.parquet"], "image": "image",
                 "long": "llava", "short": "prompt", "id": "id", "status": "llava_status", "rows": 986_000,
                 "est_gb": 1000},
    # only the CSV: the hub repository also lists parquet files, which have no image column
    "alchemist": {"repo": "yandex/alchemist", "files": ["*.csv"], "image": "image", "long": "prompt",
                  "short": None, "id": "img_key", "url": "url", "rows": 3_350, "est_gb": 4},
    "flux-reason": {"repo": "LucasFang/FLUX-Reason-6M", "files": ["*/fluxdb-*.parquet"], "image": "image",
                    "long": "caption_detail", "short": "caption_original", "id": "id", "rows": 5_890_279,
                    "est_gb": 823},
    "flux-generated": {"repo": "lehduong/flux_generated", "files": ["data/train-*.parquet"], "image": "image",
                       "long": "caption_caption", "short": None, "id": None, "rows": 1_700_000, "est_gb": 1700},
}


def is_heldout(key) -> bool:
    """The held-out evaluation rule: a fixed 1 % of rows by sha1 of the row id (never trained on)."""
    return int(hashlib.sha1(str(key).encode()).hexdigest()[:8], 16) % 1000 < HELDOUT_PERMILLE


def file_sha256(path) -> str:
    """The SHA-256 of a file, read in 16 MB pieces (the one place the repository hashes a file)."""
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
        return scenes.scenes_hash()
    man = DATA_ROOT / name / "manifest.json"
    return manifest_hash(man) if man.exists() else "not-prepared"


# ======================================================================================================================
# Images: decoding, the parquet source, mixtures


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
        self.image = image  # column names
        self.long = long
        self.short = short
        self.split = split
        self.window_rows = window_rows  # rows shuffled together (order)
        self.block_rows = block_rows  # the read unit
        self.cache_blocks = -(-window_rows // block_rows)  # blocks kept in memory: one window's
        self.files = []  # readable shards
        self.bad = []  # what was skipped, and why
        self.heldout_ids = []
        self.status = None  # the column that marks failed long captions, if the source has one
        blocks = []  # the read units
        keep = []  # per row: served by this split
        sizes = []  # rows per readable shard
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
                raise RuntimeError(f"{prepared} was prepared from other shards; "
                                   "run `python prepare.py --prepare` again")
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
        rng = np.random.default_rng([seed, epoch])
        out, group = [], []
        perm = rng.permutation(len(self.blocks))
        for i, b in enumerate(perm):
            first, n = self.blocks[b].first, self.blocks[b].rows
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
        f = row // m["file_rows"]  # file, its row group, the row in it
        g = (row % m["file_rows"]) // m["group_rows"]
        k = row % m["group_rows"]
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
    """Every training row of `a` per epoch plus rows of `b`, inserted at seeded positions so that a's row-group
    locality is kept: b's rows make up a fraction `frac` of the stream (a small set such as the 3,350 curated
    Alchemist pairs is repeated as needed), or with frac None every row of b once. Rows of b are numbered after a's."""

    def __init__(self, a, b, frac):
        for name, src in (("first", a), ("second", b)):
            if src.num_rows == 0:  # e.g. a parquet without an image column: nothing to mix in
                raise ValueError(f"the mixture's {name} source has no usable rows"
                                 f"{': ' + '; '.join(src.bad[:3]) if src.bad else ''}")
        self.a = a
        self.b = b
        self.frac = frac
        self.bad = a.bad + b.bad
        self.n_b = b.num_rows if frac is None else round(frac / (1 - frac) * a.num_rows)
        self.num_rows, self.total_rows = a.num_rows + self.n_b, a.total_rows + b.total_rows
        self.fingerprint = hashlib.sha256(f"{a.fingerprint}+{b.fingerprint}@{frac}".encode()).hexdigest()[:16]

    def order(self, seed, epoch):
        reps = -(-self.n_b // self.b.num_rows)
        ob = np.concatenate([self.b.order(seed, epoch * reps + r) for r in range(reps)])[:self.n_b]
        at = np.sort(np.random.default_rng([seed, epoch, 7]).integers(0, self.a.num_rows + 1, self.n_b))
        return np.insert(self.a.order(seed, epoch), at, ob + self.a.total_rows)

    def load(self, row, res):
        return self.a.load(row, res) if row < self.a.total_rows else self.b.load(row - self.a.total_rows, res)


# Mixtures (a, b, frac): b makes up `frac` of the stream, or (frac None) each source is read once per epoch, i.e.
# weighted by its size, as PRX Part 3 trained on its three sources. A part may itself be a mixture.
MIXES = {
    "prx-flux": ("flux-reason", "flux-generated", None),
    "prx-data": ("prx-flux", "mj-llava", None),  # PRX Part 3's 8.6 M images
    "sft-mix": ("prx-data", "alchemist", 0.05),  # stage 4: 5 % curated pairs (a guess, not tuned)
}


def leaves(name) -> list[str]:
    """The SOURCES a SOURCES or MIXES name reads, in order (a mixture's first part first)."""
    return [x for part in MIXES[name][:2] for x in leaves(part)] if name in MIXES else [name]


def open_source(name, root=DATA_ROOT, res=None, **kw):
    """A SOURCES name -> ParquetSource; a MIXES name -> MixSource of its parts (nested as MIXES nests)."""
    if name in MIXES:
        a, b, frac = MIXES[name]
        return MixSource(open_source(a, root, res, **kw), open_source(b, root, res, **kw), frac)
    return ParquetSource.from_name(name, root, res, **kw)


def missing_sources(names, root=None) -> list[str]:
    """The SOURCES among `names` (and their mixtures' parts) with no parquet shard under root: checked at setup, so
    that a missing source stops the run in one line before hour 3, not at the stage that reads it."""
    want = dict.fromkeys(n for name in names for n in leaves(name))
    return [n for n in want if not any((Path(root or DATA_ROOT) / n).rglob("*.parquet"))]


class MixCache:
    """The caption cache of a MixSource: its rows of `a` from a's cache, the rows after them from b's."""

    def __init__(self, a, b, offset):
        self.a = a
        self.b = b
        self.offset = offset

    def get(self, kind, row):
        return self.a.get(kind, row) if row < self.offset else self.b.get(kind, row - self.offset)


def text_cache_dir(source):
    """Where `python prepare.py --cache` put a source's caption embeddings: a folder, a (first, second) pair for a
    mixture (nested as MIXES nests), or None when a part has no cache (the stage then encodes live)."""
    if source in MIXES:
        parts = tuple(text_cache_dir(n) for n in MIXES[source][:2])
        return None if None in parts else parts
    return DATA_ROOT / source / "cache" if (DATA_ROOT / source / "cache" / "meta.json").exists() else None


def open_text_cache(source, cache_dir):
    if isinstance(source, MixSource):
        return MixCache(open_text_cache(source.a, cache_dir[0]), open_text_cache(source.b, cache_dir[1]),
                        source.a.total_rows)
    return text.TextCache(cache_dir, source.fingerprint)


def validation_batch(source, res, n):
    """A fixed held-out batch (uint8 images, long captions) for the binned validation loss: held-out scenes on the
    CPU track, the first n held-out rows of a hub source (a mixture: of its main source)."""
    if source == "scenes":
        held = scenes.heldout_scenes(n)
        return torch.stack([scenes.render_scene(s, res) for s in held]), [s.long_caption for s in held]
    src = ParquetSource.from_name(leaves(source)[0], DATA_ROOT, split="heldout")
    rows = [src.load(int(r), res) for r in np.flatnonzero(src.keep)[:n]]  # (image, long, short)
    return (torch.stack([img for img, _, _ in rows]),
            [pick_caption(long, short, False)[0] for _, long, short in rows])


# ======================================================================================================================
# Loader: deterministic, sharded, resumable


def pick_caption(long, short, use_short):
    """The asked-for caption, or the other one when it is empty or missing; "" (the null condition) if both are."""
    long, short = (long or "").strip(), (short or "").strip()
    first, second = ((short, "short"), (long, "long")) if use_short else ((long, "long"), (short, "short"))
    return first if first[0] else second if second[0] else ("", "long")


class _Stream(IterableDataset):
    """Batch b of rank r holds global positions (b*B + j)*world + r; worker w of W makes batches b = start+w (mod W)."""

    def __init__(self, source, res, batch_size, rank, world, seed, p_short, start, cache_dir):
        self.source = source
        self.res = res
        self.B = batch_size
        self.seed = seed
        self.rank, self.world = rank, world
        self.p_short = float(p_short)  # share of samples asked for their short caption
        self.start = start  # the first batch (a resume's position)
        self.cache_dir = cache_dir
        self._epoch = (None, None)  # (epoch, its row order), the last one used

    def _row(self, p):
        n = self.source.num_rows
        if n is None:
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
        self.args = (source, res, batch_size, rank, world, seed, p_short)  # of each _Stream
        self.source, self.seed = source, seed
        self.G = batch_size * world  # the global batch
        self.num_workers, self.cache_dir = num_workers, cache_dir
        self.batch = 0  # batches handed to the trainer
        self.skipped = 0  # bad rows skipped
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
    """source: scenes.SceneDataset | ParquetSource | MixSource | a SOURCES or MIXES name (DATA_ROOT) | "scenes"."""
    if isinstance(source, str):
        source = scenes.SceneDataset(seed) if source == "scenes" else open_source(source, DATA_ROOT, res)
    if cache_dir is not None and source.num_rows is None:
        raise ValueError("the caption cache needs a finite ParquetSource (scenes are encoded live)")
    return Loader(source, res, batch_size, rank, world, seed, p_short, num_workers, cache_dir)
