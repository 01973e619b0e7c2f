"""model.py: equivalence with diffusers' PRX, init properties, RoPE, SPRINT, the REPA tap, FLOP accounting."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

import model
from model import PRX, PRXConfig

CFG = PRXConfig(hidden=64, depth=6, heads=2, patch=8, bottleneck=32, text_dim=24, sparse_start=1, sparse_end=5,
                tread_start=1, tread_end=5, repa_block=3)


def randomize(m, std=0.05, seed=0):
    """Give every parameter (zero-initialised ones included) random values, so that every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std + (1.0 if "norm" in name else 0.0))
    return m


def inputs(B=2, res=32, L=10, text_dim=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(B, 3, res, res, generator=g), torch.rand(B, generator=g)
    txt = torch.randn(B, L, text_dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 6:] = False  # sample 0 has 4 padding tokens on the right
    return x, t, txt, mask


def capture_fuse_input(m):
    seen = {}
    handle = m.fuse.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach().clone()))
    return seen, handle


# -----------------------------------------------------------------------------
# Reference equivalence with diffusers


def test_matches_diffusers_prx_with_padded_text():
    from diffusers import PRXTransformer2DModel

    torch.manual_seed(0)
    ref = PRXTransformer2DModel(in_channels=3, patch_size=8, context_in_dim=24, hidden_size=64, mlp_ratio=3.5,
                                num_heads=2, depth=3, axes_dim=[16, 16], bottleneck_size=32).eval()
    with torch.no_grad():  # diffusers zero-inits the modulation: randomise everything so all paths are exercised
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cfg = model.config_from_diffusers(dict(ref.config), sparse_start=1, sparse_end=2, repa_block=1)
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.bottleneck) == (64, 3, 2, 32)
    ours = model.load_diffusers_state_dict(PRX(cfg), ref.state_dict()).eval()
    x, t, txt, mask = inputs(B=3, res=48)  # 6x6 tokens, non-square works too
    with torch.no_grad():
        want = ref(x, t, txt, mask, return_dict=False)[0]
        got = ours(x, t, txt, mask)
    rel = ((got - want).norm() / want.norm()).item()
    print(f"relative error vs diffusers PRX: {rel:.2e}")
    assert want.abs().mean() > 1e-2  # a meaningful, non-trivial output
    assert rel < 1e-5


def test_diffusers_loader_rejects_mismatched_checkpoint():
    sd = PRX(CFG).state_dict()
    sd["blocks.0.something_else.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="does not match"):
        model.load_diffusers_state_dict(PRX(CFG), sd)


# -----------------------------------------------------------------------------
# Init, padding, RoPE


def test_output_is_exactly_zero_at_init():
    m = PRX(CFG)
    x, t, txt, mask = inputs()
    keep = model.sprint_keep_indices(2, 4, 4, torch.Generator().manual_seed(0))
    assert torch.equal(m(x, t, txt, mask), torch.zeros_like(x))
    assert torch.equal(m(x, t, txt, mask, keep_idx=keep), torch.zeros_like(x))


def test_padded_text_positions_do_not_matter():
    m = randomize(PRX(CFG)).eval()
    x, t, txt, mask = inputs()
    txt2 = txt.clone()
    txt2[0, 6:] = torch.randn(4, 24) * 100  # change only the padded positions of sample 0
    with torch.no_grad():
        a, b = m(x, t, txt, mask), m(x, t, txt2, mask)
        txt3 = txt.clone()
        txt3[0, 2] += 1.0  # a real token does matter (the test can fail)
        c = m(x, t, txt3, mask)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a[0] - c[0]).abs().max() > 1e-4


def test_rope_known_rotation_and_relative_positions():
    hd, theta = 8, 10000.0  # 4 pairs: pairs 0-1 turn with the row, pairs 2-3 with the column
    pos = torch.tensor([[3, 5]])
    ang = model.rope_angles(pos, hd, theta)[0]
    want = torch.tensor([3.0, 3.0 / theta ** 0.5, 5.0, 5.0 / theta ** 0.5], dtype=torch.float32)
    torch.testing.assert_close(ang, want)
    x = torch.zeros(1, 1, 1, hd)
    x[..., 0] = 1.0  # unit vector on pair 0 -> (cos 3, sin 3)
    x[..., 5] = 1.0  # second component of pair 2 -> (-sin 5, cos 5)
    y = model.apply_rope(x, ang.cos()[None, None, None], ang.sin()[None, None, None])[0, 0, 0]
    torch.testing.assert_close(y[:2], torch.tensor([math.cos(3), math.sin(3)]))
    torch.testing.assert_close(y[4:6], torch.tensor([-math.sin(5), math.cos(5)]))
    assert y.norm().item() == pytest.approx(math.sqrt(2), rel=1e-6)  # a rotation keeps the norm
    # q.k after RoPE depends only on the position difference
    q, k = torch.randn(hd), torch.randn(hd)

    def dot(pq, pk):
        aq, ak = model.rope_angles(torch.tensor([pq]), hd, theta), model.rope_angles(torch.tensor([pk]), hd, theta)
        rq = model.apply_rope(q[None, None, None], aq.cos()[None, None], aq.sin()[None, None])
        rk = model.apply_rope(k[None, None, None], ak.cos()[None, None], ak.sin()[None, None])
        return (rq * rk).sum().item()

    assert dot([1, 2], [4, 7]) == pytest.approx(dot([3, 0], [6, 5]), rel=1e-5)
    assert dot([1, 2], [4, 7]) != pytest.approx(dot([1, 2], [4, 8]), rel=1e-3)


def test_patchify_roundtrip_and_token_order():
    x = torch.randn(2, 3, 16, 24)
    tok = model.patchify(x, 8)
    assert tok.shape == (2, 6, 192)
    torch.testing.assert_close(tok[:, 4], x[:, :, 8:16, 8:16].flatten(1))  # token 4 = row 1, col 1 of a 2x3 grid
    assert torch.equal(model.unpatchify(tok, 8, 16, 24), x)


# -----------------------------------------------------------------------------
# SPRINT


def test_keep_indices_one_per_2x2_group():
    gh, gw, B = 6, 8, 5
    keep = model.sprint_keep_indices(B, gh, gw, torch.Generator().manual_seed(0))
    assert keep.shape == (B, gh * gw // 4)  # exactly 25 % of the tokens
    rows, cols = keep // gw, keep % gw
    groups = (rows // 2) * (gw // 2) + cols // 2
    for b in range(B):
        assert sorted(groups[b].tolist()) == list(range(gh * gw // 4))  # one per group
        assert torch.equal(keep[b], keep[b].sort().values)
    assert len({tuple(k.tolist()) for k in keep}) == B  # independent per sample


def test_sprint_middle_sees_kept_tokens_at_their_true_positions():
    m = randomize(PRX(CFG)).eval()
    x, t, txt, mask = inputs(res=32)  # 4x4 grid, 16 tokens, 4 kept
    keep = model.sprint_keep_indices(2, 4, 4, torch.Generator().manual_seed(3))
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: seen.append(args)) for b in m.blocks]
    with torch.no_grad():
        m(x, t, txt, mask, keep_idx=keep)
    for h in hooks:
        h.remove()
    n_tokens = [a[0].shape[1] for a in seen]
    assert n_tokens == [16, 4, 4, 4, 4, 16]  # dense encoder, sparse middle, dense decoder
    cos_mid = seen[1][3]  # [B, 1, 4, hd/2]
    row, col = keep // 4, keep % 4
    omega = 1.0 / 10000.0 ** (torch.arange(0, 16, 2) / 16.0)  # head dim 32: 8 pairs per axis
    want = torch.cat([row[..., None] * omega, col[..., None] * omega], dim=-1)[:, None]
    torch.testing.assert_close(cos_mid, want.cos())


def test_sprint_reexpansion_and_path_drop():
    m = PRX(CFG)  # at init every block is the identity (adaLN-Zero), so the deep path returns its input
    with torch.no_grad():
        m.img_in[1].weight.normal_()
    x, t, txt, mask = inputs(B=3, res=32, L=10)
    mask = torch.ones(3, 10, dtype=torch.bool)
    txt = torch.randn(3, 10, 24)
    keep = model.sprint_keep_indices(3, 4, 4, torch.Generator().manual_seed(1))
    seen, hook = capture_fuse_input(m)
    with torch.no_grad():
        m(x, t, txt, mask, keep_idx=keep)
        deep, shallow = seen["x"].chunk(2, dim=-1)
        for b in range(3):
            kept = torch.zeros(16, dtype=torch.bool)
            kept[keep[b]] = True
            assert torch.equal(deep[b, kept], shallow[b, kept])  # every kept token is back at its place
            assert torch.equal(deep[b, ~kept], m.mask_token.expand(12, -1))  # mask tokens elsewhere
        drop = torch.tensor([False, True, False])
        m(x, t, txt, mask, keep_idx=keep, path_drop=drop)
        deep2 = seen["x"].chunk(2, dim=-1)[0]
        assert torch.equal(deep2[1], m.mask_token.expand(16, -1))  # the chosen sample: mask tokens only
        assert torch.equal(deep2[[0, 2]], deep[[0, 2]])  # the others: untouched
    hook.remove()


def test_path_drop_touches_only_chosen_samples_and_skip_middle_equals_all_dropped():
    m = randomize(PRX(CFG)).eval()
    x, t, txt, mask = inputs(B=3)
    mask = torch.ones(3, 10, dtype=torch.bool)
    txt = torch.randn(3, 10, 24)
    keep = model.sprint_keep_indices(3, 4, 4, torch.Generator().manual_seed(2))
    with torch.no_grad():
        base = m(x, t, txt, mask, keep_idx=keep)
        dropped = m(x, t, txt, mask, keep_idx=keep, path_drop=torch.tensor([True, False, False]))
        skip = m(x, t, txt, mask, skip_middle=True)
        all_dropped = m(x, t, txt, mask, path_drop=torch.ones(3, dtype=torch.bool))
    torch.testing.assert_close(dropped[1:], base[1:], rtol=0, atol=1e-6)
    assert (dropped[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(skip, all_dropped, rtol=0, atol=1e-6)


def test_keeping_every_token_equals_the_dense_path_and_dropping_changes_it():
    m = randomize(PRX(CFG)).eval()
    x, t, txt, mask = inputs()
    keep = model.sprint_keep_indices(2, 4, 4, torch.Generator().manual_seed(0))
    every = torch.arange(16).repeat(2, 1)  # the sparse machinery (gather, RoPE gather, scatter) with nothing dropped
    with torch.no_grad():
        dense, sparse, full = m(x, t, txt, mask), m(x, t, txt, mask, keep_idx=keep), m(x, t, txt, mask, keep_idx=every)
    torch.testing.assert_close(full, dense, rtol=1e-5, atol=1e-6)
    assert (dense - sparse).abs().max() > 1e-3


def test_gradients_reach_every_trainable_parameter():
    m = randomize(PRX(CFG))
    x, t, txt, mask = inputs(B=4)
    mask = torch.ones(4, 10, dtype=torch.bool)
    txt = torch.randn(4, 10, 24)
    keep = model.sprint_keep_indices(4, 4, 4, torch.Generator().manual_seed(0))
    out, repa, _ = m(x, t, txt, mask, keep_idx=keep, path_drop=torch.tensor([True, False, False, False]),
                       return_repa=True)
    (out.square().mean() + repa.square().mean()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert "mask_token" not in dict(m.named_parameters())  # frozen, as in the official SPRINT code
    assert len(m.muon_params()) == 7 * CFG.depth  # mod, qkv, txt_kv, proj, gate, up, down per block
    assert len(m.muon_params()) + len(m.adamw_params()) == len(list(m.parameters()))


def test_repa_tap_returns_block_output_and_kept_indices():
    m = randomize(PRX(CFG)).eval()
    x, t, txt, mask = inputs()
    seen = {}
    hook = m.blocks[CFG.repa_block - 1].register_forward_hook(lambda mod, a, out: seen.__setitem__("h", out))
    keep = model.sprint_keep_indices(2, 4, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, h, idx = m(x, t, txt, mask, return_repa=True)
        assert idx is None and h.shape == (2, 16, 64) and torch.equal(h, seen["h"])
        torch.testing.assert_close(out, m(x, t, txt, mask))
        _, h, idx = m(x, t, txt, mask, keep_idx=keep, return_repa=True)
        assert torch.equal(idx, keep) and h.shape == (2, 4, 64) and torch.equal(h, seen["h"])
    hook.remove()


# -----------------------------------------------------------------------------
# FLOPs


def _counted_flops(m, res, L, keep, route=None):
    """torch.utils.flop_counter, with the CPU flash-attention kernel counted like the CUDA ones."""
    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, **kw: sdpa_backward_flop_count(g, q, k, v),
    }
    x, t, txt, mask = inputs(B=2, res=res, L=L, text_dim=m.cfg.text_dim)
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        m(x, t, txt, mask, keep_idx=keep, route_idx=route).square().mean().backward()
    counts = {str(k) for k in fc.get_flop_counts()["Global"]}
    assert any("attention" in k for k in counts), counts  # attention is counted, not silently missing
    return fc.get_total_flops() / 2


@pytest.mark.parametrize("drop,route", [(0.0, 0.0), (0.75, 0.0), (0.0, 0.5)])
def test_flop_function_matches_flop_counter(drop, route):
    m = randomize(PRX(CFG))
    keep = model.sprint_keep_indices(2, 8, 8) if drop else None
    routed = model.tread_keep_indices(2, 64, route) if route else None
    counted = _counted_flops(m, 64, 12, keep, routed)
    predicted = model.train_flops(CFG, 64, txt_len=12, drop_ratio=drop, route=route)
    print(f"drop {drop} route {route}: counted {counted:.4e}, predicted {predicted:.4e}")
    assert abs(predicted / counted - 1) < 0.02


def test_sprint_cuts_1024px_training_flops_and_1p2b_size():
    cfg = model.PRESETS["prx-1.2b-pixel"]
    n = model.count_params(cfg)
    assert 1.15e9 < n < 1.2e9
    dense, sprint = model.train_flops(cfg, 1024), model.train_flops(cfg, 1024, drop_ratio=0.75)
    print(f"1.2B: {n / 1e9:.3f} B params; 1024 px fwd+bwd {dense:.3e} dense, {sprint:.3e} SPRINT: "
          f"{dense / sprint:.2f}x")
    assert dense / sprint >= 1.9
    assert 1.3e12 < model.train_flops(cfg, 512) < 1.45e12  # the budget estimate: ~1.35 TFLOP per 512 px sample


def test_builds_under_any_device_context():
    """Sharded or deferred initialisation: the model builds under torch.device("meta") (and "cuda" where there is
    one) with every tensor there; materialised and loaded, it computes what the CPU-built model computes."""
    ref = randomize(PRX(CFG)).eval()
    for dev in ["meta"] + (["cuda"] if torch.cuda.is_available() else []):
        with torch.device(dev):
            m = PRX(CFG)
        assert {t.device.type for t in list(m.parameters()) + list(m.buffers())} == {dev}
    with torch.device("meta"):
        m = PRX(CFG)
    m = m.to_empty(device="cpu").eval()
    m.load_state_dict(ref.state_dict())
    x, t, txt, mask = inputs()
    assert torch.equal(m(x, t, txt, mask), ref(x, t, txt, mask))
    assert torch.equal(PRX(CFG).mask_token, ref.mask_token)  # drawn from its own seed, whatever the global RNG


def test_masked_attention_backend_choice_is_exact(monkeypatch):
    """The backend order model.py gives masked SDPA (cuDNN first on CUDA) computes what the math reference does."""
    from torch.nn.attention import SDPBackend
    m = randomize(PRX(CFG)).eval()
    x, t, txt, mask = inputs()
    out = m(x, t, txt, mask)
    monkeypatch.setattr(model, "MASKED_SDPA_ORDER", [SDPBackend.MATH])
    torch.testing.assert_close(m(x, t, txt, mask), out, rtol=1e-5, atol=1e-5)


def test_rope_grid_interpolates_positions_across_resolutions(monkeypatch):
    """rope_grid = g: at a g x g token grid the model is exactly PRX's (integer positions); at 2g x 2g the angles
    are those of positions 0, 0.5, 1, ... so they span what the g x g grid taught."""
    import dataclasses
    ref = randomize(PRX(CFG)).eval()
    interp = PRX(dataclasses.replace(CFG, rope_grid=4)).eval()
    interp.load_state_dict(ref.state_dict())
    x, t, txt, mask = inputs(res=32)  # 4x4 tokens of 8 px
    assert torch.equal(interp(x, t, txt, mask), ref(x, t, txt, mask))
    seen = []
    monkeypatch.setattr(model, "rope_angles", lambda pos, *a: seen.append(pos) or model_rope(pos, *a))
    interp(torch.randn(1, 3, 64, 64), t[:1], txt[:1], mask[:1])  # 8x8 tokens
    assert seen[-1].max().item() == 3.5 and seen[-1][1].tolist() == [0.0, 0.5]


model_rope = model.rope_angles


# -----------------------------------------------------------------------------
# Levers: TREAD, v-prediction, contrastive flow matching, PRX's fixed shift, iREPA, the DINO feature loss


def test_tread_routed_tokens_skip_the_span_and_rejoin_unchanged():
    m = randomize(PRX(CFG)).eval()
    x, t, txt, mask = inputs(res=32)  # 4x4 tokens
    route = model.tread_keep_indices(2, 16, 0.5, torch.Generator().manual_seed(0))
    assert route.shape == (2, 8) and all(torch.equal(r, r.unique()) for r in route)  # sorted, distinct
    assert not torch.equal(route[0], route[1])  # drawn per sample
    seen = {}
    hooks = [m.blocks[CFG.tread_start - 1].register_forward_hook(lambda mod, a, out: seen.__setitem__("before", out)),
             m.blocks[CFG.tread_start].register_forward_pre_hook(lambda mod, a: seen.__setitem__("first", a[0])),
             m.blocks[CFG.tread_end].register_forward_pre_hook(lambda mod, a: seen.__setitem__("after", a[0]))]
    with torch.no_grad():
        m(x, t, txt, mask, route_idx=route)
    for h in hooks:
        h.remove()
    assert seen["first"].shape == (2, 8, 64)  # the span sees the kept half
    skipped = torch.ones(2, 16, dtype=torch.bool).scatter(1, route, False)
    torch.testing.assert_close(seen["after"][skipped], seen["before"][skipped], rtol=0, atol=0)  # rejoin unchanged
    assert (seen["after"][~skipped] - seen["before"][~skipped]).abs().max() > 1e-3  # the kept ones were processed


def test_tread_with_every_token_kept_equals_the_dense_model_without_fusion():
    m = randomize(PRX(CFG)).eval()
    with torch.no_grad():  # the fusion layer back to its init (identity on the deep half): the dense path is then
        m.fuse.weight.zero_()  # exactly the blocks in a row, as TREAD's path is
        m.fuse.weight[:, :64].copy_(torch.eye(64))
        m.fuse.bias.zero_()
        x, t, txt, mask = inputs()
        every = torch.arange(16).repeat(2, 1)
        torch.testing.assert_close(m(x, t, txt, mask, route_idx=every), m(x, t, txt, mask), rtol=1e-5, atol=1e-6)
        _, h, kept = m(x, t, txt, mask, route_idx=every[:, ::2], return_repa=True)
    assert torch.equal(kept, every[:, ::2]) and h.shape == (2, 8, 64)  # the REPA tap (block 3) is inside the span


def test_v_prediction_turns_the_same_network_output_into_x0():
    mx = randomize(PRX(CFG)).eval()
    mv = PRX(model.replace(CFG, pred="v")).eval()
    mv.load_state_dict(mx.state_dict())
    x, t, txt, mask = inputs()
    with torch.no_grad():
        raw, x0 = mx(x, t, txt, mask), mv(x, t, txt, mask)
    torch.testing.assert_close(x0, x - t.view(-1, 1, 1, 1) * raw)
    x0_true, eps = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    tt = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        loss = model.flow_matching_loss(mv, x0_true, eps, tt, txt, mask).fm
        xt = (1 - tt.view(-1, 1, 1, 1)) * x0_true + tt.view(-1, 1, 1, 1) * eps
        raw = mx(xt, tt, txt, mask)  # the same loss space: the network's velocity against eps - x0
    torch.testing.assert_close(loss, (raw - (eps - x0_true)).square().mean((1, 2, 3)), rtol=1e-4, atol=1e-6)


def test_contrastive_term_pushes_away_from_the_previous_samples_target():
    m = randomize(PRX(CFG)).eval()
    x0, eps, t = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.tensor([0.2, 0.5, 0.9])
    _, _, txt, mask = inputs(B=3)
    with torch.no_grad():
        plain = model.flow_matching_loss(m, x0, eps, t, txt, mask)
        out = model.flow_matching_loss(m, x0, eps, t, txt, mask, contrastive=0.05)
    assert plain.contrast is None
    torch.testing.assert_close(out.fm, plain.fm)  # the flow-matching part is unchanged (and logged alone)
    tb = t.view(-1, 1, 1, 1)
    v_hat, v = (x0 * 0 + ((1 - tb) * x0 + tb * eps) - out.x0_hat) / tb, eps - x0
    want = -0.05 * (v_hat - v[[2, 0, 1]]).square().mean((1, 2, 3))
    torch.testing.assert_close(out.contrast, want, rtol=1e-4, atol=1e-6)


def test_fixed_shift_leaves_uniform_draws_unshifted():
    z = torch.tensor([0.4])
    assert model.training_time(torch.tensor([0.05, 0.7]), z, 4.0, fixed=3.0) == pytest.approx(0.7)  # uniform
    assert model.training_time(torch.tensor([0.05, 0.7]), z, 4.0) == pytest.approx(4 * 0.7 / (1 + 3 * 0.7))
    s = torch.sigmoid(z).item()
    assert model.training_time(torch.tensor([0.5, 0.7]), z, 4.0, fixed=3.0) == pytest.approx(3 * s / (1 + 2 * s))


