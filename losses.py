"""
losses.py: the training losses against frozen networks, beside the flow-matching objective (model.py):
  REPA (Yu et al. 2024), the burn-in's alignment of the denoiser's tokens to a DINO teacher's, and iREPA's variant;
  PRX Part 3's perceptual losses: a DINO feature loss, and LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness
  of Deep Features as a Perceptual Metric"; weight 0.1, at every noise level, at half resolution).

LPIPS is written here rather than imported: the `lpips` package builds on torchvision, whose PyPI build does not import
beside the pinned torch on the CPU machines of this project. The network and the weights are the published ones: VGG16's
convolutions with torchvision's ImageNet weights (on the hub as timm's `vgg16.tv_in1k`, the same tensor names), and
LPIPS v0.1's linear layers (`lpips/weights/v0.1/vgg.pth` inside the lpips wheel, which `python prepare.py --lpips`
extracts without installing it). The record track turns it on with Track.lpips; the CPU track has no VGG weights.
"""

import io
import math
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import model

# ======================================================================================================================
# REPA and the DINO feature loss


def dino_tokens(teacher, x0, grid):
    """DINO patch tokens of an image in [-1, 1], resized so that the teacher's patch grid equals the token grid."""
    size = grid * teacher.config.patch_size
    x = F.interpolate((x0 + 1) / 2, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD, device=x.device).view(1, 3, 1, 1)
    hidden = teacher(pixel_values=(x - mean) / std).last_hidden_state
    return hidden[:, 1 + getattr(teacher.config, "num_register_tokens", 0):]  # drop CLS and registers


teacher_tokens = torch.no_grad()(dino_tokens)  # REPA's target: the frozen teacher on the clean image


def repa_loss(projector, h, y, keep_idx=None, spatial_norm=False):
    """REPA (Yu et al. 2024): negative cosine between projected student tokens and teacher tokens (per sample);
    under SPRINT / TREAD the teacher tokens are gathered at the kept indices. iREPA (Singh et al. 2025): a 3x3
    convolution over the token grid as projector (missing tokens enter it as zeros) and the teacher's tokens
    normalised over space, (y - 0.8 mean_tokens(y)) / std_tokens(y) (PRX's code: the mean scaled per token instead)."""
    if spatial_norm:
        y = (y - 0.8 * y.mean(1, keepdim=True)) / (y.std(1, keepdim=True) + 1e-6)
    if isinstance(projector, nn.Conv2d):
        g = math.isqrt(y.shape[1])
        if keep_idx is not None:
            h = h.new_zeros(h.shape[0], y.shape[1], h.shape[-1]).scatter(1, keep_idx[..., None].expand_as(h), h)
        p = model.take(projector(h.transpose(1, 2).unflatten(2, (g, g))).flatten(2).transpose(1, 2), keep_idx)
    else:
        p = projector(h)
    return -F.cosine_similarity(p.float(), model.take(y, keep_idx).float(), dim=-1).mean(1)


def make_projector(hidden, width, d_teacher, seed, conv=False):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if conv:  # iREPA
            return nn.Conv2d(hidden, d_teacher, 3, padding=1)
        return nn.Sequential(nn.Linear(hidden, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                             nn.Linear(width, d_teacher))


def dino_feature_loss(teacher, x0_hat, x0, grid):
    """PRX Part 3's DINO feature loss: 1 - cosine of the mean-pooled DINO features of the predicted and the real clean
    image (per sample, at every noise level); gradients reach the denoiser through the frozen teacher."""
    real = teacher_tokens(teacher, x0, grid).mean(1)
    return 1 - F.cosine_similarity(dino_tokens(teacher, x0_hat, grid).mean(1).float(), real.float(), dim=-1)


def load_critics(dino, lpips, teacher_path, cache, device) -> dict:
    """The perceptual losses' frozen networks, for the whole run: the REPA teacher's model for the DINO feature loss
    (PRX: DINOv2-B with registers, the record track's teacher), LPIPS' VGG16 with its layers from cache/lpips."""
    from transformers import AutoModel
    critics = {}
    if dino:
        critics["dino"] = AutoModel.from_pretrained(teacher_path).to(device).eval().requires_grad_(False)
    if lpips:
        critics["lpips"] = LPIPS.from_pretrained(cache / "lpips" / "vgg.pth").to(device)
    return critics


def aux_losses(out, x0, critics, tr, grid):
    """The levers' extra loss terms per sample (weighted): Contrastive Flow Matching's (model.flow_matching_loss
    computed it), PRX Part 3's perceptual ones on the predicted clean image."""
    aux = out.contrast if out.contrast is not None else torch.zeros_like(out.fm)
    if "dino" in critics:
        aux = aux + tr.dino_loss * dino_feature_loss(critics["dino"], out.x0_hat, x0, grid)
    if "lpips" in critics:
        aux = aux + tr.lpips * lpips_loss(critics["lpips"], out.x0_hat, x0)
    return aux


# ======================================================================================================================
# LPIPS


VGG_ID = "timm/vgg16.tv_in1k"  # torchvision's VGG16 ImageNet weights as safetensors on the hub
LPIPS_WHEEL = "lpips==0.1.4"  # its weights/v0.1/vgg.pth: the linear layers on the five VGG taps
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)  # convs up to relu5_3
TAPS = (3, 8, 15, 22, 29)  # torchvision's feature indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
SCALE = 0.5  # PRX's resize_factor: LPIPS on half-resolution images


class LPIPS(nn.Module):
    """LPIPS distance per sample between images in [-1, 1]: VGG16 features at five taps, unit-normalised over
    channels, squared differences weighted by the (non-negative) linear layers, averaged over space, summed."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16:
            layers += [nn.MaxPool2d(2, 2)] if v == "M" else [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
            c = c if v == "M" else v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in (64, 128, 256, 512, 512))
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))  # lpips' ScalingLayer
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))

    def forward(self, x, y):
        h, out = (torch.cat([x, y]) - self.shift) / self.scale, 0
        for i, layer in enumerate(self.features[:TAPS[-1] + 1]):
            h = layer(h)
            if i in TAPS:
                a, b = (f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10) for f in h.chunk(2))
                out = out + self.lins[TAPS.index(i)]((a - b).square()).mean((1, 2, 3))
        return out

    @classmethod
    def from_pretrained(cls, lin_path, vgg=VGG_ID):
        """VGG16 from the hub (a repo id or a local folder with model.safetensors), LPIPS' layers from lin_path."""
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file
        m = cls()
        local = Path(vgg) / "model.safetensors"
        sd = load_file(local if local.exists() else hf_hub_download(vgg, "model.safetensors"))
        m.features.load_state_dict({k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")},
                                   strict=False)  # the convolutions past relu5_3's pool are not used
        lins = torch.load(lin_path, map_location="cpu", weights_only=True)
        m.lins.load_state_dict({f"{k}.weight": lins[f"lin{k}.model.1.weight"] for k in range(5)})
        return m.eval().requires_grad_(False)


def lpips_loss(net, x0_hat, x0):
    """PRX Part 3's LPIPS term per sample: predicted vs real clean image, both at SCALE of the resolution."""
    def small(z):
        return F.interpolate(z, scale_factor=SCALE, mode="bilinear", align_corners=False)
    return net(small(x0_hat.float()), small(x0.float()))


def extract_lin_weights(wheel: Path, dest: Path) -> Path:
    """LPIPS v0.1's vgg.pth out of an lpips wheel (a zip), written to dest."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        data = z.read("lpips/weights/v0.1/vgg.pth")
    torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # tensors only, or refuse here
    dest.write_bytes(data)
    return dest


def fetch_lin_weights(cache: Path) -> Path:
    """Download the lpips wheel (no dependencies, nothing installed) and keep its vgg.pth under cache/lpips/."""
    dest = cache / "lpips" / "vgg.pth"
    if not dest.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", LPIPS_WHEEL, "--no-deps", "-q", "-d", tmp],
                           check=True)
            extract_lin_weights(next(Path(tmp).glob("lpips-*.whl")), dest)
    return dest
