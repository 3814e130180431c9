"""Pin the slow reference DiT (ace.reference) to hand-computed cases from ACE_REFERENCE.md."""

from __future__ import annotations

import math

import pytest
import torch

from ace.reference import (
    ReferenceDiT,
    RMSNorm,
    apply_rope,
    rope_split,
    timestep_features,
    unpatchify,
)

TINY = dict(hidden_size=32, depth=2, num_heads=2, text_dim=16, rope_max_len=64)


def tiny_model(**overrides) -> ReferenceDiT:
    torch.manual_seed(0)
    return ReferenceDiT(**{**TINY, **overrides}).double().eval()


def sample(sizes, text_lens, seed=1, text_dim=16):
    """One sample: frames (4, h, w) of the given sizes, no masks, one text per frame."""
    g = torch.Generator().manual_seed(seed)
    frames = [torch.randn(4, h, w, generator=g, dtype=torch.float64) for h, w in sizes]
    texts = [torch.randn(n, text_dim, generator=g, dtype=torch.float64) for n in text_lens]
    return frames, [None] * len(sizes), texts


def run(model, samples, t=(500.0,), indicators=None):
    frames, masks, texts = (list(x) for x in zip(*samples))
    with torch.no_grad():
        return model(frames, masks, texts, torch.tensor(t, dtype=torch.float64), indicators)


# ----------------------------------------------------------------------------- pieces


def test_timestep_features_cos_first_then_sin():
    feats = timestep_features(torch.tensor([0.0, 1.0, 500.0]))
    assert feats.shape == (3, 256)
    # t = 0: cos half is 1, sin half is 0
    assert feats.dtype == torch.float32  # as released: its weights saw float32 features
    assert torch.equal(feats[0, :128], torch.ones(128))
    assert torch.equal(feats[0, 128:], torch.zeros(128))
    # i = 0: frequency 1; i = 32: 10000^(-1/4) = 0.1; i = 64: 10000^(-1/2) = 0.01
    expected = {
        (1, 0): 0.5403023058681398,  # cos(1)
        (1, 128): 0.8414709848078965,  # sin(1)
        (2, 64): 0.28366218546322625,  # cos(500 * 0.01) = cos(5)
        (2, 128 + 64): -0.9589242746631385,  # sin(5)
        (2, 32): 0.9649660284921133,  # cos(500 * 0.1) = cos(50)
        (2, 128 + 32): -0.26237485370392877,  # sin(50)
    }
    for (row, col), value in expected.items():
        assert feats[row, col].item() == pytest.approx(value, abs=2e-5)  # float32 angles


def test_rms_norm_formula_and_dtype():
    norm = RMSNorm(4)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.tensor([[3.0, 4.0, 0.0, 0.0]])  # mean(x^2) = 25/4 -> rms 2.5
    expected = torch.tensor([[3 / 2.5, 2 * 4 / 2.5, 0.0, 0.0]])
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-5)
    # computed in float32: 300^2 overflows float16, the result does not
    big = torch.full((1, 4), 300.0, dtype=torch.float16)
    out = norm.half()(big)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float16))


def test_rope_split():
    assert rope_split(72) == (12, 12, 12)
    assert rope_split(6) == (1, 1, 1)
    assert rope_split(12) == (2, 2, 2)
    assert rope_split(16) == (4, 2, 2)


def test_rope_d6_hand_rotation():
    # D = 6: one pair per axis, each with frequency 1, so angle = position.
    x = torch.tensor([[[1.0, 0.0, 1.0, 0.0, 0.0, 1.0]]], dtype=torch.float64)  # (N=1, H=1, 6)
    pos = torch.tensor([[1, 2, 3]])  # (f, y, x)
    out = apply_rope(x, pos, max_len=16)[0, 0]
    c, s = math.cos, math.sin
    # (a + ib) e^{i theta}: (1, 0) -> (cos, sin); (0, 1) -> (-sin, cos)
    expected = [c(1), s(1), c(2), s(2), -s(3), c(3)]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))


def test_rope_d12_hand_rotation():
    # D = 12: two pairs per axis with frequencies 1 and 10000^(-2/4) = 0.01.
    x = torch.tensor([[[1.0, 0.0] * 6]], dtype=torch.float64)  # (1, 1, 12)
    f, y, xx = 3, 5, 7
    out = apply_rope(x, torch.tensor([[f, y, xx]]), max_len=16)[0, 0]
    angles = [f, 0.01 * f, y, 0.01 * y, xx, 0.01 * xx]
    expected = [v for a in angles for v in (math.cos(a), math.sin(a))]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    # float32 input comes back float32, same values
    out32 = apply_rope(x.float(), torch.tensor([[f, y, xx]]), max_len=16)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32[0, 0].double(), out, atol=1e-6, rtol=0)


def test_unpatchify_ordering():
    gh, gw, p, c = 2, 3, 2, 3
    tokens = torch.zeros(gh * gw, p * p * c)
    for i in range(gh):
        for j in range(gw):
            for r in range(p):
                for s in range(p):
                    for ch in range(c):  # vector ordered (r, s, ch), channel fastest
                        tokens[i * gw + j, (r * p + s) * c + ch] = 10000 * i + 1000 * j + 100 * r + 10 * s + ch  # fmt: skip
    img = unpatchify(tokens, gh, gw, p)
    assert img.shape == (c, gh * p, gw * p)
    for i in range(gh):
        for j in range(gw):
            for r in range(p):
                for s in range(p):
                    for ch in range(c):
                        want = 10000 * i + 1000 * j + 100 * r + 10 * s + ch
                        assert img[ch, i * p + r, j * p + s].item() == want


# ----------------------------------------------------------------------------- model


def test_state_dict_uses_released_split_names():
    model = ReferenceDiT(**{**TINY, "depth": 1})
    sd = model.state_dict()
    names = {"weight", "bias"}
    expected = {f"x_embedder.proj.{n}" for n in names}
    expected |= {f"t_embedder.mlp.{i}.{n}" for i in (0, 2) for n in names}
    expected |= {f"y_embedder.fc{i}.{n}" for i in (1, 2) for n in names}
    expected |= {f"t_block.1.{n}" for n in names}
    expected |= {"blocks.0.scale_shift_table", "final_layer.scale_shift_table"}
    for a in ("attn", "cross_attn"):
        expected |= {f"blocks.0.{a}.{x}.{n}" for x in "qkvo" for n in names}
        expected |= {f"blocks.0.{a}.norm_q.weight", f"blocks.0.{a}.norm_k.weight"}
    expected |= {f"blocks.0.mlp.fc{i}.{n}" for i in (1, 2) for n in names}
    expected |= {f"final_layer.linear.{n}" for n in names}
    assert set(sd) == expected
    assert sd["x_embedder.proj.weight"].shape == (32, 5, 2, 2)
    assert sd["blocks.0.scale_shift_table"].shape == (6, 32)
    assert sd["blocks.0.mlp.fc1.weight"].shape == (128, 32)
    assert sd["final_layer.linear.weight"].shape == (2 * 2 * 8, 32)
    assert sd["t_embedder.mlp.0.weight"].shape == (32, 256)
    # a released-style dict loads strictly; no parameter is zero
    ReferenceDiT(**{**TINY, "depth": 1}).load_state_dict(sd, strict=True)
    assert all((v != 0).all() for v in sd.values())
    no_norm = ReferenceDiT(**{**TINY, "depth": 1, "qk_norm": False, "pred_sigma": False})
    assert not any("norm_" in k for k in no_norm.state_dict())
    assert no_norm.final_layer.linear.out_features == 2 * 2 * 4


def test_depth0_hand_computed_forward():
    """No blocks: patch conv over (latent, mask), + indicator, final layer modulated by t_emb."""
    model = tiny_model(depth=0)
    frames, _, texts = sample([(4, 6)], [3])
    mask = (torch.arange(24).reshape(1, 4, 6) % 3 == 0).double()
    ind = torch.randn(10, 16, dtype=torch.float64)
    t = torch.tensor([321.0], dtype=torch.float64)
    with torch.no_grad():
        (out,) = model([frames], [[mask]], [texts], t, ind)
        z = torch.cat([frames[0], mask])  # (5, 4, 6)
        w = model.x_embedder.proj.weight.reshape(32, -1)
        t_emb = model.t_embedder.mlp(timestep_features(t).double())[0]
        shift = model.final_layer.scale_shift_table[0] + t_emb
        scale = model.final_layer.scale_shift_table[1] + t_emb
        row = model.y_embedder(ind)[0]  # F = 1: target gets row F - 1 = 0
        expected = torch.zeros(4, 4, 6, dtype=torch.float64)
        for i in range(2):
            for j in range(3):
                patch = z[:, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(-1)
                tok = w @ patch + model.x_embedder.proj.bias + row
                tok = (tok - tok.mean()) / torch.sqrt(tok.var(unbiased=False) + 1e-6)
                vec = model.final_layer.linear(tok * (1 + scale) + shift)
                for r in range(2):
                    for s in range(2):
                        expected[:, 2 * i + r, 2 * j + s] = vec[
                            (2 * r + s) * 8 : (2 * r + s) * 8 + 4
                        ]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


def test_output_shapes_mixed_sizes():
    model = tiny_model()
    outs = run(model, [sample([(4, 6), (8, 2), (6, 6)], [3, 5, 2]), sample([(2, 8)], [4])], t=(10, 900))  # fmt: skip
    assert [tuple(o.shape) for o in outs] == [(4, 4, 6), (4, 2, 8)]
    assert all(torch.isfinite(o).all() for o in outs)


def test_mask_none_equals_ones():
    model = tiny_model()
    frames, masks, texts = sample([(4, 4), (4, 6)], [3, 2])
    ones = [torch.ones(1, 4, 4, dtype=torch.float64), torch.ones(1, 4, 6, dtype=torch.float64)]
    zero = [torch.zeros(1, 4, 4, dtype=torch.float64), None]
    a, b, c = (run(model, [(frames, m, texts)])[0] for m in (masks, ones, zero))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a, c)


def test_norm_k_unused_norm_q_used():
    model = tiny_model()
    s = sample([(4, 4), (4, 4)], [3, 2])
    base = run(model, [s])[0]
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.norm_k.weight.mul_(3.0)
            blk.cross_attn.norm_k.weight.add_(1.0)
    torch.testing.assert_close(run(model, [s])[0], base, atol=0, rtol=0)
    with torch.no_grad():
        model.blocks[0].cross_attn.norm_q.weight.mul_(1.5)
    assert not torch.allclose(run(model, [s])[0], base)


def test_cross_attention_only_to_own_text():
    frames, masks, texts = sample([(4, 4), (4, 4)], [3, 2])
    other = [texts[0], torch.randn(5, 16, dtype=torch.float64)]
    # depth 1: the condition frame's text reaches its own tokens only after self-attention,
    # so the target output cannot see it; with depth 2 it can (via block 2's self-attention).
    shallow = tiny_model(depth=1)
    a, b = (run(shallow, [(frames, masks, tx)])[0] for tx in (texts, other))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    deep = tiny_model(depth=2)
    a, b = (run(deep, [(frames, masks, tx)])[0] for tx in (texts, other))
    assert not torch.allclose(a, b)


def test_samples_are_independent():
    model = tiny_model()
    s1 = sample([(4, 4), (2, 6)], [3, 2], seed=1)
    s2 = sample([(6, 4)], [7], seed=2)
    alone = run(model, [s1], t=(250.0,))[0]
    both = run(model, [s2, s1], t=(900.0, 250.0))
    torch.testing.assert_close(both[1], alone, atol=1e-13, rtol=1e-13)


def test_indicator_rows():
    model = tiny_model()
    ind = torch.randn(10, 16, dtype=torch.float64)
    s = sample([(4, 4), (4, 4)], [3, 2])  # F = 2: condition -> row 0, target -> row 1
    base = run(model, [s], indicators=ind)[0]
    assert not torch.allclose(base, run(model, [s])[0])
    changed = ind.clone()
    changed[2:] += 1.0  # rows 2..9 unused for F = 2
    torch.testing.assert_close(run(model, [s], indicators=changed)[0], base, atol=0, rtol=0)
    for used in (0, 1):
        changed = ind.clone()
        changed[used] += 1.0
        assert not torch.allclose(run(model, [s], indicators=changed)[0], base)


def test_frame_order_matters_through_rope():
    model = tiny_model()
    frames, masks, texts = sample([(4, 4), (4, 4), (4, 4)], [3, 2, 4])
    swapped = ([frames[0], frames[2], frames[1]], masks, [texts[0], texts[2], texts[1]])
    a = run(model, [(frames, masks, texts)])[0]
    b = run(model, [swapped])[0]
    assert not torch.allclose(a, b)


def test_bad_input_raises():
    model = tiny_model()
    frames, masks, texts = sample([(4, 4), (4, 4)], [3, 2])
    t = torch.tensor([1.0])
    with pytest.raises(ValueError, match="texts"):
        model([frames], [masks], [texts[:1]], t)
    with pytest.raises(ValueError, match="indicator"):
        model([frames], [masks], [texts], t, torch.randn(1, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="differ"):
        model([frames], [masks], [texts], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="frame"):
        model([[frames[0][:3], frames[1]]], [masks], [texts], t)
    with pytest.raises(ValueError, match="mask"):
        model([frames], [[torch.ones(1, 2, 2), None]], [texts], t)
    with pytest.raises(ValueError, match="text"):
        model([frames], [masks], [[texts[0], torch.randn(2, 8)]], t)
