"""CPU-track diagnosis: train a variant of train.CPU in-process and score it quickly (issue 9's experiments).

    python -m tools.cpu_diag NAME '{"shift_base": 16, "res": [64, 64, 96, 96], "model": {"rope_grid": 8}}'

Overrides: any Track field; per-stage lists "res", "steps", "batch", "max_micro", "repa", "sprint_drop";
"model" (fields of the
tiny preset); "eval_res", "eval_steps" (32), "cfg" (3.0); "eval_only" (score the run's last checkpoint again).
Writes scratch/runs/NAME (log, checkpoints), scratch/grids/NAME-{train,held}.png (top: asked for; bottom: sampled)
and appends a JSON line to scratch/results.jsonl: every-attribute / colour / shape / position adherence of 64 fresh
training-distribution scenes (scenes.SceneDataset(999)) and 48 held-out compositions, Euler sampling with CFG.
One process, the machine's threads: faster than the README's torchrun (2 processes x 1 thread) on 2 cores.
"""
import dataclasses
import json
import sys
import time

import torch

import checkpoint
import eval as ev
import model
import scenes
import train

name, ov = sys.argv[1], json.loads(sys.argv[2] if len(sys.argv) > 2 else "{}")
torch.set_flush_denormal(True)
tr = train.CPU
st = list(tr.stages)
for key in ("res", "steps", "batch", "max_micro", "repa", "sprint_drop"):
    if key in ov:
        st = [dataclasses.replace(s, **{key: v}) for s, v in zip(st, ov.pop(key))]
mdl = ov.pop("model", None)
if mdl:
    model.PRESETS["tiny"] = dataclasses.replace(model.PRESETS["tiny"], **mdl)
eval_res = ov.pop("eval_res", st[-1].res)
eval_steps, cfg = ov.pop("eval_steps", 32), ov.pop("cfg", 3.0)
do_train = not ov.pop("eval_only", False)
tr = dataclasses.replace(tr, stages=tuple(st), **ov)
train.TRACKS["cpu"] = tr
out = f"scratch/runs/{name}"
t0 = time.time()
if do_train:
    code = train.main({"SPEEDRUN_OUT": out, "SPEEDRUN_TRACK": "cpu", "SPEEDRUN_RUN_ID": name,
                       "SPEEDRUN_CKPT_EVERY": "100000"})
wall = time.time() - t0
logtxt = train.Path(f"{out}/logs/{name}.txt").read_text()
wall_s = float(logtxt.split("wall_s:")[-1].split()[0]) if "wall_s:" in logtxt else float("nan")
ck = checkpoint.latest_checkpoint(checkpoint.checkpoint_dir(train.Path(out).resolve(), name))
net, enc = ev.load_checkpoint(ck)
ds = scenes.SceneDataset(999)
scen = {"train": [ds.scene(i) for i in range(64)], "held": scenes.heldout_scenes(48)}
res = {"name": name, "ov": sys.argv[2] if len(sys.argv) > 2 else "{}", "wall_s": wall_s}
t1 = time.time()
for split, chosen in scen.items():
    proto = {"steps": eval_steps, "cfg_scale": cfg, "seed": 0, "method": "euler", "shift": eval_res / tr.shift_base,
             "interval": (0.0, 1.0), "weak": "cfg"}
    prompts = [s.long_caption for s in chosen]
    imgs = torch.cat([x for _, x in ev.generate(net, enc, prompts, range(len(chosen)), eval_res, proto)])
    sc = [scenes.check_scene(im, s) for im, s in zip(imgs, chosen)]
    for k in ("all", "colour", "shape", "position"):
        res[f"{split}_{k}"] = round(sum(x[k] for x in sc) / len(sc), 3)
    real = torch.stack([scenes.render_scene(s, eval_res) for s in chosen[:16]])
    ev.save_grid(torch.cat([real, imgs[:16]]), f"scratch/grids/{name}-{split}.png", ncol=16)
res["eval_s"] = round(time.time() - t1, 1)
print(json.dumps(res))
with open("scratch/results.jsonl", "a") as f:
    f.write(json.dumps(res) + "\n")
