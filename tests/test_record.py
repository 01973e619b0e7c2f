"""record.py with a stranger's files: extract writes only train.py's own file names inside its
folder, verify runs recorded code only with an explicit opt-in, a checkpoint loads without unpickling objects."""
import hashlib
import json

import pytest

import data
import eval as evaluation
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


