"""Token-budget batching: batches filled up to a number of DiT image tokens, with no padding.

An LCU costs the image tokens of all its frames, the target and every input image, at
the released resolution (ACE_REFERENCE section 2): centre crop to aspect ratio <= 4,
then ``ace.conditioning.target_size`` (multiples of 16 px, at most ``max_seq_len``
tokens, never enlarged); a frame of H' x W' pixels is (H'/16)(W'/16) tokens (VAE
factor 8, patch 2). Costs come from image sizes only: ``lcu_tokens`` for loaded LCUs,
``dataset_costs`` for a manifest from the PNG headers (no decoding).

Packing rule (``TokenBudgetBatcher`` and ``budget_batches``): take LCUs in order and
close the batch when the next one would push its token sum over ``max_tokens`` or its
size over ``max_samples``. An LCU over the budget alone forms its own batch (warned
once). With ``buffer=k`` (k >= 2) the LCUs are taken k at a time, each chunk sorted by
tokens (stable) and packed on its own: batches of similar sizes, fewer distinct shapes,
and the chunk's last batch may be partly filled. Nothing is dropped or repeated.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ace.conditioning import _crop_box, target_size
from ace.data.manifest import LCUManifest
from ace.lcu import LCU

T = TypeVar("T")

PATCH_PIXELS = 16
"""Image pixels per DiT token side: VAE downsampling 8 x patch size 2."""


# ---------------------------------------------------------------------------
# Costs
# ---------------------------------------------------------------------------


def frame_tokens(
    height: int, width: int, max_seq_len: int, patch_pixels: int = PATCH_PIXELS
) -> int:
    """DiT tokens of one (H, W) image after the released crop and resize."""
    _, _, crop_h, crop_w = _crop_box(height, width)
    h, w = target_size(crop_h, crop_w, max_seq_len)
    return (h // patch_pixels) * (w // patch_pixels)


def _hw(image: Any) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    if isinstance(image, torch.Tensor):
        return int(image.shape[-2]), int(image.shape[-1])
    raise ValueError(f"expected a PIL image or a tensor, got {type(image).__name__}")


def lcu_tokens(lcu: LCU, max_seq_len: int, patch_pixels: int = PATCH_PIXELS) -> int:
    """Image tokens of all frames of ``lcu`` (its target, if any, and every input image).

    >>> from ace.lcu import ConditionUnit
    >>> cu = ConditionUnit("recolour {image}", [Image.new("RGB", (64, 64))])
    >>> lcu = LCU(cu, target=Image.new("RGB", (512, 512)))
    >>> lcu_tokens(lcu, max_seq_len=1024)  # 1024 + 16
    1040
    """
    frames = [lcu.target] if lcu.target is not None else []
    return sum(frame_tokens(*_hw(im), max_seq_len, patch_pixels) for im in frames + lcu.images)


def _record_tokens(record: dict[str, Any], root: Path, max_seq_len: int, patch_pixels: int) -> int:
    """Tokens of a manifest record from its image headers (``Image.open(...).size``)."""
    total = 0
    for rel in [record["target"], *(p for turn in record["turns"] for p in turn["images"])]:
        with Image.open(root / rel) as im:  # reads the header only
            width, height = im.size
        total += frame_tokens(height, width, max_seq_len, patch_pixels)
    return total


def dataset_costs(
    dataset: LCUManifest | Sequence[LCU],
    max_seq_len: int,
    patch_pixels: int = PATCH_PIXELS,
    progress: bool = False,
) -> list[int | None]:
    """The tokens of every item, computed once: for an ``LCUManifest`` from the image
    headers (no decoding), else ``lcu_tokens(dataset[i])``.

    A record whose images cannot be opened or are too small is ``None`` (warned, and
    left out by ``budget_batches``), so one bad file never stops a run.
    """
    costs: list[int | None] = []
    bad = 0
    for i in tqdm(range(len(dataset)), disable=not progress, unit="LCU", desc="token costs"):
        try:
            if isinstance(dataset, LCUManifest):
                rec = dataset.records[i]
                costs.append(_record_tokens(rec, dataset.root, max_seq_len, patch_pixels))
            else:
                costs.append(lcu_tokens(dataset[i], max_seq_len, patch_pixels))
        except (OSError, ValueError, Image.DecompressionBombError) as e:  # PIL's size guard too
            costs.append(None)
            bad += 1
            if bad <= 10:
                warnings.warn(f"dataset_costs: item {i} left out: {e}", stacklevel=2)
    if bad:
        warnings.warn(f"dataset_costs: {bad} of {len(dataset)} item(s) left out", stacklevel=2)
    return costs


# ---------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------


def _check(max_tokens: int, max_samples: int | None, buffer: int) -> None:
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if max_samples is not None and (not isinstance(max_samples, int) or max_samples < 1):
        raise ValueError(f"max_samples must be None or a positive int, got {max_samples!r}")
    if not isinstance(buffer, int) or buffer < 0:
        raise ValueError(f"buffer must be a non-negative int, got {buffer!r}")


def _full(batch: list, tokens: int, cost: int, max_tokens: int, max_samples: int | None) -> bool:
    """Whether a non-empty ``batch`` of ``tokens`` must close before an item of ``cost``."""
    return bool(batch) and (
        tokens + cost > max_tokens or (max_samples is not None and len(batch) >= max_samples)
    )


def _pack(
    items: Iterable[tuple[int, T]],
    max_tokens: int,
    max_samples: int | None,
    oversize: Callable[[int], None],
) -> Iterator[list[T]]:
    """Greedy packing of (cost, item) pairs in order (module docstring)."""
    batch: list[T] = []
    tokens = 0
    for cost, item in items:
        if _full(batch, tokens, cost, max_tokens, max_samples):
            yield batch
            batch, tokens = [], 0
        if cost > max_tokens:
            oversize(cost)
        batch.append(item)
        tokens += cost
    if batch:
        yield batch


def _warn_once() -> Callable[[int], None]:
    warned = False

    def warn(cost: int) -> None:
        nonlocal warned
        if not warned:
            warned = True
            warnings.warn(
                f"an LCU of {cost} tokens is over the batch budget; it forms a batch alone "
                "(warned once)",
                stacklevel=3,
            )

    return warn


def budget_batches(
    costs: Sequence[int | None],
    max_tokens: int,
    seed: int = 0,
    epoch: int = 0,
    *,
    max_samples: int | None = None,
    shuffle: bool = True,
    buffer: int = 0,
    indices: Sequence[int] | None = None,
) -> list[list[int]]:
    """Index batches of one epoch of a map-style dataset, from per-index token costs.

    ``costs[i]`` is the cost of index i (``dataset_costs``; ``None`` leaves i out).
    ``indices`` (default: all) is the subset to batch. With ``shuffle`` the indices are
    permuted by ``numpy.random.default_rng([seed, epoch])`` before packing, and with
    ``buffer >= 2`` the batches are then permuted too (chunks sort by size). The same
    arguments give the same batches; every kept index appears exactly once. For DDP give
    each rank ``batches[rank::world_size]`` cut to a common length.
    """
    _check(max_tokens, max_samples, buffer)
    order = [i for i in (range(len(costs)) if indices is None else indices) if costs[i] is not None]
    rng = np.random.default_rng([seed, epoch])
    if shuffle:
        order = [order[j] for j in rng.permutation(len(order))]
    pairs = [(int(costs[i]), i) for i in order]
    warn = _warn_once()
    if buffer < 2:
        return list(_pack(pairs, max_tokens, max_samples, warn))
    batches = []
    for start in range(0, len(pairs), buffer):
        chunk = sorted(pairs[start : start + buffer], key=lambda p: p[0])
        batches.extend(_pack(chunk, max_tokens, max_samples, warn))
    if shuffle:
        batches = [batches[j] for j in rng.permutation(len(batches))]
    return batches


class TokenBudgetBatcher:
    """Batches of a stream of LCUs (or of ``(index, LCU)`` pairs, kept as pairs) filled up
    to ``max_tokens`` image tokens summed over all frames (module docstring).

    Deterministic: the batches depend only on the input order. When the source has
    ``state_dict`` / ``load_state_dict`` (``ShardStream``, ``ShardLoader``), so does the
    batcher, and resuming is exact: its state is the source's state at the start of the
    pending chunk (or batch) plus the number of that chunk's batches already handed out;
    resuming replays the chunk and skips those. The source state is copied before every
    item (``buffer < 2``) or chunk.
    """

    def __init__(
        self,
        source: Iterable[Any],
        max_tokens: int,
        max_seq_len: int,
        *,
        max_samples: int | None = None,
        buffer: int = 0,
        patch_pixels: int = PATCH_PIXELS,
    ) -> None:
        _check(max_tokens, max_samples, buffer)
        self.source, self.max_tokens, self.max_seq_len = source, max_tokens, max_seq_len
        self.max_samples, self.buffer, self.patch_pixels = max_samples, buffer, patch_pixels
        self._warn = _warn_once()
        self._stateful = callable(getattr(source, "state_dict", None))
        self._resume: tuple[Any, int] | None = None  # (source state, batches to skip)
        self._skip = 0

    def cost(self, item: Any) -> int:
        """Tokens of an LCU or of the LCU of an ``(index, LCU)`` pair."""
        lcu = item[1] if isinstance(item, tuple) else item
        return lcu_tokens(lcu, self.max_seq_len, self.patch_pixels)

    def _snap(self) -> Any:
        return copy.deepcopy(self.source.state_dict()) if self._stateful else None

    def _groups(self, it: Iterator[Any]) -> Iterator[tuple[Any, list[list[Any]], Any]]:
        """(source state at the group's start, its batches, state at the next group's start
        when already known): a group is a chunk (``buffer >= 2``) or one batch."""
        mt, ms = self.max_tokens, self.max_samples
        if self.buffer >= 2:
            while True:
                start = self._snap()
                chunk = [(self.cost(x), x) for x in islice(it, self.buffer)]
                if not chunk:
                    return
                chunk.sort(key=lambda p: p[0])  # stable: ties keep their order
                yield start, list(_pack(chunk, mt, ms, self._warn)), None
        start, batch, tokens = self._snap(), [], 0
        while True:
            before = self._snap()
            try:
                item = next(it)
            except StopIteration:
                break
            cost = self.cost(item)
            if _full(batch, tokens, cost, mt, ms):
                yield start, [batch], before
                start, batch, tokens = before, [], 0
            if cost > mt:
                self._warn(cost)
            batch.append(item)
            tokens += cost
        if batch:
            yield start, [batch], None

    def __iter__(self) -> Iterator[list[Any]]:
        skip, self._skip = self._skip, 0
        for start, batches, after in self._groups(iter(self.source)):
            for j, batch in enumerate(batches):
                if skip:
                    skip -= 1
                    continue
                last = j + 1 == len(batches)
                self._resume = (after, 0) if last else (start, j + 1)
                yield batch
        self._resume = None

    def state_dict(self) -> dict[str, Any]:
        """``{"source": state, "skip": n}``: where to restart the source and how many of the
        batches it then gives to drop."""
        if not self._stateful:
            raise TypeError(f"the source ({type(self.source).__name__}) has no state_dict")
        state, skip = self._resume if self._resume is not None else (None, 0)
        return {"source": self.source.state_dict() if state is None else state, "skip": skip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``: the source's position, and batches to skip."""
        self.source.load_state_dict(state["source"])
        self._skip = int(state["skip"])
        self._resume = (copy.deepcopy(state["source"]), self._skip)  # saved again as loaded
