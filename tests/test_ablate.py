"""Ablations in miniature: each variant changes exactly the lever it names, the ablation levers train as they say
(AdamW for every parameter, bf16-stored weights), a bad variant name is one line, and ablate.py's table resumes."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, env_for

import ablate
import plan
import train

ROOT = Path(__file__).resolve().parents[1]
# What each variant must change, written out independently of train.VARIANTS: ("track", field) or (stage, field).
EXPECTED = {
    "baseline": set(),
    "no-repa": {(0, "repa")},
    "repa-always": {(1, "repa"), (2, "repa"), (3, "repa")},
    "adamw-only": {("track", "muon")},
    "short-captions": {(0, "p_short"), (1, "p_short"), (2, "p_short"), (3, "p_short")},
    "long-only": {(3, "p_short")},
    "sprint-hires": {(2, "sprint_drop"), (2, "path_drop"), (2, "steps")},
    "bf16-weights": {("track", "bf16_weights")},
    "tread": {(0, "tread"), (1, "tread"), (2, "tread"), (3, "tread")},
    "irepa": {("track", "irepa")},
    "contrastive-fm": {("track", "contrastive")},
    "v-pred": {("track", "pred")},
    "dino-loss": {("track", "dino_loss")},
    "ema-restart": {(3, "ema_restart")},
    "prx-shift": {("track", "shift_fixed"), (3, "shift")},
    "sft-shift-rule": {(3, "shift")},
}


def changed(a: train.Track, b: train.Track) -> set:
    out = {("track", f.name) for f in dataclasses.fields(train.Track)
           if f.name not in ("stages", "variant") and repr(getattr(a, f.name)) != repr(getattr(b, f.name))}  # nan
    for k, (sa, sb) in enumerate(zip(a.stages, b.stages, strict=True)):
        out |= {(k, f.name) for f in dataclasses.fields(train.Stage) if getattr(sa, f.name) != getattr(sb, f.name)}
    return out


def test_each_variant_changes_exactly_its_lever():
    assert set(train.VARIANTS) == set(EXPECTED)
    for name, fields in EXPECTED.items():
        tr = train.select_track({"SPEEDRUN_TRACK": "cpu", "SPEEDRUN_VARIANT": name})
        assert tr.variant == name
        assert changed(train.CPU, tr) == fields, name
    sprint = train.apply_variant(train.CPU, "sprint-hires").stages[2]
    assert sprint.sprint_drop == 0.75 and sprint.path_drop == 0.1 and train.CPU.stages[2].sprint_drop == 0
    assert sprint.steps > 1.8 * train.CPU.stages[2].steps  # the same FLOPs: more (cheaper) steps
    assert train.select_track({"SPEEDRUN_TRACK": "cpu", "SPEEDRUN_SEED": "3"}).seed == 3


def test_unknown_variant_is_one_line_listing_the_valid_ones():
    r = subprocess.run([sys.executable, str(ROOT / "train.py")], env=env_for("/nonexistent", SPEEDRUN_VARIANT="nope"),
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "'nope'" in r.stderr
    assert "no-repa" in r.stderr and "bf16-weights" in r.stderr


@pytest.mark.parametrize("variant", ["adamw-only", "bf16-weights"])
def test_optimizer_levers_train_as_named(tmp_path, variant):
    tr = train.apply_variant(TINY, variant)
    run = train.setup({"SPEEDRUN_OUT": str(tmp_path)}, track=tr)
    run.id = "test"
    train.enter_stage(run, 1)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    for _ in range(2):
        train.train_step(run)
    params = dict(run.model.named_parameters())
    assert any(not torch.equal(before[n], p) for n, p in params.items())
    if variant == "adamw-only":  # AdamW holds a state for every hidden matrix (Muon's, in the baseline)
        assert run.muon is None
        assert all(p in run.adamw.state for p in run.model.muon_params())
    else:  # every weight is a bf16 value after each step, the master copy is still an FP32 tensor
        assert all(p.dtype == torch.float32 and torch.equal(p, p.to(torch.bfloat16).float()) for p in params.values())


def test_table_resumes_and_skips_finished_cells(tmp_path, monkeypatch):
    """Stub training and scoring (tests only): finished cells are never redone, the table covers every cell."""
    calls, out, cut_at = [], tmp_path / "cells", [4]
    out.mkdir()
    done = ("no-repa", 1)
    row = {"fid": 100.0, "held": 20.0, "train": 30.0, "val_loss": 0.1, "img_s": 90.0, "wall_s": 500.0, "cell_s": 600}
    ckpt = tmp_path / "step-00001711"  # scored before the short-prompt check and the steps column existed: the
    ckpt.mkdir()  # table adds both from the checkpoint (its steps from its name)
    (out / f"{ablate.cell_name(*done)}.json").write_text(
        json.dumps(dict(row, variant=done[0], seed=done[1], ckpt=str(ckpt))))
    short = {"short_held": 10.0, "short_train": 20.0}

    def fake_train(v, s, runs):
        calls.append((v, s))
        if len(calls) == cut_at[0]:
            raise TimeoutError("cut off")  # the run is cut off during its third cell (after the short check)
        return runs / "log"

    def fake_score(v, s, runs, log):
        return dict(row, variant=v, seed=s, fid=100.0 + s, steps=2202 if (v, s) != ("no-repa", 0) else 2692, **short)

    def fake_short(model, enc):
        calls.append("short")
        return {"short_held": 30.0, "short_train": 40.0}

    monkeypatch.setattr(ablate, "train_cell", fake_train)
    monkeypatch.setattr(ablate, "score_cell", fake_score)
    monkeypatch.setattr(ablate, "short_prompt_adherence", fake_short)
    monkeypatch.setattr(ablate.evaluation, "load_checkpoint", lambda ckpt: (None, None))
    with pytest.raises(TimeoutError):
        ablate.main(["--out", str(out), "--runs", str(tmp_path / "runs")])
    assert len(list(out.glob("*.json"))) == 3  # two new cells + the one done before
    assert "3 of 33 cells" in (tmp_path / "ABLATIONS.md").read_text()  # the table follows every finished cell
    first = list(calls)
    calls.clear()
    cut_at[0] = None
    ablate.main(["--out", str(out), "--runs", str(tmp_path / "runs")])
    assert calls[0] == first[-1] and set(first[1:3]).isdisjoint(calls) and done not in calls
    assert first[0] == "short" and "short" not in calls  # only the cell scored before the check, once, first
    assert len(calls) == len(ablate.cells()) - 3 and len(ablate.cells()) == 3 + 2 * (len(train.VARIANTS) - 1) == 33
    levers = len(train.VARIANTS) - 1  # the baseline's 3 seeds, then each lever's seed 0, then each lever's seed 1
    assert ablate.cells()[:4] == [("baseline", 0), ("baseline", 1), ("baseline", 2), ("no-repa", 0)]
    assert ablate.cells()[3 + levers] == ("no-repa", 1) and ablate.cells()[-1] == (list(train.VARIANTS)[-1], 1)
    assert json.loads((out / f"{ablate.cell_name(*done)}.json").read_text())["short_held"] == 30.0
    table = (tmp_path / "ABLATIONS.md").read_text()
    assert "| baseline | 3 | 101.0 ± 1.0 |" in table  # seeds 0, 1, 2: FID 100, 101, 102
    assert "| baseline-seed2 | 102.0 |" in table
    assert "| no-repa-seed1 | 100.0 | 20.0 | 30.0 | 0.1000 | 30.0 | 40.0 | 90.0 | 500 | 1711 | 0 |" in table
    assert "| no-repa | 2 | 100.0 ± 0.0 |" in table and " | 2202 | worse: FID 14.64" in table  # steps: no ± sd
    assert "(17 degrees of freedom): FID 0.7;" in table  # pooled: (2 + 14 x 0.5) / 17 (no-repa-seed1: FID 100)
    assert "adds up to 0.17 h over the 33 cells that have one" in table  # 600 s + 32 cells of (faked) ~0 s
    assert (tmp_path / "ABLATIONS.png").stat().st_size > 0
    assert table.endswith("## Reading\n\n(not written yet)\n")
    (tmp_path / "ABLATIONS.md").write_text(table.replace("(not written yet)", "What reproduces: ..."))
    ablate.main(["--out", str(out), "--runs", str(tmp_path / "runs")])  # every cell done: the table is rewritten
    assert (tmp_path / "ABLATIONS.md").read_text().endswith("## Reading\n\nWhat reproduces: ...\n")  # kept


def test_pooled_sd_pools_each_variants_deviations_from_its_own_mean():
    rows = [("baseline", 1.0), ("baseline", 2.0), ("baseline", 3.0), ("no-repa", 10.0), ("no-repa", 14.0),
            ("adamw-only", 5.0)]  # one seed: no degree of freedom
    results = [{"variant": v, "fid": x} for v, x in rows]
    sd, dof = ablate.pooled_sd(results, "fid")
    assert dof == 3 and sd == pytest.approx(((2.0 + 8.0) / 3) ** 0.5)  # squares: 1 + 0 + 1, 4 + 4


def test_short_prompt_check_scores_short_captions_wherever_objects_land(monkeypatch):
    """A sampler double (tests only) that draws each short caption's own objects, but in other cells and sizes:
    the short-prompt check counts them all right; with nothing drawn it counts none; it asks with short captions."""
    import scenes

    n, proto = ablate.SHORT_N, ablate.evaluation.PROTOCOLS["cpu"]
    splits = [scenes.heldout_scenes(n), ablate.evaluation.train_scenes(dict(proto, n_train=n))]
    asked, draw = [], [True]

    def fake_generate(model, enc, prompts, indices, res, proto, batch_size=16, progress=False):
        split = splits[len(asked) // n % 2]  # held-out first, then training-distribution scenes
        asked.extend(prompts)
        for j in indices:
            s = split[j]
            assert prompts[j] == s.short_caption
            moved = tuple((c, sh, "large" if sz == "small" else "small", (k + 4) % 9) for c, sh, sz, k in s.objects)
            yield [j], scenes.render_scene(scenes.Scene(s.background, moved if draw[0] else ()), res)[None]

    monkeypatch.setattr(ablate.evaluation, "generate", fake_generate)
    assert ablate.short_prompt_adherence(None, None) == {"short_held": 100.0, "short_train": 100.0}
    assert len(asked) == 2 * n
    draw[0] = False
    assert ablate.short_prompt_adherence(None, None) == {"short_held": 0.0, "short_train": 0.0}


def test_every_variant_spends_the_baselines_compute(tmp_path):
    """fit_budget: each variant's main stage takes up the difference, so every cell plans the baseline's FLOPs to
    within one main step (never more); a cheaper lever (AdamW: no Newton-Schulz) buys more main steps."""
    env = env_for(tmp_path, SPEEDRUN_STEPS_SCALE="0.2")
    base = train.setup(env)
    want = sum(plan.compute_plan(base))
    steps = {}
    for name in train.VARIANTS:
        tr = train.select_track(dict(env, SPEEDRUN_VARIANT=name))
        tr = plan.fit_budget(tr, plan.compute_plan(base, tr), want)
        planned = plan.compute_plan(base, tr)
        one_step = planned[1] / tr.stages[1].steps
        assert want - one_step < sum(planned) <= want, name
        assert changed(base.tr, tr) - {(1, "steps")} == EXPECTED[name], name
        steps[name] = tr.stages[1].steps
    run = train.setup(dict(env, SPEEDRUN_VARIANT="adamw-only"))  # setup fits the variant it runs
    assert run.tr.stages[1].steps == steps["adamw-only"] and run.ns_flops == 0
    # AdamW saves the Newton-Schulz FLOPs (~12 % of a 64 px step at width 64, muon.ns_flops): ~1.2x the main steps
    assert steps["adamw-only"] > 1.15 * steps["baseline"] and steps["repa-always"] < steps["baseline"]
    assert steps["bf16-weights"] == steps["long-only"] == steps["baseline"]  # the same cost: nothing to take up
    assert steps["v-pred"] == steps["contrastive-fm"] == steps["ema-restart"] == steps["baseline"]
    assert steps["tread"] > steps["baseline"] > steps["dino-loss"]  # TREAD saves compute, the DINO loss costs some
