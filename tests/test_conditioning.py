"""Tests for ace.conditioning against hand computations, with tiny random T5 and VAE."""

import copy
import re

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from PIL import Image
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from ace.conditioning import (
    INDICATOR_STRINGS,
    ConditionTokenizer,
    clean_text,
    convert_ldm_vae,
    downsample_mask,
    fill_masked,
    postprocess,
    preprocess_image,
    preprocess_mask,
    sd_vae_config,
    target_size,
    to_numpy,
)

TINY_VAE = dict(
    block_out_channels=(8, 8, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    latent_channels=4,
    sample_size=32,
)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=384, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    cfg.feed_forward_proj, cfg.dropout_rate = "gated-gelu", 0.0
    t5 = T5EncoderModel(cfg).eval()
    vae = AutoencoderKL(**TINY_VAE).eval()
    return ByT5Tokenizer(), t5, vae


@pytest.fixture(scope="module")
def ct(parts):
    return ConditionTokenizer(*parts)


# ---------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, clean",
    [
        ("  a\t\tcat \n\n on  a mat ", "a cat on a mat"),
        ("salt &amp;amp; pepper", "salt & pepper"),  # escaped twice
        ("&amp;lt;b&amp;gt; bold", "<b> bold"),
        ("sch\u00c3\u00b6n", "sch\u00f6n"),  # UTF-8 read as Latin-1 (mojibake)
        ("\u201cquoted\u201d \ufb01ne", '"quoted" fine'),  # ftfy: quotes, ligatures
        ("", ""),
    ],
)
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean


def test_encode_text_valid_tokens_match_single_prompt_runs(parts, ct):
    tok, t5, _ = parts
    prompts = ["a cat", "  put {image} on\tthe &amp;amp; table ", "x" * 200, ""]
    cleaned = ["a cat", "put {image} on the & table", "x" * 200, ""]
    # ByT5: one token per UTF-8 byte plus EOS, truncated to 120
    lengths = [min(len(c.encode()) + 1, 120) for c in cleaned]
    assert lengths == [6, 27, 120, 1]
    out = ct.encode_text(prompts)
    assert [tuple(o.shape) for o in out] == [(n, 32) for n in lengths]
    for o, c in zip(out, cleaned):
        ids = tok(c, truncation=True, max_length=120, return_tensors="pt").input_ids
        assert ids[0, -1].item() == tok.eos_token_id
        alone = t5(input_ids=ids).last_hidden_state[0]  # (L, E)
        torch.testing.assert_close(o, alone, atol=1e-5, rtol=1e-5)


def test_encode_text_keeps_encoder_dtype(parts):
    tok, t5, vae = parts
    ct16 = ConditionTokenizer(tok, copy.deepcopy(t5).to(torch.bfloat16), vae)
    assert ct16.encode_text(["a cat"])[0].dtype == torch.bfloat16


def test_indicator_table_is_first_token_of_each_string(parts, ct):
    tok, t5, _ = parts
    table = ct.indicator_table()
    assert INDICATOR_STRINGS[0] == "{image}" and INDICATOR_STRINGS[9] == "{image9}"
    assert table.shape == (10, 32)
    for row, s in zip(table, INDICATOR_STRINGS):
        ids = tok(s, return_tensors="pt").input_ids
        torch.testing.assert_close(
            row, t5(input_ids=ids).last_hidden_state[0, 0], atol=1e-5, rtol=1e-5
        )


# ---------------------------------------------------------------------------
# Images and masks
# ---------------------------------------------------------------------------


def test_target_size_by_hand():
    assert target_size(512, 512, 1024) == (512, 512)  # (512/16)^2 = 1024 exactly
    assert target_size(1024, 1024, 4096) == (1024, 1024)
    # 1000 x 600 @1024: scale = sqrt(1024 / (62.5 * 37.5)) = 0.66099...
    # 1000 * scale = 660.99 -> 656; 600 * scale = 396.59 -> 384
    assert target_size(1000, 600, 1024) == (656, 384)
    assert (656 // 16) * (384 // 16) <= 1024
    assert target_size(500, 500, 1024) == (496, 496)  # never enlarged, floored to 16
    assert target_size(100, 400, 1024) == (96, 400)


def test_preprocess_image_constant_colour_and_size():
    x = preprocess_image(Image.new("RGB", (512, 512), (255, 0, 128)), 1024)
    assert x.dtype == torch.float32 and x.shape == (3, 512, 512)
    torch.testing.assert_close(x[:, 0, 0], torch.tensor([1.0, -1.0, (128 / 255 - 0.5) / 0.5]))
    assert (x == x[:, :1, :1]).all()
    assert preprocess_image(Image.new("RGB", (600, 1000)), 1024).shape == (3, 656, 384)


def test_preprocess_image_range():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (300, 200, 3), dtype=np.uint8))
    x = preprocess_image(noise, 64)
    assert x.shape == (3, 144, 96) and x.min() >= -1 and x.max() <= 1


def test_aspect_crop_is_centred():
    # 1003 x 100 (W x H): crop to 400 wide at left = round(603 / 2) = 302 (half to even)
    a = np.zeros((100, 1003, 3), np.uint8)
    a[:, 302:702] = 255
    x = preprocess_image(Image.fromarray(a), 1024)
    assert x.shape == (3, 96, 400) and (x == 1).all()
    # tall tensor 100 x 500 (W x H): crop to 400 high at top = 50
    t = torch.zeros(3, 500, 100)
    t[:, 50:450] = 1
    y = preprocess_image(t, 1024)
    assert y.shape == (3, 400, 96)
    torch.testing.assert_close(y, torch.ones_like(y))


def test_tensor_path_close_to_pil_path():
    yy, xx = np.mgrid[0:300, 0:200]
    a = np.stack([yy / 300, xx / 200, (yy + xx) / 500], -1)
    pil = preprocess_image(Image.fromarray((a * 255).round().astype(np.uint8)), 256)
    ten = preprocess_image(torch.from_numpy((a * 255).round() / 255).permute(2, 0, 1).float(), 256)
    assert (
        pil.shape == ten.shape == (3, 288, 192)
    )  # 234 tokens <= 256: scale 1, sides floored to 16
    assert (pil - ten).abs().max() < 0.02


def test_preprocess_mask_binarises_above_128():
    a = np.zeros((32, 32), np.uint8)
    a[8:16], a[16:24], a[24:] = 128, 129, 255
    m = preprocess_mask(Image.fromarray(a), (32, 32))
    assert m.dtype == torch.float32 and m.shape == (1, 32, 32)
    assert torch.equal(m[0], torch.from_numpy(a > 128).float())
    # nearest-exact halving keeps pixel 2i + 1
    rng = np.random.default_rng(1)
    r = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    assert torch.equal(
        preprocess_mask(Image.fromarray(r), (16, 16))[0],
        torch.from_numpy(r[1::2, 1::2] > 128).float(),
    )
    # the same rule for every tensor kind and PIL "1"
    assert torch.equal(preprocess_mask(torch.from_numpy(a), (32, 32)), m)
    assert torch.equal(preprocess_mask(torch.from_numpy(a)[None] / 255, (32, 32)), m)
    assert torch.equal(preprocess_mask(torch.from_numpy(a > 128), (32, 32)), m)
    assert torch.equal(preprocess_mask(Image.fromarray(a > 128).convert("1"), (32, 32)), m)
    with pytest.warns(UserWarning, match="none above 128"):  # all zero -> ones, said
        assert preprocess_mask(torch.tensor([[0.5]]), (1, 1)).item() == 1
    assert preprocess_mask(torch.tensor([[0.5, 0.51]]), (1, 2)).tolist() == [[[0.0, 1.0]]]


def test_preprocess_mask_integer_zero_one_is_read_as_zero_one():
    a = np.zeros((32, 32), np.uint8)
    a[8:16, 4:20] = 1
    expected = torch.from_numpy(a).float()[None]  # (1, 32, 32)
    for dtype in (torch.uint8, torch.int32, torch.int64):
        assert torch.equal(preprocess_mask(torch.from_numpy(a).to(dtype), (32, 32)), expected)
        assert torch.equal(preprocess_mask(torch.from_numpy(a).to(dtype)[None], (32, 32)), expected)
    assert torch.equal(preprocess_mask(torch.from_numpy(a).bool(), (32, 32)), expected)
    # 0-255 stays as before: a maximum above 1 means > 128 is white (2 and 128 are not)
    b = a * 2
    b[0, 0], b[0, 1] = 128, 200
    want = torch.zeros(1, 32, 32)
    want[0, 0, 1] = 1
    assert torch.equal(preprocess_mask(torch.from_numpy(b), (32, 32)), want)
    # and so is PIL "L" (a numpy 0/1 array saved as PNG); the released rule read it as empty
    assert torch.equal(preprocess_mask(Image.fromarray(a), (32, 32)), expected)
    assert torch.equal(preprocess_mask(Image.fromarray(b), (32, 32)), want)


def test_preprocess_mask_all_zero_or_none_is_all_ones():
    """The released rule; a mask that marks pixels, none above 128 (a red brush stroke is
    76 in grey), is warned about, since the whole image is almost never what was meant."""
    import warnings

    ones = torch.ones(1, 16, 24)
    with pytest.warns(UserWarning, match=r"none above 128 .* the whole image"):
        assert torch.equal(preprocess_mask(Image.new("L", (30, 20), 128), (16, 24)), ones)
    with pytest.warns(UserWarning, match="none above 128"):
        red = Image.new("RGB", (30, 20), (220, 40, 40)).convert("L")
        assert torch.equal(preprocess_mask(red, (16, 24)), ones)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing marked: the released "no mask", silently
        assert torch.equal(preprocess_mask(Image.new("L", (30, 20), 0), (16, 24)), ones)
        assert torch.equal(preprocess_mask(None, (16, 24)), ones)


def test_preprocess_mask_cropped_like_image_and_pil_equals_tensor():
    a = np.zeros((100, 1003), np.uint8)
    a[:, 302:352] = 255  # crop keeps columns 302..701
    m = preprocess_mask(Image.fromarray(a), (96, 400), image_size=(100, 1003))
    expected = torch.zeros(1, 96, 400)
    expected[..., :50] = 1
    assert torch.equal(m, expected)
    r = np.random.default_rng(2).integers(0, 256, (100, 1003), dtype=np.uint8)
    pil = preprocess_mask(Image.fromarray(r), (48, 208))
    assert torch.equal(pil, preprocess_mask(torch.from_numpy(r), (48, 208)))
    # a size where torch's nearest-exact picks other pixels than PIL's nearest (the
    # released resize of its PIL masks): a tensor mask is resized as its file would be
    r = np.random.default_rng(3).integers(0, 256, (768, 1024), dtype=np.uint8)
    pil = preprocess_mask(Image.fromarray(r), (432, 576))
    assert torch.equal(pil, preprocess_mask(torch.from_numpy(r), (432, 576)))
    assert torch.equal(pil, preprocess_mask(torch.from_numpy(r > 128), (432, 576)))


def test_fill_masked_and_downsample_mask():
    img = torch.rand(3, 16, 16) * 2 - 1
    mask = torch.zeros(1, 16, 16)
    mask[:, 4:8, 2:10] = 1
    out = fill_masked(img, mask)
    assert (out[:, 4:8, 2:10] == -1).all()
    keep = mask.expand(3, -1, -1) == 0
    assert torch.equal(out[keep], img[keep])
    m = (torch.rand(1, 32, 48) > 0.5).float()
    assert torch.equal(downsample_mask(m), m[:, 4::8, 4::8])  # centre pixel of each 8 x 8 cell


def test_postprocess_by_hand():
    x = torch.tensor([-1.0, -0.5, 0.1, 0.2, 1.0, 2.0, -3.0]).view(1, 1, 1, 7).expand(1, 3, 1, 7)
    # (x + 1) / 2 * 255 + 0.5 = 0.5, 64.25, 140.75, 153.5, 255.5 -> clamp 255, ..., truncated
    assert np.asarray(postprocess(x)[0])[0, :, 0].tolist() == [0, 64, 140, 153, 255, 255, 0]
    a = to_numpy(x)
    assert a.shape == (1, 1, 7, 3) and a.dtype == np.float32
    np.testing.assert_allclose(a[0, 0, :2, 0], [0.5 / 255, 0.25 + 0.5 / 255], rtol=1e-6)


# ---------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------


def test_encode_images_mode_sample_and_grouping(parts, ct):
    _, _, vae = parts
    sf = vae.config.scaling_factor
    assert sf == 0.18215
    imgs = [
        torch.rand(3, 32, 32) * 2 - 1,
        torch.rand(3, 16, 24) * 2 - 1,
        torch.rand(3, 32, 32) * 2 - 1,
    ]
    z = ct.encode_images(imgs, sample=False)
    assert [tuple(t.shape) for t in z] == [(4, 4, 4), (4, 2, 3), (4, 4, 4)]
    for zi, x in zip(z, imgs):
        with torch.no_grad():
            mode = vae.encode(x[None]).latent_dist.mode()[0]
        torch.testing.assert_close(zi, sf * mode, atol=1e-5, rtol=1e-5)
    # a sample = sf * (mean + std * eps), eps drawn from the generator
    with torch.no_grad():
        dist = vae.encode(imgs[1][None]).latent_dist
    eps = torch.randn(1, 4, 2, 3, generator=torch.Generator().manual_seed(7))
    s = ct.encode_images([imgs[1]], generator=torch.Generator().manual_seed(7))[0]
    torch.testing.assert_close(s, sf * (dist.mean + dist.std * eps)[0], atol=1e-5, rtol=1e-5)
    again = ct.encode_images(imgs, generator=torch.Generator().manual_seed(3))
    assert all(
        torch.equal(a, b)
        for a, b in zip(again, ct.encode_images(imgs, generator=torch.Generator().manual_seed(3)))
    )


def test_encode_posteriors_splits_calls_at_the_pixel_budget(parts, ct, monkeypatch):
    import ace.conditioning

    _, _, vae = parts
    imgs = [torch.rand(3, 32, 32) * 2 - 1 for _ in range(5)] + [torch.rand(3, 16, 24) * 2 - 1]
    whole = ct.encode_posteriors(imgs)
    calls = []
    encode = vae.encode
    monkeypatch.setattr(vae, "encode", lambda x: calls.append(tuple(x.shape)) or encode(x))
    monkeypatch.setattr(ace.conditioning, "VAE_MAX_PIXELS", 2 * 32 * 32)
    split = ct.encode_posteriors(imgs)
    # 2 + 2 + 1 of the 32 x 32 images, and the lone 16 x 24 one (under the budget)
    assert [c[0] for c in calls] == [2, 2, 1, 1]
    monkeypatch.setattr(ace.conditioning, "VAE_MAX_PIXELS", 1)  # still one image per call
    calls.clear()
    ct.encode_posteriors(imgs)
    assert [c[0] for c in calls] == [1] * 6
    for (m0, s0), (m1, s1) in zip(whole, split):
        torch.testing.assert_close(m1, m0, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(s1, s0, atol=1e-6, rtol=1e-5)


def test_decode_inverts_scaling(parts, ct):
    _, _, vae = parts
    z = torch.randn(2, 4, 4, 4)
    with torch.no_grad():
        ref = vae.decode(z / 0.18215).sample
    out = ct.decode(z)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, ref)


def to_ldm(sd: dict, n_blocks: int) -> dict:
    """Inverse of diffusers' LDM VAE conversion, for the test."""
    top = {d: ldm for d, ldm in DIFFUSERS_TO_LDM_MAPPING["vae"].items()}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(
            r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{n_blocks - 1 - int(m[1])}.block.", k
        )
        k = re.sub(
            r"up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"up.{n_blocks - 1 - int(m[1])}.upsample.",
            k,
        )
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        k = k.replace("conv_shortcut", "nin_shortcut")
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.").replace("group_norm", "norm")
            k = (
                k.replace("to_q", "q")
                .replace("to_k", "k")
                .replace("to_v", "v")
                .replace("to_out.0", "proj_out")
            )
            v = v[:, :, None, None] if v.ndim == 2 else v  # LDM attention: 1x1 convs
        out[k] = v
    return out


def test_convert_ldm_vae_round_trip(parts):
    _, _, vae = parts
    ldm = to_ldm(vae.state_dict(), 4)
    assert (
        "encoder.down.2.block.0.nin_shortcut.weight" in ldm
        and ldm["encoder.mid.attn_1.q.weight"].ndim == 4
    )
    wrapped = {
        "state_dict": {
            **{f"first_stage_model.{k}": v for k, v in ldm.items()},
            "loss.logvar": torch.zeros(()),
        }
    }
    for sd in (ldm, wrapped):
        fresh = AutoencoderKL(**TINY_VAE)
        fresh.load_state_dict(convert_ldm_vae(sd, TINY_VAE), strict=True)
        z = torch.randn(1, 4, 4, 4)
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval().decode(z).sample, vae.decode(z).sample)


def test_sd_vae_config_builds_the_sd_vae():
    with torch.device("meta"):
        vae = AutoencoderKL(**sd_vae_config())
    assert vae.config.latent_channels == 4 and vae.config.scaling_factor == 0.18215
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # the SD 1.x VAE


# ---------------------------------------------------------------------------
# User mistakes
# ---------------------------------------------------------------------------


def test_value_errors(ct):
    with pytest.raises(ValueError, match="non-empty list"):
        ct.encode_text([])
    with pytest.raises(ValueError, match="expected a str"):
        ct.encode_text(["ok", 3])
    with pytest.raises(ValueError, match="RGB PIL image"):
        preprocess_image(Image.new("L", (32, 32)), 1024)
    with pytest.raises(ValueError, match="RGB PIL image"):
        preprocess_image(torch.rand(4, 32, 32), 1024)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess_image(torch.rand(3, 32, 32) * 255, 1024)
    with pytest.raises(ValueError, match="too small"):
        preprocess_image(Image.new("RGB", (8, 8)), 1024)
    with pytest.raises(ValueError, match="positive int"):
        target_size(64, 64, 0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess_mask(torch.full((8, 8), 255.0), (8, 8))
    with pytest.raises(ValueError, match="differs"):
        preprocess_mask(Image.new("L", (32, 32)), (32, 32), image_size=(32, 48))
    with pytest.raises(ValueError, match='mode "L"'):
        preprocess_mask(Image.new("RGB", (32, 32)), (32, 32))
    with pytest.raises(ValueError, match="size"):
        fill_masked(torch.zeros(3, 16, 16), torch.zeros(1, 16, 8))
    with pytest.raises(ValueError, match="divisible"):
        downsample_mask(torch.zeros(1, 12, 16))
    with pytest.raises(ValueError, match="channels"):
        ct.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="divisible"):
        ct.encode_images([torch.zeros(3, 30, 32)])
    with pytest.raises(ValueError, match=r"images\[1\]"):
        ct.encode_images([torch.zeros(3, 32, 32), torch.zeros(32, 32)])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        postprocess(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="missing"):
        convert_ldm_vae({"foo": torch.zeros(1)}, TINY_VAE)


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"shift_factor": 0.1159}, "shift_factor"),
        ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean, latents_std"),
    ],
)
def test_a_vae_with_a_latent_shift_is_refused(ct, config, named):
    """ACE's latents are scaling_factor * z: a VAE whose config shifts or standardises its
    latents (Flux's, SD3's) would be read wrongly, so it is refused, naming the setting."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(ct.vae.config, **config)
    with pytest.raises(ValueError, match=rf"the VAE's config sets {named}: ACE's latents are"):
        ConditionTokenizer(ct.tokenizer, ct.text_encoder, vae)
    unshifted = AutoencoderKL.from_config(ct.vae.config, shift_factor=0.0)
    ConditionTokenizer(ct.tokenizer, ct.text_encoder, unshifted)  # 0: no shift


def test_valid_rows_of_prefix_and_scattered_masks():
    """encode_text keeps the rows where the attention mask is 1, as h[mask.bool()] would."""
    from ace.conditioning import _valid_rows

    states = torch.randn(6, 3)
    for mask in ([1, 1, 1, 0, 0, 0], [1] * 6, [0, 0, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1]):
        mask = torch.tensor(mask)
        assert torch.equal(_valid_rows(states, mask), states[mask.bool()])


def released_process_edit_image(image, mask, task, max_seq_len=1024):
    """The released ``process_edit_image`` written out step by step (ACE_REFERENCE section
    2): centre crop to aspect 4 (Python rounding of the offsets), resize to the budget in
    16 px squares (bicubic image, nearest mask), binarise > 128 (empty: all ones), scale
    to [-1, 1], and -1 under the mask for an inpainting task."""
    import math

    mask = Image.new("L", image.size, 0) if mask is None else mask
    w, h = image.size
    crop_h, crop_w = (int(4 * w), w) if h / w > 4 else (h, int(4 * h)) if w / h > 4 else (h, w)
    if (crop_h, crop_w) != (h, w):
        top, left = round((h - crop_h) / 2.0), round((w - crop_w) / 2.0)  # half to even
        box = (left, top, left + crop_w, top + crop_h)
        image, mask = image.crop(box), mask.crop(box)
    h, w = image.height, image.width
    scale = min(1.0, math.sqrt(max_seq_len / ((h / 16) * (w / 16))))
    size = (int(w * scale) // 16 * 16, int(h * scale) // 16 * 16)
    if size != (w, h):
        image = image.resize(size, Image.BICUBIC)
        mask = mask.resize(size, Image.NEAREST)
    m = np.asarray(mask) > 128
    m = torch.from_numpy(m if m.any() else np.ones_like(m)).float()[None]  # (1, H, W)
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    x = (x - 0.5) / 0.5
    if task in ("inpainting", "Try On", "Inpainting"):
        x[m.repeat(3, 1, 1) == 1] = -1.0
    return x, m


@pytest.mark.parametrize("seed", range(8))
def test_prepare_lcu_equals_the_released_preprocessing(seed):
    """Random sizes (some past 4:1), random 0-255 masks, an inpainting request: bit for bit."""
    from ace.lcu import LCU, ConditionUnit
    from ace.request import prepare_lcu

    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(20, 700, 2))
    if seed % 3 == 0:
        w = 5 * h + int(rng.integers(0, 7))
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    for task in ("inpainting", ""):
        x, m = released_process_edit_image(image, mask, task)
        prepared = prepare_lcu(LCU(ConditionUnit("{image}", [image], [mask]), task=task), 1024)
        assert torch.equal(prepared.images[0], x) and torch.equal(prepared.masks[0], m)
