"""plan.py: the FLOPs a schedule plans and counts, the over-budget refusal, the dry run at a world size."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LEVERS, TINY, env_for, make_run
from torch.utils.flop_counter import FlopCounterMode

import losses
import model
import muon
import plan
import text
import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("track", [TINY, LEVERS], ids=["baseline", "levers"])
def test_flops_counted_per_step_and_planned(tmp_path, monkeypatch, track):
    """The running FLOP total grows each step by exactly: per micro-batch, its samples x model.train_flops at its text
    length (SPRINT's or TREAD's), + REPA per sample (the teacher's forward and the projector's fwd + bwd, the conv one
    of iREPA) and the DINO feature loss (its network's forward on both images, backward to the prediction), counted
    here on the real networks, + Newton-Schulz on every Muon matrix; the plan (text at its longest) bounds each stage
    from above."""
    run = make_run(tmp_path, track)
    lens = []
    condition = text.TextEncoder.condition
    monkeypatch.setattr(text.TextEncoder, "condition", lambda *a: lens.append(condition(*a)) or lens[-1])
    ns = sum(muon.ns_flops(p.shape) for p in run.model.muon_params())
    assert run.ns_flops == ns > 0
    planned = plan.compute_plan(run)
    for k, st in enumerate(track.stages):
        train.enter_stage(run, k)
        grid, aux = st.res // run.cfg.patch, 0
        x0 = torch.rand(1, 3, st.res, st.res) * 2 - 1
        with FlopCounterMode(display=False) as fc:
            if st.repa:  # the real teacher and projector, with a real backward through the projector
                run.teacher.set_attn_implementation("eager")  # attention as matmuls the counter sees
                losses.teacher_tokens(run.teacher, x0, grid)
                n = grid * grid // 2 if st.tread else grid * grid  # the tap (block 3) is inside TREAD's span
                h = torch.randn(1, run.cfg.hidden, grid, grid) if track.irepa else torch.randn(1, n, run.cfg.hidden)
                run.projector(h.requires_grad_()).sum().backward()
            if track.dino_loss:
                run.critics["dino"].set_attn_implementation("eager")
                x0_hat = x0.clone().requires_grad_()
                losses.dino_feature_loss(run.critics["dino"], x0_hat, x0, grid).sum().backward()
        aux = fc.get_total_flops()
        assert run.aux_flops == aux and (aux > 0) == bool(st.repa or track.dino_loss)
        lens.clear()
        before = run.flops
        train.train_step(run)
        want = sum(len(t) * (model.train_flops(run.cfg, st.res, t.shape[1], st.sprint_drop, st.tread) + aux)
                   for t, _ in lens)
        assert run.flops - before == want + ns
        assert planned[k] / st.steps >= want + ns  # the plan is an upper bound per step
    assert planned[0] > planned[1]  # REPA is counted in the burn-in's plan


def test_over_budget_recipe_stops_at_setup(tmp_path):
    with pytest.raises(SystemExit, match=r"^train.py: the cpu track's stages plan .* over its budget of 1e\+09"):
        make_run(tmp_path, dataclasses.replace(TINY, flop_budget=1e9))
    run = make_run(tmp_path, dataclasses.replace(TINY, flop_budget=sum(plan.compute_plan(make_run(tmp_path)))))
    assert run.tr.flop_budget > 0  # exactly at the budget is allowed


def test_dry_run_prints_each_stage_at_a_world_size():
    """SPEEDRUN_DRY_RUN=<GPUs>: the record track's plan at that world size (per-GPU batch, micro-batches, images,
    epochs of its data, hours at the measured rates), no training; a world size that does not split a stage's global
    batch is one line."""
    for world, per, micro in ((32, 32, 32), (8, 128, 64)):
        env = dict(env_for("/nonexistent", SPEEDRUN_DRY_RUN=str(world)), SPEEDRUN_TRACK="")  # the default: record
        r = subprocess.run([sys.executable, str(ROOT / "train.py")], env=env, capture_output=True, text=True,
                           timeout=60, check=True)
        lines = r.stdout.splitlines()
        assert lines[0].startswith(f"dry run: track record, {world} GPUs, 112 Muon matrices in 6 shapes")
        assert f"stage 1 burn-in 512 px: global batch 1024 = {world} x {per} (micro {micro} x accum {per // micro})" \
            in lines[1] and "25.6 M images" in lines[1] and "of prx-data" in lines[1]
        hours = sum(s.steps * s.batch / (world * rate) / 3600 for s, rate in zip(train.RECORD.stages,
                                                                                  plan.MEASURED_IMG_S))
        assert lines[-1].startswith(f"  total ~{hours:.1f} h of training (ESTIMATE")
    r = subprocess.run([sys.executable, str(ROOT / "train.py")], env=dict(env, SPEEDRUN_DRY_RUN="24"),
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 1 and r.stderr.strip() == ("train.py: stage burn-in's global batch 1024 does not split over "
                                                      "24 processes; use a world size that divides it (1, 2, 4, 8 "
                                                      "nodes of 8 GPUs)")
