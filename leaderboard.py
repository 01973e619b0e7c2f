"""
leaderboard.py: the records: a records/<track>/<date>_<name>/ folder made from a run's log and checkpoint (the
evaluation, the grid, the loss curve, metrics.json), and the leaderboard tables in README.md and records/README.md.
`python record.py make ...` and `python record.py leaderboard` call it.
"""
import datetime
import json
import os
import platform
import re
from pathlib import Path

import torch

import data
from record import HERE, embedded_sources, parse_log, parse_machine, parse_val_loss


def describe_machine(m: dict | None) -> str:
    """One line for the leaderboard's hardware column (the evaluating machine for logs without a machine line)."""
    if m is None:
        return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} (the evaluating machine)"
    gpus = f"{len(m['gpus'])}x {m['gpus'][0]}, " if m["gpus"] else ""
    return f"{gpus}{m['cpu']}, {m['cores']} cores ({m['torch_cpu_capability']}: {m['vector']})"


def loss_curve(logs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for log in logs:
        rows = [r for r in parse_log(log) if isinstance(r.get("loss"), float)]
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=Path(log).name, lw=0.8)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="training loss")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def make_record(track, ckpt, logs, name, description="", n=None, hardware=None, wall_clock=None, root="records"):
    """records/<track>/<date>_<name>/: the logs, metrics.json, samples.png, loss.png, README.md."""
    import eval as evaluation
    today = datetime.date.today().isoformat()
    d = Path(root) / track / f"{today}_{name}"
    d.mkdir(parents=True, exist_ok=False)
    text = "".join(Path(p).read_text(errors="replace") for p in logs)
    for log in logs:
        (d / Path(log).name).write_text(Path(log).read_text(errors="replace"))
    model, enc = evaluation.load_checkpoint(ckpt, "cuda" if torch.cuda.is_available() else "cpu")
    metrics = evaluation.evaluate(model, enc, track, n)
    proto = evaluation.PROTOCOLS[track]
    evaluation.sample_grid(model, enc, evaluation.grid_prompts(track), proto["res"], d / "samples.png",
                           proto["steps"], proto["cfg_scale"], 0, proto["method"], proto["shift"], proto["interval"],
                           proto["weak"])
    loss_curve(logs, d / "loss.png")
    rows = [{}] + [r for log in logs for r in parse_log(log)]  # rows[-1]: the last step line
    if wall_clock is None:  # train.py's final `done: ... wall_s:<s>` line; else the sum of step times
        m = re.findall(r"\bwall(?:_clock)?_s:([\d.]+)", text)
        wall_clock = float(m[-1]) if m else sum(r["ms"] for r in rows if isinstance(r.get("ms"), float)) / 1e3
    variants = re.findall(r"^track:\S+ variant:(\S+)", text, re.MULTILINE)  # train.VARIANTS (ablations)
    flops = re.findall(r"^done: .*\bflops:(\S+)", text, re.MULTILINE)  # the training FLOPs (the CPU track's budget)
    code = {k: h for k, (h, _) in embedded_sources(text).items()}
    code["eval.py (evaluated)"] = data.file_sha256(HERE / "eval.py")
    metrics.update(name=name, date=today, description=description,
                   hardware=hardware or describe_machine(parse_machine(text)), wall_clock_s=round(wall_clock, 1),
                   variant=variants[-1] if variants else "baseline", steps=rows[-1].get("step"),
                   images_seen=rows[-1].get("seen"), train_flops=float(flops[-1]) if flops else None,
                   machine=parse_machine(text), protocol=proto, val_loss=parse_val_loss(logs), code_hashes=code,
                   software=evaluation.environment(), ckpt=str(ckpt))
    (d / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    fid, wall = fmt(metrics["fid"], 2), fmt_time(metrics["wall_clock_s"])
    (d / "README.md").write_text(
        f"# {name}\n\n{description}\n\nTrack {track}: FID {fid} at N={metrics['n']}, protocol "
        f"{metrics['protocol_hash']}; wall clock {wall} on {metrics['hardware']}.\n\n"
        "Check: `python record.py verify <this folder> [--ckpt <checkpoint>]`; the code as run: "
        "`python record.py extract <this folder> <new folder>`.\n")
    return d


# ======================================================================================================================
# The leaderboard: records/<track>/*/metrics.json -> the tables in README.md and records/README.md


def fmt_time(s):
    return "-" if s is None else f"{s / 3600:.2f} h" if s >= 3600 else f"{s / 60:.1f} min"


def fmt(v, digits):
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "-"


def one_line(text, width=90):
    """A description's first sentence, cut to `width` characters (the record's README has the rest)."""
    first = text.split(". ")[0].strip().rstrip(".")
    return first if len(first) <= width else first[:width - 1].rstrip() + "…"


def leaderboard_tables(root="records", prefix="") -> str:
    """Markdown tables, one per track and protocol version (results under different protocols do not compare):
    newest record first, numbered by date (#1 the first), the current record (the newest: a record lands by beating
    the one before it under the rules of its day, or with a change of the rules) marked."""
    rows, out = {}, []
    for p in sorted(Path(root).glob("*/*/metrics.json")):
        m = json.loads(p.read_text())
        key = (m.get("track", p.parent.parent.name), m.get("protocol_version", 1))
        rows.setdefault(key, []).append((m, p.parent))
    head = ("| # | FID | CMMD | DINO-MMD | adherence held-out / train | N | wall clock | training FLOPs | hardware "
            "| date | description | folder |")
    for track, version in sorted(rows, key=lambda t: (t[0] != "record", t[0], -t[1])):
        out += [f"### {track} track, protocol v{version}", "", head, "|---" * 12 + "|"]
        dated = sorted(rows[track, version], key=lambda r: (r[0].get("date", ""), r[1].name))
        for k, (m, d) in reversed(list(enumerate(dated, 1))):
            folder = d.relative_to(Path(root)).as_posix()
            adh = [(m.get(a) or {}).get("all") for a in ("adherence", "adherence_train")]  # every attribute right
            adh = " / ".join("-" if a is None else f"{100 * a:.1f} %" for a in adh)
            flops = f"{m['train_flops']:.3g}" if m.get("train_flops") else "-"  # the CPU track's budget counts these
            mark = "**current:** " if k == len(dated) and version == max(v for t, v in rows if t == track) else ""
            out.append(f"| {k} | {fmt(m.get('fid'), 2)} | {fmt(m.get('cmmd'), 3)} | {fmt(m.get('dino_mmd'), 3)} | "
                       f"{adh} | {m.get('n', '-')} | {fmt_time(m.get('wall_clock_s'))} | {flops} | "
                       f"{m.get('hardware', '-')} | {m.get('date', '-')} | {mark}{one_line(m.get('description', ''))} "
                       f"| [{folder}]({prefix}{folder}) |")
        out.append("")
    return "\n".join(out).strip() or "(no records yet)"


def write_leaderboard(root="records", readmes=("README.md", "records/README.md")) -> list[str]:
    """Rewrites the text between <!-- records:start --> and <!-- records:end --> in each README that has them."""
    done, marks = [], re.compile(r"<!-- records:start -->.*<!-- records:end -->", re.DOTALL)
    for path in map(Path, readmes):
        if not path.exists() or not marks.search(path.read_text()):
            continue
        rel = os.path.relpath(Path(root), path.parent)
        table = leaderboard_tables(root, "" if rel == "." else rel + "/")
        block = f"<!-- records:start -->\n{table}\n<!-- records:end -->"
        path.write_text(marks.sub(lambda _, b=block: b, path.read_text()))
        done.append(str(path))
    return done
