"""Turning a Long-context Condition Unit into tensors: T5 text, VAE latents, masks, indicators.

Follows the released ACE inference (scepter ``ace_inference.py``; ACE_REFERENCE.md
sections 1-2). Images: centre crop to aspect ratio <= 4, bicubic resize to
multiples of 16 with (H/16) * (W/16) <= max seq len (never enlarged), scaled to
[-1, 1]. Masks: cropped like their image, resized with PIL's nearest, binarised at
> 128 (0-255 scale; integer tensors whose maximum is 1 and bool tensors are read as
0/1); a missing or all-zero mask means "whole image" (all ones).
Inpainting requests set the masked input pixels to -1 (``fill_masked``; the
caller decides when). Text: ``clean_text``, T5 to ``max_length`` tokens, valid
tokens kept. Latents: scaling_factor * VAE posterior sample.

Conventions: input images are RGB PIL images or float tensors (3, H, W) with
values in [0, 1]; model-side images are float32 (3, H, W) in [-1, 1]; masks are
float32 (1, H, W) of 0/1, 1 = the region to edit.

Shape letters: B images in a batch; C latent channels (4); H, W image height /
width; h, w latent height / width (H/8, W/8); N tokenizer length (120); L valid
tokens of one prompt (EOS included); E text-encoder width (4096 for T5-XXL).
"""

from __future__ import annotations

import html
import math
import re
from typing import Any

import ftfy
import numpy as np
import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ace.lcu import _IMAGE_EXPECTED, _MASK_EXPECTED, INDICATOR_NAMES, ImageLike, MaskLike, _describe
from ace.warn import warn_caller

INDICATOR_STRINGS: tuple[str, ...] = INDICATOR_NAMES  # row r of the indicator table
MAX_ASPECT_RATIO = 4  # longer side / shorter side after the centre crop
SIZE_MULTIPLE = 16  # image sides: VAE factor 8 x patch size 2
MASK_THRESHOLD = 128  # mask set where the 0-255 value is > 128 (float masks: > 128/255)
VAE_MAX_PIXELS = 8 * 512 * 512  # pixels per VAE call (encode, or decode in a batch); more are split
_WHITESPACE = re.compile(r"\s+")


def _expected(what: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"{what}: expected {expected}, got {_describe(got)}")


def _is_tensor(x: Any, ndim: int, size: int | None = None, need_float: bool = True) -> bool:
    """Whether x is a tensor with ``ndim`` dims, ``x.shape[0] == size``, floating if asked."""
    ok = isinstance(x, torch.Tensor) and x.ndim == ndim and (size is None or x.shape[0] == size)
    return ok and (x.is_floating_point() or not need_float)


def _check_unit_range(x: torch.Tensor, what: str) -> None:
    if not torch.isfinite(x).all():
        raise ValueError(f"{what}: values must be finite, got NaN or inf")
    lo, hi = x.aminmax()
    if lo < 0 or hi > 1:
        hint = " (0-255 values? divide by 255)" if hi > 1 and lo >= 0 else ""
        raise ValueError(
            f"{what}: values must lie in [0, 1], got [{lo.item():g}, {hi.item():g}]{hint}"
        )


def clean_text(text: str) -> str:
    """ftfy ``fix_text``, ``html.unescape`` twice, strip, collapse whitespace runs to one space."""
    if not isinstance(text, str):
        raise _expected("prompt", "a str", text)
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()


# ---------------------------------------------------------------------------
# Images and masks
# ---------------------------------------------------------------------------


def _crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w) of the centre crop that limits the aspect ratio to 4."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size (H, W) = {(height, width)} is empty")
    crop_h, crop_w = height, width
    if height / width > MAX_ASPECT_RATIO:
        crop_h = int(MAX_ASPECT_RATIO * width)
    elif width / height > MAX_ASPECT_RATIO:
        crop_w = int(MAX_ASPECT_RATIO * height)
    # torchvision center_crop offsets (Python round: half to even)
    return round((height - crop_h) / 2), round((width - crop_w) / 2), crop_h, crop_w


def vae_factor_of(vae_config) -> int:
    """Pixels per latent pixel along each side of an ``AutoencoderKL`` with this config (or
    its ``config.json`` as a dict): 8 for the released (SD) VAE, 4 for the toy one."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def resize_budget(rope_max_len: int, vae_factor: int, patch_size: int) -> int:
    """The ``max_seq_len`` of ``target_size`` (counted in 16 px squares, as the released
    resize counts) that keeps an image within ``rope_max_len`` tokens of
    ``vae_factor * patch_size`` px: ``rope_max_len`` itself for the released geometry
    (8 x 2 = 16 px), a quarter of it for the toy VAE's 4 x 2 = 8 px tokens."""
    px = vae_factor * patch_size
    return max(1, rope_max_len * px * px // (SIZE_MULTIPLE * SIZE_MULTIPLE))


def target_size(height: int, width: int, max_seq_len: int) -> tuple[int, int]:
    """(H', W') of the released resize for an (already aspect-cropped) image.

    scale = min(1, sqrt(max_seq_len / ((H/16) (W/16)))); H' = int(H scale) // 16 * 16,
    same for W'. Never enlarges; small images lose up to 15 pixels per side.
    """
    for name, v in (("height", height), ("width", width), ("max_seq_len", max_seq_len)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name}: expected a positive int, got {v!r}")
    d = SIZE_MULTIPLE
    scale = min(1.0, math.sqrt(max_seq_len / ((height / d) * (width / d))))
    h, w = int(height * scale) // d * d, int(width * scale) // d * d
    if h == 0 or w == 0:
        raise ValueError(f"image of size {(height, width)} is too small: it resizes to {(h, w)}")
    return h, w


def preprocess_image(image: ImageLike, max_seq_len: int) -> torch.Tensor:
    """RGB PIL image or float tensor (3, H, W) in [0, 1] -> float32 (3, H', W') in [-1, 1].

    Centre crop to aspect ratio <= 4, bicubic resize to ``target_size``. PIL inputs
    follow the released path exactly (PIL bicubic on uint8); tensors use torch
    bicubic with antialiasing (close to PIL, not bit-identical).
    """
    if isinstance(image, Image.Image) and image.mode == "RGB":
        top, left, ch, cw = _crop_box(image.height, image.width)
        size = target_size(ch, cw, max_seq_len)
        image = image.crop((left, top, left + cw, top + ch))
        if size != (ch, cw):
            image = image.resize(size[::-1], Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255  # (3, H', W')
    elif _is_tensor(image, 3, 3):
        top, left, ch, cw = _crop_box(int(image.shape[1]), int(image.shape[2]))
        size = target_size(ch, cw, max_seq_len)
        _check_unit_range(image, "image tensor")
        # on the CPU, as a PIL image's is: its mask is made there, and the VAE stacks it
        # with the LCU's other images
        x = image[:, top : top + ch, left : left + cw].detach().cpu().float()
        if size != (ch, cw):
            x = F.interpolate(x[None], size=size, mode="bicubic", antialias=True)[0].clamp(0, 1)
    else:
        raise _expected("image", _IMAGE_EXPECTED, image)
    return (x - 0.5) / 0.5


def preprocess_mask(
    mask: MaskLike | None, size: tuple[int, int], image_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Mask at its image's original size -> float32 (1, H', W') of 0/1 at ``size`` (H', W').

    ``mask``: PIL "L" or "1", or a tensor (1, H, W) / (H, W) that is bool, integer or
    float in [0, 1]. Integer and "L" masks are 0-255 (set where > 128, the released rule)
    unless their maximum is 1: a 0/1 mask (what saving a numpy 0/1 array gives), set where
    1, which the released rule would read as empty. A mode "1" mask is read as 0/255
    (the released code compares its bool array with 128, so it is empty there too).
    Floats are set where > 128/255.
    Cropped like its image, resized with PIL's nearest (as torchvision's NEAREST_EXACT
    resizes the released code's PIL masks), a tensor too. None or an all-zero result gives all
    ones (warned when the mask did mark pixels, all at 128 or below). ``image_size``, if
    given, is the image's original (H, W).
    """
    if not (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(v, int) and v > 0 for v in size)
    ):
        raise ValueError(f"size: expected two positive ints (H, W), got {size!r}")
    h_out, w_out = size
    if mask is None:
        return torch.ones(1, h_out, w_out)
    is_pil = isinstance(mask, Image.Image) and mask.mode in ("L", "1")
    if not (is_pil or _is_tensor(mask, 2, need_float=False) or _is_tensor(mask, 3, 1, False)):
        raise _expected("mask", _MASK_EXPECTED, mask)
    height, width = (mask.height, mask.width) if is_pil else tuple(mask.shape[-2:])
    if image_size is not None and (height, width) != tuple(image_size):
        raise ValueError(
            f"mask size {(height, width)} differs from its image's {tuple(image_size)}"
        )
    top, left, ch, cw = _crop_box(height, width)
    if is_pil:
        pil = mask.convert("L")  # mode "1" -> 0 / 255
        marked = pil.getextrema()[1]  # the largest value: 1 for a 0/1 mask (a saved numpy 0/1)
        pil = pil.crop((left, top, left + cw, top + ch))
        pil = pil.resize((w_out, h_out), Image.Resampling.NEAREST)  # torchvision's NEAREST_EXACT
        threshold = 0 if marked == 1 else MASK_THRESHOLD
        out = torch.from_numpy(np.asarray(pil) > threshold)[None].float()  # (1, H', W')
    else:
        m = mask.reshape(1, height, width)[:, top : top + ch, left : left + cw]
        marked = float(mask.max()) if mask.numel() else 0.0
        if m.is_floating_point():
            _check_unit_range(m, "float mask (use an integer tensor for 0-255)")
            m = m > MASK_THRESHOLD / 255
        elif m.dtype != torch.bool:  # integer: 0/1 when its maximum is 1, else 0-255
            m = m > (0 if marked == 1 else MASK_THRESHOLD)
        # resized as the PIL path is (PIL's nearest picks other pixels than torch's
        # nearest-exact at some sizes), so a tensor mask gives what its image file gives
        pil = Image.fromarray(m[0].cpu().numpy().astype(np.uint8) * 255)
        pil = pil.resize((w_out, h_out), Image.Resampling.NEAREST)
        out = torch.from_numpy(np.asarray(pil) > 0)[None].float()  # (1, H', W')
    if out.any():
        return out
    if marked:  # the released rule below, on a mask that does mark something: say so
        warn_caller(
            "a mask marks pixels, but none above 128 of 255 (after the crop and resize): it "
            "is read as no mask, the whole image; mark the region to edit in white"
        )
    return torch.ones_like(out)


def fill_masked(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inpainting fill: image (3, H, W) with pixels where mask (1, H, W) is 1 set to -1."""
    if not _is_tensor(image, 3, 3):
        raise _expected("image", "a float tensor (3, H, W)", image)
    if not (isinstance(mask, torch.Tensor) and mask.shape == (1, *image.shape[1:])):
        raise _expected("mask", f"the image's size (1, H, W) = {(1, *image.shape[1:])}", mask)
    return image.masked_fill(mask.bool(), -1.0)  # (3, H, W), mask broadcast over channels


def downsample_mask(mask: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """(1, H, W) -> (1, H/factor, W/factor), nearest-exact: keeps pixel factor*i + factor//2."""
    if not _is_tensor(mask, 3, 1, need_float=False):
        raise _expected("mask", "a tensor (1, H, W)", mask)
    height, width = mask.shape[1:]
    if height % factor or width % factor:
        raise ValueError(f"mask size {(height, width)} is not divisible by {factor}")
    x = mask if mask.is_floating_point() else mask.float()
    return F.interpolate(x[None], size=(height // factor, width // factor), mode="nearest-exact")[0]


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> float32 (B, H, W, 3): clamp((x + 1)/2 + 0.5/255, 0, 1)."""
    if not (_is_tensor(images, 4) and images.shape[1] == 3):
        raise _expected("images", "a float tensor (B, 3, H, W)", images)
    x = torch.clamp((images.float() + 1.0) / 2.0 + 0.5 / 255, 0.0, 1.0)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)


def postprocess(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images; uint8 by truncating x * 255, as released."""
    return [Image.fromarray((a * 255).astype(np.uint8)) for a in to_numpy(images)]


# ---------------------------------------------------------------------------
# Frozen encoders
# ---------------------------------------------------------------------------


def _valid_rows(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``states`` (N, E) where the CPU ``mask`` (N,) is 1: a slice when the
    mask is a prefix (right padding, as T5's tokenizer pads), else a gather."""
    n = int(mask.sum())
    if bool(mask[:n].all()):
        return states[:n]
    return states.index_select(0, mask.nonzero()[:, 0].to(states.device))


MAX_TEXT_TOKENS = 120
"""T5's input length in the released model: prompts are padded and truncated to it."""


class ConditionTokenizer:
    """Frozen T5 encoder (with its tokenizer) and KL VAE behind the calls pipeline and trainer make.

    ``tokenizer``: a transformers tokenizer; ``text_encoder``: a ``T5EncoderModel``;
    ``vae``: a diffusers ``AutoencoderKL``. Inputs go to ``device`` (default: each
    component's own device) and the component's dtype; outputs come back in that dtype.
    A pipeline under ``enable_model_cpu_offload()`` passes its execution device: its
    components sit on the CPU until their hooks move them, and the VAE's ``encode`` and
    ``decode`` hooks move the module but not its inputs.
    """

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        vae: Any,
        max_length: int = MAX_TEXT_TOKENS,
        device: torch.device | str | None = None,
    ) -> None:
        if not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"max_length: expected a positive int, got {max_length!r}")
        config = vae.config
        shift = config.get("shift_factor") if hasattr(config, "get") else None
        stats = [k for k in ("latents_mean", "latents_std") if getattr(config, k, None) is not None]  # fmt: skip
        if shift not in (None, 0, 0.0) or stats:
            raise ValueError(
                f"the VAE's config sets {'shift_factor' if shift else ', '.join(stats)}: ACE's "
                "latents are scaling_factor * z, as the released SD VAE's (no shift or "
                "per-channel statistics); this VAE's latents would be read wrongly"
            )
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.max_length = max_length
        self.device = None if device is None else torch.device(device)

    def _device(self, module: Any) -> torch.device:
        return module.device if self.device is None else self.device

    @property
    def vae_factor(self) -> int:
        """Pixels per latent pixel along each side: 8 for the released (SD) VAE."""
        return vae_factor_of(self.vae.config)

    def _encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One tokenizer call, one encoder call: hidden (B, N, E) and attention mask (B, N)."""
        kw = {"padding": "max_length", "max_length": self.max_length, "truncation": True}
        tokens = self.tokenizer(texts, return_attention_mask=True, return_tensors="pt", **kw)
        device = self._device(self.text_encoder)
        mask = tokens["attention_mask"]  # (B, N) on the CPU
        out = self.text_encoder(
            input_ids=tokens["input_ids"].to(device), attention_mask=mask.to(device)
        )
        return out.last_hidden_state, mask  # (B, N, E), (B, N)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> list[torch.Tensor]:
        """Clean and encode prompts in one call; per prompt its valid-token states (L_i, E)."""
        if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
            raise _expected("prompts", "a non-empty list of str", prompts)
        hidden, mask = self._encode([clean_text(p) for p in prompts])
        # the valid positions are read off the CPU mask, not by a boolean index into the
        # GPU states, which would wait for the encoder to finish (a host sync)
        return [_valid_rows(h, m) for h, m in zip(hidden, mask)]  # each (L_i, E)

    @torch.no_grad()
    def indicator_table(self) -> torch.Tensor:
        """(10, E): first-token state of each of ``INDICATOR_STRINGS``, encoded like prompts."""
        hidden, _ = self._encode([clean_text(s) for s in INDICATOR_STRINGS])
        return hidden[:, 0]  # (10, E)

    @torch.no_grad()
    def encode_posteriors(
        self, images: list[torch.Tensor]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Images (3, H, W) in [-1, 1] -> per image the VAE posterior (mean, std), each
        (C, h, w), unscaled. Equal-size images share VAE calls of at most ``VAE_MAX_PIXELS``
        pixels (at least one image): the encoder's activations grow with the batch, and a
        cache build hands it a whole chunk of LCUs at once."""
        if not isinstance(images, (list, tuple)) or len(images) == 0:
            raise _expected("images", "a non-empty list of tensors (3, H, W)", images)
        f = self.vae_factor
        for i, x in enumerate(images):
            if not _is_tensor(x, 3, 3):
                raise _expected(f"images[{i}]", "a float tensor (3, H, W)", x)
            if x.shape[1] % f or x.shape[2] % f:
                raise ValueError(f"images[{i}]: size {tuple(x.shape[1:])} is not divisible by {f}")
        out: list[tuple[torch.Tensor, torch.Tensor]] = [(torch.empty(0), torch.empty(0))] * len(
            images
        )
        for idx in _vae_calls([tuple(x.shape[1:]) for x in images]):
            x = torch.stack([images[i] for i in idx])  # (B, 3, H, W)
            dist = self.vae.encode(x.to(self._device(self.vae), self.vae.dtype)).latent_dist
            for i, mean, std in zip(idx, dist.mean, dist.std):  # (C, h, w) each
                out[i] = (mean, std)
        return out

    def sample_latents(
        self,
        posteriors: list[tuple[torch.Tensor, torch.Tensor]],
        generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> list[torch.Tensor]:
        """Posteriors (mean, std) -> latents (C, h, w) = scaling_factor * (mean + std * noise)
        (``sample=False``: the mean). Equal shapes draw their noise in one call, in order of
        first appearance, exactly as diffusers' ``latent_dist.sample`` on the stacked batch."""
        scale = self.vae.config.scaling_factor
        if not sample:
            return [mean * scale for mean, _ in posteriors]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (mean, _) in enumerate(posteriors):
            groups.setdefault(tuple(mean.shape), []).append(i)
        latents: list[torch.Tensor] = [torch.empty(0)] * len(posteriors)
        for idx in groups.values():
            mean = torch.stack([posteriors[i][0] for i in idx])  # (B, C, h, w)
            std = torch.stack([posteriors[i][1] for i in idx])  # (B, C, h, w)
            noise = randn_tensor(
                mean.shape, generator=generator, device=mean.device, dtype=mean.dtype
            )
            for i, zi in zip(idx, (mean + std * noise) * scale):
                latents[i] = zi
        return latents

    @torch.no_grad()
    def encode_images(
        self,
        images: list[torch.Tensor],
        generator: torch.Generator | None = None,
        sample: bool = True,
    ) -> list[torch.Tensor]:
        """Images (3, H, W) in [-1, 1] -> latents (C, h, w) = scaling_factor * posterior sample
        (``sample=False``: the posterior mode). Equal-size images share VAE calls
        (``encode_posteriors``)."""
        return self.sample_latents(self.encode_posteriors(images), generator, sample)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, f*h, f*w) (f = ``vae_factor``),
        nominally [-1, 1], not clamped."""
        c = self.vae.config.latent_channels
        if not _is_tensor(latents, 4):
            raise _expected("latents", "a float tensor (B, C, h, w)", latents)
        if latents.shape[1] != c:
            raise ValueError(f"latents: the VAE takes {c} channels, got {tuple(latents.shape)}")
        z = latents.to(self._device(self.vae), self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(z).sample  # (B, 3, 8h, 8w)

    @torch.no_grad()
    def decode_each(self, latents: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scaled latents (1, C, h, w) of any sizes -> per latent its image (1, 3, f*h, f*w),
        as ``decode``; equal sizes share VAE calls (``VAE_MAX_PIXELS``, as encoding)."""
        f = self.vae_factor
        out: list[torch.Tensor] = [torch.empty(0)] * len(latents)
        for idx in _vae_calls([(z.shape[-2] * f, z.shape[-1] * f) for z in latents]):
            pixels = self.decode(torch.cat([latents[i] for i in idx]))  # (n, 3, H, W)
            for i, x in zip(idx, pixels.split(1)):
                out[i] = x
        return out


def _vae_calls(sizes: list[tuple[int, int]]) -> list[list[int]]:
    """Indices of images of pixel ``sizes`` (H, W) grouped for VAE calls: equal sizes
    together, in order of first appearance, at most ``VAE_MAX_PIXELS`` pixels a call (at
    least one image): the VAE's activations grow with the batch."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, hw in enumerate(sizes):
        groups.setdefault(hw, []).append(i)
    calls = []
    for (h, w), group in groups.items():
        per_call = max(1, VAE_MAX_PIXELS // (h * w))
        calls += [group[start : start + per_call] for start in range(0, len(group), per_call)]
    return calls


# ---------------------------------------------------------------------------
# Released VAE weights
# ---------------------------------------------------------------------------


def sd_vae_config() -> dict[str, Any]:
    """``AutoencoderKL`` config of the Stable-Diffusion KL-f8 VAE (the released ``vae.bin``)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        act_fn="silu",
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    )


def convert_ldm_vae(state_dict: dict, vae_config: dict | None = None) -> dict:
    """LDM-layout VAE state dict -> diffusers ``AutoencoderKL`` keys (diffusers' own converter).

    Takes bare keys, a ``first_stage_model.`` or ``vae.`` prefix (other keys are then
    dropped) and a ``{"state_dict": ...}`` wrapper. ``vae_config`` (default
    ``sd_vae_config()``) must produce exactly the converted keys, else ValueError.
    """
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):
        state_dict = state_dict["state_dict"]
    if not (isinstance(state_dict, dict) and state_dict):
        raise _expected("state_dict", "a non-empty dict of tensors", state_dict)
    config = sd_vae_config() if vae_config is None else vae_config
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    converted = convert_ldm_vae_checkpoint(state_dict, config)
    with torch.device("meta"):  # parameter names only, no memory
        expected = set(AutoencoderKL.from_config(config).state_dict())
    missing, unexpected = sorted(expected - converted.keys()), sorted(converted.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"not an LDM VAE state dict for this config: {len(missing)} keys missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    return converted
