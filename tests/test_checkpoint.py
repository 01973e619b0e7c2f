"""checkpoint.py: written in the background with the state at save time; loaded without unpickling objects."""
import pickle
from pathlib import Path

import pytest
import torch
from conftest import make_run
from safetensors.torch import load_file, save_file

import checkpoint
import train

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling this calls open(marker, "w"): what a malicious state.pt would do
        return (open, (str(self.marker), "w"))


def checkpoint_with_state(path, state):
    path.mkdir(parents=True)
    w = {"w": torch.ones(2)}
    save_file(w, str(path / "model.safetensors"))
    save_file(w, str(path / "ema.safetensors"))
    with open(path / "state.pt", "wb") as f:
        pickle.dump(state, f, protocol=2) if isinstance(state, Payload) else torch.save(state, f)


def test_checkpoint_with_a_pickled_callable_is_refused_unexecuted(tmp_path):
    marker = tmp_path / "executed"
    ck = tmp_path / "checkpoints" / "run" / "step-00000001"
    checkpoint_with_state(ck, Payload(marker))
    with pytest.raises(checkpoint.CheckpointError, match="refused: it holds pickled objects"):
        checkpoint.read_checkpoint(ck, "cpu")
    with pytest.raises(SystemExit, match="no usable checkpoint of run 'run'") as e:
        checkpoint.find_resume_checkpoint(tmp_path, "run")
    assert len(str(e.value).splitlines()) == 1 and "refused" in str(e.value)
    assert not marker.exists()


def test_checkpoint_state_of_plain_values_loads(tmp_path):
    """The state train.py writes (and wrote before the FLOP count): tensors, numbers, strings, None, containers;
    an optimizer's state_dict, the CPU RNG state."""
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], betas=(0.9, 0.95))
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {"step": 7, "stage": 1, "run_id": "r", "track": "cpu", "world": 2, "adamw": opt.state_dict(), "muon": None,
             "loader": {"position": 64, "seed": 1, "skipped": 0}, "projector": None, "elapsed": 1.5,
             "rng": torch.get_rng_state()}
    ck = tmp_path / "step-00000007"
    checkpoint_with_state(ck, state)
    _, _, got = checkpoint.read_checkpoint(ck, "cpu")
    assert got["adamw"]["param_groups"][0]["betas"] == (0.9, 0.95) and torch.equal(got["rng"], state["rng"])
    assert got["loader"] == state["loader"] and "flops" not in got


def test_checkpoint_written_in_the_background_holds_the_state_at_save_time(tmp_path, monkeypatch):
    """save_checkpoint returns while the write is still blocked; training goes on; the checkpoint that lands holds
    the weights of the step it was taken at (a host copy, not the live tensors), and a failed write is raised."""
    import threading
    gate, write = threading.Event(), checkpoint.write_checkpoint
    monkeypatch.setattr(checkpoint, "write_checkpoint", lambda *a: (gate.wait(30), write(*a)))
    run = make_run(tmp_path)
    train.enter_stage(run, 1)
    train.train_step(run)
    at_save = {k: v.clone() for k, v in run.model.state_dict().items()}
    checkpoint.save(run, "test", train.log)
    assert run.writer.job["thread"].is_alive()
    assert checkpoint.latest_checkpoint(tmp_path / "checkpoints" / "test") is None
    train.train_step(run)  # the weights change while the write waits
    assert any(not torch.equal(v, at_save[k]) for k, v in run.model.state_dict().items())
    gate.set()
    run.writer.wait()
    ckpt = checkpoint.latest_checkpoint(tmp_path / "checkpoints" / "test")
    assert ckpt.name == "step-00000001" and run.writer.job is None
    saved = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in at_save.items())

    def broken(*a):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(checkpoint, "write_checkpoint", broken)
    checkpoint.save(run, "test", train.log)
    with pytest.raises(RuntimeError, match="step-00000002") as e:
        run.writer.wait()
    assert isinstance(e.value.__cause__, OSError)
    assert checkpoint.latest_checkpoint(tmp_path / "checkpoints" / "test").name == "step-00000001"  # the previous stays
