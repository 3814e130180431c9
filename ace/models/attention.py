"""Segment attention over packed token streams, with interchangeable backends.

Shapes: Tq query tokens, Tk key tokens, H heads, D head dim, S segments.

A ``SegmentLayout`` says which queries read which keys: the queries of segment i,
``q[cu_q[i]:cu_q[i+1]]``, attend to the keys ``k[cu_k[i]:cu_k[i+1]]`` and to nothing
else. ACE uses two layouts per batch (built once in ``ace.packing``):

- self-attention: one segment per sample, queries = keys = all image tokens of
  that sample (every frame);
- cross-attention: one segment per frame, queries = the frame's image tokens, keys =
  the tokens of the text paired with that frame (its condition unit).

Backends, all computing softmax(q k^T / sqrt(D)) v inside each segment:

- ``sdpa``: portable default. Segments with the same query length form a group that
  runs as ONE batched ``scaled_dot_product_attention`` call; keys of unequal length
  inside a group are padded and masked out. A layout whose segments are all equal and
  contiguous (fixed-size training batches, the CFG pair) runs as a plain view, with
  no gather or scatter.
- ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention-2 on CUDA,
  PyTorch >= 2.10), ragged batches without padding.
- ``flex``: FlexAttention with a document mask (compile it for speed).
- ``dense``: one call with a dense block-diagonal boolean mask: the test oracle.

``backend="auto"`` picks by device and dtype (``select_backend``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "sdpa", "varlen", "flex", "dense")


@dataclass
class SegmentGroup:
    """Segments of one query length ``lq``, batched into one SDPA call of ``n`` rows."""

    n: int
    lq: int
    lk: int  # keys per row after padding (the longest key segment of the group)
    q_start: int  # used when q_index is None: the group's queries are q[q_start : q_start + n*lq]
    q_index: Tensor | None  # (n*lq,) long, or None when contiguous
    k_start: int
    k_index: Tensor | None  # (n*lk,) long, or None when contiguous
    k_mask: Tensor | None  # (n, 1, 1, lk) bool, True = real key; None when nothing is padded


@dataclass
class SegmentLayout:
    """Which queries attend to which keys. Built once per batch, reused every step."""

    q_lens: list[int]
    k_lens: list[int]
    cu_q: Tensor  # (S+1,) int32 query offsets
    cu_k: Tensor  # (S+1,) int32 key offsets
    q_segment: Tensor  # (Tq,) int32 segment id per query token
    k_segment: Tensor  # (Tk,) int32 segment id per key token
    groups: list[SegmentGroup]
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def max_q(self) -> int:
        return max(self.q_lens)

    @property
    def max_k(self) -> int:
        return max(self.k_lens)

    @property
    def num_q(self) -> int:
        return sum(self.q_lens)

    @property
    def num_k(self) -> int:
        return sum(self.k_lens)

    @classmethod
    def build(
        cls, q_lens: list[int], k_lens: list[int], device: torch.device | str
    ) -> SegmentLayout:
        """Layout for segments of ``q_lens`` queries reading ``k_lens`` keys (python ints)."""
        if len(q_lens) != len(k_lens) or not q_lens:
            raise ValueError(
                f"need one key length per query segment, got {len(q_lens)} and {len(k_lens)}"
            )
        if min(q_lens) < 1 or min(k_lens) < 1:
            raise ValueError(
                f"every segment needs at least one query and one key, got {q_lens}, {k_lens}"
            )
        q_lens, k_lens = [int(n) for n in q_lens], [int(n) for n in k_lens]
        q_off = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
        k_off = [0, *torch.tensor(k_lens).cumsum(0).tolist()]
        seg = torch.arange(len(q_lens), dtype=torch.int32)
        groups = []
        for lq in sorted(set(q_lens)):
            members = [i for i, n in enumerate(q_lens) if n == lq]
            groups.append(_group(members, lq, q_off, k_lens, k_off, device))
        return cls(
            q_lens=q_lens,
            k_lens=k_lens,
            cu_q=torch.tensor(q_off, dtype=torch.int32, device=device),
            cu_k=torch.tensor(k_off, dtype=torch.int32, device=device),
            q_segment=seg.repeat_interleave(torch.tensor(q_lens)).to(device),
            k_segment=seg.repeat_interleave(torch.tensor(k_lens)).to(device),
            groups=groups,
        )


def _group(members, lq, q_off, k_lens, k_off, device) -> SegmentGroup:
    n, lk = len(members), max(k_lens[i] for i in members)
    consecutive = members == list(range(members[0], members[0] + n))
    q_index = None
    if not consecutive:
        q_index = torch.cat([torch.arange(q_off[i], q_off[i] + lq) for i in members]).to(device)
    ragged_k = any(k_lens[i] != lk for i in members)
    k_index = k_mask = None
    if ragged_k or not consecutive:
        # pad each key segment to lk by repeating its first key; the mask hides the padding
        rows = [torch.arange(lk).clamp(max=k_lens[i] - 1) + k_off[i] for i in members]
        k_index = torch.cat(rows).to(device)  # (n*lk,)
    if ragged_k:
        k_mask = torch.stack([torch.arange(lk) < k_lens[i] for i in members])  # (n, lk)
        k_mask = k_mask[:, None, None, :].to(device)  # (n, 1, 1, lk)
    return SegmentGroup(n, lq, lk, q_off[members[0]], q_index, k_off[members[0]], k_index, k_mask)


def _rows(x: Tensor, start: int, index: Tensor | None, n: int, length: int) -> Tensor:
    """Gather n rows of `length` tokens: (n*length, H, D) -> (n, H, length, D)."""
    x = x[start : start + n * length] if index is None else x.index_select(0, index)
    return x.unflatten(0, (n, length)).transpose(1, 2)  # (n, H, length, D)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout) -> Tensor:
    """Grouped ``scaled_dot_product_attention``: one call per distinct query length."""
    single = len(layout.groups) == 1 and layout.groups[0].q_index is None
    out = None
    for g in layout.groups:
        qg = _rows(q, g.q_start, g.q_index, g.n, g.lq)  # (n, H, lq, D)
        kg = _rows(k, g.k_start, g.k_index, g.n, g.lk)  # (n, H, lk, D)
        vg = _rows(v, g.k_start, g.k_index, g.n, g.lk)
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.k_mask)  # (n, H, lq, D)
        og = og.transpose(1, 2).flatten(0, 1)  # (n*lq, H, D)
        if single:
            return og
        if out is None:  # SDPA's dtype, which autocast may make other than q's
            out = q.new_empty(q.shape, dtype=og.dtype)  # (Tq, H, D)
        if g.q_index is None:
            out[g.q_start : g.q_start + g.n * g.lq] = og
        else:
            out.index_copy_(0, g.q_index, og)
    return out


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout) -> Tensor:
    """FlashAttention-2 varlen kernel (CUDA, fp16/bf16, PyTorch >= 2.10)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(q, k, v, layout.cu_q, layout.cu_k, layout.max_q, layout.max_k)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout) -> Tensor:
    """FlexAttention with a document mask; the block mask is built once per layout."""
    from torch.nn.attention.flex_attention import create_block_mask
    from torch.nn.attention.flex_attention import flex_attention as flex

    key = ("flex_block_mask", str(q.device))
    if key not in layout._cache:
        qs, ks = layout.q_segment.to(q.device), layout.k_segment.to(q.device)

        def same_segment(b, h, qi, ki):
            return qs[qi] == ks[ki]

        layout._cache[key] = create_block_mask(
            same_segment, None, None, layout.num_q, layout.num_k, device=q.device
        )
    out = flex(  # contiguous: compiled on CPU, Inductor failed to lower these views
        q.transpose(0, 1)[None].contiguous(),  # (1, H, Tq, D)
        k.transpose(0, 1)[None].contiguous(),
        v.transpose(0, 1)[None].contiguous(),
        block_mask=layout._cache[key],
    )
    return out[0].transpose(0, 1)  # (Tq, H, D)


def dense_attention(q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout) -> Tensor:
    """Oracle: one attention call over all tokens with a dense block-diagonal mask."""
    mask = layout.q_segment[:, None] == layout.k_segment[None, :]  # (Tq, Tk)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask.to(q.device)
    )  # (H, Tq, D)
    return out.transpose(0, 1)


def varlen_available(device: torch.device, dtype: torch.dtype, head_dim: int | None = None) -> bool:
    """True where ``varlen_attn`` can run: a CUDA GPU of compute capability 8.0 or newer
    (FlashAttention-2 refuses a T4 or V100), fp16/bf16, PyTorch >= 2.10, and head
    dimensions that are multiples of 8 up to 256 (when ``head_dim`` is given:
    ``mha_varlen_fwd`` checks ``head_size % 8 == 0`` and ``varlen_attn`` does not pad; the
    tiny preset's 12 would raise)."""
    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return False
    if head_dim is not None and (head_dim > 256 or head_dim % 8):
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    # under torch.compile both become constants when traced (is_available is folded, the
    # capability's ints are baked in): no graph break, to be confirmed on a GPU
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def select_backend(
    layout: SegmentLayout, device: torch.device, dtype: torch.dtype, head_dim: int | None = None
) -> str:
    """The automatic choice: ``varlen`` for ragged layouts on CUDA half precision, else ``sdpa``.

    A layout of one group of equal segments is a single batched SDPA call, which is the
    fastest path on long segments; ragged layouts (mixed resolutions, texts of different
    lengths) avoid padding with varlen where it exists.
    """
    uniform = len(layout.groups) == 1 and layout.groups[0].k_mask is None
    if not uniform and varlen_available(device, dtype, head_dim):
        return "varlen"
    return "sdpa"


_IMPLS = {
    "sdpa": sdpa_attention,
    "varlen": varlen_attention,
    "flex": flex_attention,
    "dense": dense_attention,
}


def segment_attention(
    q: Tensor, k: Tensor, v: Tensor, layout: SegmentLayout, backend: str = "auto"
) -> Tensor:
    """Attention inside segments: q (Tq, H, D), k and v (Tk, H, D) -> (Tq, H, D)."""
    if backend == "auto":
        backend = select_backend(layout, q.device, q.dtype, q.shape[-1])
    if backend not in _IMPLS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "varlen" and not varlen_available(q.device, q.dtype, q.shape[-1]):
        raise ValueError(
            f"attention backend 'varlen' needs a CUDA GPU of compute capability >= 8.0, "
            f"fp16/bf16, a head dim that is a multiple of 8 up to 256 and PyTorch >= 2.10; "
            f"got device {q.device}, "
            f"dtype {q.dtype}, head dim {q.shape[-1]}"
        )
    return _IMPLS[backend](q, k, v, layout)
