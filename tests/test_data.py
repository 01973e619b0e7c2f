"""Tests of data.py: tiny parquet shards with the real schema, a tiny T5Gemma, the procedural scenes."""
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import _ids, _jpeg, _shard, _take
from PIL import Image

import data
import prepare
import scenes


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """Good rows plus a corrupt image, a truncated JPEG, an empty and a missing caption, a wrong column, junk."""
    d, rng = tmp_path_factory.mktemp("dirty"), np.random.default_rng(1)
    ids = _ids(16, heldout=0)
    imgs = [_jpeg(rng, 64, 48) for _ in ids]
    imgs[3] = b"this is not an image"
    imgs[5] = imgs[5][: len(imgs[5]) // 2]
    llava = [f"long {i}" for i in ids]
    llava[7] = ""
    prompt = [f"short {i}" for i in ids]
    prompt[9] = None
    _shard(d / "a.parquet", ids, rng, llava=llava, prompt=prompt, images=imgs)
    _shard(d / "b_wrong_column.parquet", _ids(4, 0), rng, rename=("llava", "caption"))
    (d / "c_unreadable.parquet").write_bytes(b"PAR1 garbage garbage")
    return d


# ------------------------------------------------------------------ loader
@pytest.mark.parametrize("workers", [0, 2])
def test_exact_resume(clean, workers):
    src = data.ParquetSource(clean, window_rows=16)
    full = _take(data.make_loader(src, 32, 3, 0, 2, seed=5, num_workers=workers), 9)  # crosses an epoch (40 rows)
    a = data.make_loader(src, 32, 3, 0, 2, seed=5, num_workers=workers)
    _take(a, 4)
    sd = json.loads(json.dumps(a.state_dict()))
    assert sd["position"] == 4 * 3 * 2
    b = data.make_loader(src, 32, 3, 0, 2, seed=5, num_workers=workers)
    b.load_state_dict(sd)
    rest = _take(b, 5)
    for x, y in zip(full[4:], rest):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
        assert x["caption"] == y["caption"]
    with pytest.raises(ValueError):  # a position that is not a whole number of global batches of the new loader
        data.make_loader(src, 32, 5, 0, 2, seed=5).load_state_dict(sd)


def test_two_ranks_two_workers_partition(clean):
    src = data.ParquetSource(clean, window_rows=16)
    assert src.num_rows == 40 and len(src.heldout_ids) == 4
    B, world, steps = 4, 2, 10  # 2 epochs of 40 rows
    idx, rows = [], []
    for rank in range(world):
        batches = _take(data.make_loader(src, 32, B, rank, world, seed=1, num_workers=2), steps)
        for s, bt in enumerate(batches):  # global batch s = positions [s*G, (s+1)*G)
            assert torch.equal(bt["index"], torch.arange(B) * world + rank + s * B * world)
            idx += bt["index"].tolist()
            rows += bt["row"].tolist()
    assert sorted(idx) == list(range(steps * B * world))
    by_pos = dict(zip(idx, rows))
    train = {r for r in range(src.total_rows) if src.keep[r]}
    for e in range(2):
        epoch = [by_pos[p] for p in range(e * 40, (e + 1) * 40)]
        assert set(epoch) == train  # every training row once per epoch, no held-out row
    assert [by_pos[p] for p in range(40)] != [by_pos[p] for p in range(40, 80)]  # reshuffled per epoch


def test_caption_policy_and_determinism():
    ds = scenes.SceneDataset(0)
    for policy, lo, hi in ((0.0, 0.0, 0.0), (0.3, 0.25, 0.35), (1.0, 1.0, 1.0)):
        batches = _take(data.make_loader(ds, 32, 100, 0, 1, seed=3, p_short=policy), 6)
        short = torch.cat([b["short"] for b in batches]).float().mean().item()
        assert lo <= short <= hi, (policy, short)
        for b in batches[:1]:
            for cap, row, s in zip(b["caption"], b["row"], b["short"]):
                sc = ds.scene(int(row))
                assert cap == (sc.short_caption if s else sc.long_caption)
    a = _take(data.make_loader(ds, 32, 50, 0, 1, seed=3, p_short=0.5), 1)[0]
    b = _take(data.make_loader(ds, 32, 50, 0, 1, seed=3, p_short=0.5), 1)[0]
    assert a["caption"] == b["caption"] and torch.equal(a["image"], b["image"])


def test_pick_caption_fallbacks():
    assert data.pick_caption("long", "short", True) == ("short", "short")
    assert data.pick_caption("long", None, True) == ("long", "long")
    assert data.pick_caption("  ", "short", False) == ("short", "short")
    assert data.pick_caption(None, None, False) == ("", "long")


def test_bad_input_skipped_and_counted(dirty, capfd):
    src = data.ParquetSource(dirty)
    err = capfd.readouterr().err
    assert len(src.bad) == 2 and "b_wrong_column.parquet" in err and "missing column(s) ['llava']" in err
    assert "c_unreadable.parquet" in err
    loader = data.make_loader(src, 32, 4, 0, 1, seed=0, p_short=1.0)
    batches = _take(loader, 4)  # one epoch of the 16 good-shard rows
    err = capfd.readouterr().err
    got = torch.cat([b["index"] for b in batches]).tolist()
    assert len(got) == 14 and loader.state_dict()["skipped"] == 2
    assert loader.state_dict()["position"] == 16 and loader.state_dict()["bad_files"] == 2
    missing = sorted(set(range(16)) - set(got))
    bad_rows = sorted(int(batches[0]["row"].new_tensor(src.order(0, 0))[p]) for p in missing)
    assert bad_rows == [3, 5]
    assert "a.parquet row 3: bad image" in err and "a.parquet row 5: bad image" in err
    caps = {int(r): c for b in batches for r, c in zip(b["row"], b["caption"])}
    ids = pq.read_table(dirty / "a.parquet", columns=["id"]).column(0).to_pylist()
    assert caps[9] == f"long {ids[9]}"  # short missing -> long
    assert caps[7] == f"short {ids[7]}"
    long_only = _take(data.make_loader(src, 32, 16, 0, 1, seed=0), 1)[0]
    assert {int(r): c for r, c in zip(long_only["row"], long_only["caption"])}[7] == f"short {ids[7]}"  # empty long


def test_decode_resize_centre_crop():
    img = np.zeros((60, 180, 3), np.uint8)
    img[:, :60], img[:, 60:120], img[:, 120:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    out = data.decode_image(buf.getvalue(), 30)
    assert out.shape == (3, 30, 30) and out.dtype == torch.uint8
    assert out[2, 5:25, 5:25].float().mean() > 200 and out[0, 5:25, 5:25].float().mean() < 40  # the blue middle
    big = np.zeros((1200, 800, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "JPEG")
    assert data.decode_image(buf.getvalue(), 128).shape == (3, 128, 128)  # draft path (1/4 scale)


# ------------------------------------------------------------------ manifest / prepare
def test_manifest_and_second_run_does_nothing(clean, tmp_path, monkeypatch):
    d = tmp_path / "src"
    d.mkdir()
    for p in clean.glob("*.parquet"):
        (d / p.name).write_bytes(p.read_bytes())
    man = prepare.write_manifest("mj-llava", d)
    files = json.loads(man.read_text())["files"]
    assert [f["rows"] for f in files] == [24, 20] and all(len(f["sha256"]) == 64 for f in files)
    h = data.manifest_hash(man)
    assert prepare.write_manifest("mj-llava", d) and data.manifest_hash(man) == h
    monkeypatch.setattr(data, "HELDOUT_DIR", tmp_path / "heldout")
    (tmp_path / "heldout").mkdir()
    (tmp_path / "heldout" / "src.txt").write_text("")
    monkeypatch.setitem(data.SOURCES, "src", data.SOURCES["mj-llava"])
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("downloaded again"))
    assert prepare.prepare("src", tmp_path) == man
    with open(d / "train_000.parquet", "ab") as f:
        f.write(b"x")
    assert data.manifest_hash(prepare.write_manifest("mj-llava", d)) != h


# ------------------------------------------------------------------ text encoder and cache
# ------------------------------------------------------------------ procedural scenes
def test_sft_mixture_fraction_rows_and_resume(tmp_path):
    rng = np.random.default_rng(1)
    a_ids, b_ids = _ids(40, heldout=0), [f"alc-{k}" for k in range(6) if not data.is_heldout(f"alc-{k}")]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _shard(tmp_path / "a" / "a.parquet", a_ids, rng)
    _shard(tmp_path / "b" / "b.parquet", b_ids, rng, llava=[f"curated {i}" for i in b_ids])
    mix = data.MixSource(data.ParquetSource(tmp_path / "a"), data.ParquetSource(tmp_path / "b"), 0.2)
    assert mix.num_rows == 40 + 10  # 10 curated rows = 20 % of the stream
    order = mix.order(0, 0)
    assert sorted(order[order < 40].tolist()) == list(range(40))  # every row of a once per epoch
    assert (order >= 40).sum() == 10 and set((order[order >= 40] - 40).tolist()) == set(range(len(b_ids)))
    assert np.array_equal(order, mix.order(0, 0)) and not np.array_equal(order, mix.order(0, 1))
    loader = data.make_loader(mix, 32, 5, 0, 1, seed=0)
    caps = [c for b in _take(loader, 10) for c in b["caption"]]
    assert sum(c.startswith("curated") for c in caps) == 10 and len(caps) == 50
    loader2 = data.make_loader(mix, 32, 5, 0, 1, seed=0)
    loader2.load_state_dict({"position": 25, "seed": 0, "skipped": 0, "bad_files": 0})
    assert [c for b in _take(loader2, 5) for c in b["caption"]] == caps[25:]


