"""Slow, obvious, per-sample reference implementation of the released ACE DiT.

This is the test oracle and the speed baseline for the fast model, written only from
ACE_REFERENCE.md (sections 2-5), quirks included. Clarity over speed: Python loops over
samples and frames, attention written out by hand, RoPE as a float64 complex multiply.
Parameters use the released "split" checkpoint names, so a released state dict loads
with ``load_state_dict(strict=True)``.

Shape letters: B samples; F frames of a sample; C latent channels; h, w latent size;
p patch size; gh, gw patch grid (h/p, w/p); N tokens of a sample (all its frames);
L text length; d hidden size; H heads; D = d/H head dim; P = D/2 rotation pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf
from einops import rearrange
from torch import Tensor, nn

EPS = 1e-6


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm over the last dim, no affine, eps 1e-6, computed in >= float32."""
    return nnf.layer_norm(_at_least_fp32(x), x.shape[-1:], eps=EPS).to(x.dtype)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) in >= float32, cast back to x's dtype, then times weight."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = _at_least_fp32(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + EPS)
        return y.to(x.dtype) * self.weight


def timestep_features(t: Tensor, dim: int = 256) -> Tensor:
    """(B,) -> (B, dim) float32: [cos(t w_i) for i < dim/2, sin(t w_i) ...], w_i = 10000^(-i/(dim/2)).

    float32, as the released code computes it (its weights saw these rounding errors).
    """
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000.0) * i / half)  # (dim/2,)
    args = t.float()[:, None] * freqs[None, :]  # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim), cos first


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Number of rotation pairs for the (frame, y, x) axes: c - 2(c//3), c//3, c//3."""
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def rope_axis_table(max_len: int, n_pairs: int, device=None) -> Tensor:
    """(max_len, n_pairs) complex128: exp(i * pos * 10000^(-2j / (2 n_pairs)))."""
    j2 = torch.arange(0, 2 * n_pairs, 2, dtype=torch.float64, device=device)  # (n,)
    freqs = 1.0 / torch.pow(10000.0, j2 / (2 * n_pairs))  # (n,)
    pos = torch.arange(max_len, dtype=torch.float64, device=device)  # (max_len,)
    angles = torch.outer(pos, freqs)  # (max_len, n)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope(x: Tensor, pos: Tensor, max_len: int) -> Tensor:
    """Rotate adjacent channel pairs of x (N, H, D) by the 3D positions pos (N, 3) = (f, y, x)."""
    n, heads, dim = x.shape
    tables = [rope_axis_table(max_len, k, x.device) for k in rope_split(dim)]
    rot = torch.cat([tab[pos[:, axis]] for axis, tab in enumerate(tables)], dim=-1)  # (N, P)
    xc = torch.view_as_complex(x.to(torch.float64).reshape(n, heads, dim // 2, 2))  # (N, H, P)
    out = torch.view_as_real(xc * rot[:, None, :]).reshape(n, heads, dim)  # (N, H, D)
    return out.to(x.dtype)


def unpatchify(tokens: Tensor, gh: int, gw: int, p: int) -> Tensor:
    """(gh*gw, p*p*c) tokens, vector ordered (row in patch, col in patch, channel) -> (c, gh*p, gw*p)."""
    return rearrange(tokens, "(gh gw) (r s c) -> c (gh r) (gw s)", gh=gh, gw=gw, r=p, s=p)


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(nnf.gelu(self.fc1(x), approximate="tanh"))


class Attention(nn.Module):
    """Multi-head attention, q from x, k/v from context; optional RoPE (self-attention only)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool):
        super().__init__()
        self.num_heads, self.qk_norm = num_heads, qk_norm
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        if qk_norm:
            self.norm_q, self.norm_k = RMSNorm(dim), RMSNorm(dim)

    def forward(self, x: Tensor, context: Tensor, pos: Tensor | None = None, max_len: int = 0):
        q, k, v = self.q(x), self.k(context), self.v(context)  # (N, d), (M, d), (M, d)
        if self.qk_norm:  # quirk: BOTH q and k use norm_q; norm_k is never used
            q, k = self.norm_q(q), self.norm_q(k)
        (n, dim), m, heads = q.shape, k.shape[0], self.num_heads
        q = q.reshape(n, heads, dim // heads)  # (N, H, D)
        k = k.reshape(m, heads, dim // heads)  # (M, H, D)
        v = v.reshape(m, heads, dim // heads)  # (M, H, D)
        if pos is not None:
            q, k = apply_rope(q, pos, max_len), apply_rope(k, pos, max_len)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, N|M, D)
        scores = q @ k.transpose(1, 2) / math.sqrt(dim // heads)  # (H, N, M)
        out = scores.softmax(dim=-1) @ v  # (H, N, D)
        return self.o(out.transpose(0, 1).reshape(n, dim))  # (N, d)


class Block(nn.Module):
    """PixArt adaLN-single block: modulated self-attn, plain per-frame cross-attn, modulated MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))
        self.attn = Attention(dim, num_heads, qk_norm)
        self.cross_attn = Attention(dim, num_heads, qk_norm)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim)

    def forward(self, x, t0, pos, max_len, frame_lens, contexts):
        mod = self.scale_shift_table + t0.reshape(6, -1)  # (6, d)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.unbind(0)
        h = layer_norm(x) * (1 + scale_msa) + shift_msa  # (N, d)
        x = x + gate_msa * self.attn(h, h, pos, max_len)
        pieces, start = [], 0
        for n_k, ctx in zip(frame_lens, contexts):  # each frame attends only to its own text
            x_k = x[start : start + n_k]  # (n_k, d)
            pieces.append(x_k + self.cross_attn(x_k, ctx))
            start += n_k
        x = torch.cat(pieces, dim=0)  # (N, d)
        h = layer_norm(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.mlp(h)


class ReferenceDiT(nn.Module):
    """The released ACE DiT, one sample and one frame at a time."""

    def __init__(
        self,
        in_channels=4,
        patch_size=2,
        hidden_size=1152,
        depth=28,
        num_heads=16,
        mlp_ratio=4.0,
        text_dim=4096,
        rope_max_len=1024,
        qk_norm=True,
        pred_sigma=True,
        num_indicators=10,
        share_qk_norm=True,  # the released model's only way: k uses norm_q (norm_k is stored)
    ):
        super().__init__()
        if not share_qk_norm:
            raise ValueError("ReferenceDiT is the released model: k always uses norm_q")
        d, p = hidden_size, patch_size
        if d % num_heads or (d // num_heads) % 2:
            raise ValueError(f"hidden_size {d} must split into {num_heads} heads of even size")
        self.in_channels, self.patch_size, self.hidden_size = in_channels, p, d
        self.text_dim, self.rope_max_len = text_dim, rope_max_len
        self.num_indicators = num_indicators  # documents the released table size (10)
        self.out_channels = 2 * in_channels if pred_sigma else in_channels
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels + 1, d, p, stride=p)  # +1: mask channel
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = Mlp(text_dim, d, d)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(d, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = nn.Module()
        self.final_layer.scale_shift_table = nn.Parameter(torch.zeros(2, d))
        self.final_layer.linear = nn.Linear(d, p * p * self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Small random values everywhere (no zeros): this model exists to be compared against."""
        for name, param in self.named_parameters():
            if ".norm_" in name:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            elif name.endswith("scale_shift_table"):
                param.copy_(torch.randn_like(param) / math.sqrt(self.hidden_size))
            else:
                param.copy_(0.02 * torch.randn_like(param))

    def _check_inputs(self, frames, masks, texts, timesteps, indicators) -> None:
        batch = (len(frames), len(masks), len(texts), timesteps.numel())
        _require(
            len(set(batch)) == 1, f"#frame lists, #mask lists, #text lists, #t differ: {batch}"
        )
        if indicators is not None:
            shape = tuple(indicators.shape)
            _require(len(shape) == 2 and shape[1] == self.text_dim, f"indicators: got {shape}")
        c, p, td = self.in_channels, self.patch_size, self.text_dim
        for b, (fr, ms, tx) in enumerate(zip(frames, masks, texts)):
            counts = f"sample {b}: {len(fr)} frames, {len(ms)} masks, {len(tx)} texts"
            _require(len(fr) >= 1 and len(ms) == len(tx) == len(fr), counts + ", need equal >= 1")
            if indicators is not None:
                _require(len(fr) <= len(indicators), counts + f", {len(indicators)} indicator rows")
            for k, (f, m, t) in enumerate(zip(fr, ms, tx)):
                at, fs = f"sample {b} frame {k}", tuple(f.shape)
                ok = len(fs) == 3 and fs[0] == c and fs[1] % p == 0 and fs[2] % p == 0
                _require(ok, f"{at}: frame {fs} must be ({c}, h, w), h and w multiples of {p}")
                ok = m is None or tuple(m.shape) == (1, *fs[1:])
                _require(
                    ok, f"{at}: mask {getattr(m, 'shape', None)} must be (1, {fs[1]}, {fs[2]})"
                )
                ok = t.ndim == 2 and t.shape[0] >= 1 and t.shape[1] == td
                _require(ok, f"{at}: text {tuple(t.shape)} must be (L >= 1, {td})")

    def forward(
        self, frames, masks, texts, timesteps: Tensor, indicators: Tensor | None = None
    ) -> list[Tensor]:
        """Per sample, the (C, h0, w0) prediction for its target frame (frame 0)."""
        self._check_inputs(frames, masks, texts, timesteps, indicators)
        dtype = self.x_embedder.proj.weight.dtype
        t_emb = self.t_embedder.mlp(timestep_features(timesteps.reshape(-1)).to(dtype))  # (B, d)
        t0 = self.t_block(t_emb)  # (B, 6d)
        ind = None if indicators is None else self.y_embedder(indicators.to(dtype))  # (rows, d)
        return [
            self._forward_sample(frames[b], masks[b], texts[b], t_emb[b], t0[b], ind)
            for b in range(len(frames))
        ]

    def _forward_sample(self, frames, masks, texts, t_emb, t0, ind) -> Tensor:
        dtype, p, n_frames = self.x_embedder.proj.weight.dtype, self.patch_size, len(frames)
        tokens, positions, contexts = [], [], []
        for k, (frame, mask, text) in enumerate(zip(frames, masks, texts)):
            frame = frame.to(dtype)
            mask = torch.ones_like(frame[:1]) if mask is None else mask.to(dtype)  # (1, h, w)
            z = torch.cat([frame, mask], dim=0)  # (C+1, h, w)
            z = self.x_embedder.proj(z[None])[0]  # (d, gh, gw)
            gh, gw = z.shape[1:]
            tok = z.flatten(1).transpose(0, 1)  # (gh*gw, d), row-major
            ctx = self.y_embedder(text.to(dtype))  # (L, d)
            if ind is not None:  # condition frame k >= 1 -> row k-1, target -> row F-1
                row = ind[k - 1] if k >= 1 else ind[n_frames - 1]  # (d,)
                tok, ctx = tok + row, ctx + row
            ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")  # (gh, gw)
            pos = torch.stack([torch.full_like(ys, k), ys, xs], dim=-1).reshape(-1, 3)  # (gh*gw, 3)
            tokens.append(tok)
            positions.append(pos.to(frame.device))
            contexts.append(ctx)
        pos = torch.cat(positions, dim=0)  # (N, 3)
        if int(pos.max()) >= self.rope_max_len:
            raise ValueError(
                f"position {int(pos.max())} exceeds the RoPE table ({self.rope_max_len})"
            )
        x = torch.cat(tokens, dim=0)  # (N, d)
        frame_lens = [t.shape[0] for t in tokens]
        for block in self.blocks:
            x = block(x, t0, pos, self.rope_max_len, frame_lens, contexts)
        x = x[: frame_lens[0]]  # (gh0*gw0, d): target tokens only
        shift, scale = (self.final_layer.scale_shift_table + t_emb[None]).unbind(0)  # quirk: t_emb
        out = self.final_layer.linear(layer_norm(x) * (1 + scale) + shift)  # (gh0*gw0, p*p*out)
        out = unpatchify(out, frames[0].shape[1] // p, frames[0].shape[2] // p, p)  # (out, h0, w0)
        return out[: self.in_channels]  # (C, h0, w0): learned-sigma half dropped
