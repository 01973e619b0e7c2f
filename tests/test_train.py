"""train.py: distributed Muon = torch.optim.Muon, world-size invariance under torchrun, FP32 state under autocast,
stage transitions, time cap, non-finite loss, kill-and-resume, and the CPU track end to end (shortened)."""

import dataclasses
import itertools
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import LEVERS, TINY, cpu_env, env_for, main_in_process, make_run, random_lpips
from safetensors.torch import load_file

import checkpoint
import data
import eval as evaluation
import leaderboard
import losses
import model
import record
import scenes
import train

ROOT = Path(__file__).resolve().parents[1]
HELPER = ["-m", "tests.train_dist_helper"]  # run from the repository root
SCALE = "0.015"  # the CPU track at 1.5 % of its steps: 8 / 20 / 3 / 2 steps
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """2 shared cores: one thread per process avoids OpenMP oversubscription (100x slowdowns seen here)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_train(out, timeout=240, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train.py")], env=env_for(out, **kw), cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def final_weights(out, run_id):
    ckpt = checkpoint.latest_checkpoint(out / "checkpoints" / run_id)
    return ckpt, load_file(str(ckpt / "model.safetensors")), load_file(str(ckpt / "ema.safetensors"))


# ---------------------------------------------------------------------------------------------------------- Muon


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    """torchrun --nproc_per_node=2 (gloo) vs one process, same global batch: distributed Muon and gradient
    accumulation (4 micro-batches vs 2 per rank) give the same weights, up to float summation order. The two
    processes start from an empty cache: they share its preparation (captions on one, the teacher on the other).
    Past one node: two "nodes" of one process each, joined by torchrun's c10d rendezvous on the loopback (the
    multi-node launch of the README), train exactly what one node of two processes trains."""
    outs = {}
    env = env_for(tmp_path, SPEEDRUN_CACHE=str(tmp_path / "cache"))
    launch = [sys.executable, "-m", "torch.distributed.run"]
    rdzv = [f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-backend=c10d", "--rdzv-id=nodes", "--nnodes=2",
            "--nproc-per-node=1"]
    for name, cmds in (("two", [launch + ["--standalone", "--nproc_per_node=2", *HELPER]]),
                       ("one", [[sys.executable, *HELPER]]),
                       ("nodes", [launch + rdzv + HELPER] * 2)):
        procs = [subprocess.Popen(cmd + [str(tmp_path / name)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for cmd in cmds]
        for r in procs:
            stdout, stderr = r.communicate(timeout=240)
            assert r.returncode == 0, stdout[-3000:] + stderr[-3000:]
            assert ("accum:4" if name == "one" else "accum:2") in stdout or name == "nodes"
        outs[name] = load_file(str(tmp_path / name / "model.safetensors"))
    assert all(torch.equal(outs["nodes"][k], outs["two"][k]) for k in outs["two"])  # the same reductions, bit for bit
    import train_dist_helper
    torch.manual_seed(train_dist_helper.TRACK.seed)
    init = model.PRX(dataclasses.replace(model.PRESETS[train.CPU.preset], text_dim=384)).state_dict()
    moved = max((outs["one"][k] - init[k]).abs().max().item() for k in init)
    diff = max((outs["one"][k] - outs["two"][k]).abs().max().item() for k in init)
    assert moved > 1e-3  # the steps did train
    # float summation order only: measured 2.3e-5 vs 7.5e-3 (with the trained scene teacher, whose batched forward
    # differs at float level, and Muon's lr 3e-3); a wrong reduction (a missing / world, a lost micro-batch) is O(1)
    assert diff < 1e-2 * moved, (diff, moved)
    teacher = next((tmp_path / "cache").glob("scene-teacher-*"))  # written by a rank other than 1 or not: complete
    assert {"config.json", "model.safetensors", "teacher.json"} <= {p.name for p in teacher.iterdir()}
    # distributed Muon on 5 + 1 matrices (a rank with no matrix sends zeros): bit-identical to torch.optim.Muon
    params, grads = train_dist_helper.muon_matrices()
    opt = torch.optim.Muon(params, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    for name in ("one", "two"):
        got = load_file(str(tmp_path / name / "muon.safetensors"))
        assert all(torch.equal(got[f"p{i}"], p.detach()) for i, p in enumerate(params)), name


# ---------------------------------------------------------------------------------------------------------- in-process


def test_fp32_state_under_autocast(tmp_path):
    run = make_run(tmp_path)
    run.amp = torch.bfloat16  # CPU autocast, as CUDA runs under bf16 autocast
    seen = []
    run.model.blocks[0].qkv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    train.enter_stage(run, 0)  # REPA on: the projector's AdamW state too
    for _ in range(2):
        m = train.train_step(run)
        assert torch.isfinite(torch.tensor(m["loss"]))
    assert seen and all(d == torch.bfloat16 for d in seen)  # autocast really ran the matmuls in bf16
    for mod in (run.model, run.ema, run.projector):
        assert all(p.dtype == torch.float32 for p in mod.parameters())
    for opt in (run.adamw, run.muon):
        states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
        assert states and all(v.dtype == torch.float32 for v in states)


def test_stage_transitions(tmp_path, monkeypatch):
    """REPA (loss, teacher, projector group) only in stage 1; SPRINT keep indices only in stage 3; short captions
    only in stage 4; LR cools down to 0 at the end."""
    run = make_run(tmp_path)
    batches, calls = [], []
    next_batch = train.next_batch
    monkeypatch.setattr(train, "next_batch", lambda r: batches.append(next_batch(r)) or batches[-1])
    run.model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    per_stage = {}
    for k, end in enumerate(train.stage_ends(TINY)):  # train.main's spine, one step at a time
        train.enter_stage(run, k)
        while run.step < end:
            batches.clear()
            calls.clear()
            m = train.train_step(run)
            groups = [g["name"] for g in run.adamw.param_groups]
            per_stage.setdefault(k, []).append(dict(
                m, teacher=run.teacher is not None, groups=groups, keep=[c["keep_idx"] is not None for c in calls],
                short=[bool(b["short"].any()) for b in batches], n_state=len(run.adamw.state)))
    s1, s2, s3, s4 = (per_stage[k] for k in range(4))
    assert all(r["repa"] is not None and r["teacher"] and "repa" in r["groups"] for r in s1)
    assert all(r["repa"] is None and not r["teacher"] and r["groups"] == ["model"] for r in s2 + s3 + s4)
    assert s2[0]["n_state"] == len(list(run.model.adamw_params()))  # projector's Adam state is gone
    assert all(any(r["keep"]) is False for r in s1 + s2 + s4) and all(all(r["keep"]) for r in s3)
    assert not any(any(r["short"]) for r in s1 + s2 + s3) and any(any(r["short"]) for r in s4)
    assert s4[0]["lr"] > s4[1]["lr"] > s4[2]["lr"] == 0.0  # the cooldown ends at LR 0 on the last step
    assert train.lr_at(TINY, 0) < train.lr_at(TINY, 1) == TINY.lr  # warmup


def test_levers_train_as_named(tmp_path):
    """TREAD, iREPA, v-prediction, Contrastive FM, the DINO and LPIPS losses in one run: each is where it says, the
    auxiliary terms reach the step line, and the fine-tune's EMA restarts at its first step (not on a resume)."""

    track = dataclasses.replace(LEVERS, pred="v", stages=LEVERS.stages[:3] + (
        dataclasses.replace(LEVERS.stages[3], ema_restart=True),))
    run = make_run(tmp_path, track)
    run.tr, run.critics["lpips"] = dataclasses.replace(run.tr, lpips=0.1), random_lpips()  # no VGG16 weights here
    assert run.cfg.pred == "v" and run.model.cfg.pred == "v" and set(run.critics) == {"dino", "lpips"}
    ends = train.stage_ends(track)
    for k in range(4):
        train.enter_stage(run, k)
        if k == 0:
            assert isinstance(run.projector, torch.nn.Conv2d)  # iREPA's projector
        same = all(torch.equal(p, q) for p, q in zip(run.ema.parameters(), run.model.parameters()))
        assert same == (k in (0, 3))  # the restart: the fine-tune's average starts from its first weights
        while run.step < ends[k]:
            m = train.train_step(run)
            assert m["aux"] is not None and math.isfinite(m["aux"]) and m["aux"] != 0
        assert "aux:" in train.step_line(run, m, 0.1)
    run.step = ends[2] + 1  # a resume inside the fine-tune keeps the EMA it restored
    ema = [p.clone() for p in run.ema.parameters()]
    train.enter_stage(run, 3)
    assert all(torch.equal(p, q) for p, q in zip(run.ema.parameters(), ema))
    assert isinstance(run.critics["lpips"], losses.LPIPS)


def logged(log, tag, key):
    """The value after `key` on the log's last line that starts with `tag` (not the embedded sources' text)."""
    return re.findall(rf"^{tag} .*?{re.escape(key)}(\S+)", log, re.MULTILINE)[-1]


def test_time_cap_saves_and_stops(tmp_path):
    code = main_in_process(cpu_env(tmp_path, SPEEDRUN_RUN_ID="cap", SPEEDRUN_TIME_CAP_S="0"))
    log = (tmp_path / "logs" / "cap.txt").read_text()
    assert code == 3 and "track:cpu" in log  # the cap is a safety net: hitting it is not a finished run
    assert "STOP: wall-clock cap 0 s reached: the run is incomplete and not a valid record; saved at step 1" in log
    assert checkpoint.latest_checkpoint(tmp_path / "checkpoints" / "cap").name == "step-00000001"


def test_nonfinite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    loss_fn = model.flow_matching_loss

    def poisoned(model, x0, *a, **kw):  # the weights blow up after two steps
        out = loss_fn(model, x0, *a, **kw)
        return out._replace(fm=out.fm * float("nan")) if train_step_count[0] >= 2 else out

    train_step_count = [0]
    step = train.train_step
    monkeypatch.setattr(model, "flow_matching_loss", poisoned)
    monkeypatch.setattr(train, "train_step", lambda r: (step(r), train_step_count.__setitem__(0, r.step))[0])
    code = main_in_process(cpu_env(tmp_path, SPEEDRUN_RUN_ID="nan", SPEEDRUN_CKPT_EVERY="2"))
    log = (tmp_path / "logs" / "nan.txt").read_text()
    assert code == 1 and "STOP: non-finite loss at step 3" in log
    ckpt = checkpoint.latest_checkpoint(tmp_path / "checkpoints" / "nan")
    assert ckpt.name == "step-00000002"
    assert torch.isfinite(load_file(str(ckpt / "model.safetensors"))["final.weight"]).all()


# ---------------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The CPU track, shortened, run uninterrupted as `python train.py` would run it."""
    out = tmp_path_factory.mktemp("cpu_track")
    r = run_train(out, SPEEDRUN_STEPS_SCALE=SCALE, SPEEDRUN_RUN_ID="ref", SPEEDRUN_CKPT_EVERY="5")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_cpu_track_end_to_end(reference):
    out = reference
    log = (out / "logs" / "ref.txt").read_text()
    src = record.embedded_sources(log)  # what `record.py verify` and `extract` read
    assert set(src) == set(record.SOURCES)
    for name in record.SOURCES:
        assert src[name][0] == data.file_sha256(ROOT / name) and src[name][1] == (ROOT / name).read_text(), name
    for key in ("git:", "dirty:", "data_manifest:scenes:", "python:", "torch:", "world:1", "track:cpu",
                "trained once on the procedural scenes", "teacher freed", "p_short:0.5", "path_drop:0.1",
                "done: track:cpu",
                "stall_s:", "checkpoint_written:", "peak: spec"):
        assert key in log, key
    rows = record.parse_log(out / "logs" / "ref.txt")
    total = sum(round(s.steps * float(SCALE)) for s in train.CPU.stages)
    assert [r["step"] for r in rows] == list(range(1, total + 1))
    assert {r["stage"] for r in rows} == {1, 2, 3, 4}
    assert all(("repa" in r) == (r["stage"] == 1) for r in rows)
    for key in ("loss", "lr", "gnorm", "ms", "img/s", "mfu", "mem_gb", "flops"):
        assert all(key in r for r in rows), key
    flops = [r["flops"] for r in rows]  # the running total of training FLOPs
    assert all(b > a > 0 for a, b in itertools.pairwise(flops))
    done = float(logged(log, "done:", "flops:"))
    assert done == pytest.approx(flops[-1], rel=1e-4)
    planned = float(logged(log, "compute:", "planned <= "))
    assert 0.8 * planned < done <= planned  # the plan bounds the real count (text at its longest)
    mach = record.parse_machine(log)  # the machine, so that times can be compared
    assert mach["cores"] == os.cpu_count() and mach["cpu"] and mach["vector"] and mach["gpus"] == []
    assert mach["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    s2 = [r["loss"] for r in rows if r["stage"] == 2]
    first = sum(r["loss"] for r in rows[:3]) / 3
    assert sum(s2[-5:]) / 5 < 0.5 * first  # loss falls (same 64 px resolution)
    lr4 = [r["lr"] for r in rows if r["stage"] == 4]  # the cooldown
    assert lr4 == sorted(lr4, reverse=True) and lr4[-1] == 0.0 < lr4[0] == max(r["lr"] for r in rows)
    grids = sorted(p.name for p in (out / "logs" / "ref-samples").glob("*.png"))
    assert grids == ["stage1-burn-in.png", "stage2-main.png", "stage3-high-res.png", "stage4-sft.png"]
    ckpt, _weights, ema = final_weights(out, "ref")
    assert ckpt.name == f"step-{total:08d}" and len(list(ckpt.parent.glob("step-*"))) == 1
    model, _ = evaluation.load_checkpoint(ckpt)  # eval.py reads the checkpoint's config.json + EMA
    assert all(torch.equal(v, ema[k]) for k, v in model.state_dict().items())


def test_record_from_the_log_verifies_reevaluates_and_extracts(reference, tmp_path, monkeypatch):
    """record.py make: a records/ folder without copies of the code; verify passes, and with the checkpoint it
    re-evaluates through the model.py embedded in the log (loaded explicitly) to the same numbers; extract writes
    the code as run, byte for byte."""
    out = reference
    ckpt = checkpoint.latest_checkpoint(out / "checkpoints" / "ref")
    monkeypatch.setattr(evaluation, "CACHE_DIR", tmp_path / "eval-cache")
    monkeypatch.setitem(evaluation.PROTOCOLS, "cpu", dict(evaluation.PROTOCOLS["cpu"], n_train=8))  # 8, not 200
    d = leaderboard.make_record("cpu", ckpt, [out / "logs" / "ref.txt"], "t", n=8, root=tmp_path / "records")
    assert sorted(p.name for p in d.iterdir()) == ["README.md", "loss.png", "metrics.json", "ref.txt", "samples.png"]
    meta = json.loads((d / "metrics.json").read_text())
    assert meta["n"] == 8 and meta["code_hashes"]["model.py"] == data.file_sha256(ROOT / "model.py")
    assert meta["machine"] == record.parse_machine((out / "logs" / "ref.txt").read_text())
    assert meta["train_flops"] > 0 and meta["machine"]["cpu"] in meta["hardware"]
    assert record.verify(d) == []
    assert record.verify(d, ckpt=ckpt, rtol=1e-9) == []
    names = record.extract(d, tmp_path / "code")
    assert names == sorted(record.SOURCES)
    assert all((tmp_path / "code" / n).read_text() == (ROOT / n).read_text() for n in names)


def test_kill_and_resume_match_uninterrupted(reference):
    """SIGTERM (saves, exits 0), resume, SIGKILL right after the burn-in's last checkpoint, resume, SIGKILL between
    checkpoints, resume: the same final weights and EMA as the
    uninterrupted run, bit for bit (exact data position, per-sample noise, optimizer state)."""
    out, env = reference, {"SPEEDRUN_STEPS_SCALE": SCALE, "SPEEDRUN_CKPT_EVERY": "5"}
    r = run_train(out, SPEEDRUN_RUN_ID="kill", SPEEDRUN_KILL_AT="3:TERM", **env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint.latest_checkpoint(out / "checkpoints" / "kill").name == "step-00000004"
    burn_in = round(train.CPU.stages[0].steps * float(SCALE))  # 8: the checkpoint at the end of the REPA burn-in
    r = run_train(out, SPEEDRUN_RESUME="kill", SPEEDRUN_KILL_AT=f"{burn_in + 1}:KILL", **env)
    assert r.returncode == -signal.SIGKILL
    assert checkpoint.latest_checkpoint(out / "checkpoints" / "kill").name == f"step-{burn_in:08d}"
    r = run_train(out, SPEEDRUN_RESUME="kill", SPEEDRUN_KILL_AT="22:KILL", **env)  # resumes without the REPA group
    assert r.returncode == -signal.SIGKILL
    assert checkpoint.latest_checkpoint(out / "checkpoints" / "kill").name == "step-00000020"
    r = run_train(out, SPEEDRUN_RESUME="kill", **env)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (out / "logs" / "kill.txt").read_text()
    assert "STOP: SIGTERM; saved at step 4" in log and "at step:4" in log and "at step:20" in log
    _, w_ref, e_ref = final_weights(out, "ref")
    ckpt, w, e = final_weights(out, "kill")
    assert ckpt.name == checkpoint.latest_checkpoint(out / "checkpoints" / "ref").name
    assert all(torch.equal(w[k], w_ref[k]) for k in w_ref) and all(torch.equal(e[k], e_ref[k]) for k in e_ref)
    ref_log = (out / "logs" / "ref.txt").read_text()
    assert logged(log, "done:", "flops:") == logged(ref_log, "done:", "flops:")  # the count survives the resumes


def test_skipped_rows_give_the_mean_over_the_served_samples(tmp_path, monkeypatch):
    """A micro-batch that lost rows to bad input (here: all of them) must not shrink the step: the gradient and the
    loss are the mean over the samples actually served, the same as a global batch of only those samples."""
    grads, losses = {}, {}

    def capture(key):
        def clip(params, max_norm):
            grads[key] = torch.cat([p.grad.flatten() for p in params]).clone()
            return torch.tensor(0.0)
        return clip

    for key, G, empty in (("skipped", 4, True), ("plain", 2, False)):
        run = make_run(tmp_path / key)
        train.enter_stage(run, 1)  # dense, no REPA
        run.stage = dataclasses.replace(run.stage, batch=G)
        batch = train.next_batch(run)
        cut = {k: v[:0] if torch.is_tensor(v) or isinstance(v, list) else v for k, v in batch.items()}
        run.accum, run.batches = (2, iter([batch, cut])) if empty else (1, iter([batch]))
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture(key))
        losses[key] = train.train_step(run)["loss"]
    assert losses["skipped"] == pytest.approx(losses["plain"], rel=1e-6)
    torch.testing.assert_close(grads["skipped"], grads["plain"])


def test_old_stage_workers_end_at_the_stage_switch(tmp_path):
    """Each stage makes a new loader: the previous one's worker processes must be gone once the next stage starts,
    and none may outlive the run."""
    import multiprocessing as mp
    run = make_run(tmp_path, dataclasses.replace(TINY, workers=2))
    train.enter_stage(run, 0)
    train.next_batch(run)
    old = mp.active_children()
    assert len(old) == 2
    train.enter_stage(run, 1)
    train.next_batch(run)
    new = mp.active_children()
    assert len(new) == 2 and not any(p.is_alive() for p in old) and not {p.pid for p in old} & {p.pid for p in new}
    run.loader.close()
    assert mp.active_children() == []


def test_binned_validation_loss_is_deterministic_and_binned(tmp_path):
    """The same checkpoint gives the same numbers (fixed batch, noise and t); the bins differ from each other; the
    log line parses into the record's metrics."""
    run = make_run(tmp_path)
    train.enter_stage(run, 1)
    run.logf = open(tmp_path / "log.txt", "w")  # noqa: SIM115
    train.binned_val_loss(run)
    train.binned_val_loss(run)
    run.logf.close()
    lines = [x for x in (tmp_path / "log.txt").read_text().splitlines() if x.startswith("val_loss:")]
    assert len(lines) == 2 and lines[0] == lines[1]
    vals = record.parse_val_loss([tmp_path / "log.txt"])["stage2"]
    assert set(vals) == {"res", "mean"} | {f"t{t}" for t in evaluation.VAL_T}
    bins = [vals[f"t{t}"] for t in evaluation.VAL_T]
    assert len(set(bins)) == len(bins) and all(v > 0 for v in bins) and vals["res"] == 32
    assert vals["mean"] == pytest.approx(sum(bins) / len(bins), abs=1e-4)
    images, captions = data.validation_batch("scenes", 32, evaluation.VAL_N)
    assert images.shape == (evaluation.VAL_N, 3, 32, 32)
    assert captions == [s.long_caption for s in scenes.heldout_scenes(32)]


def test_a_stage_shift_draws_that_stages_times_only(tmp_path):
    """Stage.shift (the CPU track's fine-tune at 1.5): that stage's timesteps follow model.training_time at its fixed
    shift (uniform draws unshifted), the other stages keep the track's resolution rule; the draws are
    otherwise the same."""
    track = dataclasses.replace(TINY, stages=TINY.stages[:3] + (dataclasses.replace(TINY.stages[3], shift=1.5),))
    run, index = make_run(tmp_path, track), torch.arange(16)
    for k, fixed in ((2, 0.0), (3, 1.5)):
        train.enter_stage(run, k)
        d = train.draw_samples(run, index, step=5)
        a = track.stages[k].res / track.shift_base
        want, rule = [], []
        for i in index.tolist():  # the per-sample generator's first draws, as draw_samples makes them
            g = torch.Generator().manual_seed(train.sample_key(track.seed, 5, i))
            u, z = torch.rand(4, generator=g), torch.randn(1, generator=g)
            want.append(model.training_time(u[:2], z, a, fixed))
            rule.append(model.training_time(u[:2], z, a))
        torch.testing.assert_close(d.t, torch.tensor(want, dtype=d.t.dtype))
        assert torch.allclose(d.t, torch.tensor(rule, dtype=d.t.dtype)) == (not fixed)  # the shift changes them
