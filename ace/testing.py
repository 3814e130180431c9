"""Tiny random components for tests, examples and the CPU demo. Fully offline.

``tiny_pipeline(seed)`` builds an ``ACEPipeline`` from real classes at toy sizes: a
2-layer ``T5EncoderModel`` with ByT5's byte tokenizer (it needs no vocabulary file),
a 4-level ``AutoencoderKL`` that downsamples by 8 like the released VAE, a tiny
``ACETransformer`` and the released DDIM sampler settings. Its weights are random, so
it makes noise, but every code path of the real pipeline runs, in about a second.

``released_size_pipeline(preset, device, dtype)`` builds the same classes at the released
sizes (T5 v1.1 XXL encoder, the SD VAE, the 0.6B DiT) with random weights, for timing and
memory figures (``scripts/benchmark.py --pipeline released``); it needs about 12 GB in bf16.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL
from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

from ace.models import ACETransformer

TEXT_DIM = 32


def tiny_text_encoder() -> tuple[ByT5Tokenizer, T5EncoderModel]:
    config = T5Config(
        vocab_size=384,  # ByT5: 3 special tokens + 256 bytes + 125 extra ids
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",  # T5 v1.1, like the released T5-XXL
    )
    return ByT5Tokenizer(), T5EncoderModel(config).eval()


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()


def tiny_transformer(**overrides) -> ACETransformer:
    """The "tiny" preset with every weight random (a fresh model would predict zeros)."""
    model = ACETransformer.from_preset("tiny", text_dim=TEXT_DIM, **overrides)
    randomize_(model)
    return model


@torch.no_grad()
def randomize_(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    """Add small noise to every parameter, so zero-initialised layers do something."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * std)
    return model


def t5_xxl_encoder_config() -> T5Config:
    """The T5 v1.1 XXL encoder's architecture (4.8B parameters), as the released ACE uses."""
    return T5Config(
        vocab_size=32128,
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_layers=24,
        num_heads=64,
        relative_attention_num_buckets=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
    )


def released_size_pipeline(
    preset: str = "ace-0.6b-512",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A random ``ACEPipeline`` at the released sizes, built directly on ``device``.

    T5 v1.1 XXL encoder (with ByT5's byte tokenizer, which needs no vocabulary file), the
    Stable-Diffusion VAE and the ``preset`` DiT. For benchmarks: the weights are random.
    """
    from ace.conditioning import sd_vae_config
    from ace.diffusion import make_objective
    from ace.pipeline import ACEPipeline

    torch.manual_seed(seed)
    with torch.device(device):
        text_encoder = T5EncoderModel(t5_xxl_encoder_config()).to(dtype).eval()
        vae = AutoencoderKL(**sd_vae_config()).to(dtype).eval()
        transformer = ACETransformer.from_preset(preset).to(dtype)
    return ACEPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=ByT5Tokenizer(),
        scheduler=make_objective("ddpm-eps").make_scheduler(),
    )


def tiny_pipeline(seed: int = 0, objective: str = "ddpm-eps"):
    """A random tiny ``ACEPipeline``; the same seed gives the same weights."""
    from ace.diffusion import make_objective
    from ace.pipeline import ACEPipeline

    torch.manual_seed(seed)
    tokenizer, text_encoder = tiny_text_encoder()
    return ACEPipeline(
        transformer=tiny_transformer(),
        vae=tiny_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=make_objective(objective).make_scheduler(),
    )
