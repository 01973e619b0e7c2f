"""The GPU readiness check runs end to end on the CPU (tiny preset) and its cost model is right."""

import dataclasses
import json
import re

import gpu_check
import gpu_mini
import pytest

import eval as evaluation
import model
import muon
import train


def test_gpu_check_runs_on_cpu(capsys, tmp_path):
    res = gpu_check.main(["--cpu", "--reps", "1", "--steps", "2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows, loop = res["stages"], res["loop"]
    # the real loop: four stages, step lines, background checkpoints, the grids; the process exits promptly
    assert loop["code"] == 0 and loop["exit_s"] < 10, loop["log"][-3000:]
    for key in ("step:8/8 stage:4", "stall_s:", "checkpoint_written:", "done: track:record", "decoder tensors ignored"):
        assert key in loop["log"], key
    assert "UNEXPECTED" not in loop["log"]
    assert sorted(p.name for p in tmp_path.glob("loop-*.png")) == [
        "loop-stage1-burn-in.png", "loop-stage2-main.png", "loop-stage3-high-res.png", "loop-stage4-sft.png"]
    assert all(r[4] < 1e-5 for r in res["attention"] if "not exact" not in r[1])  # exact kernels agree with math
    assert "build under torch.device('meta'): every tensor on ['meta']" in out
    assert [r["stage"] for r in rows] == [s.name for s in train.CPU.stages]
    for r in rows:
        assert r["fp32"] and r["img_s"] > 0 and r["loss"] == r["loss"]  # FP32 weights, finite loss
    assert rows[0]["teacher_share"] > 0 and all(r["teacher_share"] == 0 for r in rows[1:])  # REPA only in burn-in
    assert "| stage |" in out and "SPRINT speed-up" in out and "world 8" in out


def test_newton_schulz_flops_and_muon_cost_model():
    assert muon.ns_flops((6, 4)) == 5 * (2 * 16 * 6 + 2 * 64 + 2 * 16 * 6)  # transposed: m=4, n=6
    cfg = model.PRESETS["tiny"]
    st = dataclasses.replace(train.CPU.stages[0], batch=8)
    one, eight = gpu_check.muon_cost_model(cfg, [st], worlds=(1, 8))
    n_ns = sum(muon.ns_flops(p.shape) for p in model.PRX(cfg).muon_params())
    assert one[2] == n_ns and one[3] == 8 * model.train_flops(cfg, st.res, 256, st.sprint_drop)
    # tiny: 6 blocks -> 6 matrices of each shape: 8 ranks leave every rank at most one per shape
    assert eight[2] == n_ns / 6 and eight[3] == one[3] / 8


def test_gpu_miniature_is_the_record_path_halved():
    """train.MINI: 16 px patches, 8x8 then 16x16 tokens (the record's 16x16 then 32x32, halved), REPA in the burn-in,
    SPRINT at 256 px, the mixed long/short fine-tune, text at one fixed length for the compiler; its denoiser FLOPs
    are those its comment states (2.4e16), and the mini protocol scores at its last stage's resolution and shift."""
    tr, cfg = train.MINI, model.PRESETS["mini"]
    record_patch = model.PRESETS[train.RECORD.preset].patch
    assert [s.res // cfg.patch for s in tr.stages] == [r.res // record_patch // 2 for r in train.RECORD.stages]
    assert [(s.repa > 0, s.sprint_drop, s.p_short) for s in tr.stages] == [
        (r.repa > 0, r.sprint_drop, r.p_short) for r in train.RECORD.stages]
    assert tr.ns_dtype == "bfloat16" and tr.text_len >= 35  # the scene pool's longest caption: 35 MiniLM tokens
    flops = sum(s.steps * s.batch * model.train_flops(cfg, s.res, tr.text_len, s.sprint_drop) for s in tr.stages)
    assert round(flops / 1e16, 1) == 2.4
    proto = evaluation.PROTOCOLS["mini"]
    assert proto["res"] == tr.stages[-1].res and proto["shift"] == proto["res"] / tr.shift_base


def test_gpu_miniature_runs_on_cpu(tmp_path):
    """tools/gpu_mini --cpu: train.py's loop on the mini track at a tiny size, then the mini protocol's scoring (held-
    out, training and short prompts) of its final EMA weights; the JSON it writes is what it returns."""
    res = gpu_mini.main(["--cpu", "--out", str(tmp_path), "--n", "4"])
    log = (tmp_path / "logs" / "mini.txt").read_text()
    assert "track:mini" in log and re.search(r"stage:3 .* sprint_drop:0.75", log)
    assert re.search(r"stage:4 .* p_short:0.5", log) and "done: track:mini steps:12" in log
    assert res["n"] == 4 and set(res["adherence"]) == {"colour", "shape", "position", "all"}
    assert all(0 <= res[k] <= 100 for k in ("held", "train", "short_held", "short_train")) and res["flops"] > 0
    assert json.loads((tmp_path / "gpu_mini.json").read_text()) == res
    assert train.TRACKS["mini"] is train.MINI  # the tool's tiny copy is gone
    with pytest.raises(SystemExit, match="holds a mini run already"):
        gpu_mini.main(["--cpu", "--out", str(tmp_path)])
