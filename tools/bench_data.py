"""The loader's images/s per worker (one thread): the raw hub shards (decode + resize + crop per sample) against the
training-ready shards of prepare.prepare_images, and the candidate formats of those shards, on photo-like JPEGs.

    python -m tools.bench_data        # or: python prepare.py --bench
"""
import io
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from data import ParquetSource, decode_image
from prepare import prepare_images


def _photo_like_jpeg(rng, w, h, quality=90):
    """Gradients + smooth blobs + fine noise: JPEG sizes close to photos (~0.3-1 MB at 1024-1536 px)."""
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(6 * xx + c) * 60 + 120 * yy + 60 for c in rng.uniform(0, 6, 3)], -1)
    small = Image.fromarray(rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8))
    blobs = np.asarray(small.resize((w, h), Image.BICUBIC), np.float32) - 128
    img = (base + 0.3 * blobs + rng.normal(0, 12, (h, w, 3))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _encode(img: torch.Tensor, fmt) -> bytes:
    if fmt == "raw":
        return img.numpy().tobytes()
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, fmt.split("-")[0].upper(),
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


if __name__ == "__main__":
    bench()
