"""record.py and checkpoint.py with a stranger's files: extract writes only train.py's own file names inside its
folder, verify runs recorded code only with an explicit opt-in, a checkpoint loads without unpickling objects."""
import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import checkpoint
import data
import eval as evaluation
import leaderboard
import record


def log_with(files: dict) -> str:
    return "".join(f"==== {n} sha256:{hashlib.sha256(s.encode()).hexdigest()} ====\n{s}\n" for n, s in files.items())


@pytest.mark.parametrize("name", ["../../escaped.py", "/tmp/absolute.py", "evil.py", "sub/model.py", ".."])
def test_extract_refuses_names_that_are_not_train_pys_files(tmp_path, name):
    """Each hostile name is refused in one line naming it; nothing is written, not even the honest files."""
    log = tmp_path / "rec" / "log.txt"
    log.parent.mkdir()
    log.write_text(log_with({"train.py": "print('train')\n", name: "print('pwned')\n"}))
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(SystemExit) as e:
        record.extract(log, out)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and repr(name) in msg and "refused, nothing written" in msg
    assert not out.exists() and not (tmp_path / "escaped.py").exists() and not (tmp_path / "a" / "escaped.py").exists()
    assert sorted(p.name for p in tmp_path.rglob("*.py")) == []


def test_extract_writes_honest_files(tmp_path):
    files = {"train.py": "print('train')\n", "model.py": "x = 1\n"}
    (tmp_path / "log.txt").write_text(log_with(files))
    assert record.extract(tmp_path / "log.txt", tmp_path / "out") == sorted(files)
    assert {n: (tmp_path / "out" / n).read_text() for n in files} == files


def hostile_record(tmp_path, marker):
    """A record whose embedded model.py differs from this checkout's and would write `marker` when run."""
    d = tmp_path / "rec"
    d.mkdir()
    model_py = f"open({str(marker)!r}, 'w').write('ran')\n"
    (d / "log.txt").write_text(log_with({"train.py": "\n", "model.py": model_py, "data.py": "\n"}))
    proto = evaluation.PROTOCOLS["cpu"]
    meta = {"track": "cpu", "n": 8, "protocol_hash": evaluation.protocol_hash(proto), "fid": 1.0}
    (d / "metrics.json").write_text(json.dumps(meta))
    return d


def test_verify_runs_a_differing_model_py_only_with_the_opt_in(tmp_path):
    marker = tmp_path / "executed"
    d = hostile_record(tmp_path, marker)
    assert record.verify(d) == []  # hashes only: nothing is run
    with pytest.raises(SystemExit) as e:
        record.verify(d, ckpt=tmp_path / "ckpt")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "--trust-recorded-code" in msg and "differs" in msg
    assert not marker.exists()  # nothing executed
    text = (d / "log.txt").read_text()
    record.model_code(text, trust_recorded_code=True)  # the opt-in runs the recorded code
    assert marker.read_text() == "ran"


def test_verify_uses_this_checkouts_model_py_when_identical(tmp_path):
    files = {"model.py": (record.HERE / "model.py").read_text()}
    assert record.model_code(log_with(files)) is evaluation.model_lib
    assert data.file_sha256(record.HERE / "model.py") == hashlib.sha256(files["model.py"].encode()).hexdigest()


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


# ---------------------------------------------------------------------------------------------- the leaderboard
def write_metrics(root, track, folder, **kw):
    d = Path(root) / track / folder
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(dict(track=track, **kw)))


def test_leaderboard_regeneration(tmp_path):
    root = tmp_path / "records"
    write_metrics(root, "cpu", "2025-01-02_b", fid=12.3456, adherence={"all": 0.25, "colour": 0.5}, n=1000,
                  wall_clock_s=1800, hardware="CPU x2",
                  date="2025-01-02", description="second")
    write_metrics(root, "cpu", "2025-01-03_c", fid=9.0, adherence={"all": 0.5}, adherence_train={"all": 0.75}, n=1000,
                  wall_clock_s=600, hardware="CPU x2", date="2025-01-03", description="third", protocol_version=2,
                  train_flops=4.5678e13)
    write_metrics(root, "cpu", "2025-01-01_a", fid=20.0, cmmd=None, n=1000, wall_clock_s=7200.0, hardware="CPU x2",
                  date="2025-01-01", description="first")
    for p in (tmp_path / "README.md", root / "README.md"):
        p.write_text("# T\n\n<!-- records:start -->\nold\n<!-- records:end -->\n\nafter\n")
    assert len(leaderboard.write_leaderboard(root, (tmp_path / "README.md", root / "README.md"))) == 2
    head = ("| # | FID | CMMD | DINO-MMD | adherence held-out / train | N | wall clock | training FLOPs | hardware "
            "| date | description | folder |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    expected = ("### cpu track, protocol v2\n\n" + head +  # newest first, numbered by date, the current one marked
                "| 1 | 9.00 | - | - | 50.0 % / 75.0 % | 1000 | 10.0 min | 4.57e+13 | CPU x2 | 2025-01-03 | "
                "**current:** third | [cpu/2025-01-03_c](cpu/2025-01-03_c) |\n\n"
                "### cpu track, protocol v1\n\n" + head +
                "| 2 | 12.35 | - | - | 25.0 % / - | 1000 | 30.0 min | - | CPU x2 | 2025-01-02 | second | "
                "[cpu/2025-01-02_b](cpu/2025-01-02_b) |\n"
                "| 1 | 20.00 | - | - | - / - | 1000 | 2.00 h | - | CPU x2 | 2025-01-01 | first | "
                "[cpu/2025-01-01_a](cpu/2025-01-01_a) |")
    assert (root / "README.md").read_text() == (f"# T\n\n<!-- records:start -->\n{expected}\n<!-- records:end -->"
                                                "\n\nafter\n")
    assert "[cpu/2025-01-01_a](records/cpu/2025-01-01_a)" in (tmp_path / "README.md").read_text()


    assert leaderboard.one_line("x" * 200).endswith("…") and len(leaderboard.one_line("x" * 200)) == 90
