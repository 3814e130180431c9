"""The training batch against a hand-built one: ``encode_batch`` (preprocess, T5, VAE, pack)
and the packed model call are checked by the released model run one sample and one frame at
a time (``ReferenceDiT``), on latents, masks and texts assembled here by hand."""

import numpy as np
import pytest
import torch
from PIL import Image

from ace.conditioning import ConditionTokenizer
from ace.convert import official_dit_to_ace
from ace.lcu import LCU, ConditionUnit
from ace.models import ACETransformer
from ace.reference import ReferenceDiT
from ace.testing import TEXT_DIM, tiny_text_encoder, tiny_vae
from ace.train.batch import encode_batch, noisy_tokens

CFG = dict(
    in_channels=4, patch_size=2, hidden_size=32, depth=2, num_heads=2, mlp_ratio=2.0,
    text_dim=TEXT_DIM, rope_max_len=64, qk_norm=True, pred_sigma=True, num_indicators=10,
)  # fmt: skip
SIZE, F, P = 64, 8, 2  # image side, VAE factor, patch size


def image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def mask(top: int, left: int, bottom: int, right: int) -> Image.Image:
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[top:bottom, left:right] = 255
    return Image.fromarray(m)


def latent_mask(m: Image.Image | None) -> torch.Tensor:
    """By hand: a 0/255 mask's pixel (8i + 4, 8j + 4) for latent (i, j); none -> ones."""
    if m is None:
        return torch.ones(1, SIZE // F, SIZE // F)
    a = np.asarray(m)[F // 2 :: F, F // 2 :: F] > 128
    return torch.from_numpy(a.astype(np.float32))[None]


def patchify(x: torch.Tensor) -> torch.Tensor:
    """(C, h, w) -> (h/p * w/p, p*p*C), tokens row-major, values (row in patch, column, channel)."""
    c, h, w = x.shape
    return x.reshape(c, h // P, P, w // P, P).permute(1, 3, 2, 4, 0).reshape(-1, P * P * c)


def unpatchify(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    c = tokens.shape[1] // (P * P)
    return tokens.reshape(h // P, w // P, P, P, c).permute(4, 0, 2, 1, 3).reshape(c, h, w)


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tokenizer, text_encoder = tiny_text_encoder()
    conditioner = ConditionTokenizer(tokenizer, text_encoder, tiny_vae())
    ref = ReferenceDiT(**CFG).eval()
    with torch.no_grad():  # weights 5x the reference's 0.02: another frame's text then moves
        for name, param in ref.named_parameters():  # the target's output by ~4%, not ~1e-5
            if ".norm_" not in name:
                param.mul_(5)
    model = ACETransformer(**CFG).eval()
    model.load_state_dict(official_dit_to_ace(ref.state_dict()), strict=True)
    return conditioner, ref, model


def test_training_batch_equals_the_released_model_on_hand_built_inputs(parts):
    conditioner, ref, model = parts
    masks = [mask(8, 16, 40, 60), mask(0, 0, 20, 33), mask(30, 5, 64, 50)]
    lcus = [
        LCU(  # a history turn, then two current images (the second without a mask)
            ConditionUnit("put {image1} into {image}", [image(2), image(3)], [masks[1], None]),
            history=[ConditionUnit("draw a cat on {image}", [image(1)], [masks[0]])],
            target=image(0),
            target_mask=masks[2],
        ),
        LCU(ConditionUnit("a red square on blue"), target=image(4)),  # text-to-image
    ]
    seed = 7
    batch = encode_batch(
        lcus, conditioner, model, 1024, 0.0, torch.Generator().manual_seed(seed), "cpu", torch.float32
    )  # fmt: skip

    # by hand: pixels in [-1, 1]; one dropout draw per LCU, then posterior noise frame by frame
    g = torch.Generator().manual_seed(seed)
    for _ in lcus:
        torch.rand((), generator=g)
    vae, scale = conditioner.vae, conditioner.vae.config.scaling_factor
    frames, texts, lmasks = [], [], []
    for lcu in lcus:
        lat = []
        for im in [lcu.target, *lcu.images]:
            x = torch.from_numpy(np.asarray(im, np.float32) / 127.5 - 1).permute(2, 0, 1)
            with torch.no_grad():
                dist = vae.encode(x[None]).latent_dist
            noise = torch.randn(dist.mean.shape[1:], generator=g)
            lat.append((dist.mean[0] + dist.std[0] * noise) * scale)  # (C, 8, 8)
        frames.append(lat)
        texts.append([conditioner.encode_text([t])[0] for t in lcu.frame_texts()])
        lmasks.append([latent_mask(m) for m in [lcu.target_mask, *lcu.masks]])
    assert batch.num_samples == 2 and batch.num_tokens == 5 * (SIZE // F // P) ** 2
    torch.testing.assert_close(
        batch.x0, torch.cat([patchify(lat[0]) for lat in frames]), rtol=1e-5, atol=1e-6
    )
    assert torch.equal(batch.target_mask[:16], patchify(lmasks[0][0]))  # (T0, p*p): C = 1

    # the packed model on noisy targets, against the released model sample by sample
    x_t = torch.randn(batch.x0.shape, generator=g)  # (T0, D)
    t = torch.tensor([250.0, 900.0])
    table = conditioner.indicator_table()  # (10, E)
    with torch.no_grad():
        out = model(noisy_tokens(batch, x_t, P), batch.text, t, batch.packed, table)
        h = SIZE // F
        noisy = [unpatchify(x, h, h) for x in x_t.split(h * h // (P * P))]
        expected = ref(
            [[n, *lat[1:]] for n, lat in zip(noisy, frames)], lmasks, texts, t, table
        )  # fmt: skip
    torch.testing.assert_close(
        out[:, : P * P * 4], torch.cat([patchify(e) for e in expected]), rtol=1e-4, atol=1e-5
    )
