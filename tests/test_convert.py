"""Released-checkpoint import: both spellings, wrappers, the norm quirk, the 4-channel patch embedding."""

import re

import pytest
import torch

from ace.convert import official_dit_to_ace
from ace.models import ACETransformer
from ace.reference import ReferenceDiT

CFG = dict(
    in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0,
    text_dim=16, rope_max_len=64, qk_norm=True, pred_sigma=True, num_indicators=10,
)  # fmt: skip


def to_fused(split: dict) -> dict:
    """The PixArt-style spelling written by hand from the split one (ACE_REFERENCE section 5)."""
    fused = {}
    for key, value in split.items():
        m = re.match(r"(blocks\.\d+)\.(attn|cross_attn)\.([qkvo])\.(weight|bias)$", key)
        if m:
            blk, kind, name, what = m.groups()

            def part(n, blk=blk, kind=kind, what=what):
                return split[f"{blk}.{kind}.{n}.{what}"]

            if kind == "attn" and name == "q":
                fused[f"{blk}.attn.qkv.{what}"] = torch.cat([part("q"), part("k"), part("v")])
            elif kind == "cross_attn" and name == "q":
                fused[f"{blk}.cross_attn.q_linear.{what}"] = part("q")
                fused[f"{blk}.cross_attn.kv_linear.{what}"] = torch.cat([part("k"), part("v")])
            elif name == "o":
                fused[f"{blk}.{kind}.proj.{what}"] = value
            continue
        key = re.sub(r"^y_embedder\.fc([12])", r"y_embedder.y_proj.fc\1", key)
        fused[key] = value
    fused["x_embedder.proj.weight"] = fused["x_embedder.proj.weight"][:, :4]  # no mask channel
    return fused


def predictions(model):
    g = torch.Generator().manual_seed(3)
    frames = [[torch.randn(4, 6, 4, generator=g), torch.randn(4, 4, 8, generator=g)]]
    texts = [[torch.randn(3, 16, generator=g), torch.randn(5, 16, generator=g)]]
    with torch.no_grad():
        return model.predict(
            frames, None, texts, torch.tensor([250.0]), torch.randn(10, 16, generator=g)
        )[0]


def test_fused_spelling_converts_and_predicts_identically():
    torch.manual_seed(0)
    ref = ReferenceDiT(**CFG)
    with torch.no_grad():
        ref.x_embedder.proj.weight[:, 4] = 0  # a 4-channel release reads the mask with zero weights
    split = ref.state_dict()
    from_split = ACETransformer(**CFG)
    from_split.load_state_dict(official_dit_to_ace(split), strict=True)
    from_fused = ACETransformer(**CFG)
    from_fused.load_state_dict(official_dit_to_ace({"state_dict": to_fused(split)}), strict=True)
    assert torch.equal(predictions(from_split), predictions(from_fused))
    # and both equal the reference model that holds the split weights
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        frames = [[torch.randn(4, 6, 4, generator=g), torch.randn(4, 4, 8, generator=g)]]
        texts = [[torch.randn(3, 16, generator=g), torch.randn(5, 16, generator=g)]]
        expected = ref(
            frames, [[None, None]], texts, torch.tensor([250.0]), torch.randn(10, 16, generator=g)
        )[0]
    torch.testing.assert_close(predictions(from_fused), expected, rtol=1e-5, atol=1e-6)


def test_norm_quirk_norm_k_gets_norm_q():
    sd = ReferenceDiT(**CFG).state_dict()
    out = official_dit_to_ace(sd)
    for n in range(CFG["depth"]):
        for kind in ("attn", "cross_attn"):
            assert torch.equal(
                out[f"blocks.{n}.{kind}.norm_k.weight"], sd[f"blocks.{n}.{kind}.norm_q.weight"]
            )
            assert not torch.equal(
                out[f"blocks.{n}.{kind}.norm_k.weight"], sd[f"blocks.{n}.{kind}.norm_k.weight"]
            )


def test_a_shared_qk_norm_model_trains_like_the_released_one():
    """The released model normalises k with norm_q: converted into a share_qk_norm model
    (the released presets) it has no norm_k, predicts the same, and the gradient of every
    weight, norm_q's included, is the reference's. A model with its own norm_k predicts
    the same but splits norm_q's gradient with norm_k."""
    torch.manual_seed(0)
    ref = ReferenceDiT(**CFG)
    sd = ref.state_dict()
    shared = ACETransformer(**CFG, share_qk_norm=True)
    shared.load_state_dict(official_dit_to_ace(sd, share_qk_norm=True), strict=True)
    assert not any("norm_k" in k for k in shared.state_dict())
    own = ACETransformer(**CFG)
    own.load_state_dict(official_dit_to_ace(sd), strict=True)

    def grads(model, call):
        model.zero_grad()
        g = torch.Generator().manual_seed(3)
        frames = [[torch.randn(4, 6, 4, generator=g), torch.randn(4, 4, 8, generator=g)]]
        texts = [[torch.randn(3, 16, generator=g), torch.randn(5, 16, generator=g)]]
        out = call(model, frames, texts, torch.tensor([250.0]), torch.randn(10, 16, generator=g))
        out[0].square().sum().backward()
        return out[0].detach(), {n: p.grad for n, p in model.named_parameters()}

    out_ref, g_ref = grads(ref, lambda m, f, t, s, i: m(f, [[None, None]], t, s, i))
    out_shared, g_shared = grads(shared, lambda m, f, t, s, i: m.predict(f, None, t, s, i))
    out_own, g_own = grads(own, lambda m, f, t, s, i: m.predict(f, None, t, s, i))
    torch.testing.assert_close(out_shared, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_own, out_ref, rtol=1e-5, atol=1e-6)
    for kind in ("attn", "cross_attn"):
        name = f"blocks.1.{kind}.norm_q.weight"
        torch.testing.assert_close(g_shared[name], g_ref[name], rtol=1e-4, atol=1e-7)
        assert not torch.allclose(g_own[name], g_ref[name], rtol=1e-2)  # half of it, or so
    assert ACETransformer.from_preset("ace-0.6b-512", depth=1, hidden_size=48, num_heads=4, text_dim=16).config.share_qk_norm  # fmt: skip


def test_wrappers_prefixes_and_ignored_keys():
    """DDP's module. and scepter's model. prefixes, a state_dict wrapper, PixArt's null
    caption and cached RoPE tables change nothing: the same keys and the same values."""
    sd = ReferenceDiT(**CFG).state_dict()
    bare = official_dit_to_ace(sd)
    for prefix in ("module.", "model."):
        wrapped = {prefix + k: v for k, v in sd.items()}
        wrapped["y_embedder.y_embedding"] = torch.zeros(120, 16)  # PixArt's, unused here
        wrapped[prefix + "blocks.0.attn.freqs_cis"] = torch.zeros(64, 4, dtype=torch.complex64)
        wrapped[prefix + "blocks.1.cross_attn.freqs"] = torch.zeros(64, 4)
        out = official_dit_to_ace({"state_dict": wrapped})
        assert out.keys() == bare.keys()
        assert all(torch.equal(out[k], bare[k]) for k in bare)
        ACETransformer(**CFG).load_state_dict(out, strict=True)


def test_bad_checkpoints_raise():
    sd = ReferenceDiT(**CFG).state_dict()
    with pytest.raises(ValueError, match=r"unknown keys in the ACE checkpoint: \['pos_embed'\]"):
        official_dit_to_ace({**sd, "pos_embed": torch.zeros(1)})
    broken = {k: v for k, v in sd.items() if k != "blocks.1.attn.v.weight"}
    with pytest.raises(ValueError, match=r"blocks.1.attn.v.weight.*missing"):
        official_dit_to_ace(broken)
    with pytest.raises(ValueError, match="expected a state dict"):
        official_dit_to_ace([1, 2])
    no_q = {k: v for k, v in sd.items() if k != "blocks.0.attn.q.weight"}
    with pytest.raises(
        ValueError, match=r"blocks.0.attn.k.weight is present but \['blocks.0.attn.q.weight'\]"
    ):
        official_dit_to_ace(no_q)  # it said "unknown keys" about k and v
    with pytest.raises(
        ValueError, match=r"several state dicts \(\['model', 'ema'\]\).*checkpoint\['ema'\]"
    ):
        official_dit_to_ace({"model": sd, "ema": sd})  # it took "model" and dropped the EMA
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4}]}  # not a dict of tensors
    converted = official_dit_to_ace({"model": sd, "optimizer": optimizer, "epoch": 3})
    assert converted.keys() == official_dit_to_ace(sd).keys()
    ours = official_dit_to_ace(sd)
    for again in (ours, {f"module.{k}": v for k, v in ours.items()}):  # DDP's prefix too
        with pytest.raises(ValueError, match="already in ace's layout"):
            official_dit_to_ace(again)
