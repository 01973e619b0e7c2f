"""
perceptual.py: LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric"),
the perceptual loss of PRX Part 3's 24-hour run (weight 0.1, at every noise level, at half resolution).

Written here rather than imported: the `lpips` package builds on torchvision, whose PyPI build does not import beside
the pinned torch on the CPU machines of this project. The network and the weights are the published ones: VGG16's
convolutions with torchvision's ImageNet weights (on the hub as timm's `vgg16.tv_in1k`, the same tensor names), and
LPIPS v0.1's linear layers (`lpips/weights/v0.1/vgg.pth` inside the lpips wheel, which `python prepare.py --lpips`
extracts without installing it). The record track turns it on with Track.lpips; the CPU track has no VGG weights.
"""

import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

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
