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

import collections
import contextlib
import traceback

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


# ops that make the host wait for the device on CUDA: reading a value (.item(), bool(),
# int(), torch.equal), and ops whose output size depends on the data (boolean masks,
# nonzero, unique, bincount); nonzero_static, whose size is given, does not
_SYNC_PACKETS = frozenset(
    {
        "aten._local_scalar_dense",
        "aten.equal",
        "aten.nonzero",
        "aten.masked_select",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten._unique",
        "aten._unique2",
        "aten.bincount",
    }
)
_SYNC_OVERLOADS = frozenset({("aten.repeat_interleave", "Tensor")})  # repeats as a tensor


@contextlib.contextmanager
def host_syncs():
    """Count the ops that would make the host wait for a GPU, on any device (so also in
    CPU tests): yields a Counter of (op, file:line of the innermost ``ace`` frame).
    ``.tolist()`` and ``.cpu()`` copy without an op this can see: keep them off the step.

        with host_syncs() as syncs:
            model(tokens, text, t, packed, indicators)
        assert not syncs
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    counter: collections.Counter = collections.Counter()

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name, packet = str(func), str(func.overloadpacket)
            bool_index = packet in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                getattr(i, "dtype", None) == torch.bool for i in (args[1] or [])
            )  # x[mask] and x[mask] = values: a nonzero inside
            sync = packet in _SYNC_PACKETS or (packet, func._overloadname) in _SYNC_OVERLOADS
            if sync or bool_index:
                frames = [
                    f
                    for f in traceback.extract_stack()
                    if "/ace/" in f.filename and not f.filename.endswith("testing.py")
                ]
                where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
                counter[(name, where)] += 1
            return func(*args, **(kwargs or {}))

    with Spy():
        yield counter


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
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in dtype: T5-XXL built in fp32, then cast, took 18 GiB
    try:
        with torch.device(device):
            text_encoder = T5EncoderModel(t5_xxl_encoder_config()).to(dtype).eval()
            vae = AutoencoderKL(**sd_vae_config()).to(dtype).eval()
            transformer = ACETransformer.from_preset(preset).to(dtype)
    finally:
        torch.set_default_dtype(default)
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
