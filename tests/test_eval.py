"""Tests of eval.py: metric core, extractors, sampler, records. Fast (< 60 s on 2 CPU cores), offline."""
import hashlib
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import _ids, _shard

import eval as ev
import model
import record


# ---------------------------------------------------------------------------------------------- Fréchet distance
def test_frechet_identical_sets_is_zero():
    f = np.random.default_rng(0).normal(size=(500, 16))
    assert abs(ev.frechet_from_features(f, f)) < 1e-9


def test_frechet_closed_form_diagonal_gaussians():
    # Commuting covariances: FD = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(1)
    mu1, mu2, a, b = rng.normal(size=8), rng.normal(size=8), rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert ev.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("n", [400, 40])  # 40 samples in 64 dims: singular covariances (clipping matters)
def test_frechet_matches_scipy_sqrtm(n):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3
    b = rng.normal(size=(n, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.5
    mu1, mu2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real)
    assert ev.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


# ---------------------------------------------------------------------------------------------- MMD
def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mmd_identical_is_zero_and_matches_brute_force():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(15, 5)) + 0.7
    assert abs(ev.mmd(x, x)) < 1e-9

    def k(a, b):
        return np.exp(-((a - b) ** 2).sum() / (2 * 10.0**2))

    kxx = sum(k(a, b) for a in x for b in x) / len(x) ** 2
    kyy = sum(k(a, b) for a in y for b in y) / len(y) ** 2
    kxy = sum(k(a, b) for a in x for b in y) / (len(x) * len(y))
    assert ev.mmd(x, y, chunk=7) == pytest.approx(1000 * (kxx + kyy - 2 * kxy), rel=1e-10)


# Analytic constant: with k = exp(-d/200), d = |x-y|^2, to first order k = 1 - d/200. Biased means over all pairs:
# mean_xx d = 2 mean|x|^2 - 2|m_x|^2, mean_xy d = mean|x|^2 + mean|y|^2 - 2 m_x.m_y, so
# MMD^2 = (1/200) (2|m_x|^2 + 2|m_y|^2 - 4 m_x.m_y) = |m_x - m_y|^2 / 100, i.e. 10 |m_x - m_y|^2 after x1000.
# Same distribution, unit-norm features: E|m_x - m_y|^2 = 2 tr(Cov)/n = 2 (1 - |mu|^2)/n -> floor 20 (1 - |mu|^2)/n.
def test_mmd_same_distribution_sits_at_the_noise_floor():
    rng = np.random.default_rng(0)
    direction = np.zeros(64)
    direction[0] = 3.0

    def draw(n):
        return unit(rng.normal(size=(n, 64)) + direction)

    mu2 = (draw(200_000).mean(0) ** 2).sum()
    n = 200
    mean_mmd = np.mean([ev.mmd(draw(n), draw(n)) for _ in range(50)])
    assert mean_mmd == pytest.approx(20 * (1 - mu2) / n, rel=0.1)


def test_mmd_mean_shift_is_ten_times_squared_shift():
    rng = np.random.default_rng(0)
    shift = np.zeros(32)
    shift[:4] = 0.15  # |shift|^2 = 0.09
    x, y = rng.normal(size=(400, 32)) * 0.1, rng.normal(size=(400, 32)) * 0.1 + shift
    m = ev.mmd(x, y)
    assert m == pytest.approx(10 * ((x.mean(0) - y.mean(0)) ** 2).sum(), rel=0.02)
    assert m == pytest.approx(10 * 0.09, rel=0.15)


# ---------------------------------------------------------------------------------------------- extractors
def test_tf_bilinear_resize():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(1, 3, 4, 4)
    assert torch.equal(ev.tf_bilinear(x, 4), x)  # same size: identity
    up = ev.tf_bilinear(x, 8)  # TF legacy: src = dst * in/out, so output pixel 1 sits at source 0.5
    assert up[0, 0, 0, 1].item() == pytest.approx(0.5) and up[0, 0, 1, 0].item() == pytest.approx(2.0)
    assert up[0, 0, 7, 7].item() == 15.0  # clamped at the border


def test_inception_real_weights_offline_uint8_equals_float():
    inc = ev.InceptionFeatures()
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    u8[0, 0, 0, 0], u8[1, 0, 0, 0] = 255, 0  # extremes (the modulo-256 wrap-around bug would change them)
    f_u8, f_float = inc(u8), inc(u8.float() / 127.5 - 1)
    assert f_u8.shape == (2, 2048) and np.isfinite(f_u8).all() and f_u8.std() > 0
    np.testing.assert_array_equal(f_u8, f_float)
    assert not np.allclose(f_u8[0], f_u8[1])
    assert torch.equal(ev.to_uint8(torch.tensor([-1.0, 1.0, 2.0])), torch.tensor([0, 255, 255], dtype=torch.uint8))


def test_tiny_clip_and_dino_load_through_the_production_path(tmp_path):
    import transformers as tr
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    tr.CLIPVisionModelWithProjection(tr.CLIPVisionConfig(**small, image_size=336, patch_size=14, projection_dim=16)
                                     ).save_pretrained(tmp_path / "clip")
    tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(**small, image_size=518, patch_size=14)
                                ).save_pretrained(tmp_path / "dinoreg")
    tr.Dinov2Model(tr.Dinov2Config(**small, image_size=224, patch_size=14)).save_pretrained(tmp_path / "dino")
    paths = {"cmmd": str(tmp_path / "clip"), "dino_mmd": str(tmp_path / "dinoreg"), "fd_dinov2": str(tmp_path / "dino")}
    ex, missing = ev.build_extractors((), paths)
    assert set(ex) == {"cmmd", "dino_mmd", "fd_dinov2"} and not missing
    imgs = torch.randint(0, 256, (2, 3, 40, 48), dtype=torch.uint8)  # non-square: centre crop
    f = {m: e(imgs) for m, e in ex.items()}
    assert f["cmmd"].shape == (2, 16) and f["dino_mmd"].shape == (2, 32) and f["fd_dinov2"].shape == (2, 32)
    np.testing.assert_allclose(np.linalg.norm(f["cmmd"], axis=1), 1, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(f["dino_mmd"], axis=1), 1, atol=1e-12)
    assert not np.allclose(np.linalg.norm(f["fd_dinov2"], axis=1), 1)  # FD-DINOv2 uses raw features
    ex2, missing2 = ev.build_extractors((), {"cmmd": str(tmp_path / "absent")})
    assert "cmmd" not in ex2 and missing2["cmmd"].startswith("unavailable")



def test_dino_mmd_preprocessing_is_prx_bicubic_interpolate_without_crop_or_antialias(tmp_path):
    import transformers as tr
    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    tr.Dinov2WithRegistersModel(tr.Dinov2WithRegistersConfig(**small, image_size=518, patch_size=14)
                                ).save_pretrained(tmp_path / "dinoreg")
    ex = ev.HFFeatures("dino_mmd", str(tmp_path / "dinoreg"))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))  # ImageNet's
    for shape in ((2, 3, 40, 48), (1, 3, 600, 560)):  # non-square, up- and downsampled (where antialias would act)
        imgs = torch.randint(0, 256, shape, dtype=torch.uint8)
        want = torch.nn.functional.interpolate(imgs.float() / 255, size=(518, 518), mode="bicubic",
                                               align_corners=False, antialias=False)
        assert torch.equal(ex.preprocess(imgs), (want - mean) / std)  # the whole image, stretched: no centre crop
    with torch.no_grad():
        cls = ex.net(pixel_values=ex.preprocess(imgs)).last_hidden_state[:, 0].double()
    np.testing.assert_allclose(ex(imgs), (cls / cls.norm(dim=-1, keepdim=True)).numpy(), rtol=1e-12)
    assert ex.name.endswith(":interp")  # cached reference features of the old (cropped, antialiased) resize not reused
    assert "antialias=False, no crop" in ev.PROTOCOLS["record"]["dino_mmd_resize"]
    baseline = json.loads((Path(__file__).resolve().parents[1] / "records/cpu/2026-11-26_baseline/metrics.json")
                          .read_text())
    assert baseline["protocol_version"] == 1 < ev.PROTOCOLS["cpu"]["version"]  # the first record keeps v1
    assert ev.protocol_hash(ev.PROTOCOLS["cpu"]) != baseline["protocol_hash"]

# ---------------------------------------------------------------------------------------------- sampler
class Oracle(torch.nn.Module):
    """Test double: the text embedding carries the true x0 of each sample (zeros for the null condition).
    skip_middle=True (the PDG weak branch) adds 0.1, TREAD routing 0.2; `calls` records (t, null?) of each call."""
    cfg = model.PRXConfig(patch=4)

    def __init__(self, damp=0.0):
        super().__init__()
        self.w, self.damp, self.calls, self.routes = torch.nn.Parameter(torch.zeros(())), damp, [], []

    def forward(self, x, t, txt, txt_mask, skip_middle=False, route_idx=None):
        self.calls.append((float(t[0]), not bool(txt_mask.any())))
        self.routes += [] if route_idx is None else [route_idx]
        out = (txt[:, 0] * txt_mask[:, :1]).view_as(x) + (0.1 if skip_middle else 0.2 if route_idx is not None else 0)
        return out + self.damp * x * t.view(-1, 1, 1, 1)  # damp > 0: the result depends on the noise


class BankEncoder:
    """Test double of text.TextEncoder: prompt "i" -> image i of a fixed bank, "" -> zeros."""

    def __init__(self, bank):
        self.bank = bank

    def encode(self, prompts):
        emb = torch.stack([self.bank[int(p)].flatten()[None] for p in prompts])
        return emb, torch.ones(len(prompts), 1, dtype=bool)

    def null(self):
        return torch.zeros(1, 1, self.bank[0].numel()), torch.zeros(1, 1, dtype=bool)


def oracle_inputs(b=3, res=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(b, 3, res, res, generator=g) * 0.4 - 0.2
    null = torch.zeros(1, 1, 3 * res * res), torch.zeros(1, 1, dtype=bool)
    return x0, x0.flatten(1)[:, None], torch.ones(b, 1, dtype=bool), *null, torch.randn(b, 3, res, res, generator=g)


@pytest.mark.parametrize("method,shift", [("euler", 1.0), ("euler", 3.0), ("heun", 1.0), ("heun", 3.0)])
def test_sampler_with_true_x0_returns_x0(method, shift):
    x0, txt, mask, null, null_mask, noise = oracle_inputs()
    out = model.sample(Oracle(), txt, mask, null, null_mask, noise, steps=10, method=method, shift=shift)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)
    grid = model.time_grid(10, shift)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a > b for a, b in itertools.pairwise(grid))
    assert grid[5] == pytest.approx(shift * 0.5 / (1 + (shift - 1) * 0.5))


def test_guidance_scale_interval_and_pdg():
    x0, txt, mask, null, null_mask, noise = oracle_inputs()
    out = model.sample(Oracle(), txt, mask, null, null_mask, noise, steps=8, cfg_scale=3.0)  # weak = "" -> 0
    torch.testing.assert_close(out, 3.0 * x0, atol=1e-5, rtol=0)
    out = model.sample(Oracle(), txt, mask, null, null_mask, noise, steps=8, cfg_scale=3.0, weak="pdg")  # weak = 0.1
    torch.testing.assert_close(out, 0.1 + 3.0 * (x0 - 0.1), atol=1e-5, rtol=0)
    m = Oracle()  # TREAD's self-guidance: the weak branch is the prompt itself with half of the tokens routed
    out = model.sample(m, txt, mask, null, null_mask, noise, steps=8, cfg_scale=3.0, weak="tread")
    torch.testing.assert_close(out, x0 - 2 * 0.2, atol=1e-5, rtol=0)  # weak = x0 + 0.2
    assert not any(is_null for _, is_null in m.calls) and len(m.routes) == 8
    assert all(r.shape == (3, 2) for r in m.routes) and not torch.equal(m.routes[0], m.routes[1])  # 4 tokens, 2 kept
    m = Oracle()
    out = model.sample(m, txt, mask, null, null_mask, noise, steps=8, cfg_scale=3.0, interval=(0.3, 0.8), method="heun")
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)  # the last step (t = 1/8) is outside the interval
    cond_t = [t for t, is_null in m.calls if not is_null]
    assert sorted(t for t, is_null in m.calls if is_null) == sorted(t for t in cond_t if 0.3 <= t <= 0.8)
    assert any(0.3 <= t <= 0.8 for t in cond_t) and any(not 0.3 <= t <= 0.8 for t in cond_t)


def test_generate_is_batch_size_and_split_invariant():
    bank = torch.rand(6, 3, 8, 8) - 0.5
    enc, proto = BankEncoder(bank), dict(ev.PROTOCOLS["cpu"], steps=6, cfg_scale=2.0, method="heun")
    prompts, idx = [str(i) for i in range(6)], list(range(100, 106))

    def run(bs, sel):
        return torch.cat([x for _, x in ev.generate(Oracle(damp=0.3), enc, [prompts[i] for i in sel],
                                                    [idx[i] for i in sel], 8, proto, batch_size=bs)])

    one, four = run(1, range(6)), run(4, range(6))
    assert one.dtype == torch.uint8 and torch.equal(one, four)
    assert torch.equal(run(4, [1, 3, 5]), one[[1, 3, 5]])  # rank 1 of world 2 computes the same images
    assert not torch.equal(one, torch.cat([x for _, x in ev.generate(
        Oracle(damp=0.3), enc, prompts, [i + 1 for i in idx], 8, proto)]))  # noise does depend on the index


def test_sample_grid_writes_png(tmp_path):
    from PIL import Image
    bank = torch.rand(5, 3, 8, 8) * 0.6 - 0.3
    imgs = ev.sample_grid(Oracle(), BankEncoder(bank), [str(i) for i in range(5)], 8, tmp_path / "g.png", steps=4,
                          cfg_scale=2.0)
    assert Image.open(tmp_path / "g.png").size == (24, 16)  # 3 columns x 2 rows of 8 px
    assert (imgs.int() - ev.to_uint8(2 * bank).int()).abs().max() <= 1  # guided x0 = 2 x0 (rounding: 1 level)
    assert torch.equal(torch.from_numpy(np.array(Image.open(tmp_path / "g.png")))[:8, :8].permute(2, 0, 1), imgs[0])


# ---------------------------------------------------------------------------------------------- records
def test_parse_log_extract_and_verify(tmp_path):
    """The log is the record: its embedded sources come back byte for byte (extract), verify checks them against
    their declared hashes and metrics.json, and recorded_module imports the code as run, not this checkout's."""
    log = tmp_path / "log.txt"
    files = {"train.py": "print('train')\n", "data.py": "y = 2",  # data.py: no final newline
             "model.py": "from dataclasses import dataclass\n\n\n@dataclass\nclass PRXConfig:\n    hidden: int = 7\n"}
    text = "".join(f"==== {n} sha256:{hashlib.sha256(s.encode()).hexdigest()} ====\n{s}" +
                   ("" if s.endswith("\n") else "\n") for n, s in files.items())
    log.write_text(text + "env: torch\nstep:1/10 stage:1 loss:0.5 lr:1e-4 ms:120\nstep:2/10 stage:1 loss:0.25 ms:80\n")
    assert {k: v[1] for k, v in record.embedded_sources(log.read_text()).items()} == files
    rows = record.parse_log(log)
    assert rows == [{"step": 1.0, "stage": 1.0, "loss": 0.5, "lr": 1e-4, "ms": 120.0},
                    {"step": 2.0, "stage": 1.0, "loss": 0.25, "ms": 80.0}]
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "log.txt").write_text(log.read_text())
    hashes = {n: hashlib.sha256(s.encode()).hexdigest() for n, s in files.items()}
    (rec / "metrics.json").write_text(json.dumps({"code_hashes": dict(hashes, **{"eval.py": "0" * 64})}))
    assert record.verify(rec) == []  # eval.py is not embedded in this (older-style) log: not checked against it
    assert record.extract(rec, tmp_path / "code") == sorted(files)
    assert {n: (tmp_path / "code" / n).read_text() for n in files} == files
    recorded = record.recorded_module(log.read_text(), "model.py")
    assert recorded.PRXConfig().hidden == 7 and model.PRXConfig().hidden == 1792  # the code as run, explicitly
    (rec / "metrics.json").write_text(json.dumps({"code_hashes": dict(hashes, **{"model.py": "0" * 64})}))
    assert record.verify(rec) == ["model.py: hash in metrics.json differs from the log's"]
    (rec / "log.txt").write_text(log.read_text().replace("hidden: int = 7", "hidden: int = 8"))
    assert record.verify(rec) == ["log.txt: embedded model.py does not hash to its declared sha256",
                                  "model.py: hash in metrics.json differs from the log's"]
    with pytest.raises(SystemExit, match="model.py do not hash as declared"):
        record.extract(rec, tmp_path / "code2")


def test_protocol_blocks_are_hashed():
    h = {k: ev.protocol_hash(p) for k, p in ev.PROTOCOLS.items()}
    assert len(set(h.values())) == len(ev.PROTOCOLS) == 3 and all(len(v) == 16 for v in h.values())
    assert ev.protocol_hash(dict(ev.PROTOCOLS["cpu"], steps=33)) != h["cpu"]


def test_record_eval_set_is_the_heldout_split(tmp_path, monkeypatch):

    import data

    ids = _ids(20, heldout=3)
    (tmp_path / "mj-llava").mkdir()
    _shard(tmp_path / "mj-llava" / "train_000.parquet", ids, np.random.default_rng(0))
    monkeypatch.setattr(data, "DATA_ROOT", tmp_path)
    prompts, image, check = ev.eval_set("record", 3, 32)
    assert prompts == [f"a long caption of {i}" for i in ids if data.is_heldout(i)]  # long captions of held-out rows
    assert image(2).shape == (3, 32, 32) and image(2).dtype == torch.uint8 and check is None
    with pytest.raises(ValueError, match="fewer than N=4"):
        ev.eval_set("record", 4, 32)


def test_verify_refuses_to_reevaluate_under_another_protocol(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"track": "cpu", "protocol_hash": "0123456789abcdef", "n": 4}))
    problems = record.verify(tmp_path, ckpt=tmp_path / "no-such-checkpoint")  # refused before any checkpoint is read
    assert any("is not this eval.py's" in p for p in problems)


def test_sampler_sweep_settings_override_only_what_they_name():
    from tools.sampler_sweep import parse_setting

    assert parse_setting("heun:16:3") == {"method": "heun", "steps": 16, "shift": 3.0}
    assert parse_setting("euler:8:6:1.5:0.3-1") == {"method": "euler", "steps": 8, "shift": 6.0, "cfg_scale": 1.5,
                                                    "interval": (0.3, 1.0)}
    proto = dict(ev.PROTOCOLS["cpu"], **parse_setting("euler:16:3:1.5"))
    assert ev.protocol_hash(proto) == ev.protocol_hash(ev.PROTOCOLS["cpu"])  # v4's own sampler: the same hash
