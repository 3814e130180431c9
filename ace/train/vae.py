"""Train a small ``AutoencoderKL`` on toy images: the latent space of the CPU demo.

A random VAE cannot reconstruct anything, so the demo first fits one on the images of
toy LCUs (inputs and targets). It downsamples by 4 into 8 channels (64 px -> 16 x 16
latents, see ``toy_vae_config`` for why); the DiT's ``toy`` preset reads it with
``in_channels=8, patch_size=2``.

    from ace.train.vae import reconstruction_psnr, toy_images, train_vae
    vae = train_vae(toy_images(4096, seed=0), steps=1500)
    reconstruction_psnr(vae, toy_images(256, seed=0, split="eval"))  # dB

``train_toy_vae(path, steps)`` does all of it and saves the result where a training
config's ``model.vae`` points (``model.vae_toy_steps``). It trains on toy images, and can
mix in ``swatches`` (flat rectangles of the toy world's colours), which fix the colours it
decodes but not, so far, the demo DiT trained on it (``TOY_VAE_SWATCHES``).

The loop is plain and seeded: AdamW, a linear warmup then a cosine decay to zero, and
the loss ``l1_weight * |x - y| + mse_weight * (x - y)^2`` (means over pixels) plus
``kl_weight`` times the KL of the posterior summed over its elements and divided by the
number of pixel values, which is the LDM normalisation (their f8 VAEs use 1e-6). No GAN,
no perceptual loss. At the end ``scaling_factor`` is set to 1 / std of posterior samples
of training images, so the DiT sees unit-variance latents (SD's 0.18215 does the same).

Shapes: B batch, H x W pixels, C latent channels, h x w = H / f x W / f (f the factor).
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL
from PIL import Image
from tqdm.auto import tqdm

from ace.atomic import fsync_dir, fsync_tree
from ace.device import fused_adamw

ImageSource = torch.Tensor | str | Path | Iterable[Any]
"""What ``train_vae`` and ``reconstruction_psnr`` read: a tensor (N, 3, H, W) (uint8, or
float in [0, 1]), an LCU manifest (its directory or file), or an iterable of RGB PIL
images, float tensors (3, H, W) in [0, 1], LCUs or toy samples (their input images and
target)."""

Callback = Callable[[int, AutoencoderKL, dict[str, float]], None]
"""``callback(step, vae, logs)`` after each optimizer step (1-based); ``logs`` holds
``loss``, ``l1``, ``mse``, ``kl`` and ``lr``. The model is in train mode; a callback that
evaluates it must put it back. On a CPU its convolution weights are NHWC
(``torch.channels_last``) until training ends: ``save_vae`` saves them as they are, a raw
``safetensors`` ``save_file`` would refuse them."""


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------


def toy_vae_config(latent_channels: int = 8, size: int = 64) -> dict[str, Any]:
    """``AutoencoderKL`` config of the demo VAE: 3 levels (factor 4), for ``size`` px images
    (``sample_size``; the VAE is convolutional and takes any multiple of 8).

    The factor is chosen for the DiT, not for reconstruction. A factor-2 VAE with 8
    channels reconstructs toy scenes better (about 25 dB against about 19.5 dB after 1000
    steps), but then a 64-token frame needs 4 x 4 latent patches, so each token carries
    128 latent values into the toy DiT's 192 dimensions. The DiT trained on it did not
    learn, in the demo's budget, to copy the input image through attention (the thing
    every edit needs); with this VAE and 2 x 2 patches a token carries 32 values, and
    the same budget does learn it (``BENCHMARKS.md``). The released geometry has 16
    values per token in 1152 dimensions. On a 2-core CPU the cost of a VAE step is the
    64 px level, whatever the depth below it. No mid-block attention: the toy world
    needs none, and without it the VAE is convolutional.
    """
    if isinstance(latent_channels, bool) or not isinstance(latent_channels, int):
        raise ValueError(f"latent_channels must be an int, got {latent_channels!r}")
    if latent_channels < 1:
        raise ValueError(f"latent_channels must be >= 1, got {latent_channels}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 8 or size % 8:
        raise ValueError(f"size must be a multiple of 8, at least 8, got {size!r}")
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=8,
        mid_block_add_attention=False,
        sample_size=size,
        scaling_factor=1.0,  # set from the latents' std after training
    )


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


def _image_uint8(x: Any, where: str) -> torch.Tensor:
    """One image -> uint8 (3, H, W)."""
    if isinstance(x, Image.Image):
        if x.mode != "RGB":
            raise ValueError(f"{where}: expected an RGB PIL image, got mode {x.mode!r}")
        return torch.from_numpy(np.asarray(x, dtype=np.uint8).copy()).permute(2, 0, 1)
    if isinstance(x, torch.Tensor) and x.ndim == 3 and x.shape[0] == 3:
        if x.dtype == torch.uint8:
            return x.cpu()
        if x.is_floating_point():
            x = x.detach().float().cpu()
            lo, hi = (x.min().item(), x.max().item()) if x.numel() else (0.0, 1.0)
            if not (lo >= 0 and hi <= 1):  # [-1, 1] (the DiT's range) or 0-255 would clamp
                raise ValueError(
                    f"{where}: a float image must lie in [0, 1], got values in [{lo:.3g}, {hi:.3g}]"
                )
            return (x * 255).round().to(torch.uint8)
    got = f"a tensor {tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x)
    raise ValueError(
        f"{where}: expected an RGB PIL image or a tensor (3, H, W) (uint8, or float in [0, 1]), "
        f"got {got}"
    )


def _expand(item: Any) -> list[Any]:
    """An LCU or toy sample -> its input images and target; anything else -> itself."""
    lcu = getattr(item, "lcu", item)  # ToySample -> LCU
    if hasattr(lcu, "images") and hasattr(lcu, "target") and not isinstance(lcu, torch.Tensor):
        return [*lcu.images, *([] if lcu.target is None else [lcu.target])]
    return [item]


def load_images(source: ImageSource, limit: int | None = None) -> torch.Tensor:
    """Every image of ``source`` (at most ``limit``) as one uint8 tensor (N, 3, H, W).

    All images must share one size, a multiple of 8 (ValueError otherwise, as for an
    empty source or an item that is not an image).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if isinstance(source, torch.Tensor):
        if source.ndim != 4 or source.shape[1] != 3:
            raise ValueError(f"an image tensor must be (N, 3, H, W), got {tuple(source.shape)}")
        images = [_image_uint8(x, f"images[{i}]") for i, x in enumerate(source[:limit])]
    else:
        if isinstance(source, (str, Path)):
            from ace.data.manifest import LCUManifest

            source = LCUManifest(source)  # FileNotFoundError / ValueError name the problem
        images = []
        for i, item in enumerate(source):
            for x in _expand(item):
                images.append(_image_uint8(x, f"item {i}"))
                if limit is not None and len(images) >= limit:
                    break
            if limit is not None and len(images) >= limit:
                break
    if not images:
        raise ValueError("no images to train on: the source is empty")
    sizes = sorted({tuple(x.shape[1:]) for x in images})
    if len(sizes) > 1:
        raise ValueError(f"all images must share one size, got sizes (H, W) {sizes[:5]}")
    h, w = sizes[0]
    if h % 8 or w % 8:
        raise ValueError(f"image size {h} x {w} is not a multiple of 8 (the VAE's factor)")
    return torch.stack(images)  # (N, 3, H, W) uint8


TOY_VAE_WEIGHTS: dict[str, float] = {
    "edge_map": 4.0,
    "edge_to_image": 3.0,
    "segmentation_map": 2.0,
    "grayscale": 2.0,
}
"""Task weights of the demo VAE's training images (the rest: ``toy.DEFAULT_WEIGHTS``).

Edge maps are one-pixel lines, the hardest images for a factor-4 VAE, and in the DiT's
mix they are about 5% of the images. Trained on that mix, the demo VAE reconstructed
held-out toy images at 19.4 dB and edge maps at 12.4 dB; with these weights (same steps
and seed) 21.6 dB and 17.2 dB, and the ceiling (``evaluate``'s ``vae_change``) of every
other task family rose or held (``BENCHMARKS.md``)."""


def toy_images(
    n: int,
    seed: int = 0,
    split: str = "train",
    size: int = 64,
    weights: dict[str, float] | None = None,
) -> torch.Tensor:
    """The first ``n`` images (inputs, then target, LCU after LCU) of the toy stream with
    task ``weights`` (``sample_stream``'s), uint8 (n, 3, size, size)."""
    from ace.data.toy import sample_stream

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    # An LCU holds at least one image (its target), so n LCUs give at least n images.
    stream = sample_stream(n, seed, split=split, size=size, weights=weights)
    return load_images(stream, limit=n)


TOY_VAE_SWATCHES = 0.0
"""The fraction of the demo VAE's training images that are ``swatches`` of the toy palette
(``train_toy_vae``'s default; ``scripts/train_vae.py --swatches``): none.

Saturated colours cover a few per cent of toy pixels, on small objects, and a VAE fitted
to toy images alone learns them last: it first decodes them as a few clusters (green as
violet, yellow as orange: ``palette_error`` 0.27 on objects after 1000 steps at 64 px,
0.42 at 32 px, where every object came out dark red) while its PSNR looks fine. With
half its images swatches, 1000 steps at 64 px reached 0.10, yet the DiT of the 500-step
demo of the time won fewer task families on it (session 11). What the demo uses instead
is more steps: at 32 px, 4000 steps on toy images alone reach 0.08-0.12 on objects
(``configs/toy.yaml``'s ``model.vae_toy_steps``; ``BENCHMARKS.md``, session 17)."""


def palette() -> np.ndarray:
    """The toy world's flat colours, uint8 (K, 3): object colours, background colours and
    their pattern marks, segmentation colours, black and white."""
    from ace.data.toy import BACKGROUND_COLORS, COLORS, PATTERN_DARKEN, SEG_COLORS

    backgrounds = np.array(list(BACKGROUND_COLORS.values()), np.int32)  # (6, 3)
    colors = [
        np.array(list(COLORS.values()), np.int32),
        backgrounds,
        np.maximum(backgrounds - PATTERN_DARKEN, 0),  # pattern marks, as _background draws them
        np.array(list(SEG_COLORS.values()), np.int32),
        np.array([[0, 0, 0], [255, 255, 255]], np.int32),
    ]
    return np.unique(np.concatenate(colors), axis=0).astype(np.uint8)  # (K, 3)


def swatches(n: int, seed: int = 0, size: int = 64) -> torch.Tensor:
    """``n`` images of flat ``palette`` colours, uint8 (n, 3, size, size): each a grid of
    2-4 rows by 2-4 columns (fewer below 32 px) cut on the 8 px grid, every rectangle one
    colour drawn uniformly. Deterministic in ``seed``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 16 or size % 8:
        raise ValueError(f"size must be a multiple of 8, at least 16, got {size!r}")
    colors = palette()  # (K, 3)
    rng = np.random.default_rng([seed, 0x5A7C])
    cuts = np.arange(8, size, 8)  # where a rectangle may end
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        most = min(3, len(cuts))  # 16 and 24 px have fewer places to cut
        rows = [0, *np.sort(rng.choice(cuts, rng.integers(1, most + 1), replace=False)), size]
        cols = [0, *np.sort(rng.choice(cuts, rng.integers(1, most + 1), replace=False)), size]
        for top, bottom in itertools.pairwise(rows):
            for left, right in itertools.pairwise(cols):
                out[i, top:bottom, left:right] = colors[rng.integers(len(colors))]
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()  # (n, 3, size, size)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.float().div(127.5).sub(1.0)  # uint8 [0, 255] -> float [-1, 1]


# ---------------------------------------------------------------------------
# Loss and training
# ---------------------------------------------------------------------------


@torch.no_grad()
def init_posterior_(vae: AutoencoderKL, logvar: float = -10.0) -> AutoencoderKL:
    """Start the posterior nearly deterministic: log-variance ``logvar`` everywhere.

    A fresh ``AutoencoderKL`` starts with log-variances near 0, so its posterior samples
    are unit noise over latent means of about 0.1, and the decoder learns from noise
    until the encoder has pushed them down. Zeroing the log-variance rows of
    ``quant_conv`` (the 1x1 conv that emits mean and log-variance) and setting their
    bias removes that phase; they stay trainable.
    """
    if vae.quant_conv is None:
        raise ValueError("init_posterior_ needs an AutoencoderKL with use_quant_conv=True")
    c = vae.config.latent_channels
    vae.quant_conv.weight[c:].zero_()  # (2C, 2C, 1, 1): rows C.. are the log-variances
    vae.quant_conv.bias[c:].fill_(logvar)
    return vae


def vae_loss(
    vae: AutoencoderKL,
    x: torch.Tensor,
    generator: torch.Generator | None = None,
    l1_weight: float = 1.0,
    mse_weight: float = 1.0,
    kl_weight: float = 1e-6,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Reconstruction + KL loss of a batch ``x`` (B, 3, H, W) in [-1, 1]; (loss, logs)."""
    posterior = vae.encode(x).latent_dist  # mean, std: (B, C, h, w)
    z = posterior.sample(generator=generator)  # (B, C, h, w)
    y = vae.decode(z).sample  # (B, 3, H, W)
    err = y.float() - x.float()
    l1, mse = err.abs().mean(), err.square().mean()
    kl = posterior.kl().sum() / x.numel()  # summed over latent values, per pixel value (LDM)
    loss = l1_weight * l1 + mse_weight * mse + kl_weight * kl
    return loss, {"loss": loss.item(), "l1": l1.item(), "mse": mse.item(), "kl": kl.item()}


def _check_positive(value: Any, name: str, kind: type = int) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def _check_weight(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to 0 at ``steps`` (0-based)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1.0 + math.cos(math.pi * t))


def train_vae(
    images: ImageSource,
    steps: int = 1500,
    batch_size: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    kl_weight: float = 1e-6,
    l1_weight: float = 1.0,
    mse_weight: float = 1.0,
    weight_decay: float = 0.0,
    warmup: int = 50,
    grad_clip: float = 1.0,
    config: dict[str, Any] | None = None,
    vae: AutoencoderKL | None = None,
    init_logvar: float | None = -10.0,
    scale_images: int = 256,
    callback: Callback | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> AutoencoderKL:
    """Fit an ``AutoencoderKL`` to ``images`` (see ``ImageSource``) and return it in eval mode.

    The model is ``AutoencoderKL(**config)`` (default ``toy_vae_config()``), built under
    ``seed``, or ``vae`` itself when given (trained in place; not both). Batches are
    drawn without replacement, epoch after epoch, in an order fixed by ``seed``, as are
    the posterior samples: the same arguments give the same weights. A fresh model
    starts from ``init_posterior_(vae, init_logvar)`` unless ``init_logvar`` is None. Steps whose loss is
    not finite raise ValueError. At the end ``scaling_factor`` is set to 1 / std of the
    posterior samples of the first ``scale_images`` training images. ``device``: where to
    train (the model is moved there and returned there); None trains where the model is,
    the CPU for a fresh one. The seeded draws (order, posterior samples) come from a
    CPU generator on every device.
    """
    _check_positive(steps, "steps")
    _check_positive(batch_size, "batch_size")
    _check_positive(lr, "lr", float)
    _check_positive(scale_images, "scale_images")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    for name, value in [
        ("kl_weight", kl_weight),
        ("l1_weight", l1_weight),
        ("mse_weight", mse_weight),
        ("weight_decay", weight_decay),
        ("grad_clip", grad_clip),
    ]:
        _check_weight(value, name)
    if l1_weight == 0 and mse_weight == 0:
        raise ValueError("l1_weight and mse_weight are both 0: nothing to reconstruct")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative int, got {warmup!r}")
    if config is not None and vae is not None:
        raise ValueError("give config or vae, not both")
    data = load_images(images)  # (N, 3, H, W) uint8

    if vae is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vae = AutoencoderKL(**(config if config is not None else toy_vae_config()))
        if init_logvar is not None:
            init_posterior_(vae, init_logvar)
    if device is not None:
        vae.to(device)
    vae.train().requires_grad_(True)
    device = vae.device
    # on a CPU, NHWC convolutions (the weights go back to the usual layout at the end) and
    # one fused AdamW kernel for every parameter instead of a loop over them: together a
    # step of the demo's VAE took 12% less on 2 cores (BENCHMARKS.md, session 18)
    cpu = device.type == "cpu"
    layout = torch.channels_last if cpu else torch.preserve_format
    params = [p for p in vae.parameters() if p.requires_grad]
    fused = fused_adamw(device) or None  # None: torch's default
    opt = torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99), fused=fused
    )
    gen = torch.Generator().manual_seed(seed)  # batch order and posterior samples

    order, pos = torch.randperm(len(data), generator=gen), 0
    bar = tqdm(range(steps), disable=not progress, desc="vae", unit="step")
    try:
        vae.to(memory_format=layout)
        for step in bar:
            idx = []
            while len(idx) < batch_size:  # without replacement, then a fresh epoch
                if pos == len(order):
                    order, pos = torch.randperm(len(data), generator=gen), 0
                take = order[pos : pos + batch_size - len(idx)]
                idx.extend(take.tolist())
                pos += len(take)
            batch = data[idx]  # (B, 3, H, W) uint8
            x = _as_float(batch).to(device, vae.dtype, memory_format=layout)  # (B, 3, H, W)
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, lr, min(warmup, steps))
            loss, logs = vae_loss(vae, x, gen, l1_weight, mse_weight, kl_weight)
            if not torch.isfinite(loss):
                raise ValueError(f"non-finite VAE loss {loss.item()} at step {step + 1}; lower lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            logs["lr"] = opt.param_groups[0]["lr"]
            if progress:
                bar.set_postfix(loss=f"{logs['loss']:.4f}", refresh=False)
            if callback is not None:
                callback(step + 1, vae, logs)
    finally:
        bar.close()
        if cpu:
            vae.to(memory_format=torch.contiguous_format)

    vae.eval().requires_grad_(False)
    set_scaling_factor(vae, data[:scale_images], generator=gen)
    return vae


# ---------------------------------------------------------------------------
# Scaling and measuring
# ---------------------------------------------------------------------------


@torch.no_grad()
def latent_std(
    vae: AutoencoderKL,
    images: ImageSource,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> float:
    """The std over all values of the posterior samples of ``images`` (unscaled latents)."""
    data = load_images(images)
    zs = []
    for i in range(0, len(data), batch_size):
        x = _as_float(data[i : i + batch_size]).to(vae.device, vae.dtype)  # (B, 3, H, W)
        zs.append(vae.encode(x).latent_dist.sample(generator=generator).float().flatten())
    return torch.cat(zs).std().item()


def set_scaling_factor(
    vae: AutoencoderKL, images: ImageSource, generator: torch.Generator | None = None
) -> float:
    """Set ``vae.config.scaling_factor`` to 1 / ``latent_std`` of ``images``; return it."""
    std = latent_std(vae, images, generator=generator)
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"the latents' std is {std}: the VAE cannot be scaled")
    vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std


@torch.no_grad()
def reconstructions(
    vae: AutoencoderKL, images: ImageSource, batch_size: int = 64, sample: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(originals, reconstructions), float (N, 3, H, W) in [0, 1], through the posterior
    mean (``sample=False``) or a posterior sample drawn from a generator seeded with 0."""
    data = load_images(images)
    gen = torch.Generator(vae.device).manual_seed(0)
    training = vae.training
    vae.eval()
    out = []
    for i in range(0, len(data), batch_size):
        x = _as_float(data[i : i + batch_size]).to(vae.device, vae.dtype)  # (B, 3, H, W)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=gen) if sample else posterior.mode()  # (B, C, h, w)
        out.append(vae.decode(z).sample.float().cpu())  # (B, 3, H, W)
    vae.train(training)
    recon = torch.cat(out).add(1).div(2).clamp(0, 1)
    return data.float() / 255, recon


def reconstruction_psnr(
    vae: AutoencoderKL, images: ImageSource, batch_size: int = 64, sample: bool = False
) -> float:
    """PSNR in dB of the reconstructions of ``images`` (values in [0, 1], peak 1), from
    the mean squared error over the whole set (so one perfect image cannot make it inf)."""
    x, y = reconstructions(vae, images, batch_size, sample)
    mse = (x - y).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def palette_error(vae: AutoencoderKL, size: int = 64) -> dict[str, float]:
    """How far the VAE moves the toy world's colours, in [0, 1] units per channel.

    PSNR hides it: a VAE at 21.6 dB turned white, cream and pink backgrounds into one
    peach, and the DiT can draw no colour its VAE cannot decode (``BENCHMARKS.md``). For
    each plain background colour (the whole image) and each object colour (a large
    square in the centre of a plain white background, on its pixels), the mean colour
    of the reconstruction (posterior mean) is compared with the original's; an entry's
    error is its largest channel difference. Returns ``{"background": mean over the
    background colours, "object": mean over the object colours, "worst": the largest}``.
    """
    from ace.data.toy import (
        BACKGROUND_COLORS,
        COLORS,
        Background,
        Obj,
        Scene,
        check_size,
        object_mask,
        render,
    )

    check_size(size)  # ValueError: a multiple of 16, at least 32
    white = Background("white", "plain")
    squares = [Obj("square", color, "large", "center") for color in COLORS]
    scenes = [Scene(Background(c, "plain")) for c in BACKGROUND_COLORS]
    scenes += [Scene(white, [o]) for o in squares]
    x, y = reconstructions(vae, [render(scene, size) for scene in scenes])  # (N, 3, H, W)
    regions = [torch.ones(size, size, dtype=torch.bool)] * len(BACKGROUND_COLORS)
    regions += [torch.from_numpy(object_mask(o, size)) for o in squares]
    errors = [
        (a[:, m].mean(dim=1) - b[:, m].mean(dim=1)).abs().max().item()  # (3,) -> worst channel
        for a, b, m in zip(x, y, regions)
    ]
    n = len(BACKGROUND_COLORS)
    return {
        "background": float(np.mean(errors[:n])),
        "object": float(np.mean(errors[n:])),
        "worst": float(max(errors)),
    }


def measurements(vae: AutoencoderKL, held_out: torch.Tensor) -> dict[str, Any]:
    """What ``training.json`` records of a trained VAE: the held-out count, reconstruction
    PSNR (posterior mean and sample), ``palette_error`` (at the held-out images' size),
    ``scaling_factor`` and device."""
    return {
        "eval_images": len(held_out),
        "psnr_db": round(reconstruction_psnr(vae, held_out), 3),
        "psnr_sampled_db": round(reconstruction_psnr(vae, held_out, sample=True), 3),
        "palette_error": {
            k: round(v, 4) for k, v in palette_error(vae, held_out.shape[-1]).items()
        },
        "scaling_factor": vae.config.scaling_factor,
        "device": str(vae.device),
    }


# ---------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------


def save_vae(vae: AutoencoderKL, out: str | Path, info: dict | None = None) -> Path:
    """``vae.save_pretrained`` (+ ``training.json`` from ``info``) into a temporary sibling
    of ``out``, then renamed into place: ``out`` is complete or absent, never half-written.
    An existing ``out`` is moved aside first and removed last."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp, old = out.with_name(f".{out.name}.tmp-{tag}"), out.with_name(f".{out.name}.old-{tag}")
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        if info is not None:
            (tmp / "training.json").write_text(json.dumps(info, indent=2) + "\n")
        fsync_tree(tmp)  # on disk before its name says it is complete (a run reuses it)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def toy_vae_mismatch(path: str | Path, steps: int, size: int, seed: int = 0) -> str | None:
    """How the toy VAE saved at ``path`` differs from the one ``train_toy_vae(steps=steps,
    size=size, seed=seed)`` would train with its other defaults (what a training run asks
    for), as its ``training.json`` records them ("1000 steps, not 4000 steps"; a VAE trained
    on a ``--data`` manifest differs too), or None when it matches or records none of them
    (a VAE from elsewhere, or an unreadable file)."""
    try:
        info = json.loads((Path(path) / "training.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict):
        return None
    default = {k: v.default for k, v in inspect.signature(train_toy_vae).parameters.items()}
    want = {
        "steps": (steps, " steps"), "size": (size, " px"), "seed": (seed, ""),
        "batch_size": (default["batch_size"], ""), "lr": (default["lr"], ""),
        "weights": (dict(default["weights"] or {}), ""),
        "swatch_fraction": (default["swatch_fraction"], ""),
    }  # fmt: skip
    differ = [
        f"{info[key]}{unit}, not {value}{unit}" if unit else f"{key} {info[key]}, not {value}"
        for key, (value, unit) in want.items()
        if key in info and info[key] != value
    ]
    if info.get("data"):
        differ.append(f"trained on {info['data']}, not the toy world")
    return "; ".join(differ) or None


def train_toy_vae(
    out: str | Path,
    steps: int = 1000,
    n_images: int = 4096,
    eval_images: int = 256,
    seed: int = 0,
    batch_size: int = 8,
    lr: float = 2e-3,
    latent_channels: int = 8,
    weights: dict[str, float] | None = TOY_VAE_WEIGHTS,
    swatch_fraction: float = TOY_VAE_SWATCHES,
    progress: bool = True,
    device: torch.device | str | None = None,
    size: int = 64,
) -> dict[str, Any]:
    """Train the demo VAE on ``n_images`` images of ``size`` px (at most ``steps *
    batch_size``: what the run can see): ``swatch_fraction`` of them ``swatches`` of the
    toy palette, the rest the first toy images of the task mix ``weights``. Trains on
    ``device`` (default the CPU), scores the VAE on ``eval_images`` held-out toy images
    (the default mix, same size) and saves it to ``out`` (``save_vae``); returns what
    ``training.json`` holds."""
    if isinstance(swatch_fraction, bool) or not isinstance(swatch_fraction, (int, float)):
        raise ValueError(f"swatch_fraction must be a number in [0, 1), got {swatch_fraction!r}")
    if not 0 <= swatch_fraction < 1:
        raise ValueError(f"swatch_fraction must be in [0, 1), got {swatch_fraction!r}")
    # no more images than the run will see (a short run need not render thousands)
    n = min(n_images, steps * batch_size)
    n_swatches = min(n - 1, round(n * swatch_fraction))
    config = toy_vae_config(latent_channels, size)  # ValueError before any rendering
    images = toy_images(n - n_swatches, seed=seed, split="train", size=size, weights=weights)
    if n_swatches:  # after the toy images: the scaling factor comes from the first 256
        images = torch.cat([images, swatches(n_swatches, seed, size=size)])
    held_out = toy_images(eval_images, seed=seed, split="eval", size=size)
    start = time.perf_counter()
    vae = train_vae(
        images,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        config=config,
        progress=progress,
        device=device,
    )
    info = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "weights": dict(weights or {}),
        "swatch_fraction": swatch_fraction,
        "size": size,
        "train_images": len(images),
        "train_seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        **measurements(vae, held_out),
    }
    save_vae(vae.to("cpu"), out, info)
    return info
