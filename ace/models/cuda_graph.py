"""CUDA-graph replay of the transformer's forward at fixed shapes (sampling).

A denoising run calls the DiT 20 times with the same layout: the same frames, texts and
packing; only the noisy target tokens and the timestep change. At small batch sizes a
step is bound by kernel launches, not arithmetic. A CUDA graph records the forward's
kernels once and replays them with one launch:

    graphed = GraphedForward(model, tokens, text, timesteps, packed, indicators)
    out = graphed(tokens, text, timesteps, indicators)  # same shapes, new values

The inputs are copied into the graph's own buffers before each replay, and the output
is the graph's buffer: it holds the next replay's result after that replay, so read it
(or clone it) before calling again. ``packed`` (positions, RoPE tables, segment layouts)
is captured as is: a graph serves every call whose layout is the same
(``layout_key``), whatever the pixel and text values. The forward must not synchronise
with the host (``ace.testing.host_syncs`` checks the pipeline's steps for that), and the
model's weights must stay where they were at capture: not with model CPU offload.

Shapes: T image tokens, Tt text tokens, B samples, K indicator rows, E text width.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
from torch import Tensor, nn

from ace.packing import PackedBatch


def layout_key(packed: PackedBatch) -> Hashable:
    """What a captured graph depends on besides tensor values: the packed layout."""
    sizes = tuple(tuple(tuple(s) for s in fs) for fs in packed.frame_sizes)
    return sizes, tuple(tuple(ls) for ls in packed.text_lengths), packed.patch_size


class GraphedForward:
    """``model(tokens, text, timesteps, packed, indicators)`` recorded as one CUDA graph."""

    def __init__(
        self,
        model: nn.Module,
        tokens: Tensor,
        text: Tensor,
        timesteps: Tensor,
        packed: PackedBatch,
        indicators: Tensor | None = None,
        warmup: int = 2,
    ) -> None:
        if tokens.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the inputs on a CUDA device, got {tokens.device}")
        if warmup < 1:  # the warm-up builds what the forward caches; a capture cannot
            raise ValueError(f"warmup must be >= 1, got {warmup}")
        self.packed = packed  # kept alive: the graph reads its tensors' memory on every replay
        # the graph's own input buffers: (T, (C+1)*p*p), (Tt, E), (B,), (K, E)
        self.tokens, self.text, self.timesteps = tokens.clone(), text.clone(), timesteps.clone()
        self.indicators = None if indicators is None else indicators.clone()
        args = (self.tokens, self.text, self.timesteps, packed, self.indicators)
        with torch.no_grad(), torch.cuda.device(tokens.device):
            # warm up on a side stream, as torch's docs ask: lazy initialisation, autotuning,
            # and the layout's cached one-hot tables are all made before capture
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    model(*args)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = model(*args)  # (T0, p*p*C), the graph's output buffer

    def __call__(
        self, tokens: Tensor, text: Tensor, timesteps: Tensor, indicators: Tensor | None = None
    ) -> Tensor:
        """Copy the inputs in, replay, return the output buffer (T0, p*p*C)."""
        for name, new, old in (
            ("tokens", tokens, self.tokens),
            ("text", text, self.text),
            ("timesteps", timesteps, self.timesteps),
        ):
            if new.shape != old.shape:
                raise ValueError(
                    f"{name} shape {tuple(new.shape)} differs from the captured {tuple(old.shape)}"
                )
            if new.dtype != old.dtype:  # copy_ would cast: float timesteps cut to integers
                raise ValueError(f"{name} dtype {new.dtype} differs from the captured {old.dtype}")
            old.copy_(new)
        if (indicators is None) != (self.indicators is None):
            raise ValueError("indicators must be given exactly when they were at capture")
        if indicators is not None:
            if indicators.shape != self.indicators.shape:  # copy_ would broadcast a (1, E)
                raise ValueError(
                    f"indicators shape {tuple(indicators.shape)} differs from the captured "
                    f"{tuple(self.indicators.shape)}"
                )
            self.indicators.copy_(indicators)
        self.graph.replay()
        return self.out


class GraphCache:
    """At most ``max_size`` recorded graphs by key; a full cache drops the least recently
    used one (each graph holds its own GPU memory pool)."""

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self._graphs: dict[Hashable, Callable] = {}  # least recently used first

    def __len__(self) -> int:
        return len(self._graphs)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._graphs

    def get(self, key: Hashable, record: Callable[[], Callable]) -> Callable:
        """The graph for ``key``, recorded by ``record()`` on first use."""
        if key in self._graphs:
            self._graphs[key] = self._graphs.pop(key)  # now the most recently used
        else:
            while len(self._graphs) >= self.max_size:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = record()
        return self._graphs[key]
