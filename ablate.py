"""
ablate.py: PRX's ablation table in miniature, on the CPU track, with a measured run-to-run spread.

    python ablate.py            # every cell, resumable; writes records/cpu/ABLATIONS.md and ablations.png
    python ablate.py --status   # which cells are done

A cell is one variant of train.VARIANTS (one lever of the CPU track changed) with one seed: the README's training
command (torchrun, all cores) with SPEEDRUN_VARIANT and SPEEDRUN_SEED, then the CPU protocol's evaluation (eval.py, N =
1000). The baseline runs 3 seeds, every other variant 2 (33 cells), each on the baseline's training FLOPs. A finished
cell's result (<out>/<cell>.json) is never redone; a cell cut off midway resumes its training from the last checkpoint
(train.py's exact resume). Each cell is also scored on short prompts (outside the frozen protocol), the prompts the
mixed fine-tune is for.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import checkpoint
import eval as evaluation
import record
import scenes
import train

HERE = Path(__file__).resolve().parent
SEEDS = {"baseline": (0, 1, 2)}  # every other variant: seeds 0 and 1 (cells())
# PRX's published effect of the same lever (Photoroom's PRX ablations, 256 px latents, FID at their protocol):
# the direction to compare with; the scales differ (procedural scenes at 96 px here).
PRX_EFFECT = {
    "baseline": "reference: FID 18.20 (PRX's baseline)",
    "no-repa": "worse: FID 14.64 with a DINOv3 REPA teacher vs 18.20 without",
    "repa-always": "worse later (HASTE: alignment constrains late training; PRX saw better textures once REPA was off)",
    "adamw-only": "worse: FID 15.55 with Muon vs 18.20 with AdamW, at equal steps",
    "short-captions": "worse: FID 36.84 with short captions only vs 18.20 with long ones",
    "long-only": "no FID published: the mixed fine-tune exists so that short prompts work",
    "sprint-hires": "better: FID 16.90 with SPRINT vs 17.42 dense at 1024 px, and 1.42x the batches/s",
    "bf16-weights": "worse: FID 21.87 with weights stored in bf16 vs 18.20 with FP32 master weights",
    "tread": "better: FID 14.10 with TREAD vs 17.42 dense at 1024 px, 1.64 vs 1.33 batches/s",
    "irepa": "mixed: iREPA helped with a DINOv2 teacher, not with DINOv3",
    "contrastive-fm": "small: modest gains in CMMD / DINO-MMD, FID not improved",
    "v-pred": "worse (JiT, no PRX number): with 3072 values per token, v-prediction collapses in pixel space",
    "dino-loss": "no single-lever number: part of PRX Part 3's 24-hour recipe (weight 0.01)",
    "ema-restart": "no published number: PRX Part 3 kept one EMA (0.999) through its run",
    "prx-shift": "no published ablation: PRX Part 3 trained and sampled at a fixed shift of 3.0",
    "sft-shift-rule": "no PRX counterpart: PRX keeps one shift (3.0) in every stage; the track fine-tunes at 1.5",
}
COLUMNS = (("fid", "FID", 1), ("held", "held-out adherence %", 1), ("train", "train-prompt adherence %", 1),
           ("val_loss", "val loss", 4), ("short_held", "short prompts: held-out %", 1),
           ("short_train", "short prompts: train %", 1), ("img_s", "img/s", 1), ("wall_s", "wall s", 0),
           ("steps", "steps", 0))  # optimizer steps on the baseline's FLOPs: what a lever costs per step
QUALITY = COLUMNS[:6]  # the columns that do not depend on timing: pooled sd and the comparison with the baseline
SHORT_N = 200  # scenes per split of the short-prompt check
READING = "## Reading"  # ABLATIONS.md from this heading on is written by hand and kept when the table is rewritten


def cells():
    """The baseline's seeds first (the spread), then every variant's seed 0, then seed 1: a table cut off midway
    has seen each lever once before it sees any twice."""
    return [("baseline", s) for s in SEEDS["baseline"]] + [
        (v, s) for s in (0, 1) for v in train.VARIANTS if v != "baseline"]


def cell_name(variant, seed):
    return f"{variant}-seed{seed}"


def train_cell(variant, seed, runs: Path) -> Path:
    """Trains one cell with the README's command (resuming a cut-off run); returns its log."""
    name = cell_name(variant, seed)
    env = dict(os.environ, SPEEDRUN_TRACK="cpu", SPEEDRUN_VARIANT=variant, SPEEDRUN_SEED=str(seed),
               SPEEDRUN_OUT=str(runs), SPEEDRUN_RUN_ID=name,
               SPEEDRUN_TIME_CAP_S="7200")  # every cell trains all its steps; the table reports the clock it took
    if checkpoint.latest_checkpoint(runs / "checkpoints" / name):
        env["SPEEDRUN_RESUME"] = name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=auto",
           str(HERE / "train.py")]
    runs.mkdir(parents=True, exist_ok=True)
    with open(runs / f"{name}.console.txt", "a") as console:
        subprocess.run(cmd, env=env, cwd=HERE, stdout=console, stderr=subprocess.STDOUT, check=True)
    return runs / "logs" / f"{name}.txt"


def score_cell(variant, seed, runs: Path, log: Path) -> dict:
    """CPU-protocol evaluation of the cell's final EMA weights and the short-prompt check, plus the log's wall clock,
    img/s and val loss."""

    name = cell_name(variant, seed)
    ckpt = checkpoint.latest_checkpoint(runs / "checkpoints" / name)
    model, enc = evaluation.load_checkpoint(ckpt)
    m = evaluation.evaluate(model, enc, "cpu", progress=False)
    done = re.findall(r"^done: .* wall_s:([\d.]+)", log.read_text(), re.MULTILINE)
    if not done:
        raise RuntimeError(f"{log}: the training did not finish (no `done:` line); rerun ablate.py to resume it")
    wall = float(done[-1])
    seen = record.parse_log(log)[-1]["seen"]
    val = record.parse_val_loss([log])
    return {"variant": variant, "seed": seed, "fid": m["fid"],
            "held": 100 * m["adherence"]["all"], "train": 100 * m["adherence_train"]["all"],
            "val_loss": val[max(val)]["mean"], "img_s": seen / wall,
            "wall_s": wall, "eval_s": m["eval_seconds"], "ckpt": str(ckpt), "metrics": m,
            **short_prompt_adherence(model, enc)}  # the same loaded weights, outside the frozen protocol


def checkpoint_steps(ckpt) -> int | None:
    """Optimizer steps a cell trained: its last checkpoint's name (train.py: step-<8 digits>)."""
    found = re.fullmatch(r"step-(\d+)", Path(str(ckpt)).name)
    return int(found.group(1)) if found else None


def short_prompt_adherence(model, enc, track="cpu", n=SHORT_N) -> dict:
    """Outside the frozen protocol, for the caption levers: adherence to short prompts ("red circle, blue square"),
    the prompts the mixed fine-tune exists for (the protocol prompts with long captions). A short caption names no
    position or size, so an object counts when its colour and shape are right in whichever cell holds most of that
    colour (scenes.check_scene(positions=False)). n held-out and n fresh training-distribution scenes, with the
    track protocol's sampler and noise seeds."""
    proto = evaluation.PROTOCOLS[track]
    out = {}
    for split, sc in (("short_held", scenes.heldout_scenes(n)), ("short_train", evaluation.train_scenes(dict(
            proto, n_train=n)))):
        ok = [scenes.check_scene(im, sc[i], positions=False)["all"]
              for idx, imgs in evaluation.generate(model, enc, [x.short_caption for x in sc], range(len(sc)),
                                                   proto["res"], proto, 64)
              for i, im in zip(idx, imgs)]
        out[split] = 100 * float(np.mean(ok))
    return out


def add_short_prompts(path: Path):
    """Adds the short-prompt check to a scored cell that lacks it (every new cell, and cells scored before the check
    existed), from the cell's own final checkpoint."""
    r = json.loads(path.read_text())
    if "short_held" in r:
        return
    if not r.get("ckpt") or not Path(r["ckpt"]).is_dir():
        print(f"    {path.stem}: no checkpoint at {r.get('ckpt')}: short-prompt check skipped", flush=True)
        return
    print(f"    {path.stem}: short-prompt check", flush=True)
    r.update(short_prompt_adherence(*evaluation.load_checkpoint(r["ckpt"])))
    path.write_text(json.dumps(r, indent=1, default=str) + "\n")


def summarise(results: list[dict]) -> dict:
    """variant -> column -> (mean or None, sd or None, n); a column a cell lacks is left out of its mean."""
    out = {}
    for v in train.VARIANTS:
        rows = [r for r in results if r["variant"] == v]
        if rows:
            vals = {k: [r[k] for r in rows if k in r] for k, _, _ in COLUMNS}
            out[v] = {k: (statistics.mean(x) if x else None, statistics.stdev(x) if len(x) > 1 else None, len(x))
                      for k, x in vals.items()}
    return out


def pooled_sd(results: list[dict], key: str):
    """The seed-to-seed sd pooled over every variant (each variant's deviations from its own mean), assuming a lever
    moves the mean and not the noise: more degrees of freedom than the baseline's 3 seeds alone."""
    groups = [[r[key] for r in results if r["variant"] == v and key in r] for v in train.VARIANTS]
    dof = sum(len(g) - 1 for g in groups if g)
    ss = sum(sum((x - statistics.mean(g)) ** 2 for x in g) for g in groups if g)
    return (ss / dof) ** 0.5 if dof else None, dof


def write_table(results: list[dict], path: Path):
    summ = summarise(results)
    head = "| variant | seeds | " + " | ".join(title for _, title, _ in COLUMNS) + " | PRX, same lever |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for v, cols in summ.items():
        cells_ = []
        for key, _, digits in COLUMNS:
            mean, sd, _ = cols[key]
            spread = f" ± {sd:.{digits}f}" if sd is not None and key != "steps" else ""
            cells_.append("–" if mean is None else f"{mean:.{digits}f}{spread}")
        lines.append(f"| {v} | {cols['fid'][2]} | " + " | ".join(cells_) + f" | {PRX_EFFECT[v]} |")
    # every cell, so that the spread behind each mean ± sd is visible
    per_cell = ["| cell | " + " | ".join(title for _, title, _ in COLUMNS) + " | eval s |",
                "|" + "---|" * (len(COLUMNS) + 2)]
    for r in sorted(results, key=lambda r: (list(train.VARIANTS).index(r["variant"]), r["seed"])):
        values = [f"{r[k]:.{d}f}" if k in r else "–" for k, _, d in COLUMNS]
        values.append(f"{r.get('eval_s', 0):.0f}")
        per_cell.append(f"| {cell_name(r['variant'], r['seed'])} | " + " | ".join(values) + " |")
    pooled = [(title, *pooled_sd(results, k), d) for k, title, d in QUALITY]
    noise = "; ".join(f"{t} {sd:.{d}f}" + (f" ({dof} dof)" if dof != pooled[0][2] else "")
                      for t, sd, dof, d in pooled if sd is not None)
    if noise:
        noise = f"Seed-to-seed sd pooled over every variant ({pooled[0][2]} degrees of freedom): {noise}.\n"
    # each variant against the baseline: difference of means in standard errors (pooled sd x sqrt(1/n_base + 1/n))
    versus = ["| variant | " + " | ".join(t for _, t, _ in QUALITY) + " |", "|" + "---|" * (len(QUALITY) + 1)]
    for v, cols in summ.items():
        if v != "baseline" and "baseline" in summ:
            diffs = []
            for (key, _, d), (_, sd, _, _) in zip(QUALITY, pooled):
                (m, _, n), (m0, _, n0) = cols[key], summ["baseline"][key]
                se = sd * (1 / n + 1 / n0) ** 0.5 if None not in (m, m0, sd) and sd > 0 else None
                diffs.append(f"{m - m0:+.{d}f} ({(m - m0) / se:+.1f})" if se else "–")
            versus.append(f"| {v} | " + " | ".join(diffs) + " |")
    compute_h = sum(r["wall_s"] + r.get("eval_s", 0) for r in results) / 3600
    timed = [r["cell_s"] for r in results if "cell_s" in r]  # each cell's whole clock, as main() measured it
    clock = (f" Each cell's whole wall clock (the training command with its start-up, the evaluation and the short "
             f"prompts: `cell_s`) adds up to {sum(timed) / 3600:.2f} h over the {len(timed)} cells that have one: the "
             "table's wall clock, measured cell by cell (on an idle box unless ABLATIONS.md's reading says "
             "otherwise).") if timed else ""
    kept = path.read_text().partition(READING)[2] if path.exists() else ""  # the reading, written by hand
    path.write_text(
        "# Ablations in miniature (CPU track)\n\n"
        f"`python ablate.py` on the 2-core CPU box: {len(results)} of {len(cells())} cells; their training clocks "
        f"(`wall_s`) plus evaluations add up to {compute_h:.2f} h.{clock} Each cell: the README's training command "
        "with SPEEDRUN_VARIANT / SPEEDRUN_SEED, then `eval.py`'s CPU protocol (N = 1000, 96 px). Mean ± sd over seeds "
        "(sample sd). Adherence: every attribute of an object right (held-out compositions; fresh "
        "training-distribution prompts). Short prompts: the same checker on short captions (colour and shape, "
        f"wherever the object is; outside the frozen protocol; {SHORT_N} scenes each). img/s: images seen / wall_s; "
        "wall clock and img/s compare only between cells trained on an otherwise idle machine, the quality columns "
        "do not depend on timing (every cell trains all its steps). steps: optimizer steps on the baseline's "
        "training FLOPs (the main stage takes up the difference): fewer where a lever costs more per step. "
        "PRX's column gives the direction of its published "
        "effect; its scale (FID of a 1.2B model on photos) does not transfer. The reading: at the end.\n\n" +
        "\n".join(lines) + "\n\n" + noise + "\n## Against the baseline\n\n"
        "Difference of means (variant - baseline) and, in brackets, that difference in standard errors (pooled sd x "
        f"sqrt(1/n + 1/n_baseline)). {(len(versus) - 2) * len(QUALITY)} comparisons: a few beyond 2 standard errors "
        "are expected by chance alone.\n\n" + "\n".join(versus) + "\n\n## Every cell\n\n" + "\n".join(per_cell) +
        "\n\n" + READING + (kept or "\n\n(not written yet)\n"))
    plot(summ, path.with_suffix(".png"))


def plot(summ, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summ)
    shown = [c for c in COLUMNS if c[0] in ("fid", "held", "train", "short_held")]
    fig, axes = plt.subplots(1, len(shown), figsize=(18, 4))
    for ax, (key, title, _) in zip(axes, shown):
        means = [math.nan if summ[v][key][0] is None else summ[v][key][0] for v in names]
        sds = [summ[v][key][1] or 0 for v in names]
        ax.barh(names, means, xerr=sds, color=["tab:gray" if v == "baseline" else "tab:blue" for v in names])
        ax.set_title(title)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(HERE / "records" / "cpu" / "ablations"), help="cell results (JSON)")
    p.add_argument("--runs", default=str(HERE / "cache" / "ablation-runs"), help="logs and checkpoints of the cells")
    p.add_argument("--status", action="store_true", help="list the cells and which are done")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    todo = [(v, s) for v, s in cells() if not (out / f"{cell_name(v, s)}.json").exists()]
    if a.status:
        for v, s in cells():
            print(f"{cell_name(v, s):28s} {'todo' if (v, s) in todo else 'done'}")
        return
    for f in sorted(out.glob("*.json")):  # cells scored before the short-prompt check existed
        add_short_prompts(f)
    rewrite_table(out)
    for i, (v, s) in enumerate(todo):
        t0 = time.time()
        print(f"[{len(cells()) - len(todo) + i + 1}/{len(cells())}] {cell_name(v, s)}: training", flush=True)
        log = train_cell(v, s, Path(a.runs))
        print("    evaluating (CPU protocol, N = 1000)", flush=True)
        r = score_cell(v, s, Path(a.runs), log)
        r["cell_s"] = time.time() - t0  # the cell's whole wall clock: training command, evaluation, short prompts
        path = out / f"{cell_name(v, s)}.json"
        path.write_text(json.dumps(r, indent=1, default=str) + "\n")
        print(f"    FID {r['fid']:.1f}  held {r['held']:.1f} %  train {r['train']:.1f} %  wall {r['wall_s']:.0f} s  "
              f"({r['cell_s']:.0f} s with evaluation and short prompts)", flush=True)
        rewrite_table(out)  # after every cell: a table cut off midway is current


def rewrite_table(out: Path):
    results = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    for r in results:  # the steps column: derived from each cell's last checkpoint, not stored
        if "steps" not in r and (n := checkpoint_steps(r.get("ckpt", ""))) is not None:
            r["steps"] = n
    if results:
        write_table(results, out.parent / "ABLATIONS.md")
        print(f"wrote {out.parent / 'ABLATIONS.md'} ({len(results)} cells)", flush=True)


if __name__ == "__main__":
    main()
