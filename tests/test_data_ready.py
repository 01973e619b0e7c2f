"""Record-track data at full speed: training-ready shards equal the raw path, bounded reads of a shard written as
one large row group, cached text for the stage-4 mixture, sturdy downloads and caption fallbacks."""
import http.client
import subprocess
import sys
import urllib.error
from pathlib import Path

import bench_data
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import _ids, _jpeg, _shard, _take

import data
import prepare
import text

ROOT = Path(__file__).resolve().parents[1]


def _batches(src, n, state=None):
    loader = data.make_loader(src, 32, 3, 0, 2, seed=5)
    if state:
        loader.load_state_dict(state)
    return _take(loader, n), loader


def test_prepared_shards_give_the_raw_paths_images_order_and_resume(tmp_path):
    rng = np.random.default_rng(3)
    ids = _ids(40, heldout=3)
    imgs = [bench_data._photo_like_jpeg(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90))) for _ in ids]
    imgs[6] = b"not an image"  # a bad row: skipped and counted on both paths
    (tmp_path / "raw").mkdir()
    _shard(tmp_path / "raw" / "a.parquet", ids[:24], rng, images=imgs[:24])
    _shard(tmp_path / "raw" / "b.parquet", ids[24:], rng, images=imgs[24:])
    raw = data.ParquetSource(tmp_path / "raw", window_rows=16)
    out = prepare.prepare_images(raw, 32, tmp_path / "raw" / "prepared-32", file_rows=16, group_rows=4)
    assert len(list(out.glob("part-*.parquet"))) == 3  # 40 rows in files of 16
    ready = data.ParquetSource(tmp_path / "raw", window_rows=16, prepared=out)
    assert ready.num_rows == raw.num_rows == 37 and np.array_equal(ready.order(5, 0), raw.order(5, 0))
    a, la = _batches(raw, 8)
    b, lb = _batches(ready, 8)
    assert la.state_dict() == lb.state_dict() and la.state_dict()["skipped"] == 2  # 48 positions: 2 epochs
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["row"], y["row"])
        assert x["caption"] == y["caption"] and torch.equal(x["short"], y["short"])
        diff = (x["image"].float() - y["image"].float()).abs()
        assert diff.mean() < 3 and diff.max() < 48  # JPEG q95 of the resize output (another image: ~50 mean)
    resumed, _ = _batches(ready, 4, state=lb.state_dict() | {"position": 4 * 3 * 2})
    for x, y in zip(b[4:], resumed):
        assert torch.equal(x["index"], y["index"]) and torch.equal(x["image"], y["image"])
    with pytest.raises(ValueError, match="holds 32 px"):
        ready.load(0, 64)
    again = prepare.prepare_images(raw, 32, out, file_rows=16, group_rows=4)  # a second run keeps the files
    assert again == out


def test_single_row_group_shard_is_read_in_bounded_blocks(tmp_path):
    """600 rows of 100 KB in ONE row group (60 MB): a block of 16 rows is read with a few MB of Arrow memory."""
    path = tmp_path / "one.parquet"
    rng = np.random.default_rng(0)
    blobs = [rng.integers(0, 256, 100_000, dtype=np.uint8).tobytes() for _ in range(600)]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(600)], "image": blobs, "llava": ["x"] * 600,
                             "prompt": ["y"] * 600}), path, row_group_size=600, write_batch_size=16)
    assert pq.ParquetFile(path).num_row_groups == 1
    code = ("import pyarrow as pa, data; "
            f"s = data.ParquetSource({str(path)!r}, block_rows=16); "
            "t = s._block(20, s.cols); caps = sum(1 for _ in s.iter_captions()); "
            "print(len(s.blocks), t.num_rows, bytes(t.column('image')[0].as_py())[:4].hex(), caps, "
            "pa.default_memory_pool().max_memory())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=ROOT)  # `python -c` puts the working directory on the path
    blocks, rows, head, caps, peak = out.stdout.split()
    assert int(blocks) == 38 and int(rows) == 16 and int(caps) == 600
    assert head == blobs[20 * 16][:4].hex()  # the right rows
    assert int(peak) < 15e6, f"{int(peak) / 1e6:.1f} MB of Arrow memory for a 16-row block"


def test_mixture_reads_cached_text_for_both_sources(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(2)
    monkeypatch.setattr(data, "DATA_ROOT", tmp_path)
    monkeypatch.setitem(data.MIXES, "sft-mix", ("mj-llava", "alchemist", 0.05))  # a two-source mixture with a share
    (tmp_path / "mj-llava").mkdir(), (tmp_path / "alchemist").mkdir()
    _shard(tmp_path / "mj-llava" / "a.parquet", _ids(40, heldout=0), rng)
    b_ids = [f"alc-{k}" for k in range(8) if not data.is_heldout(f"alc-{k}")]
    pq.write_table(pa.table({"img_key": b_ids, "image": [_jpeg(rng, 50, 50) for _ in b_ids],
                             "prompt": [f"curated {i}" for i in b_ids]}), tmp_path / "alchemist" / "x.parquet")
    enc = text.TextEncoder.cpu_track()
    assert data.text_cache_dir("sft-mix") is None  # no cache yet: the stage encodes live
    for name in ("mj-llava", "alchemist"):
        text.build_cache(data.ParquetSource.from_name(name, tmp_path), enc, tmp_path / name / "cache", batch_size=16)
    prepare.cache_report(tmp_path / "mj-llava" / "cache")
    report = capsys.readouterr().out.splitlines()
    assert "40 rows x 2 captions" in report[0] and len(report) == 5
    assert report[2].startswith("  main 512 px: 8 GPUs x 290 img/s need") and report[2].endswith("MB/s of cache reads")
    dirs = data.text_cache_dir("sft-mix")
    assert dirs == (tmp_path / "mj-llava" / "cache", tmp_path / "alchemist" / "cache")
    loader = data.make_loader("sft-mix", 32, 16, 0, 1, seed=0, p_short=0.5, cache_dir=dirs)
    batches = _take(loader, 3)
    caps = [c for b in batches for c in b["caption"]]
    assert any(c.startswith("curated") for c in caps) and any(c.startswith("a long") for c in caps)
    for b in batches:
        live, mask = enc.encode(b["caption"])
        n = b["txt"].shape[1]
        assert torch.equal(b["txt_mask"], mask[:, :n])
        # bf16 rounding (relative 2^-8) of an encoding made in other batches (other padding)
        assert torch.allclose(b["txt"].float(), live[:, :n], rtol=1e-2, atol=1e-3)


def test_failed_llava_captions_fall_back_to_the_short_prompt_counted(tmp_path):
    rng = np.random.default_rng(4)
    ids = _ids(12, heldout=0)
    _shard(tmp_path / "a.parquet", ids, rng)
    t = pq.read_table(tmp_path / "a.parquet")
    status = ["ok"] * 12
    status[2] = status[7] = "failed"
    pq.write_table(t.set_column(t.schema.get_field_index("llava_status"), "llava_status", pa.array(status)),
                   tmp_path / "a.parquet")
    src = data.ParquetSource(tmp_path, status="llava_status")
    loader = data.make_loader(src, 32, 12, 0, 1, seed=0)
    batch = _take(loader, 1)[0]
    by_row = dict(zip(batch["row"].tolist(), batch["caption"]))
    assert by_row[2] == f"short {ids[2]}" and by_row[7] == f"short {ids[7]}" and by_row[0].startswith("a long")
    assert loader.state_dict()["caption_fallbacks"] == 2
    assert [r for r, long, _ in src.iter_captions() if long is None] == [2, 7]  # the cache encodes the same


def test_url_fetch_retries_partial_reads_and_names_dead_links(tmp_path, monkeypatch):
    calls = []

    class Answer:
        def __init__(self, body):
            self.body = body

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return self.body

    def urlopen(req, timeout):
        calls.append(req.full_url)
        assert req.get_header("User-agent") == prepare.USER_AGENT
        if req.full_url.endswith("/flaky") and calls.count(req.full_url) == 1:
            raise http.client.IncompleteRead(b"partial")  # not an OSError
        if req.full_url.endswith("/dead"):
            raise urllib.error.HTTPError(req.full_url, 404, "Not Found", {}, None)
        return Answer(b"image bytes of " + req.full_url.encode())

    monkeypatch.setattr(prepare.urllib.request, "urlopen", urlopen)
    assert prepare.fetch_url("http://x/flaky", backoff=0) == b"image bytes of http://x/flaky"
    assert calls.count("http://x/flaky") == 2
    with pytest.raises(urllib.error.HTTPError):
        prepare.fetch_url("http://x/dead", backoff=0)
    assert calls.count("http://x/dead") == 1  # a 404 is final
    csv = tmp_path / "alchemist.csv"
    csv.write_text("img_key,url,prompt\nk1,http://x/ok,one\nk2,http://x/dead,two\nk3,http://x/flaky2,three\n")
    n, dead = prepare._fetch_url_images(csv, tmp_path / "alchemist.parquet", data.SOURCES["alchemist"],
                                     fetch=lambda u: prepare.fetch_url(u, backoff=0))
    assert n == 2 and len(dead) == 1 and dead[0].startswith("k2\thttp://x/dead\tHTTPError")
    assert "k2" in (tmp_path / "dead_links.txt").read_text()
    assert pq.read_table(tmp_path / "alchemist.parquet").num_rows == 2


def test_mixture_refuses_a_source_without_usable_rows(tmp_path):
    rng = np.random.default_rng(5)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    _shard(tmp_path / "a" / "a.parquet", _ids(8, heldout=0), rng)
    pq.write_table(pa.table({"img_key": ["k1"], "prompt": ["no image column"]}), tmp_path / "b" / "b.parquet")
    b = data.ParquetSource(tmp_path / "b", long="prompt", short=None, id="img_key")
    with pytest.raises(ValueError, match=r"second source has no usable rows: .*missing column\(s\) \['image'\]"):
        data.MixSource(data.ParquetSource(tmp_path / "a"), b, 0.05)


def _write_source(root, name, n, rng):
    """A tiny shard with the columns data.SOURCES names for `name` (the public code's columns)."""
    src = data.SOURCES[name]
    ids = [f"{name}-{k}" for k in range(n)]
    cols = {src["image"]: [{"bytes": _jpeg(rng, 40, 40), "path": None} for _ in ids],
            src["long"]: [f"long {name} {i}" for i in ids]}
    cols.update({src["short"]: [f"short {i}" for i in ids]} if src["short"] else {})
    cols.update({src["id"]: ids} if src["id"] else {})
    folder = root / name / ("Text" if name == "flux-reason" else "data")
    folder.mkdir(parents=True)
    pq.write_table(pa.table(cols), folder / "train-00000-of-00001.parquet", row_group_size=8)
    return sum(not data.is_heldout(i) for i in ids) if src["id"] else None


def test_prx_sources_mix_by_size_with_nested_caches(tmp_path, monkeypatch):
    """The record track's data: FLUX-Reason-6M, flux_generated and midjourney-v6-llava, each read once per epoch (the
    mixture nests), their caption caches nested alike; a missing source is named at setup, in one line."""
    rng = np.random.default_rng(6)
    monkeypatch.setattr(data, "DATA_ROOT", tmp_path)
    assert data.leaves("sft-mix") == ["flux-reason", "flux-generated", "mj-llava", "alchemist"]
    assert data.missing_sources(["prx-data"], tmp_path) == ["flux-reason", "flux-generated", "mj-llava"]
    with pytest.raises(SystemExit, match=r"^train.py: no data for source\(s\) flux-reason, flux-generated, mj-llava, "
                                         r"alchemist under .*: run `python prepare.py --sources flux-reason"):
        import train
        train.setup({"SPEEDRUN_TRACK": "record", "SPEEDRUN_OUT": str(tmp_path)}, track=train.RECORD)
    sizes = {n: _write_source(tmp_path, n, k, rng) for n, k in (("flux-reason", 30), ("flux-generated", 12))}
    (tmp_path / "mj-llava").mkdir()
    _shard(tmp_path / "mj-llava" / "a.parquet", _ids(9, heldout=0), rng)
    assert data.missing_sources(["prx-data"], tmp_path) == []
    src = data.open_source("prx-data", tmp_path)
    served = {"flux-reason": sizes["flux-reason"], "flux-generated": 12, "mj-llava": 9}  # no id: none held out
    assert src.num_rows == sum(served.values())
    order = src.order(0, 0)
    assert len(order) == len(set(order.tolist())) == src.num_rows  # every row of every source, once
    enc = text.TextEncoder.cpu_track()
    for name in served:
        text.build_cache(data.ParquetSource.from_name(name, tmp_path), enc, tmp_path / name / "cache", batch_size=16)
    dirs = data.text_cache_dir("prx-data")
    assert dirs == ((tmp_path / "flux-reason" / "cache", tmp_path / "flux-generated" / "cache"),
                    tmp_path / "mj-llava" / "cache")
    batches = _take(data.make_loader("prx-data", 32, 17, 0, 1, seed=0, cache_dir=dirs), 3)
    caps = [c for b in batches for c in b["caption"]]
    assert {c.split()[1] for c in caps if c.startswith("long flux")} == {"flux-reason", "flux-generated"}
    assert any(c.startswith("a long caption of mj-") for c in caps)
    for b in batches:
        live, _ = enc.encode(b["caption"])
        n = b["txt"].shape[1]
        assert torch.allclose(b["txt"].float(), live[:, :n], rtol=1e-2, atol=1e-3)  # each row's own source's cache
