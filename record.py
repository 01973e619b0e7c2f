"""record.py: the record format in one place. A run's log is its record; this file writes its header, reads it back,
extracts and checks the code it embeds (record folders and the leaderboard tables: leaderboard.py, behind `make` and
`leaderboard`). It imports the evaluator only where it scores a checkpoint (verify --ckpt): train.py writes its log
header through it.

    python record.py make --track cpu --ckpt CKPT --log logs/<run-id>.txt --name NAME  # records/<track>/<date>_NAME
    python record.py verify records/<track>/<date>_<name> [--ckpt CKPT]  # hashes agree; re-evaluate with the ckpt
    python record.py extract records/<track>/<date>_<name> OUT          # the code as run, into OUT, runnable there
    python record.py leaderboard                                        # the tables in README.md, records/README.md

The log (logs/<run-id>.txt, written by train.py), in order:
    ==== <file> sha256:<hex> ====         then that file's text: every file of SOURCES, the code as run
    ==== end of sources ====              then git:<commit> dirty:<bool> and data_manifest:<source>:<hash>,...
    python:... / track:<name> variant:<v> run:<id> ... / peak: / hyper: / plan: stage <k> ...
    stage:<k> name:... res:...            at each stage start
    step:<n>/<total> stage:<k> loss:...   one line per optimizer step (ms, img/s, mfu, mem_gb, seen: images so far)
    val_loss: stage:<k> res:<px> t0.1:... mean:...  / sample_grid:<png> / checkpoint:... / done: ... wall_s:<s>
Lines are space-separated key:value tokens after their tag, so a parser needs no list of keys. A records/ folder
holds the log(s), metrics.json (every number, N, the protocol and its hash, code hashes), samples.png, loss.png and a
README.md; the code as run is in the log, not copied beside it (`extract` writes it out).
"""
import argparse
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import torch

import data

HERE = Path(__file__).resolve().parent
# every file train.py runs (imports), in the order a reader meets them
SOURCES = ("train.py", "model.py", "muon.py", "losses.py", "plan.py", "data.py", "text.py", "scenes.py", "prepare.py",
           "checkpoint.py", "eval.py", "record.py")
SRC_HEADER = re.compile(r"^==== (\S+) sha256:([0-9a-f]{64}) ====$", re.MULTILINE)
NUM = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(inf|nan)")


# ======================================================================================================================
# Writing: the log's header


def git(*args) -> str:
    try:
        out = subprocess.run(["git", *args], check=False, cwd=HERE, capture_output=True, text=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def data_manifest(tr) -> str:
    """Every source the stages read (a mixture's parts included), each with data.py's hash of it."""
    names = {s for st in tr.stages for s in data.leaves(st.source)}
    return ",".join(f"{n}:{data.source_hash(n)}" for n in sorted(names))


def write_sources(f, tr):
    """The header of a new log: the code as run (each file's text after its hash), the commit, the data."""
    for name in SOURCES:
        f.write(f"==== {name} sha256:{data.file_sha256(HERE / name)} ====\n{(HERE / name).read_text()}\n")
    dirty = bool(git("status", "--porcelain"))
    f.write(f"==== end of sources ====\ngit:{git('rev-parse', 'HEAD') or 'unknown'} dirty:{dirty}\n"
            f"data_manifest:{data_manifest(tr)}\n")


VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "asimd", "sve", "sve2", "bf16", "i8mm")  # x86 and Arm vector extensions


def machine() -> dict:
    """What the record names of the machine it ran on, so that times can be compared: CPU model, cores, vector
    extensions (from /proc/cpuinfo on Linux), the SIMD level PyTorch's CPU kernels use, and the GPUs."""
    info = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = (x.strip() for x in line.partition(":"))
            info.setdefault(key, value)  # the first processor's entry
    except OSError:
        pass
    flags = set((info.get("flags") or info.get("Features") or "").split())
    return {"cpu": info.get("model name") or platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "vector": ",".join(f for f in VECTOR_FLAGS if f in flags) or "unknown",
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}


def parse_machine(text: str) -> dict | None:
    """The `machine: {json}` header line of a log (train.py writes it); None for logs older than that line."""
    m = re.findall(r"^machine: (\{.*\})$", text, re.MULTILINE)
    return json.loads(m[-1]) if m else None


def source_hashes() -> str:
    """`name:sha256:hex` of every source (the line a resumed run logs: the code may have changed)."""
    return " ".join(f"{n}:sha256:{data.file_sha256(HERE / n)}" for n in SOURCES)


# ======================================================================================================================
# Reading: sources, step lines, validation loss


def embedded_sources(text: str) -> dict:
    """{name: (declared sha256, embedded text)} from a log: after each `==== name sha256:hex ====` line comes the
    file's text; it ends at the first line boundary where the text's hash matches (text None if none does)."""
    out = {}
    for m in SRC_HEADER.finditer(text):
        body, want = text[m.end() + 1:], m.group(2)
        h = hashlib.sha256()
        pos, found = 0, None
        for line in body.split("\n"):
            g = h.copy()
            g.update(line.encode())  # a file without a final newline (the writer added one)
            h.update((line + "\n").encode())
            if g.hexdigest() == want or h.hexdigest() == want:
                found = body[:pos + len(line) + (h.hexdigest() == want)]
                break
            if SRC_HEADER.match(line):
                break
            pos += len(line) + 1
        out[m.group(1)] = (want, found)
    return out


def parse_log(path) -> list[dict]:
    """Per-step lines `step:12/400 stage:1 loss:0.1234 ...` -> dicts (numbers as float, `a/b` -> a)."""
    rows = []
    for line in Path(path).read_text(errors="replace").splitlines():
        if line.startswith("step:"):
            kv = [(k, v.split("/")[0]) for k, _, v in (tok.partition(":") for tok in line.split())]
            rows.append({k: float(v) if NUM.fullmatch(v) else v for k, v in kv})
    return rows


def parse_val_loss(logs) -> dict:
    """train.py's `val_loss: stage:k res:r t0.1:x ... mean:m` lines -> {"stage<k>": {...}}; the last: the run's end."""
    out = {}
    for line in "".join(Path(p).read_text(errors="replace") for p in logs).splitlines():
        if line.startswith("val_loss:"):
            kv = dict(tok.split(":", 1) for tok in line.split()[1:])
            stage = kv.pop("stage")
            out[f"stage{stage}"] = {k: float(v) for k, v in kv.items()}
    return out


def record_logs(path) -> list[Path]:
    """The training log(s) of a records/ folder (or one log file)."""
    p = Path(path)
    return [p] if p.is_file() else [q for q in sorted(p.iterdir()) if q.suffix in (".txt", ".log")]


def extract(path, out) -> list[str]:
    """Write the code as run (every source embedded in the log(s) at `path`) into folder `out`; returns the names.
    A source whose text does not hash as declared is refused (never written)."""
    logs = record_logs(path)
    src = {}
    for log in logs:
        src.update(embedded_sources(log.read_text(errors="replace")))
    foreign = [n for n in src if n not in SOURCES]  # only train.py's own plain file names: nothing outside `out`
    if foreign:
        raise SystemExit(f"record.py: {path}: refused, nothing written: embedded file name {foreign[0]!r} is not one "
                         f"of train.py's files ({', '.join(SOURCES)})")
    bad = [n for n, (_, text) in src.items() if text is None]
    if not src or bad:
        raise SystemExit(f"record.py: {path}: " + (f"{', '.join(bad)} do not hash as declared" if bad else
                                                   "no embedded sources (not a train.py log?)"))
    Path(out).mkdir(parents=True, exist_ok=True)
    for name, (_, text) in src.items():
        (Path(out) / name).write_text(text)
    return sorted(src)


def recorded_module(log_text: str, name: str):
    """Import the embedded `name` (e.g. "model.py") of a log as a module of its own: the code as run, whatever this
    checkout's files are and whatever was imported before (sys.path and sys.modules are not consulted for it)."""
    want, text = embedded_sources(log_text).get(name, (None, None))
    if text is None:
        raise ValueError(f"{name} is not embedded in the log, or does not hash as declared")
    spec = importlib.util.spec_from_loader(f"recorded_{name[:-3]}_{want[:12]}", loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their class's module up
    exec(compile(text, f"<recorded {name} {want[:12]}>", "exec"), module.__dict__)  # noqa: S102 (hash-checked code)
    return module


def model_code(log_text: str, trust_recorded_code=False):
    """The module that re-evaluates a record: this checkout's model.py if the recorded one is byte-identical, else the
    recorded one when the caller trusts it; otherwise one line saying what the opt-in does."""
    want = embedded_sources(log_text).get("model.py", (None, None))[0]
    if want == data.file_sha256(HERE / "model.py"):
        import model
        return model
    if not trust_recorded_code:
        raise SystemExit("record.py: the record's model.py differs from this checkout's; re-evaluating would run the "
                         "submitter's code with your permissions: pass --trust-recorded-code to run it (read it first: "
                         "`record.py extract`), or check out the commit its log names")
    return recorded_module(log_text, "model.py")


# ======================================================================================================================
# Records: verify, make


def verify(record_dir, ckpt=None, rtol=0.02, trust_recorded_code=False) -> list[str]:
    """Problems found (empty = verified): every log embeds train.py, model.py and data.py, every embedded source
    hashes as declared, metrics.json's code hashes agree with the log's; with a checkpoint, the model is re-evaluated
    under this eval.py's protocol and the numbers compared. The model code is this checkout's model.py when the
    recorded one is byte-identical; otherwise the recorded model.py runs only with trust_recorded_code (it is the
    submitter's code, run with your permissions: transformers' trust_remote_code in spirit)."""
    import eval as evaluation
    d = Path(record_dir)
    if not (d / "metrics.json").is_file():
        raise SystemExit(f"record.py: {d} is not a record folder (no metrics.json); records are under records/<track>/")
    try:
        meta = json.loads((d / "metrics.json").read_text())
    except json.JSONDecodeError as e:
        raise SystemExit(f"record.py: {d / 'metrics.json'} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or (ckpt and meta.get("track") not in evaluation.PROTOCOLS):
        raise SystemExit(f"record.py: {d / 'metrics.json'} names no known track ({', '.join(evaluation.PROTOCOLS)})")
    logs = record_logs(d)
    problems = [] if logs else ["no training log"]
    declared = {}
    for log in logs:
        src = embedded_sources(log.read_text(errors="replace"))
        for name in ("train.py", "model.py", "data.py"):
            if name not in src:
                problems.append(f"{log.name}: {name} not embedded")
        for name, (want, text) in src.items():
            if text is None:
                problems.append(f"{log.name}: embedded {name} does not hash to its declared sha256")
            declared[name] = want
    for name, h in meta.get("code_hashes", {}).items():  # eval.py of a record older than its embedding: from git
        if name in declared and declared[name] != h:
            problems.append(f"{name}: hash in metrics.json differs from the log's")
    if ckpt and meta.get("protocol_hash") != evaluation.protocol_hash(evaluation.PROTOCOLS[meta["track"]]):
        problems.append(f"protocol {meta.get('protocol_hash')} is not this eval.py's: re-evaluation would not compare")
    elif ckpt and not problems:
        text = logs[-1].read_text(errors="replace")
        ran = re.search(r"^data_manifest:(\S*)", text, re.MULTILINE)
        now = data.source_hash("mj-llava" if meta["track"] == "record" else "scenes")
        if ran and now not in ran.group(1):
            problems.append(f"the evaluation data differ from the run's ({ran.group(1)} vs {now})")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, enc = evaluation.load_checkpoint(ckpt, device, model_lib=model_code(text, trust_recorded_code))
        new = evaluation.evaluate(model, enc, meta["track"], meta["n"])
        for k in ("fid", "cmmd", "dino_mmd", "fd_dinov2"):
            if isinstance(meta.get(k), float) and not math.isclose(new[k], meta[k], rel_tol=rtol):
                problems.append(f"{k}: re-evaluated {new[k]:.4f} vs recorded {meta[k]:.4f}")
    return problems


def main(argv=None):
    from eval import PROTOCOLS, positive_int
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("make", help="create a records/ folder end to end (evaluates the checkpoint)")
    r.add_argument("--ckpt", required=True)
    r.add_argument("--track", default="cpu", choices=PROTOCOLS)
    r.add_argument("--num-samples", dest="n", type=positive_int, help="smaller N for quick checks")
    r.add_argument("--log", action="append", required=True)
    r.add_argument("--name", required=True)
    for k, typ in (("--desc", str), ("--hardware", str), ("--wall-clock", float)):
        r.add_argument(k, type=typ, help="default: '', the eval machine, the log's wall_s")
    v = sub.add_parser("verify", help="check a record's log and hashes; re-evaluate with --ckpt")
    v.add_argument("record")
    v.add_argument("--ckpt")
    v.add_argument("--trust-recorded-code", action="store_true",
                   help="with --ckpt: re-evaluate with the model.py embedded in the record's log even when it differs "
                        "from this checkout's (it runs the submitter's code)")
    x = sub.add_parser("extract", help="write the code as run (embedded in the log) into a folder")
    x.add_argument("record", help="a records/ folder or a log file")
    x.add_argument("out")
    sub.add_parser("leaderboard", help="regenerate the records tables in README.md and records/README.md")
    a = p.parse_args(argv)
    if a.cmd in ("make", "leaderboard"):
        import leaderboard
    if a.cmd == "make":
        print("wrote", leaderboard.make_record(a.track, a.ckpt, a.log, a.name, a.desc or "", a.n, a.hardware,
                                               a.wall_clock))
        print("updated:", leaderboard.write_leaderboard())
    elif a.cmd == "verify":
        problems = verify(a.record, a.ckpt, trust_recorded_code=a.trust_recorded_code)
        print("\n".join(problems) or "verified")
        sys.exit(1 if problems else 0)
    elif a.cmd == "leaderboard":
        print("updated:", leaderboard.write_leaderboard())
    elif a.cmd == "extract":
        print(f"wrote {', '.join(extract(a.record, a.out))} to {a.out}/ (run them there, e.g. `python train.py`)")


if __name__ == "__main__":
    main()
