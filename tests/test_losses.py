"""losses.py: LPIPS on random-weight VGG16s (the published weights cannot be downloaded here)."""

import zipfile

import pytest
import torch
import torch.nn.functional as F
from conftest import random_lpips
from safetensors.torch import save_file

import losses


def test_lpips_matches_a_direct_computation_of_its_definition():
    net = random_lpips()
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    want, h = 0, [(z - net.shift) / net.scale for z in (x, y)]
    # VGG16: conv-relu blocks of 2, 2, 3, 3, 3 convolutions, max-pooled between; a tap after each block's last relu
    sizes, k = (2, 2, 3, 3, 3), 0
    for tap, n in enumerate(sizes):
        if tap:
            h = [F.max_pool2d(z, 2) for z in h]
        for _ in range(n):
            h = [F.relu(convs[k](z)) for z in h]
            k += 1
        a, b = (z / (z.pow(2).sum(1, keepdim=True).sqrt() + 1e-10) for z in h)
        want = want + (net.lins[tap].weight * (a - b).pow(2)).sum(1).mean((1, 2))
    torch.testing.assert_close(net(x, y), want, rtol=1e-5, atol=1e-7)
    assert net(x, x).abs().max() == 0 and (net(x, y) > 0).all()


def test_lpips_loss_trains_the_prediction_at_half_resolution():
    net = random_lpips()
    x0, x0_hat = torch.rand(2, 3, 32, 32) * 2 - 1, (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_()
    loss = losses.lpips_loss(net, x0_hat, x0)
    half = [F.interpolate(z, scale_factor=0.5, mode="bilinear", align_corners=False) for z in (x0_hat, x0)]
    torch.testing.assert_close(loss, net(*half))
    loss.sum().backward()
    assert x0_hat.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())


def test_from_pretrained_loads_vgg_features_and_lpips_layers(tmp_path):
    ref = random_lpips(seed=1)
    sd = {f"features.{k}": v for k, v in ref.features.state_dict().items()}
    sd["head.fc.weight"] = torch.zeros(3, 4)  # timm's checkpoint holds its classifier too: ignored
    (tmp_path / "vgg").mkdir()
    save_file(sd, tmp_path / "vgg" / "model.safetensors")
    lins = {f"lin{k}.model.1.weight": lin.weight.clone() for k, lin in enumerate(ref.lins)}
    torch.save(lins, tmp_path / "vgg.pth")
    wheel = tmp_path / "lpips-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "vgg.pth", "lpips/weights/v0.1/vgg.pth")
    path = losses.extract_lin_weights(wheel, tmp_path / "cache" / "lpips" / "vgg.pth")
    net = losses.LPIPS.from_pretrained(path, vgg=str(tmp_path / "vgg"))
    x, y = torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16)
    torch.testing.assert_close(net(x, y), ref(x, y), rtol=0, atol=0)
    assert not any(p.requires_grad for p in net.parameters())


def test_extract_refuses_pickled_objects(tmp_path):
    torch.save({"lin0.model.1.weight": torch.nn.Conv2d(1, 1, 1)}, tmp_path / "vgg.pth")  # a module, not tensors
    wheel = tmp_path / "lpips.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "vgg.pth", "lpips/weights/v0.1/vgg.pth")
    with pytest.raises(Exception, match="(?i)weights only|unsupported|global"):
        losses.extract_lin_weights(wheel, tmp_path / "out" / "vgg.pth")
    assert not (tmp_path / "out" / "vgg.pth").exists()
