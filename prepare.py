"""prepare.py: data preparation, done once before the clock starts (none of it is timed): the hub sources downloaded
with a manifest and the held-out id lists, training-ready shards (every image decoded and resized once), the caption
embeddings cached, and the loader benchmark. A second run finds what exists and does nothing.

    python prepare.py                 # download + prepare data.SOURCES (progress bars; a second run does nothing)
    python prepare.py --prepare       # training-ready shards: every image decoded and resized once (512, 1024 px)
    python prepare.py --cache         # precompute caption embeddings (GPU node, after the download); size, bandwidth
    python prepare.py --bench         # the loader's images/s per worker, prepared vs raw, and the format candidates
"""
import argparse
import hashlib
import http.client
import io
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

import data
import text
from data import BAD_INPUT, SOURCES, ParquetSource, SampleError

# ======================================================================================================================
# Downloads: manifest, held-out list, images behind URLs


def write_manifest(name, folder):
    """files, sizes, sha256 and row counts of a prepared source; unchanged files keep their old sha256."""
    folder = Path(folder)
    man_path = folder / "manifest.json"
    old = {f["path"]: f for f in json.loads(man_path.read_text())["files"]} if man_path.exists() else {}
    files = []
    for p in sorted(folder.rglob("*.parquet")):
        rel, size = str(p.relative_to(folder)), p.stat().st_size
        o = old.get(rel)
        sha = o["sha256"] if o and o["size"] == size else data.file_sha256(p)
        try:
            rows = pq.ParquetFile(p).metadata.num_rows
        except BAD_INPUT as e:  # recorded, and skipped with a message by the loader
            print(f"[data] {p}: unreadable parquet ({e})", file=sys.stderr)
            rows = -1
        files.append({"path": rel, "size": size, "sha256": sha, "rows": rows})
    man = {"source": name, "repo": SOURCES.get(name, {}).get("repo"), "heldout_permille": data.HELDOUT_PERMILLE,
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
    img_dir = Path(out_path).parent / "images"
    img_dir.mkdir(exist_ok=True)
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


def prepare(name, root=data.DATA_ROOT):
    """Download one source (resumes; a second run with everything present does nothing), manifest, held-out ids."""
    from huggingface_hub import snapshot_download
    src, folder = SOURCES[name], Path(root) / name
    man = folder / "manifest.json"
    if man.exists() and (data.HELDOUT_DIR / f"{name}.txt").exists() and all(
            (folder / f["path"]).exists() and (folder / f["path"]).stat().st_size == f["size"]
            for f in json.loads(man.read_text())["files"]):
        print(f"{name}: already prepared ({man}, hash {data.manifest_hash(man)})")
        return man
    snapshot_download(src["repo"], repo_type="dataset", local_dir=folder, allow_patterns=src["files"], max_workers=8)
    if src.get("url"):  # images fetched from the CSV's URLs, once
        for csv_path in folder.rglob("*.csv"):
            if not (folder / (csv_path.stem + ".parquet")).exists():
                _fetch_url_images(csv_path, folder / (csv_path.stem + ".parquet"), src)
    man = write_manifest(name, folder)
    ids = ParquetSource(folder, **{k: src[k] for k in ("image", "long", "short", "id")}, split="heldout").heldout_ids
    data.HELDOUT_DIR.mkdir(exist_ok=True)
    (data.HELDOUT_DIR / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    print(f"{name}: manifest {man} hash {data.manifest_hash(man)}, {len(ids)} held-out ids -> heldout/{name}.txt")
    return man


# ======================================================================================================================
# Training-ready shards and the caption-embedding cache


PREPARED_QUALITY = 95  # JPEG q95, 4:4:4 chroma: the prepared format (the candidates: `python prepare.py --bench`)


def prepare_images(src: ParquetSource, res, out_dir, file_rows=4096, group_rows=64):
    """Decode, centre-crop and resize every row of `src` once to `res` and write it as JPEG q95 into parquet files
    of file_rows rows in row groups of group_rows (bounded reads), with both captions; global row numbering kept,
    so order, resume, rank split and held-out rule are those of the raw source. Undecodable rows are written empty
    with their error (the loader skips and counts them as on the raw path). Resumes file by file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
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
                buf = io.BytesIO()
                Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, "JPEG", quality=PREPARED_QUALITY, subsampling=0)
                blob, err = buf.getvalue(), None
            except SampleError as e:
                blob, err = b"", str(e)
                long = short = None
            for k, v in zip(rows, (blob, long, short, err)):
                rows[k].append(v)
            bar.update(1)
        table = pa.table({"image": pa.array(rows["image"], pa.binary()), "long": pa.array(rows["long"], pa.string()),
                          "short": pa.array(rows["short"], pa.string()), "error": pa.array(rows["error"], pa.string())})
        pq.write_table(table, str(path) + ".tmp", row_group_size=group_rows, write_batch_size=group_rows)
        os.replace(str(path) + ".tmp", path)
    bar.close()
    return out


# ======================================================================================================================
# Cache report and command line (the loader benchmark: tools/bench_data.py)


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="*", default=list(SOURCES), help="default: every data.SOURCES entry")
    ap.add_argument("--root", default=str(data.DATA_ROOT))
    ap.add_argument("--encoder", default=text.T5GEMMA)
    for flag in ("--cache", "--bench", "--prepare"):
        ap.add_argument(flag, action="store_true")
    a = ap.parse_args(argv)
    bad = [n for n in a.sources if n not in SOURCES]
    if bad:
        ap.error(f"unknown source {', '.join(map(repr, bad))}; choose from: {', '.join(SOURCES)}")
    if a.bench:
        return subprocess.run([sys.executable, "-m", "tools.bench_data"], cwd=Path(__file__).parent, check=True)
    for name in a.sources:
        prepare(name, a.root)
    if a.prepare:  # training-ready shards at each record-track resolution
        for name in a.sources:
            for res in (512, 1024):
                prepare_images(ParquetSource.from_name(name, a.root), res, Path(a.root) / name / f"prepared-{res}")
    if a.cache:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        enc = text.TextEncoder.from_name(a.encoder, dev)
        for name in a.sources:
            cache_report(text.build_cache(ParquetSource.from_name(name, a.root), enc, Path(a.root) / name / "cache"))


if __name__ == "__main__":
    main()
