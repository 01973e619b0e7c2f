"""model.py: the PRX text-to-image denoiser in pixel space, in one file.

  PRX (Photoroom 2025; diffusers `PRXTransformer2DModel`): image tokens are the only queries; they attend over
  [text keys ; image keys]; text is projected once and never updated.
  JiT (Li & He 2025, "Back to Basics"): 32x32 RGB patches (no VAE) through a low-rank bottleneck; predicts x0.
  SPRINT (Park et al. 2025): the middle blocks see 25 % of the tokens; a fusion layer merges the sparse deep path
  with the dense shallow path.
  TREAD (Krause et al. 2025): a random share of the tokens skips a span of blocks and rejoins after it.
  REPA (Yu et al. 2024): the forward can hand out the hidden states after one block (the loss: losses.py).

Conventions (PRX, SD3): x_t = (1 - t) x0 + t eps, t = 0 is data; pixels in [-1, 1]; text padded on the right,
txt_mask True for real tokens.
"""
import itertools
import math
import re
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# ======================================================================================================================
# Config and presets


@dataclass(frozen=True)
class PRXConfig:
    hidden: int = 1792
    depth: int = 16
    heads: int = 28
    mlp_ratio: float = 3.5
    patch: int = 32
    bottleneck: int = 256  # JiT bottleneck patch embedding: 3*32*32 -> 256 -> hidden
    text_dim: int = 2304  # T5Gemma-2B encoder width
    in_channels: int = 3
    theta: float = 10000.0  # RoPE base
    sparse_start: int = 2  # SPRINT: blocks[sparse_start:sparse_end] form the sparse middle
    sparse_end: int = 14  # 2 dense / 12 sparse / 2 dense, the paper's 2/24/2 split scaled to 16 blocks
    tread_start: int = 2  # TREAD: routed tokens skip blocks[tread_start:tread_end] (PRX's TREAD.yaml: 2 to 12)
    tread_end: int = 13
    repa_block: int = 8  # REPA tap: hidden states after this many blocks (PRX: 8 of 16)
    pred: str = "x"  # the network's output: "x" the clean image (JiT), "v" the velocity (forward converts it to x0)
    rope_grid: int = 0  # 0: RoPE on integer token positions (PRX). g > 0: positions scaled to span a g x g grid at
    # every resolution (position interpolation, as FiT / Lumina-Next): a higher-resolution stage keeps the angles the
    # model learnt instead of meeting unseen ones (the CPU track: too few high-res steps to learn them)

    @property
    def head_dim(self):
        return self.hidden // self.heads

    @property
    def mlp_hidden(self):
        return int(self.hidden * self.mlp_ratio)

    @property
    def patch_dim(self):
        return self.in_channels * self.patch * self.patch


PRESETS = {
    "prx-1.2b-pixel": PRXConfig(),
    # tests: 8 px patches (64 px -> 8x8 tokens); the CPU track: the same at half the width (0.65 M parameters: at
    # its FLOP budget a smaller model that sees 4x the images learns more); the GPU miniature (73 M): 16 px patches.
    "tiny": (TINY := PRXConfig(hidden=128, depth=6, heads=4, patch=8, bottleneck=64, text_dim=384, sparse_start=1,
                               sparse_end=5, tread_start=1, tread_end=5, repa_block=3, rope_grid=8)),
    "cpu": replace(TINY, hidden=64, heads=2),
    "mini": PRXConfig(hidden=512, depth=12, heads=8, patch=16, bottleneck=128, text_dim=384, sparse_start=2,
                      sparse_end=10, tread_start=2, tread_end=11, repa_block=6, rope_grid=8),
}

# ======================================================================================================================
# Small pieces: timestep embedding, 2-D axial RoPE, patchify


def timestep_embedding(t, dim=256, max_period=10000.0, scale=1000.0):
    """Sinusoidal embedding [cos, sin] of scale * t (the PRX / diffusers `flip_sin_to_cos` order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float()[:, None] * freqs[None]) * scale  # same operation order as diffusers, bit for bit
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_angles(pos, head_dim, theta):
    """2-D axial RoPE (RoFormer, Su et al. 2021, per axis): pos [..., 2] (row, col) -> angles [..., head_dim/2].
    The first half of the rotated pairs turns with the row index, the second half with the column."""
    axis = head_dim // 2
    omega = 1.0 / theta ** (torch.arange(0, axis, 2, dtype=torch.float64, device=pos.device) / axis)
    ang = pos.double()[..., :, None] * omega  # [..., 2, axis/2]
    return ang.flatten(-2).float()


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the head dim; x [B, heads, N, hd], cos/sin [B or 1, 1, N, hd/2]."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1).flatten(-2).type_as(x)


def patchify(x, p):
    """[B, C, H, W] -> [B, (H/p)(W/p), C*p*p], row-major tokens, each token ordered (c, py, px)."""
    B, C, H, W = x.shape
    return x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(tokens, p, H, W):
    B, _, D = tokens.shape
    C = D // (p * p)
    return tokens.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def grid_positions(gh, gw, device):
    """Integer (row, col) patch positions of a gh x gw grid, row-major: [gh*gw, 2]."""
    rows, cols = torch.meshgrid(torch.arange(gh, device=device), torch.arange(gw, device=device), indexing="ij")
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def sprint_keep_indices(batch, gh, gw, generator=None, device=None):
    """SPRINT structured drop (Park et al. 2025): split the token grid into 2x2 groups and keep one random
    token per group, independently per sample. Returns sorted flat token indices [batch, gh*gw/4]."""
    assert gh % 2 == 0 and gw % 2 == 0, f"SPRINT needs an even token grid, got {gh}x{gw}"
    pick = torch.randint(0, 4, (batch, gh // 2, gw // 2), generator=generator, device=device)
    gr, gc = torch.meshgrid(torch.arange(gh // 2, device=device), torch.arange(gw // 2, device=device), indexing="ij")
    rows, cols = 2 * gr + pick // 2, 2 * gc + pick % 2
    return (rows * gw + cols).flatten(1).sort(dim=1).values  # kept tokens in raster order


def take(z, idx):
    """Tokens z [B, N, D] at indices idx [B, Nk] (all of them when idx is None)."""
    return z if idx is None else z.gather(1, idx[..., None].expand(-1, -1, z.shape[-1]))


def tread_keep_indices(batch, n, route, generator=None):
    """TREAD (Krause et al. 2025): a random share `route` of the n tokens is routed around the span (PRX: 0.5);
    returns the sorted indices of the tokens that go through it [batch, n - round(n * route)]."""
    keep = n - min(max(round(n * route), 1), n - 1)
    return torch.rand(batch, n, generator=generator).argsort(dim=1)[:, :keep].sort(dim=1).values


# ======================================================================================================================
# The PRX block and the denoiser


class RMSNorm(nn.RMSNorm):
    """nn.RMSNorm with the weight cast to the input's dtype, so that under bf16 autocast the fused kernel runs."""

    def forward(self, x):
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class Block(nn.Module):
    """Image queries over [text; image] keys, RMS QK-norm, axial RoPE on image q/k, adaLN-Zero, gated GELU MLP."""

    def __init__(self, cfg: PRXConfig):
        super().__init__()
        H, hd = cfg.hidden, cfg.head_dim
        self.heads, self.head_dim = cfg.heads, hd
        self.mod = nn.Linear(H, 6 * H)  # adaLN-Zero (DiT, Peebles & Xie 2023): shift/scale/gate x 2, zero init
        nn.init.zeros_(self.mod.weight)
        nn.init.zeros_(self.mod.bias)
        self.qkv = nn.Linear(H, 3 * H, bias=False)
        self.txt_kv = nn.Linear(H, 2 * H, bias=False)  # per-block text keys/values; text itself is never updated
        self.q_norm, self.k_norm, self.txt_k_norm = (RMSNorm(hd, eps=1e-6) for _ in range(3))
        self.proj = nn.Linear(H, H, bias=False)
        self.gate = nn.Linear(H, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(H, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, H, bias=False)

    def forward(self, x, txt, vec, cos, sin, key_mask):
        B, N, H = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.mod(F.silu(vec))[:, None].chunk(6, dim=-1)
        h = modulate(F.layer_norm(x, (H,), eps=1e-6), shift1, scale1)
        q, k, v = self.qkv(h).view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)
        tk, tv = self.txt_kv(txt).view(B, txt.shape[1], 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = torch.cat([self.txt_k_norm(tk), k], dim=2), torch.cat([tv, v], dim=2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # [B,1,1,L+N]: padded text never attended
        x = x + gate1 * self.proj(a.transpose(1, 2).reshape(B, N, H))
        h = modulate(F.layer_norm(x, (H,), eps=1e-6), shift2, scale2)
        return x + gate2 * self.down(F.gelu(self.gate(h), approximate="tanh") * self.up(h))


# The denoiser. The text padding mask keeps SDPA off flash attention. On an H100 (torch 2.11) cuDNN's kernel ran the
# masked attention of a 512 px block in 1.62 ms vs 2.14 ms for the default choice (fwd+bwd, batch 64; gpu-checks).
# The first backend that accepts the inputs runs; all are exact. CPUs have neither cuDNN nor this choice: unchanged.
MASKED_SDPA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                     SDPBackend.MATH]


class PRX(nn.Module):
    def __init__(self, cfg: PRXConfig):
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden
        assert cfg.head_dim * cfg.heads == H and cfg.head_dim % 4 == 0, "head dim must split into two RoPE axes"
        assert 0 <= cfg.sparse_start <= cfg.sparse_end <= cfg.depth, "SPRINT span must lie inside the blocks"
        self.img_in = nn.Sequential(nn.Linear(cfg.patch_dim, cfg.bottleneck), nn.Linear(cfg.bottleneck, H))  # JiT
        self.time_in = nn.Sequential(nn.Linear(256, H), nn.SiLU(), nn.Linear(H, H))
        self.txt_in = nn.Linear(cfg.text_dim, H)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        # SPRINT: mask token for dropped positions (frozen, as in the official code) and the sparse-dense fusion.
        # drawn on the CPU whatever the device context (cuda, meta), then placed where the context builds the model
        token = torch.randn(H, generator=torch.Generator().manual_seed(0), device="cpu") * 0.02
        self.register_buffer("mask_token", torch.empty(H).copy_(token))
        self.fuse = nn.Linear(2 * H, H)  # Linear(concat[deep, shallow]) -> H
        with torch.no_grad():  # identity on the deep half: without token drop the model is exactly PRX
            self.fuse.weight.zero_()
            self.fuse.weight[:, :H].copy_(torch.eye(H))
            self.fuse.bias.zero_()
        self.final_mod = nn.Linear(H, 2 * H)  # final adaLN shift/scale, zero init
        self.final = nn.Linear(H, cfg.patch_dim)  # zero init: the network outputs exactly 0 at initialisation
        for lin in (self.final_mod, self.final):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def muon_params(self):
        """Muon (Jordan 2024) trains the 2-D matrices inside the blocks; AdamW trains everything else."""
        return [p for p in self.blocks.parameters() if p.ndim == 2]

    def adamw_params(self):
        muon = {id(p) for p in self.muon_params()}
        return [p for p in self.parameters() if id(p) not in muon]

    def forward(self, x, t, txt, txt_mask, keep_idx=None, path_drop=None, skip_middle=False, return_repa=False,
                route_idx=None):
        """x [B,3,H,W] noisy pixels, t [B] in [0,1], txt [B,L,text_dim], txt_mask [B,L] bool -> x0_hat [B,3,H,W].
        keep_idx [B, N/4] (from sprint_keep_indices): the middle blocks see only these tokens.
        path_drop [B] bool: those samples get mask tokens instead of the deep output (SPRINT path-drop).
        skip_middle: the middle blocks are not run at all (the weak branch of path-drop guidance).
        route_idx [B, Nk] (from tread_keep_indices): TREAD, only these tokens go through the routed span.
        return_repa: also return (hidden states after cfg.repa_block blocks, the kept indices there or None)."""
        cfg = self.cfg
        x_t, (B, _, Hpx, Wpx) = x, x.shape
        gh, gw = Hpx // cfg.patch, Wpx // cfg.patch
        x = self.img_in(patchify(x, cfg.patch))
        pos = grid_positions(gh, gw, x.device)
        if cfg.rope_grid:
            pos = pos * torch.tensor([cfg.rope_grid / gh, cfg.rope_grid / gw], device=x.device)
        ang = rope_angles(pos, cfg.head_dim, cfg.theta)[None, None]  # [1,1,N,hd/2]
        cos, sin = ang.cos(), ang.sin()
        vec = self.time_in(timestep_embedding(t).to(x.dtype))
        txt = self.txt_in(txt)
        txt_mask = txt_mask.bool()
        repa = None

        def run(h, lo, hi, cos, sin):
            nonlocal repa
            key_mask = torch.cat([txt_mask, txt_mask.new_ones(B, h.shape[1])], dim=1)[:, None, None, :]
            with sdpa_kernel(MASKED_SDPA_ORDER, set_priority=True):  # outside the compiled blocks: baked in
                for i in range(lo, hi):
                    h = self.blocks[i](h, txt, vec, cos, sin, key_mask)
                    if i + 1 == cfg.repa_block:
                        repa = h
            return h

        def sparse(h, idx, lo, hi, base):  # the kept tokens, with their own RoPE angles, scattered back into base
            sub_ang = ang[0, 0][idx][:, None]
            out = run(take(h, idx), lo, hi, sub_ang.cos(), sub_ang.sin())
            return base.scatter(1, idx[..., None].expand_as(out), out)

        assert route_idx is None or keep_idx is None, "TREAD and SPRINT are alternatives"
        assert route_idx is None or 0 < cfg.tread_start < cfg.tread_end < cfg.depth, "TREAD span outside the blocks"
        s, e = (cfg.tread_start, cfg.tread_end) if route_idx is not None else (cfg.sparse_start, cfg.sparse_end)
        x = run(x, 0, s, cos, sin)
        if route_idx is not None:  # TREAD: the routed tokens rejoin unchanged (nothing dropped, no fusion)
            x = sparse(x, route_idx, s, e, x)
        else:  # SPRINT: the middle on the kept tokens (or all), mask tokens elsewhere, fused with the shallow path
            mask_tok = self.mask_token.to(x.dtype).expand_as(x)
            deep = (mask_tok if skip_middle else run(x, s, e, cos, sin) if keep_idx is None else
                    sparse(x, keep_idx, s, e, mask_tok))
            if path_drop is not None:
                deep = torch.where(path_drop[:, None, None], mask_tok, deep)
            x = self.fuse(torch.cat([deep, x], dim=-1))
        x = run(x, e, cfg.depth, cos, sin)
        shift, scale = self.final_mod(F.silu(vec))[:, None].chunk(2, dim=-1)
        x = self.final(modulate(F.layer_norm(x, (x.shape[-1],), eps=1e-6), shift, scale))
        out = unpatchify(x, cfg.patch, Hpx, Wpx)
        if cfg.pred == "v":  # v-prediction: the same network outputs the velocity; x0 = x_t - t v
            out = x_t - t.view(-1, 1, 1, 1) * out
        if not return_repa:
            return out
        kept = route_idx if route_idx is not None else keep_idx
        return out, repa, (kept if s < cfg.repa_block <= e else None)


# ======================================================================================================================
# Flow matching with x-prediction (JiT, Li & He 2025): the training objective and its sampler, side by side.
# Convention B (PRX, SD3): x_t = (1 - t) x0 + t eps, t = 0 is data; the ODE velocity is v = (x_t - x0) / t.


def shift_time(t, a: float):
    """SD3 resolution shift (Esser et al. 2024): t' = a t / (1 + (a-1) t); a > 1 spends more time at high noise.
    Training and sampling use the same a = res / shift_base (the square root of the pixel-count ratio)."""
    return a * t / (1 + (a - 1) * t)


def training_time(u: torch.Tensor, z: torch.Tensor, a: float, fixed: float = 0.0) -> float:
    """PRX's t of a training sample from uniforms u, normal z: logit-normal N(0, 1), 10 % uniform, shifted by a;
    fixed > 0: PRX Part 3's fixed shift instead (3.0), its uniform draws left unshifted."""
    if fixed:
        return u[1].item() if u[0] < 0.1 else shift_time(torch.sigmoid(z), fixed).item()
    return shift_time(u[1].item() if u[0] < 0.1 else torch.sigmoid(z).item(), a)


class Loss(NamedTuple):
    fm: torch.Tensor  # [B] flow-matching loss per sample
    h: torch.Tensor | None  # REPA hidden states
    kept: torch.Tensor | None  # SPRINT / TREAD kept indices at the REPA tap
    x0_hat: torch.Tensor  # the predicted clean image (perceptual losses)
    contrast: torch.Tensor | None  # [B] the contrastive term (weighted), when asked


def flow_matching_loss(model, x0, eps, t, txt, mask, keep_idx=None, path_drop=None, return_repa=False,
                       route_idx=None, contrastive=0.0) -> Loss:
    """The objective: the net predicts x0 from x_t; the loss is the MSE of the implied velocities (t clipped at
    0.05 in the division), per sample. contrastive > 0: Contrastive Flow Matching (Stoica et al. 2025) pushes each
    prediction away from another sample's target, -w * MSE(v_hat, v of the previous sample in the micro-batch)."""
    tb = t.view(-1, 1, 1, 1)
    x_t = (1 - tb) * x0 + tb * eps
    out = model(x_t, t, txt, mask, keep_idx=keep_idx, path_drop=path_drop, return_repa=return_repa,
                route_idx=route_idx)
    x0_hat, h, kept = out if return_repa else (out, None, None)
    v_hat = (x_t - x0_hat.float()) / tb.clamp(min=0.05)
    v = (x_t - x0) / tb.clamp(min=0.05)
    contrast = -contrastive * (v_hat - v.roll(1, 0)).square().mean((1, 2, 3)) if contrastive else None
    return Loss((v_hat - v).square().mean((1, 2, 3)), h, kept, x0_hat, contrast)


T_EPS = 1e-3  # the sampler never evaluates t = 0 (its last step is Euler): this only guards the division


def time_grid(steps: int, shift: float) -> list[float]:
    return shift_time(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).tolist()


@torch.no_grad()
def sample(model, txt, txt_mask, null_txt, null_mask, noise, steps=50, method="euler", cfg_scale=1.0,
           interval=(0.0, 1.0), shift=1.0, weak="cfg"):
    """The sampler: integrate the velocity of the x-prediction from t=1 (noise) to t=0; returns x0 in [-1, 1].
    v = (x_t - x0_hat) / t exactly (t = 0 is never evaluated). Guidance acts on x0_hat, which equals guiding v at
    the same (x_t, t): x0 = w + s (c - w), only for t in `interval`. weak="cfg": the weak branch w is the ""
    condition (classifier-free guidance, Ho & Salimans 2022); weak="pdg": "" and the SPRINT middle blocks skipped
    (path-drop guidance, Park et al. 2025); weak="tread": the prompt with TREAD's routing, a fresh random half of the
    tokens around its span (TREAD's self-guidance, as PRX's Tread(self_guidance=True))."""
    x, b = noise.float(), noise.shape[0]
    null_txt, null_mask = null_txt.expand(b, -1, -1), null_mask.expand(b, -1)
    g = torch.Generator().manual_seed(0)  # TREAD guidance's routing draws

    def velocity(x, t):
        tt = torch.full((b,), t, device=x.device, dtype=torch.float32)
        x0 = model(x, tt, txt, txt_mask).float()
        if cfg_scale != 1.0 and interval[0] <= t <= interval[1]:
            if weak == "tread":
                n = x.shape[-2] * x.shape[-1] // model.cfg.patch ** 2
                w = model(x, tt, txt, txt_mask, route_idx=tread_keep_indices(b, n, 0.5, g).to(x.device)).float()
            else:
                w = model(x, tt, null_txt, null_mask, skip_middle=weak == "pdg").float()
            x0 = w + cfg_scale * (x0 - w)
        return (x - x0) / max(t, T_EPS)

    for t, t_next in itertools.pairwise(time_grid(steps, shift)):
        d = velocity(x, t)
        if method == "heun" and t_next > 0:  # Heun 2nd order (Karras et al. 2022); last step Euler as in JiT
            d = (d + velocity(x + (t_next - t) * d, t_next)) / 2
        x = x + (t_next - t) * d
    return x.clamp(-1, 1)


# ======================================================================================================================
# diffusers PRX checkpoints -> this model

_DIFFUSERS_NAMES = [  # (diffusers name pattern, name here)
    (r"time_in\.in_layer\.", "time_in.0."), (r"time_in\.out_layer\.", "time_in.2."),
    (r"\.attention\.img_qkv_proj\.", ".qkv."), (r"\.attention\.txt_kv_proj\.", ".txt_kv."),
    (r"\.attention\.norm_q\.", ".q_norm."), (r"\.attention\.norm_k\.", ".k_norm."),
    (r"\.attention\.norm_added_k\.", ".txt_k_norm."), (r"\.attention\.to_out\.0\.", ".proj."),
    (r"\.gate_proj\.", ".gate."), (r"\.up_proj\.", ".up."), (r"\.down_proj\.", ".down."),
    (r"\.modulation\.lin\.", ".mod."),
    (r"final_layer\.adaLN_modulation\.1\.", "final_mod."), (r"final_layer\.linear\.", "final."),
]


def load_diffusers_state_dict(model: PRX, sd: dict):
    """Load a diffusers `PRXTransformer2DModel` state dict (pixel variant with bottleneck) into `model`.
    SPRINT's fusion layer and mask token are not in PRX checkpoints and keep their init (fusion = identity)."""
    mapped = {}
    for name, tensor in sd.items():
        for pat, rep in _DIFFUSERS_NAMES:
            name = re.sub(pat, rep, name)
        mapped[name] = tensor
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if not k.startswith(("fuse.", "mask_token"))]
    if missing or unexpected:
        raise ValueError(f"diffusers PRX checkpoint does not match: missing {missing}, unexpected {unexpected}")
    return model


def config_from_diffusers(dcfg: dict, **overrides) -> PRXConfig:
    """PRXConfig from a diffusers PRXTransformer2DModel config dict (e.g. its config.json)."""
    return replace(PRXConfig(hidden=dcfg["hidden_size"], depth=dcfg["depth"], heads=dcfg["num_heads"],
                             mlp_ratio=dcfg["mlp_ratio"], patch=dcfg["patch_size"], bottleneck=dcfg["bottleneck_size"],
                             text_dim=dcfg["context_in_dim"], in_channels=dcfg["in_channels"],
                             theta=float(dcfg["theta"])), **overrides)


# ======================================================================================================================
# FLOP accounting (matmuls and attention; what torch.utils.flop_counter counts)


def train_flops(cfg: PRXConfig, res: int, txt_len: int = 256, drop_ratio: float = 0.0, route: float = 0.0) -> float:
    """Forward + backward FLOPs of one training sample at res x res px (SPRINT drop_ratio or TREAD route), counted as
    torch.utils.flop_counter does: backward = 2x forward for every matmul, 1x for layers whose input needs no
    gradient (patches, text, timestep features), 2.5x for attention (flash-attention backward recomputes scores)."""
    H, M, L, D = cfg.hidden, cfg.mlp_hidden, txt_len, cfg.patch_dim
    N = (res // cfg.patch) ** 2
    lo, hi, ratio = (cfg.tread_start, cfg.tread_end, route) if route else (cfg.sparse_start, cfg.sparse_end, drop_ratio)
    n_sparse = N - min(max(round(N * route), 1), N - 1) if route else round(N * (1 - drop_ratio))
    ns = [n_sparse if ratio and lo <= i < hi else N for i in range(cfg.depth)]
    # per block on n image tokens: qkv, proj and MLP on n tokens; text k/v on L tokens; the modulation on one vector
    linear = sum(2 * n * H * (3 * H + H + 3 * M) + 2 * L * H * 2 * H + 2 * H * 6 * H for n in ns)
    fuse = 0 if route else 2 * N * 2 * H * H  # SPRINT's fusion layer (TREAD has none)
    linear += 2 * N * cfg.bottleneck * H + 2 * H * H + fuse + 2 * H * 2 * H + 2 * N * H * D
    attention = sum(4 * n * (L + n) * H for n in ns)  # q.k and p.v over L text + n image keys
    input_layers = 2 * N * D * cfg.bottleneck + 2 * L * cfg.text_dim * H + 2 * 256 * H
    return 3.0 * linear + 3.5 * attention + 2.0 * input_layers


def counted_flops(fn, *args, **kwargs) -> int:
    """FLOPs of fn(*args, **kwargs) as torch.utils.flop_counter counts them (on meta tensors: shapes, no compute)."""
    with FlopCounterMode(display=False) as fc:
        fn(*args, **kwargs)
    return fc.get_total_flops()


def count_params(cfg: PRXConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in PRX(cfg).parameters())


if __name__ == "__main__":  # parameter count and FLOPs (speed against diffusers' PRX: `python -m tools.bench_model`)
    for name, cfg in PRESETS.items():
        f512, f1024 = train_flops(cfg, 16 * cfg.patch), train_flops(cfg, 32 * cfg.patch)
        f1024s = train_flops(cfg, 32 * cfg.patch, drop_ratio=0.75)
        print(f"{name}: {count_params(cfg) / 1e9:.3f} B params; train FLOPs/sample: 16x16 tokens {f512:.3e}, "
              f"32x32 tokens {f1024:.3e}, 32x32 with SPRINT 75% {f1024s:.3e} ({f1024 / f1024s:.2f}x less)")
