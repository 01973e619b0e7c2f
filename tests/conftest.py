"""Helpers shared by the test files (no test file imports another): tiny tracks, environments, data files."""
import dataclasses
import io
import math
import os
import signal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
import losses
import train

# 32 px (4x4 tokens of 8 px), global batch 4 in micro-batches of 2: accumulation, REPA, SPRINT, mixed captions
TINY = dataclasses.replace(train.CPU, warmup=2, ckpt_every=1000, flop_budget=math.nan, stages=(
    train.Stage("burn-in", 32, 2, 4, 2, 0.0, 0.5, 0.0, 0.0, (1.0, 1.0), "scenes"),
    train.Stage("main", 32, 2, 4, 2, 0.0, 0.0, 0.0, 0.0, (1.0, 1.0), "scenes"),
    train.Stage("high-res", 32, 2, 4, 2, 0.0, 0.0, 0.75, 0.5, (1.0, 1.0), "scenes"),
    train.Stage("sft", 32, 3, 4, 2, 0.5, 0.0, 0.0, 0.5, (1.0, 0.0), "scenes")))


def env_for(out, **kw):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPEEDRUN_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    env.update(OMP_NUM_THREADS="1", SPEEDRUN_TRACK="cpu", SPEEDRUN_OUT=str(out), **kw)
    return env


def _jpeg(rng, w, h):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


def _ids(n, heldout):
    """n row ids, `heldout` of them falling in the held-out split."""
    out, k = [], 0
    want_h, want_t = heldout, n - heldout
    while want_h or want_t:
        i, k = f"mj-{k:06d}", k + 1
        if data.is_heldout(i) and want_h:
            out.append(i)
            want_h -= 1
        elif not data.is_heldout(i) and want_t:
            out.append(i)
            want_t -= 1
    return out


def _shard(path, ids, rng, llava=None, prompt=None, images=None, rename=None):
    n = len(ids)
    imgs = images or [_jpeg(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90))) for _ in range(n)]
    cols = {"id": ids, "image": [{"bytes": b, "path": None} for b in imgs],
            "prompt": prompt or [f"short {i}" for i in ids], "llava": llava or [f"a long caption of {i}" for i in ids],
            "llava_status": ["ok"] * n}
    if rename:
        cols[rename[1]] = cols.pop(rename[0])
    pq.write_table(pa.table(cols), path, row_group_size=8)


def _take(loader, n):
    it = iter(loader)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def random_lpips(seed=0):
    torch.manual_seed(seed)
    net = losses.LPIPS()
    with torch.no_grad():
        for lin in net.lins:
            lin.weight.uniform_(0, 1)  # LPIPS' layers are non-negative
    return net.eval().requires_grad_(False)


def cpu_env(out, **kw):
    env = env_for(out, SPEEDRUN_STEPS_SCALE="0.0045", **kw)  # 2 / 6 / 1 / 1 steps
    env.pop("SPEEDRUN_TRACK")
    return env


def main_in_process(env):
    """train.main in this process, restoring the SIGTERM handler it installs."""
    handler = signal.getsignal(signal.SIGTERM)
    try:
        return train.main(env)
    finally:
        signal.signal(signal.SIGTERM, handler)


LEVERS = dataclasses.replace(TINY, irepa=True, dino_loss=0.01, contrastive=0.05, stages=tuple(  # TREAD: all stages
    dataclasses.replace(s, tread=0.5, sprint_drop=0.0) for s in TINY.stages))


def make_run(tmp_path, track=TINY):
    run = train.setup({"SPEEDRUN_OUT": str(tmp_path)}, track=track)
    run.id = "test"
    return run


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d, rng = tmp_path_factory.mktemp("clean"), np.random.default_rng(0)
    ids = _ids(44, heldout=4)
    _shard(d / "train_000.parquet", ids[:24], rng)
    _shard(d / "train_001.parquet", ids[24:], rng)
    return d
