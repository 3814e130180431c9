"""ACETransformer: the packed long-context DiT of ACE (ACE_REFERENCE section 3).

Shapes: B samples, T image tokens of all frames, Tt text tokens, T0 target tokens,
C latent channels, p patch size, d hidden size, E text dim, K indicator rows.

The model takes tensors only. ``forward`` reads one packed batch: patch tokens of all
frames of all samples (T, (C+1)*p*p), text tokens (Tt, E), one timestep per sample,
and a ``PackedBatch`` holding the shape-dependent structure (positions, RoPE, segment
layouts). ``predict`` is the list-level entry point of DESIGN.md that packs for you.
"""

from __future__ import annotations

import inspect
import math
from typing import ClassVar

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from ace.models.attention import BACKENDS
from ace.models.layers import ACEBlock, FinalLayer, TextProjection, TimestepEmbedder
from ace.packing import PackedBatch

PRESETS: dict[str, dict] = {
    # the released ACE-0.6B models (ACE_REFERENCE section 1): 611M parameters
    "ace-0.6b-512": dict(
        in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
        text_dim=4096, rope_max_len=1024, qk_norm=True, pred_sigma=True, num_indicators=10,
        share_qk_norm=True,
    ),
    "ace-0.6b-1024": dict(
        in_channels=4, patch_size=2, hidden_size=1152, depth=28, num_heads=16, mlp_ratio=4.0,
        text_dim=4096, rope_max_len=4096, qk_norm=True, pred_sigma=True, num_indicators=10,
        share_qk_norm=True,
    ),
    # for tests, examples and the CPU demo; head dim 12 gives RoPE 2/2/2 pairs
    "tiny": dict(
        in_channels=4, patch_size=2, hidden_size=48, depth=2, num_heads=4, mlp_ratio=4.0,
        text_dim=32, rope_max_len=256, qk_norm=True, pred_sigma=True, num_indicators=10,
    ),
    # the CPU demo (configs/toy.yaml): reads the toy VAE (ace.train.vae, factor 4, 8
    # channels) in 2 x 2 latent patches, so a 64 px frame is 64 tokens of 32 values
    "toy": dict(
        in_channels=8, patch_size=2, hidden_size=192, depth=6, num_heads=6, mlp_ratio=4.0,
        text_dim=32, rope_max_len=256, qk_norm=True, pred_sigma=True, num_indicators=10,
    ),
}  # fmt: skip


def _check_config(args: dict) -> None:
    """ValueError naming the first argument of the wrong type or out of range (a config
    override such as ``depth: abc`` or ``patch_size: 0`` would fail deep in a layer)."""
    for name in ("in_channels", "patch_size", "hidden_size", "depth", "num_heads", "text_dim",
                 "rope_max_len", "num_indicators"):  # fmt: skip
        v = args[name]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    r = args["mlp_ratio"]
    if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 0:
        raise ValueError(f"mlp_ratio must be a number > 0, got {r!r}")
    for name in ("qk_norm", "pred_sigma", "share_qk_norm"):
        if not isinstance(args[name], bool):
            raise ValueError(f"{name} must be true or false, got {args[name]!r}")


class ACETransformer(ModelMixin, ConfigMixin):
    """The ACE diffusion transformer.

    Args:
        in_channels: latent channels C (the patch embedding reads C + 1: the mask).
        patch_size: p, the side of a patch in latent pixels.
        hidden_size: d.
        depth: number of blocks.
        num_heads: H; the head dim d / H must be even and at least 6 (a RoPE pair per axis).
        mlp_ratio: MLP hidden width over d.
        text_dim: E, the width of the text encoder's states.
        rope_max_len: RoPE table length; also the most tokens one frame may have.
        qk_norm: RMSNorm on q and k in both attentions.
        pred_sigma: the output also holds a learned-sigma half (2C channels), dropped by
            ``forward``; kept for weight compatibility.
        num_indicators: rows of the image-indicator table; at most this many frames.
        share_qk_norm: normalise k with q's norm weight (no ``norm_k``), as the released
            model does; its presets set it, so that fine-tuning trains what it trained.

    Use ``ACETransformer.from_preset("ace-0.6b-512")`` for the released architecture.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["ACEBlock"]
    _repeated_blocks: ClassVar[list[str]] = ["ACEBlock"]  # compile_repeated_blocks()

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        text_dim: int = 4096,
        rope_max_len: int = 1024,
        qk_norm: bool = True,
        pred_sigma: bool = True,
        num_indicators: int = 10,
        share_qk_norm: bool = False,
    ):
        super().__init__()
        _check_config(locals())
        if hidden_size % num_heads or (hidden_size // num_heads) % 2 or hidden_size < 6 * num_heads:
            raise ValueError(
                f"hidden_size={hidden_size} must split into num_heads={num_heads} heads of an even "
                "dim of at least 6 (3D RoPE rotates a pair per axis: frame, row, column)"
            )
        d, p = hidden_size, patch_size
        self.out_channels = 2 * in_channels if pred_sigma else in_channels
        self.head_dim = d // num_heads
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels + 1, d, p, stride=p)
        self.t_embedder = TimestepEmbedder(d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.y_embedder = TextProjection(text_dim, d)
        self.blocks = nn.ModuleList(
            ACEBlock(d, num_heads, mlp_ratio, qk_norm, share_qk_norm) for _ in range(depth)
        )
        self.final_layer = FinalLayer(d, p, self.out_channels)
        self.gradient_checkpointing = False
        self.attention_backend = "auto"
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> ACETransformer:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        unknown = cls.unknown_arguments(overrides)
        if unknown:
            raise ValueError(
                f"unknown ACETransformer argument(s) {unknown} over preset {name!r}; "
                f"known: {sorted(cls.arguments())}"
            )
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def arguments(cls) -> set[str]:
        """The names ``__init__`` takes (a preset's overrides may set them)."""
        return set(inspect.signature(cls.__init__).parameters) - {"self"}

    @classmethod
    def unknown_arguments(cls, overrides) -> list[str]:
        """The keys of ``overrides`` that are no ``__init__`` argument, sorted."""
        return sorted(set(overrides) - cls.arguments())

    def initialize_weights(self) -> None:
        """PixArt / DiT initialisation, all in one place.

        Linear layers xavier-uniform with zero bias; the patch embedding like a linear
        layer; timestep and text MLPs N(0, 0.02). The cross-attention output projections
        and the final layer start at zero, so a new block adds nothing to the residual
        stream and a new model predicts zero.
        """

        def basic(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for layer in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1]):
            nn.init.normal_(layer.weight, std=0.02)
        nn.init.normal_(self.y_embedder.fc1.weight, std=0.02)
        nn.init.normal_(self.y_embedder.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_attention_backend(self, backend: str) -> None:
        """Choose the attention implementation: ``auto``, ``sdpa``, ``varlen``, ``flex`` or ``dense``."""
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
        self.attention_backend = backend

    # ----------------------------------------------------------------------------------

    def pack(
        self, frame_sizes: list[list[tuple[int, int]]], text_lengths: list[list[int]], device=None
    ) -> PackedBatch:
        """The ``PackedBatch`` for latent frame sizes and text lengths, with this model's settings."""
        c = self.config
        return PackedBatch.build(
            frame_sizes,
            text_lengths,
            patch_size=c.patch_size,
            head_dim=self.head_dim,
            rope_max_len=c.rope_max_len,
            num_indicators=c.num_indicators,
            device=device if device is not None else self.device,
        )

    def forward(
        self,
        x: Tensor,
        text: Tensor,
        timesteps: Tensor,
        packed: PackedBatch,
        indicators: Tensor | None = None,
    ) -> Tensor:
        """Packed forward.

        Args:
            x: (T, (C+1)*p*p) patch tokens of every frame (``packed.pack_frames``).
            text: (Tt, E) text tokens, one text per frame (``packed.pack_texts``).
            timesteps: (B,) one diffusion timestep per sample.
            packed: the batch structure.
            indicators: the raw (K, E) indicator table, or None for no indicators.

        Returns:
            (T0, p*p*C) the prediction for the target frames' tokens, each token ordered
            (row in patch, column in patch, channel); ``packed.unpack_target`` makes latents.
        """
        if x.shape[0] != packed.num_tokens or text.shape[0] != packed.num_text_tokens:
            raise ValueError(
                f"got {x.shape[0]} image and {text.shape[0]} text tokens, the packed batch has "
                f"{packed.num_tokens} and {packed.num_text_tokens}"
            )
        if timesteps.shape != (packed.num_samples,):
            raise ValueError(
                f"timesteps shape {tuple(timesteps.shape)}, expected ({packed.num_samples},)"
            )
        cfg, proj = self.config, self.x_embedder.proj
        width = (cfg.in_channels + 1) * cfg.patch_size**2
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"x shape {tuple(x.shape)}, expected (T, {width}): (C+1)*p*p")
        if text.ndim != 2 or text.shape[1] != cfg.text_dim:
            raise ValueError(f"text shape {tuple(text.shape)}, expected (Tt, {cfg.text_dim})")
        if indicators is not None and tuple(indicators.shape) != (cfg.num_indicators, cfg.text_dim):
            raise ValueError(
                f"indicator table shape {tuple(indicators.shape)}, the model expects "
                f"({cfg.num_indicators}, {cfg.text_dim})"
            )
        given = (x, text, timesteps, proj.weight, *([] if indicators is None else [indicators]))
        if len({str(v.device) for v in given}) > 1:
            on = "" if indicators is None else f", indicators on {indicators.device}"
            raise ValueError(
                f"x on {x.device}, text on {text.device}, timesteps on {timesteps.device}{on}: "
                f"put them where the model is ({proj.weight.device})"
            )
        dtype = self.dtype
        x = nn.functional.linear(
            x.to(dtype), proj.weight.flatten(1), proj.bias
        )  # (T, d): the p x p conv
        y = self.y_embedder(text.to(dtype))  # (Tt, d)
        if indicators is not None:
            ind = self.y_embedder(indicators.to(dtype))  # (K, d)
            ind_x, ind_y = packed.indicator_rows(ind)  # (T, d), (Tt, d)
            x = x + ind_x  # each frame gets its row ...
            y = y + ind_y  # ... and so does its paired text
        t_emb = self.t_embedder(timesteps)  # (B, d)
        t0 = self.t_block(t_emb).unflatten(-1, (6, -1))  # (B, 6, d)
        backend = self.attention_backend
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = self._gradient_checkpointing_func(block, x, y, t0, packed, backend)
            else:
                x = block(x, y, t0, packed, backend)
        out = self.final_layer(x[packed.target_index], packed.per_target(t_emb))  # (T0, p*p*out)
        p2 = self.config.patch_size**2
        return out.unflatten(-1, (p2, -1))[..., : self.config.in_channels].flatten(1)  # (T0, p*p*C)

    def predict(
        self,
        frames: list[list[Tensor]],
        masks: list[list[Tensor | None]] | None,
        texts: list[list[Tensor]],
        timesteps: Tensor,
        indicators: Tensor | None = None,
    ) -> list[Tensor]:
        """List-level entry point (DESIGN.md).

        Args:
            frames: per sample [noisy target latent (C, h, w), condition latents (C, h, w)...].
            masks: per sample one (1, h, w) latent-resolution mask or None per frame
                (None for the whole argument = no masks).
            texts: per sample one (L, E) tensor of valid text-token embeddings per frame;
                frame 0's is the current instruction.
            timesteps: (B,) one timestep per sample.
            indicators: the raw (num_indicators, E) indicator table, or None.

        Returns:
            per sample the (C, h, w) prediction for the target frame.
        """
        if len(texts) != len(frames):
            raise ValueError(f"got texts for {len(texts)} samples but frames for {len(frames)}")
        if masks is not None and len(masks) != len(frames):
            raise ValueError(f"got masks for {len(masks)} samples but frames for {len(frames)}")
        for b, (fs, ts) in enumerate(zip(frames, texts)):
            if not isinstance(fs, (list, tuple)) or not isinstance(ts, (list, tuple)):
                raise ValueError(
                    f"sample {b}: frames and texts must be lists (one tensor per frame), got "
                    f"{type(fs).__name__} and {type(ts).__name__}"
                )
            if len(fs) != len(ts):
                raise ValueError(
                    f"sample {b}: {len(ts)} texts for {len(fs)} frames; ACE pairs one text with each frame"
                )
            for f, x in enumerate(fs):
                if x.ndim != 3 or x.shape[0] != self.config.in_channels:
                    raise ValueError(
                        f"sample {b} frame {f}: latent shape {tuple(x.shape)}, expected "
                        f"({self.config.in_channels}, h, w)"
                    )
            for f, t in enumerate(ts):
                if t.ndim != 2 or t.shape[1] != self.config.text_dim:
                    raise ValueError(
                        f"sample {b} frame {f}: text shape {tuple(t.shape)}, expected "
                        f"(L, {self.config.text_dim})"
                    )
        device = self.x_embedder.proj.weight.device
        timesteps = torch.as_tensor(timesteps).to(device)
        packed = self.pack(
            [[tuple(x.shape[-2:]) for x in fs] for fs in frames],
            [[t.shape[0] for t in ts] for ts in texts],
            device=device,
        )
        out = self(
            packed.pack_frames(frames, masks),
            packed.pack_texts(texts),
            timesteps,
            packed,
            indicators,
        )
        return packed.unpack_target(out)
