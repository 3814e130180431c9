"""PackedBatch: a batch of LCU frames as one token stream, built once, reused every step.

Shapes: B samples; NF frames in the batch (all samples); per frame a latent grid
(h, w) and, after patching, (h/p, w/p) tokens; T image tokens in the batch (n = T / B a
sample when all samples have as many); Tt text tokens; T0 tokens of the target frames;
C latent channels; p patch size; E text dim.

The model never loops over samples. Everything that depends only on the *shapes* of
a batch lives here and is computed once: the (frame, y, x) positions and their RoPE
cos/sin, the segment layouts of self- and cross-attention, which sample and which
indicator row each token belongs to, where the target tokens sit. Sampling calls the
model 20-100 times with the same layout; training builds one per batch.

Stream order: samples in order; inside a sample its frames in order (frame 0 = the
target); inside a frame its patch tokens row-major. Texts follow the same frame order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import Tensor

from ace.models.attention import SegmentLayout
from ace.models.rope import rope_cos_sin


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(C', h, w) -> (h/p * w/p, C'*p*p): p x p patches, row-major, each flattened as
    (channel, row in patch, column in patch) to match a p x p stride-p convolution."""
    return rearrange(x, "c (gh p) (gw q) -> (gh gw) (c p q)", p=patch_size, q=patch_size)


@dataclass
class PackedBatch:
    """The shape-dependent structure of one batch. Build with ``PackedBatch.build``."""

    frame_sizes: list[list[tuple[int, int]]]  # latent (h, w) per frame, per sample
    text_lengths: list[list[int]]  # text tokens per frame, per sample
    patch_size: int
    positions: Tensor  # (T, 3) int32 (frame, y, x)
    rope_cos: Tensor  # (T, D/2) float32
    rope_sin: Tensor  # (T, D/2) float32
    token_sample: Tensor  # (T,) long: sample of each image token
    token_indicator: Tensor  # (T,) long: indicator row of each image token
    text_indicator: Tensor  # (Tt,) long: indicator row of each text token
    target_index: Tensor  # (T0,) long: stream index of each target-frame token
    target_sample: Tensor  # (T0,) long: sample of each target-frame token
    self_attn: SegmentLayout  # one segment per sample
    cross_attn: SegmentLayout  # one segment per frame: its tokens read its own text
    _onehot: dict = field(default_factory=dict, repr=False)  # cached one-hot maps for _expand

    # ----------------------------------------------------------------------------------
    # per-sample / per-frame values to per-token rows, with a deterministic backward

    def per_token(self, v: Tensor) -> Tensor:
        """(B, ...) per-sample values -> (T, ...) one row per image token."""
        return self._expand(v, self.token_sample, self.self_attn.q_lens, "token")

    def by_sample(self, x: Tensor) -> Tensor:
        """(T, ...) token rows -> (B, n, ...) (a view) when every sample has n tokens, else
        ``x`` itself: what ``per_sample_rows`` values broadcast against."""
        lens = self.self_attn.q_lens
        if len(set(lens)) == 1:
            return x.unflatten(0, (len(lens), lens[0]))
        return x

    def per_sample_rows(self, v: Tensor) -> Tensor:
        """(B, ...) per-sample values -> (B, 1, ...) when every sample has the same number of
        tokens (they broadcast over ``by_sample``'s (B, n, ...), and nothing of size T is
        made: in training, T rows of each modulation would be kept for backward), else
        ``per_token``'s (T, ...)."""
        if len(set(self.self_attn.q_lens)) == 1:
            return v[:, None]
        return self.per_token(v)

    def per_target(self, v: Tensor) -> Tensor:
        """(B, ...) per-sample values -> (T0, ...) one row per target token."""
        lens = [
            (s[0][0] // self.patch_size) * (s[0][1] // self.patch_size) for s in self.frame_sizes
        ]
        return self._expand(v, self.target_sample, lens, "target")

    def indicator_rows(self, table: Tensor) -> tuple[Tensor, Tensor]:
        """(K, d) indicator rows -> (T, d) per image token and (Tt, d) per text token."""
        return (
            self._expand(table, self.token_indicator, None, "token_indicator"),
            self._expand(table, self.text_indicator, None, "text_indicator"),
        )

    def _expand(self, v: Tensor, index: Tensor, lens: list[int] | None, key: str) -> Tensor:
        # Plain indexing v[index] would be right, but its backward scatter-adds many rows
        # into few and is not bitwise reproducible across runs on CPU; a one-hot matmul
        # (or a broadcast, when every segment has the same length) is.
        if lens is not None and len(set(lens)) == 1:
            n = lens[0]
            return v[:, None].expand(v.shape[0], n, *v.shape[1:]).flatten(0, 1)  # (B*n, ...)
        cache_key = (key, v.dtype, v.device)
        if cache_key not in self._onehot:
            # a comparison, not F.one_hot: one_hot checks its range with a host sync
            index = index.to(v.device)
            rows = torch.arange(v.shape[0], device=v.device)
            self._onehot[cache_key] = (index[:, None] == rows[None, :]).to(v.dtype)
        onehot = self._onehot[cache_key]  # (rows, B or K)
        return (onehot @ v.flatten(1)).unflatten(1, v.shape[1:])

    @property
    def num_samples(self) -> int:
        return len(self.frame_sizes)

    @property
    def num_tokens(self) -> int:
        return self.self_attn.num_q

    @property
    def num_text_tokens(self) -> int:
        return self.cross_attn.num_k

    @classmethod
    def build(
        cls,
        frame_sizes: list[list[tuple[int, int]]],
        text_lengths: list[list[int]],
        *,
        patch_size: int,
        head_dim: int,
        rope_max_len: int,
        num_indicators: int,
        device: torch.device | str = "cpu",
    ) -> PackedBatch:
        """Build the layout from latent sizes and text lengths (python ints only, no data).

        Raises ValueError for: no samples, a sample without frames, a texts/frames count
        mismatch, more frames than indicator rows, a latent side not divisible by the
        patch size, a frame grid of more tokens than ``rope_max_len``, an empty text.
        """
        device = torch.device(device)
        if not frame_sizes:
            raise ValueError("a batch needs at least one sample")
        if len(text_lengths) != len(frame_sizes):
            raise ValueError(
                f"got texts for {len(text_lengths)} samples but frames for {len(frame_sizes)}"
            )
        p = patch_size
        pos, tok_sample, tok_frame, frame_row, txt_frame, target = [], [], [], [], [], []
        q_self, q_cross, k_cross = [], [], []
        start, nf = 0, 0
        for b, (sizes, lengths) in enumerate(zip(frame_sizes, text_lengths)):
            F = len(sizes)
            if F == 0:
                raise ValueError(f"sample {b} has no frames; frame 0 must be the target")
            if len(lengths) != F:
                raise ValueError(
                    f"sample {b}: {len(lengths)} texts for {F} frames; ACE pairs one text with each frame"
                )
            if num_indicators < F:
                raise ValueError(
                    f"sample {b} has {F} frames but the model has {num_indicators} indicator rows "
                    f"(at most {num_indicators - 1} input images)"
                )
            if rope_max_len < F:
                raise ValueError(
                    f"sample {b} has {F} frames, more than rope_max_len={rope_max_len}"
                )
            n_sample = 0
            for f, ((h, w), n_text) in enumerate(zip(sizes, lengths)):
                if h <= 0 or w <= 0:
                    raise ValueError(f"sample {b} frame {f}: latent size {h}x{w} is empty")
                if h % p or w % p:
                    raise ValueError(
                        f"sample {b} frame {f}: latent size {h}x{w} is not divisible by patch size {p}"
                    )
                gh, gw = h // p, w // p
                if gh * gw > rope_max_len:
                    raise ValueError(
                        f"sample {b} frame {f}: a {gh}x{gw} token grid ({gh * gw} tokens) is larger than "
                        f"rope_max_len={rope_max_len}; resize the image"
                    )
                if n_text < 1:
                    raise ValueError(f"sample {b} frame {f}: its text has no tokens")
                n = gh * gw
                ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
                pos.append(
                    torch.stack([torch.full((n,), f), ys.flatten(), xs.flatten()], dim=1)
                )  # (n, 3)
                tok_sample.append(torch.full((n,), b))
                tok_frame.append(torch.full((n,), nf))
                txt_frame.append(torch.full((n_text,), nf))
                # indicator row: condition frame k -> k - 1, the target -> F - 1 (the next free name)
                frame_row.append(F - 1 if f == 0 else f - 1)
                if f == 0:
                    target.append(torch.arange(start, start + n))
                q_cross.append(n)
                k_cross.append(n_text)
                start, nf, n_sample = start + n, nf + 1, n_sample + n
            q_self.append(n_sample)

        positions = torch.cat(pos).to(torch.int32)
        rows = torch.tensor(frame_row)
        token_sample = torch.cat(tok_sample)
        target_index = torch.cat(target)
        cos, sin = rope_cos_sin(positions.to(device), head_dim, rope_max_len)
        return cls(
            frame_sizes=[[tuple(s) for s in sizes] for sizes in frame_sizes],
            text_lengths=[list(lengths) for lengths in text_lengths],
            patch_size=p,
            positions=positions.to(device),
            rope_cos=cos,
            rope_sin=sin,
            token_sample=token_sample.to(device),
            token_indicator=rows[torch.cat(tok_frame)].to(device),
            text_indicator=rows[torch.cat(txt_frame)].to(device),
            target_index=target_index.to(device),
            target_sample=token_sample[target_index].to(device),
            self_attn=SegmentLayout.build(q_self, q_self, device),
            cross_attn=SegmentLayout.build(q_cross, k_cross, device),
        )

    # ----------------------------------------------------------------------------------
    # data in and out of the stream

    def pack_frames(
        self, frames: list[list[Tensor]], masks: list[list[Tensor | None]] | None = None
    ) -> Tensor:
        """Per-sample frame latents (C, h, w) and masks (1, h, w) or None -> patches (T, (C+1)*p*p).

        Each frame gets its mask as an extra channel (None = all ones), then is cut into
        p x p patches, row-major, each flattened as (channel, row in patch, column in patch)
        to match a p x p stride-p convolution.
        """
        p, out = self.patch_size, []
        if len(frames) != self.num_samples:
            raise ValueError(
                f"got frames for {len(frames)} samples, the layout has {self.num_samples}"
            )
        if masks is not None and len(masks) != len(frames):
            raise ValueError(f"got masks for {len(masks)} samples, the layout has {len(frames)}")
        masks = masks if masks is not None else [[None] * len(fs) for fs in frames]
        for b, (fs, ms, sizes) in enumerate(zip(frames, masks, self.frame_sizes)):
            if len(fs) != len(sizes) or len(ms) != len(fs):
                raise ValueError(
                    f"sample {b}: {len(fs)} frames and {len(ms)} masks, the layout has {len(sizes)} frames"
                )
            for f, (x, m, (h, w)) in enumerate(zip(fs, ms, sizes)):
                if x.ndim != 3 or tuple(x.shape[1:]) != (h, w):
                    raise ValueError(
                        f"sample {b} frame {f}: latent shape {tuple(x.shape)}, expected (C, {h}, {w})"
                    )
                if m is None:
                    m = x.new_ones(1, h, w)
                elif tuple(m.shape) != (1, h, w):
                    raise ValueError(
                        f"sample {b} frame {f}: mask shape {tuple(m.shape)}, expected (1, {h}, {w}) "
                        "at latent resolution"
                    )
                x = torch.cat([x, m.to(x.dtype)], dim=0)  # (C+1, h, w)
                out.append(patchify(x, p))
        channels = {x.shape[-1] for x in out}
        if len(channels) != 1:
            raise ValueError("all frames of a batch need the same number of latent channels")
        return torch.cat(out)  # (T, (C+1)*p*p)

    def pack_texts(self, texts: list[list[Tensor]]) -> Tensor:
        """Per-sample, per-frame text embeddings (L, E) -> one stream (Tt, E)."""
        if len(texts) != self.num_samples:
            raise ValueError(
                f"got texts for {len(texts)} samples, the layout has {self.num_samples}"
            )
        flat = []
        for b, (ts, lengths) in enumerate(zip(texts, self.text_lengths)):
            if len(ts) != len(lengths):
                raise ValueError(f"sample {b}: {len(ts)} texts for {len(lengths)} frames")
            for f, (t, n) in enumerate(zip(ts, lengths)):
                if t.ndim != 2 or t.shape[0] != n:
                    raise ValueError(
                        f"sample {b} text {f}: shape {tuple(t.shape)}, expected ({n}, text_dim)"
                    )
                flat.append(t)
        return torch.cat(flat)  # (Tt, E)

    def unpack_target(self, tokens: Tensor) -> list[Tensor]:
        """Target-frame outputs (T0, p*p*C), each ordered (row in patch, col in patch, channel)
        -> per sample a latent (C, h, w)."""
        p, out, start = self.patch_size, [], 0
        for sizes in self.frame_sizes:
            h, w = sizes[0]
            n = (h // p) * (w // p)
            out.append(
                rearrange(
                    tokens[start : start + n],
                    "(gh gw) (p q c) -> c (gh p) (gw q)",
                    gh=h // p,
                    p=p,
                    q=p,
                )
            )
            start += n
        return out
