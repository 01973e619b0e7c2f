"""scenes.py: the adherence checker, the held-out compositions, the scene labels and teacher, the finite scene pool."""
import json
from pathlib import Path

import numpy as np
import torch
from conftest import _take

import data
import scenes
import text

ROOT = Path(__file__).resolve().parents[1]


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


def test_a_pool_renders_each_scene_once_per_resolution(monkeypatch):
    """SceneDataset keeps a pool's renders: the second load of a row is the first's, the same pixels as a fresh
    render; a pool too large for scenes.MEMO_BYTES keeps none."""
    ds, calls = scenes.SceneDataset(seed=3, pool=16), []
    render = scenes.render_scene
    monkeypatch.setattr(scenes, "render_scene", lambda s, res: calls.append(res) or render(s, res))
    first = ds.load(5, 64)
    assert ds.load(5, 64) is first and calls == [64]
    assert torch.equal(first[0], render(ds.scene(5), 64)) and first[1] == ds.scene(5).long_caption
    ds.load(5, 96)
    assert calls == [64, 96]
    monkeypatch.setattr(scenes, "MEMO_BYTES", 16 * 3 * 64 * 64 - 1)
    big = scenes.SceneDataset(seed=3, pool=16)
    big.load(5, 64), big.load(5, 64)
    assert calls == [64, 96, 64, 64] and not big.memo
