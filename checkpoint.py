"""checkpoint.py: checkpoints that cost the trainer a copy to host memory and never lose a run.

A checkpoint is a folder checkpoints/<run-id>/step-XXXXXXXX holding model.safetensors (FP32 weights),
ema.safetensors (what is sampled and evaluated), config.json (the model config and text encoder: eval.py rebuilds
the model from it) and state.pt (optimizers, data position, step, clock, RNG). It is written on a thread into a temp
folder, fsynced and renamed: a folder named step-* is always complete; the previous one goes once the new one is
there. A run holds a lock on its folder; a resume takes the newest readable checkpoint and names any damaged one.
"""
import dataclasses
import fcntl
import json
import math
import os
import pickle
import shutil
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says which, why, and what is still intact."""


def checkpoint_dir(out: Path, run_id: str) -> Path:
    return out / "checkpoints" / run_id


def to_host(obj, pool=None):
    """A copy in host memory of every tensor in obj (nested dicts/lists), on a CPU too, so that training may go on
    while a thread writes it. CUDA tensors go to page-locked buffers kept in `pool` under their path in obj and
    reused from one checkpoint to the next (allocating 14 GB of pinned memory took 10-13 s on an H200), copied
    asynchronously, then one synchronisation."""
    pool = {} if pool is None else pool

    def copy(x, path):
        if isinstance(x, dict):
            return {k: copy(v, f"{path}/{k}") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v, f"{path}/{i}") for i, v in enumerate(x))
        if not torch.is_tensor(x):
            return x
        if x.device.type != "cuda":
            return x.detach().to("cpu", copy=True).contiguous()
        buf = pool.get(path)
        if buf is None or buf.shape != x.shape or buf.dtype != x.dtype:
            buf = pool[path] = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return buf.copy_(x.detach(), non_blocking=True)

    out = copy(obj, "")
    if pool:
        torch.cuda.synchronize()
    return out


def latest_checkpoint(root: Path):
    done = sorted(root.glob("step-*"))  # only complete checkpoints carry this name
    return done[-1] if done else None


def write_checkpoint(root: Path, step: int, snap: dict):
    """Background thread: write the snapshot to a temp dir, fsync, rename (atomic), then drop the previous one."""
    final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
    if final.exists():
        return
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(snap["model"], str(tmp / "model.safetensors"))
    save_file(snap["ema"], str(tmp / "ema.safetensors"))
    (tmp / "config.json").write_text(json.dumps(snap["config"]))
    torch.save(snap["state"], tmp / "state.pt")
    for f in tmp.iterdir():  # on disk before the rename makes the checkpoint visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    os.rename(tmp, final)  # atomic: a checkpoint dir named step-* is always complete
    for old in root.glob("step-*"):  # the previous one goes only once the new one is complete
        if old != final:
            shutil.rmtree(old)


class Writer:
    """One checkpoint write in flight, on a thread: start() returns once the state is copied to host memory (the
    trainer's only stall); wait() joins the write, logs how long it took, and raises its error as a CheckpointError
    naming the intact previous checkpoint (logged first: nothing is lost silently)."""

    def __init__(self, log=print):
        self.log = log  # where the written / failed lines go (train.py: the run's log)
        self.pool = {}  # page-locked host buffers, reused from one checkpoint to the next
        self.job = None  # the write in flight: thread, path, error, write_s

    def start(self, root: Path, step: int, state: dict) -> Path:
        self.wait()
        snap = to_host(state, self.pool)
        job = {"path": root / f"step-{step:08d}", "error": None, "write_s": 0.0}

        def write():
            t0 = time.perf_counter()
            try:
                write_checkpoint(root, step, snap)
            except Exception as e:  # noqa: BLE001 (any failure: re-raised by wait)
                job["error"] = e
            job["write_s"] = time.perf_counter() - t0

        job["thread"] = threading.Thread(target=write, name="checkpoint-writer")
        job["thread"].start()
        self.job = job
        return job["path"]

    def wait(self):
        """Join the write in flight, if any."""
        job, self.job = self.job, None
        if job is None:
            return
        job["thread"].join()
        if job["error"] is not None:
            root = job["path"].parent
            shutil.rmtree(root / f".tmp-{job['path'].name}", ignore_errors=True)  # the partial write, not a checkpoint
            msg = (f"writing checkpoint {job['path']} failed ({job['error']}); the previous checkpoint "
                   f"{latest_checkpoint(root) or '(none)'} is intact")
            self.log(f"STOP: {msg}")
            raise CheckpointError(msg) from job["error"]
        self.log(f"checkpoint_written:{job['path']} write_s:{job['write_s']:.1f}")


def matching_groups(sd, names):
    """An optimizer state without the param groups that are not alive now (the REPA projector's, when the checkpoint
    was written at the end of the burn-in, before the next stage dropped it)."""
    groups = [g for g in sd["param_groups"] if g.get("name") in names]
    keep = {i for g in groups for i in g["params"]}
    return {"state": {i: v for i, v in sd["state"].items() if i in keep}, "param_groups": groups}


def read_checkpoint(path: Path, device) -> tuple:
    """(weights, EMA, state) of a checkpoint folder, or CheckpointError naming the damaged file."""
    out = []
    for name in ("model.safetensors", "ema.safetensors", "state.pt"):
        try:
            out.append(load_file(str(path / name), device=str(device)) if name.endswith(".safetensors") else
                       torch.load(path / name, map_location=device, weights_only=True))  # tensors + plain values
        except pickle.UnpicklingError as e:  # an object that is not a tensor, number, string or container of them
            raise CheckpointError(f"{path / name} refused: it holds pickled objects other than tensors and plain "
                                  f"values, not loaded ({str(e).splitlines()[0][:120]})") from None
        except Exception as e:  # noqa: BLE001 (truncated, missing or foreign: the caller falls back or stops)
            raise CheckpointError(f"{path / name} is damaged ({type(e).__name__}: {str(e)[:120]})") from None
    return tuple(out)


def find_resume_checkpoint(out: Path, rid: str) -> tuple:
    """The newest readable checkpoint of run `rid`: (path, contents on the CPU). A damaged one is named and skipped
    for the previous complete one; none readable stops with one line (never a silent restart from step 0)."""
    root = checkpoint_dir(out, rid)
    damaged = []
    for path in sorted(root.glob("step-*"), reverse=True):
        try:
            return path, read_checkpoint(path, "cpu")
        except CheckpointError as e:
            damaged.append(str(e))
            print(f"train.py: {e}; trying the previous checkpoint", file=sys.stderr)
    raise SystemExit(f"train.py: no usable checkpoint of run {rid!r} under {root}" +
                     (f" ({'; '.join(damaged)})" if damaged else ""))


def lock_run(out: Path, run_id: str, rank: int):
    """One run per run id: rank 0 holds an exclusive lock on checkpoints/<id>/.lock for its whole life (the OS drops
    it when the process dies, even by SIGKILL); a second run of the same id stops with the holder's pid. Returns the
    open lock file (keep it), None on other ranks."""
    if rank != 0:
        return None
    path = checkpoint_dir(out, run_id) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 (held open for the whole run)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        raise SystemExit(f"train.py: run {run_id!r} is already running (pid {holder} holds {path}); stop it first, "
                         "or pick another SPEEDRUN_RUN_ID") from None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f


def resume_id(env):
    """SPEEDRUN_RESUME ("latest" or a run id) -> the run id to continue, checked before any setup; None: a new run."""
    resume = env.get("SPEEDRUN_RESUME")
    if not resume:
        return None
    root = Path(env.get("SPEEDRUN_OUT", ".")).resolve() / "checkpoints"
    runs = sorted((d for d in root.iterdir() if d.is_dir()), key=lambda d: d.stat().st_mtime) if root.is_dir() else []
    if resume != "latest" and resume not in {d.name for d in runs}:
        raise SystemExit(f"train.py: SPEEDRUN_RESUME={resume!r}: no such run under {root} (runs there: "
                         f"{', '.join(d.name for d in runs[-5:]) or 'none'}; or 'latest')")
    if not runs:
        raise SystemExit(f"train.py: SPEEDRUN_RESUME=latest: no run under {root} to resume")
    return runs[-1].name if resume == "latest" else resume


# ======================================================================================================================
# A run's checkpoint: what train.py saves and restores (the run's fields; rank 0 writes)


def save(run, why, log):
    """Checkpoints off the critical path: the trainer stalls only to copy the state to host memory; a thread writes
    it (Writer). Rank 0 writes: weights are equal on every rank and the optimizer state is replicated."""
    t = time.perf_counter()
    run.writer.wait()
    if run.rank == 0:
        config = {"model": dataclasses.asdict(run.cfg), "track": run.tr.name, "text_encoder": run.tr.text_encoder,
                  "step": run.step}
        state = {"step": run.step, "stage": run.k, "run_id": run.id, "track": run.tr.name, "world": run.world,
                 "adamw": run.adamw.state_dict(), "muon": run.muon.state_dict() if run.muon else None,
                 "loader": run.loader.state_dict(), "projector": run.projector.state_dict() if run.projector else None,
                 "elapsed": time.time() - run.t0 + run.elapsed0, "rng": torch.get_rng_state(), "flops": run.flops}
        snap = {"model": run.model.state_dict(), "ema": run.ema.state_dict(), "config": config, "state": state}
        path = run.writer.start(checkpoint_dir(run.out, run.id), run.step, snap)
        log(run, f"checkpoint:{path} why:{why} stall_s:{time.perf_counter() - t:.2f} (written in the background)")
    if run.world > 1:
        dist.barrier()


def restore_weights(run, contents: tuple) -> dict:
    """A resume, first half (before any stage): weights, EMA, step, clock, RNG; returns the rest (restore_stage)."""
    weights, ema, state = contents
    run.model.load_state_dict(weights)
    run.ema.load_state_dict(ema)
    run.step, run.elapsed0 = state["step"], state["elapsed"]
    run.flops = state.get("flops", math.nan)  # checkpoints older than the FLOP count: unknown
    torch.set_rng_state(state["rng"].cpu())
    return state


def restore_stage(run, state: dict):
    """A resume, second half, once its stage exists (its REPA group): data position, projector, optimizers."""
    if state["stage"] == run.k:
        run.loader.load_state_dict(state["loader"])
    if state["projector"] is not None and run.projector is not None:
        run.projector.load_state_dict(state["projector"])
    alive = {g.get("name") for g in run.adamw.param_groups}
    run.adamw.load_state_dict(matching_groups(state["adamw"], alive))
    if run.muon:
        run.muon.load_state_dict(state["muon"])
