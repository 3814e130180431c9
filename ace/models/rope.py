"""3D rotary position embedding over (frame, row, column), as the released ACE computes it.

Shapes: T tokens, H heads, D head dim, c = D // 2 rotation pairs.

The c pairs are ADJACENT channels (2i, 2i+1) read as complex numbers. The first
``c - 2 * (c // 3)`` pairs rotate by the frame index f, the next ``c // 3`` by the
patch row y and the last ``c // 3`` by the patch column x. An axis with n pairs uses
frequencies ``theta ** (-j / n)``, j < n, and angle = position * frequency
(ACE_REFERENCE section 4).

The released code builds a float64 complex table of ``rope_max_len`` positions. We
build the same table once per (head dim, length, device), in float64 on the host, and
keep only its float32 cos and sin; tokens gather their rows by position id. The
rotation itself is real float32 arithmetic, so it runs wherever PyTorch runs (no
complex or float64 kernels on the accelerator).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def axis_pairs(head_dim: int) -> tuple[int, int, int]:
    """Rotation pairs given to the (frame, row, column) axes for a head of ``head_dim``."""
    if head_dim % 2 or head_dim < 6:
        raise ValueError(
            f"RoPE needs an even head dim of at least 6 (a rotation pair per axis), got {head_dim}"
        )
    c = head_dim // 2
    return c - 2 * (c // 3), c // 3, c // 3


def frequencies(head_dim: int, theta: float = 10000.0) -> Tensor:
    """(c,) float64 frequency of each rotation pair, axis by axis."""
    parts = []
    for n in axis_pairs(head_dim):
        j = torch.arange(n, dtype=torch.float64)
        parts.append(theta ** (-j / n))  # n >= 1: axis_pairs needs head_dim >= 6
    return torch.cat(parts)


@functools.lru_cache(maxsize=32)
def _table(
    head_dim: int, max_len: int, theta: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), frequencies(head_dim, theta))
    # angles: (max_len, c), exact in float64 as released; kept as float32 cos / sin
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rope_cos_sin(
    positions: Tensor, head_dim: int, max_len: int, theta: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (T, c), float32, for integer ``positions`` of shape (T, 3) = (f, y, x).

    Every position must be below ``max_len`` (the released table length).
    """
    cos_t, sin_t = _table(head_dim, max_len, float(theta), positions.device)
    nf, ny, _ = axis_pairs(head_dim)
    pos = positions.long()
    f, y, x = pos[:, 0], pos[:, 1], pos[:, 2]

    def gather(tab: Tensor) -> Tensor:
        # each axis reads its own columns of the table at its own position: (T, c)
        return torch.cat([tab[f, :nf], tab[y, nf : nf + ny], tab[x, nf + ny :]], dim=-1)

    return gather(cos_t), gather(sin_t)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs of ``x`` (T, H, D) by per-token angles; float32 inside."""
    xf = x.float().unflatten(-1, (-1, 2))  # (T, H, c, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (T, H, c) each
    cos, sin = cos[:, None], sin[:, None]  # (T, 1, c)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)  # (T, H, c, 2)
    return out.flatten(-2).type_as(x)  # (T, H, D)
