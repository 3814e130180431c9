"""The building blocks of the ACE DiT (ACE_REFERENCE section 3).

Shapes: B samples, T image tokens, Tt text tokens, d hidden size, H heads, D = d / H;
n = T / B image tokens a sample when every sample has as many.
Every layer works on a packed stream: image tokens (T, d), text tokens (Tt, d).
Per-sample quantities (B, ...) reach tokens through ``PackedBatch.per_sample_rows``: as
(B, 1, ...) rows broadcast over the tokens viewed (B, n, d) when the samples are of one
length, else expanded to (T, ...) rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ace.models.attention import SegmentLayout, segment_attention
from ace.models.rope import apply_rope


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32, cast back, then scaled (as released).

    The result keeps ``x``'s dtype: under autocast the weight stays float32, and a float32
    q and k next to a bfloat16 v would reach attention in two dtypes."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight
        return y.to(x.dtype)  # a no-op but under autocast


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (cos first, then sin) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def features(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
        """(B,) timesteps -> (B, dim) float32 features [cos(t f_i), sin(t f_i)], f_i = exp(-ln(P) i / (dim/2))."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)

    def forward(self, t: Tensor) -> Tensor:
        feats = self.features(t, self.freq_dim).to(self.mlp[0].weight.dtype)
        return self.mlp(feats)  # (B, d)


class TextProjection(nn.Module):
    """Projects T5 states (and the indicator table) to the hidden size: Linear -> GELU(tanh) -> Linear."""

    def __init__(self, text_dim: int, hidden_size: int):
        super().__init__()
        self.fc1 = nn.Linear(text_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, y: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(y), approximate="tanh"))


def _qk_norms(dim: int, qk_norm: bool, share: bool) -> tuple[nn.Module, nn.Module | None]:
    """(norm_q, norm_k). ``share``: no norm_k; k is normalised with norm_q, as the released
    model does (ACE_REFERENCE section 3), so fine-tuning trains the one weight it has."""
    if not qk_norm:
        return nn.Identity(), nn.Identity()
    return RMSNorm(dim), (None if share else RMSNorm(dim))


class _QKNormed(nn.Module):
    """What both attentions share: q/k norms, k's possibly q's (``_qk_norms``)."""

    norm_q: nn.Module
    norm_k: nn.Module | None

    def key_norm(self, k: Tensor) -> Tensor:
        """k's norm: its own, or q's where shared (the released model)."""
        return (self.norm_q if self.norm_k is None else self.norm_k)(k)


class SelfAttention(_QKNormed):
    """Self-attention among all image tokens of a sample, with 3D RoPE and q/k RMSNorm.

    q, k, v are one fused projection (stored as ``qkv``, q/k/v stacked on dim 0).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, share_qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = _qk_norms(dim, qk_norm, share_qk_norm)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, layout: SegmentLayout, backend: str
    ) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # (T, d) each
        q, k = self.norm_q(q), self.key_norm(k)  # norms over the full d, before the head split
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)) for t in (q, k, v))  # (T, H, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = segment_attention(q, k, v, layout, backend)  # (T, H, D)
        return self.proj(out.flatten(1))  # (T, d)


class CrossAttention(_QKNormed):
    """Each frame's tokens read only the tokens of the text paired with that frame; no RoPE.

    k and v are one fused projection (stored as ``kv``, k/v stacked on dim 0).
    """

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, share_qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm_q, self.norm_k = _qk_norms(dim, qk_norm, share_qk_norm)

    def forward(self, x: Tensor, y: Tensor, layout: SegmentLayout, backend: str) -> Tensor:
        q = self.norm_q(self.q(x))  # (T, d)
        k, v = self.kv(y).chunk(2, dim=-1)  # (Tt, d) each
        k = self.key_norm(k)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)) for t in (q, k, v))  # (T|Tt, H, D)
        out = segment_attention(q, k, v, layout, backend)  # (T, H, D)
        return self.proj(out.flatten(1))  # (T, d)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine, eps 1e-6."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


class ACEBlock(nn.Module):
    """PixArt adaLN-single block: modulated self-attention, plain cross-attention, modulated MLP."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool, share_qk_norm: bool = False
    ):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn = SelfAttention(dim, num_heads, qk_norm, share_qk_norm)
        self.cross_attn = CrossAttention(dim, num_heads, qk_norm, share_qk_norm)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, y: Tensor, t0: Tensor, packed, backend: str) -> Tensor:
        # t0: (B, 6, d) per sample. Samples of equal length: tokens as (B, n, d) and the
        # modulation (B, 1, d) broadcast over them; ragged: (T, d) both (packing.py)
        mod = packed.per_sample_rows(self.scale_shift_table[None] + t0)  # (B, 1, 6, d) | (T, 6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(-2)
        rows = packed.by_sample  # (T, d) -> (B, n, d) | (T, d)
        h = (layer_norm(rows(x)) * (1 + scale_msa) + shift_msa).reshape(x.shape)  # (T, d)
        a = self.attn(h, packed.rope_cos, packed.rope_sin, packed.self_attn, backend)  # (T, d)
        x = (rows(x) + gate_msa * rows(a)).reshape(x.shape)
        x = x + self.cross_attn(x, y, packed.cross_attn, backend)
        h = layer_norm(rows(x)) * (1 + scale_mlp) + shift_mlp
        return (rows(x) + gate_mlp * self.mlp(h)).reshape(x.shape)  # (T, d)


class FinalLayer(nn.Module):
    """Modulated by t_emb (not t0, as released), then a linear map to p*p*out values per token."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        # x: (T0, d) target tokens; t_emb: (T0, d) their sample's timestep embedding
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).unbind(1)  # (T0, d) each
        return self.linear(layer_norm(x) * (1 + scale) + shift)  # (T0, p*p*out)
