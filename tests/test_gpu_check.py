"""The GPU readiness check runs end to end on the CPU (tiny preset) and its cost model is right."""

import dataclasses

import gpu_check

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
