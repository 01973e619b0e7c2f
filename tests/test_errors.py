"""Bad input ends in one short line naming the bad value (no traceback); one run per run directory (a lock the OS
drops when its holder dies); torchrun workers do not outlive their launcher; a full disk or a damaged checkpoint
never loses the previous checkpoint nor silently restarts a run from step 0."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cpu_env, env_for, main_in_process

import checkpoint

ROOT = Path(__file__).resolve().parents[1]


def short_error(r, *names):
    """Non-zero exit, at most 3 lines, no traceback, every name in the message."""
    err = r.stderr.strip()
    assert r.returncode != 0, err
    assert "Traceback" not in err and len(err.splitlines()) <= 3, err
    for name in names:
        assert name in err, (name, err)


def run_py(args, out, timeout=120, **env):
    full = env_for(out)
    full.update(env)
    return subprocess.run([sys.executable, *args], env=full, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, check=False)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A record folder whose metrics.json is malformed; a checkpoint folder whose ema.safetensors is truncated."""
    d = tmp_path_factory.mktemp("bad")
    (d / "record").mkdir()
    (d / "record" / "metrics.json").write_text('{"track": "cpu", "fid": ')
    ck = d / "step-00000001"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps({"model": {}, "text_encoder": "cpu_track"}))
    (ck / "ema.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\"")  # cut mid-header
    return d


@pytest.mark.parametrize(("args", "env", "names"), [
    (["record.py", "verify", "records/nope"], {}, ["records/nope", "metrics.json"]),
    (["record.py", "verify", "{bad}/record"], {}, ["metrics.json", "not valid JSON"]),
    (["record.py", "extract", "{bad}/record", "{bad}/code"], {}, ["record", "no embedded sources"]),
    (["eval.py", "eval", "--track", "cpu", "--ckpt", "/nonexistent"], {}, ["/nonexistent", "does not exist"]),
    (["eval.py", "--prompt", "hi", "--ckpt", "records"], {}, ["records", "not a checkpoint"]),
    (["eval.py", "--prompt", "hi", "--ckpt", "{bad}/step-00000001"], {}, ["step-00000001", "damaged"]),
    (["eval.py", "--prompt", " ", "--ckpt", "records"], {}, ["--prompt", "empty"]),
    (["eval.py", "eval", "--ckpt", "records", "--num-samples", "0"], {}, ["--num-samples", "'0'"]),
    (["prepare.py", "--sources", "nope"], {}, ["'nope'", "mj-llava", "alchemist"]),
    (["train.py"], {"SPEEDRUN_TRACK": "foo"}, ["SPEEDRUN_TRACK", "'foo'", "record", "cpu"]),
    (["train.py"], {"SPEEDRUN_RESUME": "nope"}, ["SPEEDRUN_RESUME", "'nope'"]),
    (["train.py"], {"SPEEDRUN_STEPS_SCALE": "abc"}, ["SPEEDRUN_STEPS_SCALE", "'abc'"]),
    (["train.py"], {"SPEEDRUN_STEPS_SCALE": "-1"}, ["SPEEDRUN_STEPS_SCALE", "'-1'", ">= 1e-09"]),
])
def test_bad_input_is_one_short_line(tmp_path, damaged, args, env, names):
    args = [a.replace("{bad}", str(damaged)) for a in args]
    short_error(run_py(args, tmp_path, **env), *names)


def test_truncated_checkpoint_on_resume_falls_back_to_the_previous_one(tmp_path):
    env = cpu_env(tmp_path, SPEEDRUN_RUN_ID="r", )  # 2 / 6 / 1 / 1 steps
    assert main_in_process(env) == 0
    root = tmp_path / "checkpoints" / "r"
    last = checkpoint.latest_checkpoint(root)
    earlier = root / "step-00000001"  # a complete checkpoint, as a run writes one every ckpt_every steps
    shutil.copytree(last, earlier)
    size = (last / "model.safetensors").stat().st_size
    with open(last / "model.safetensors", "r+b") as f:
        f.truncate(size // 2)
    r = run_py(["train.py"], tmp_path, SPEEDRUN_RESUME="latest", **{k: env[k] for k in ("SPEEDRUN_STEPS_SCALE",)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"{last / 'model.safetensors'} is damaged" in r.stderr and "trying the previous checkpoint" in r.stderr
    assert f"resumed from {earlier}" in (tmp_path / "logs" / "r.txt").read_text()
    shutil.rmtree(earlier)  # only the damaged one left: stop with its name, never restart from step 0
    r = run_py(["train.py"], tmp_path, SPEEDRUN_RESUME="r", SPEEDRUN_STEPS_SCALE="0.0045")
    short_error(r, "no usable checkpoint", "model.safetensors is damaged")


def test_full_disk_keeps_the_previous_checkpoint_and_says_why(tmp_path, monkeypatch):
    writes = []
    real = checkpoint.save_file

    def save_file(tensors, path):
        writes.append(path)
        if len(writes) > 2:  # the second checkpoint's first file: the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    with pytest.raises(checkpoint.CheckpointError, match="No space left on device"):
        main_in_process(cpu_env(tmp_path, SPEEDRUN_RUN_ID="full"))
    root = tmp_path / "checkpoints" / "full"
    kept = checkpoint.latest_checkpoint(root)
    assert kept is not None and not list(root.glob(".tmp-*"))
    checkpoint.read_checkpoint(kept, "cpu")  # complete and readable
    log = (tmp_path / "logs" / "full.txt").read_text()
    assert f"No space left on device); the previous checkpoint {kept} is intact" in log


def test_one_run_per_run_directory(tmp_path):
    holder = checkpoint.lock_run(tmp_path, "busy", 0)  # this process holds the lock
    try:
        r = run_py(["train.py"], tmp_path, SPEEDRUN_RUN_ID="busy", SPEEDRUN_STEPS_SCALE="0.0045")
        short_error(r, "'busy' is already running", f"pid {os.getpid()}")
    finally:
        holder.close()
    code = ("import os, signal; from pathlib import Path; import checkpoint; "
            f"f = checkpoint.lock_run(Path({str(tmp_path)!r}), 'dead', 0); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, timeout=60, check=False)
    assert r.returncode == -signal.SIGKILL
    checkpoint.lock_run(tmp_path, "dead", 0).close()  # the OS dropped the killed holder's lock


def alive(pid):
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux's")
def test_worker_saves_and_exits_when_its_launcher_is_killed(tmp_path):
    env = env_for(tmp_path, SPEEDRUN_RUN_ID="orphan", TORCHELASTIC_RUN_ID="test", SPEEDRUN_STEPS_SCALE="1")
    launcher = ("import subprocess, sys; p = subprocess.Popen([sys.executable, 'train.py']); "
                "print(p.pid, flush=True); p.wait()")
    parent = subprocess.Popen([sys.executable, "-c", launcher], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    child = int(parent.stdout.readline())
    log = tmp_path / "logs" / "orphan.txt"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or log.read_text().count("\nstep:") < 2):
        time.sleep(0.5)
    parent.kill()  # SIGKILL: the launcher cannot forward anything
    parent.wait()
    deadline = time.time() + 60
    while alive(child) and time.time() < deadline:
        time.sleep(0.5)
    assert not alive(child)
    text = log.read_text()
    assert "STOP: SIGTERM; saved at step" in text
    assert checkpoint.latest_checkpoint(tmp_path / "checkpoints" / "orphan") is not None


def test_every_python_command_of_the_readme_exists_as_written(capsys):
    """Each `python <script> [subcommand] --flags` of the README: the script is there, and its --help (in process,
    no data) lists the subcommand and every flag the README passes (train.py is env-driven: tested elsewhere)."""
    import re

    import gpu_check

    import ablate
    import eval as evaluation
    import prepare
    import record
    mains = {"eval.py": evaluation.main, "record.py": record.main, "ablate.py": ablate.main, "prepare.py": prepare.main,
             "-m tools.gpu_check": gpu_check.main}
    text = (ROOT / "README.md").read_text()
    cmds = re.findall(r"python ((?:-m tools\.\w+)|\w+\.py)([^`\n#]*)", text)
    assert len(cmds) >= 10, cmds
    seen = set()
    for script, args in cmds:
        path = ROOT / (script[3:].replace(".", "/") + ".py") if script.startswith("-m ") else ROOT / script
        assert path.exists(), script
        if script not in mains:
            continue
        words = args.split()
        sub = [words[0]] if words and not words[0].startswith("-") and script in ("eval.py", "record.py") else []
        with pytest.raises(SystemExit) as e:
            mains[script](sub + ["--help"])
        assert e.value.code == 0, (script, sub)
        out = capsys.readouterr().out
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in out, (script, sub, flag)
        seen.add((script, *sub))
    assert {("record.py", "verify"), ("record.py", "extract"), ("eval.py", "eval"), ("prepare.py",)} <= seen
