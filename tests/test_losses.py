"""losses.py: LPIPS on random-weight VGG16s (the published weights cannot be downloaded here)."""

import zipfile

import pytest
import torch
import torch.nn.functional as F
from conftest import random_lpips
from safetensors.torch import save_file

import losses
import model


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


def test_irepa_conv_projector_and_spatial_normalisation():
    proj = losses.make_projector(8, 16, 6, seed=0, conv=True)
    h, y = torch.randn(2, 16, 8), torch.randn(2, 16, 6) * 3 + 5
    grid = proj(h.transpose(1, 2).reshape(2, 8, 4, 4)).flatten(2).transpose(1, 2)
    yn = (y - 0.8 * y.mean(1, keepdim=True)) / y.std(1, keepdim=True)
    torch.testing.assert_close(losses.repa_loss(proj, h, y, spatial_norm=True),
                               -torch.nn.functional.cosine_similarity(grid, yn, dim=-1).mean(1), rtol=1e-4, atol=1e-5)
    assert losses.repa_loss(proj, h, y).mean() != losses.repa_loss(proj, h, y, spatial_norm=True).mean()
    keep = model.sprint_keep_indices(2, 4, 4, torch.Generator().manual_seed(0))  # 4 kept tokens per sample
    kept_h = model.take(h, keep)
    zeros = torch.zeros_like(h).scatter(1, keep[..., None].expand(-1, -1, 8), kept_h)  # dropped tokens: zeros
    want = model.take(proj(zeros.transpose(1, 2).reshape(2, 8, 4, 4)).flatten(2).transpose(1, 2), keep)
    torch.testing.assert_close(losses.repa_loss(proj, kept_h, y, keep),
                               -torch.nn.functional.cosine_similarity(want, model.take(y, keep), dim=-1).mean(1))


def test_dino_feature_loss_is_zero_on_the_real_image_and_trains_through_the_frozen_teacher():
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    teacher = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, patch_size=4, image_size=16)).eval().requires_grad_(False)
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    assert losses.dino_feature_loss(teacher, x0, x0, 4).abs().max() < 1e-6
    x0_hat = (x0 + 0.5 * torch.randn_like(x0)).requires_grad_()
    loss = losses.dino_feature_loss(teacher, x0_hat, x0, 4)
    assert (loss > 1e-4).all()
    loss.sum().backward()
    assert x0_hat.grad.abs().sum() > 0 and all(p.grad is None for p in teacher.parameters())
    feats = losses.teacher_tokens(teacher, x0_hat.detach(), 4)
    assert feats.shape == (2, 16, 32) and not feats.requires_grad  # REPA's target: no graph


def test_repa_loss_gathers_teacher_tokens_at_kept_indices():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 16, 8, generator=g)  # teacher tokens of a 4x4 grid
    keep = model.sprint_keep_indices(2, 4, 4, generator=g)
    kept = y.gather(1, keep[..., None].expand(-1, -1, 8))
    ident = torch.nn.Identity()
    assert torch.allclose(losses.repa_loss(ident, kept, y, keep), torch.full((2,), -1.0))  # aligned at kept tokens
    assert torch.allclose(losses.repa_loss(ident, y, y), torch.full((2,), -1.0))  # dense
    assert (losses.repa_loss(ident, y[:, :4], y, keep) > -0.9).all()  # other tokens: not aligned
