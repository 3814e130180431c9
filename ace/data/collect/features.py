"""Batch image features from any transformers image encoder, as resumable feature shards.

The pairing step (``ace.data.collect.pairing``) clusters images by these features. The
encoder is loaded from a LOCAL directory with ``AutoModel`` + ``AutoImageProcessor``
(SigLIP by default, any image model works): ``model.get_image_features`` when the model
has it, else its pooled output, else the mean of its last hidden state.

    out_dir/features.json                 what made the shards: model, dim, shard_size,
                                          count, a hash of the image ids, dtype, normalize
    out_dir/features-00000.safetensors    images [0, shard_size) of the list (ace.data.collect.store)
    out_dir/features-00001.safetensors    images [shard_size, 2 * shard_size) ...

Shards are written atomically, so a shard on disk is complete: a rerun skips them and
computes only the missing ones (an interrupted run resumes). With an accelerate
``Accelerator``, process r computes the shards s with s % num_processes == r.

>>> import tempfile
>>> import numpy as np
>>> from PIL import Image
>>> from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
>>> tmp = Path(tempfile.mkdtemp())
>>> for i in range(3):
...     Image.new("RGB", (40, 30), (80 * i, 0, 0)).save(tmp / f"im{i}.png")
>>> cfg = SiglipVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
...                          intermediate_size=37, image_size=32, patch_size=8)
>>> SiglipVisionModel(cfg).save_pretrained(tmp / "enc")
>>> _ = SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp / "enc")
>>> paths = extract_features(list_images(tmp), tmp / "feats", tmp / "enc", root=tmp,
...                          shard_size=2, progress=False)
>>> [p.name for p in paths]
['features-00000.safetensors', 'features-00001.safetensors']
>>> ids, x = load_features(tmp / "feats")
>>> ids, x.shape, bool(np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5))
(['im0.png', 'im1.png', 'im2.png'], (3, 32), True)
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from tqdm import tqdm

from ace.atomic import atomic_write
from ace.data.collect.store import (
    META,
    PATTERN,
    ids_digest,
    load_features,
    save_feature_shard,
    shard_name,
)
from ace.device import default_device
from ace.images import open_image

__all__ = [
    "DTYPES",
    "META",
    "SUFFIXES",
    "encode",
    "extract_features",
    "image_ids",
    "list_images",
    "load_encoder",
    "load_features",
    "load_image",
    "num_shards",
    "shards_of_rank",
]

SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
"""Image file suffixes ``list_images`` collects (compared case-insensitively)."""

"""The file in a feature directory that records what made its shards."""

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16}
"""The stored dtypes of feature rows."""

# Settings a resumed run must share with the run that made the directory.
_RESUME_KEYS = ("model", "shard_size", "count", "ids_sha256", "dtype", "normalize")


# ---------------------------------------------------------------------------
# Image lists and the shard split (pure functions)
# ---------------------------------------------------------------------------


def list_images(root: str | Path, suffixes: Sequence[str] = SUFFIXES) -> list[Path]:
    """Every image file under ``root`` (recursive, sorted), skipping hidden files and folders.

    A file counts when its suffix, lower-cased, is one of ``suffixes``; anything whose path
    below ``root`` has a part starting with "." is skipped (temporary files, caches).
    Linked folders are followed (a collection is often assembled from links), each real
    folder once, so a link back up the tree ends the walk there.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image root {root} is not a directory")
    wanted = {s.lower() for s in suffixes}
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # reached again through a link: a loop, or a second way in
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # first way in wins
        found += [
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and Path(f).suffix.lower() in wanted
        ]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def image_ids(images: Sequence[str | Path], root: str | Path | None = None) -> list[str]:
    """The id of each image: its path relative to ``root`` (as given without one), "/"-separated.

    >>> image_ids(["data/a/x.png", "data/y.jpg"], root="data")
    ['a/x.png', 'y.jpg']
    """
    if root is None:
        ids = [Path(p).as_posix() for p in images]
    else:
        base = Path(os.path.abspath(root))
        ids = []
        for p in images:
            try:
                ids.append(Path(os.path.abspath(p)).relative_to(base).as_posix())
            except ValueError:
                raise ValueError(f"image {p} is not under the root {root}") from None
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            raise ValueError(f"image {i!r} is listed twice")
        seen.add(i)
    return ids


def num_shards(count: int, shard_size: int) -> int:
    """How many shards ``count`` images fill: ceil(count / shard_size)."""
    return math.ceil(count / shard_size)


def shards_of_rank(n_shards: int, rank: int, world_size: int) -> list[int]:
    """The shards process ``rank`` of ``world_size`` computes: s with s % world_size == rank.

    >>> shards_of_rank(5, 1, 2)
    [1, 3]
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    return list(range(rank, n_shards, world_size))


# ---------------------------------------------------------------------------
# Loading and encoding
# ---------------------------------------------------------------------------


def load_image(path: str | Path) -> Image.Image:
    """The image at ``path`` as RGB, fully decoded and read as ``ace.images`` reads every
    file (EXIF orientation applied, 16-bit greyscale scaled, not clipped to white);
    ValueError naming the file otherwise."""
    try:
        return open_image(path, "RGB")
    except FileNotFoundError:
        raise ValueError(f"missing image {path}") from None
    except Exception as e:  # PIL raises several types for a damaged or foreign file
        raise ValueError(f"unreadable image {path}: {e}") from e


def load_encoder(model_path: str | Path) -> tuple[torch.nn.Module, Any]:
    """(model in eval mode without gradients, image processor) from a local directory."""
    from transformers import AutoImageProcessor, AutoModel  # lazy: slow to import

    path = Path(model_path)
    if not path.exists():  # a missing local path would otherwise be read as a hub repo id
        raise ValueError(f"model path {path} does not exist")
    try:
        model = AutoModel.from_pretrained(path, local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError ...
        raise ValueError(f"cannot load an image encoder from {path}: {e}") from e
    model.eval().requires_grad_(False)
    return model, processor


@torch.no_grad()
def encode(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, D) features of preprocessed images (B, C, H, W).

    ``get_image_features`` when the model has it (a tensor in transformers 4, an output
    whose ``pooler_output`` holds the features in 5), else ``pooler_output``, else the mean
    of ``last_hidden_state`` over tokens (or over space for a (B, D, h, w) map).
    """
    if hasattr(model, "get_image_features"):
        out = model.get_image_features(pixel_values=pixel_values)
        if isinstance(out, torch.Tensor):
            return out
        if getattr(out, "pooler_output", None) is not None:
            return out.pooler_output.flatten(1)
    out = model(pixel_values=pixel_values)
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)  # (B, D) or (B, D, 1, 1) -> (B, D)
    hidden = out.last_hidden_state
    if hidden.ndim == 3:
        return hidden.mean(1)  # (B, T, D) -> (B, D)
    return hidden.flatten(2).mean(2)  # (B, D, h, w) -> (B, D)


# ---------------------------------------------------------------------------
# The directory's record (features.json)
# ---------------------------------------------------------------------------


def _read_meta(out_dir: Path) -> dict[str, Any] | None:
    path = out_dir / META
    if not path.is_file():
        if out_dir.is_dir() and any(out_dir.glob(PATTERN)):
            raise ValueError(
                f"{out_dir} holds feature shards but no {META}: not made by extract_features; "
                "use another directory"
            )
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable {path}: {e}") from e


def _check_meta(old: dict[str, Any], new: dict[str, Any], out_dir: Path) -> None:
    """ValueError naming the first setting that differs from the run that made ``out_dir``."""
    for key in _RESUME_KEYS:
        if old.get(key) != new[key]:
            what = (
                "another image list (same count, other ids or order)"
                if key == "ids_sha256"
                else f"{key}={old.get(key)!r}, not {new[key]!r}"
            )
            raise ValueError(
                f"cannot resume into {out_dir}: it was made with {what}; "
                "use another directory or delete it"
            )


def _write_meta(out_dir: Path, meta: dict[str, Any]) -> None:
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write(out_dir / META, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _shard_dim(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return int(f.get_slice("features").get_shape()[1])


# ---------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------


def extract_features(
    images: Sequence[str | Path],
    out_dir: str | Path,
    model_path: str | Path,
    *,
    root: str | Path | None = None,
    batch_size: int = 32,
    shard_size: int = 4096,
    dtype: str = "float32",
    normalize: bool = True,
    accelerator=None,
    progress: bool = True,
) -> list[Path]:
    """Encode ``images`` with the model at ``model_path`` into feature shards in ``out_dir``.

    Shard s holds images [s * shard_size, (s + 1) * shard_size) of ``images``, with ids
    relative to ``root`` (``image_ids``); rows are L2-normalised when ``normalize`` and
    stored as ``dtype`` ("float32" or "float16"). Shards already on disk are skipped; a
    directory made with another model, shard size, image list, dtype or normalisation is
    refused. With an accelerate ``accelerator``, this process computes its share of the
    shards (``shards_of_rank``) on ``accelerator.device`` under ``accelerator.autocast()``
    and all processes meet at ``wait_for_everyone()``; without one, everything runs here,
    on CUDA when available, else on CPU. Returns the paths of every shard, in order.

    Bad input is a ValueError naming it (an empty list, a missing or unreadable image, a
    missing model path, bad sizes or dtype); every check that needs no model runs before
    anything is written, and a shard is never half-written.
    """
    # 1. check the arguments (no files written)
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    images = [Path(p) for p in images]
    if not images:
        raise ValueError("the image list is empty")
    ids = image_ids(images, root)
    model_path = Path(model_path)
    if not model_path.exists():
        raise ValueError(f"model path {model_path} does not exist")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")
    rank, world = 0, 1
    if accelerator is not None:
        rank, world = accelerator.process_index, accelerator.num_processes
    is_main = rank == 0
    meta = {
        "model": str(model_path.resolve()),
        "dim": None,
        "shard_size": shard_size,
        "count": len(ids),
        "ids_sha256": ids_digest(ids),
        "dtype": dtype,
        "normalize": bool(normalize),
    }
    old = _read_meta(out_dir)
    if old is not None:
        _check_meta(old, meta, out_dir)
        meta["dim"] = old.get("dim")

    # 2. this process's missing shards; their images must exist
    paths = [out_dir / shard_name(s) for s in range(num_shards(len(ids), shard_size))]
    todo = [s for s in shards_of_rank(len(paths), rank, world) if not paths[s].is_file()]
    spans = {s: range(s * shard_size, min((s + 1) * shard_size, len(ids))) for s in todo}
    for s in todo:
        for i in spans[s]:
            if not images[i].is_file():
                raise ValueError(f"missing image {images[i]}")

    # 3. the encoder (only with shards to compute), then the record of the directory
    if accelerator is not None:
        device, autocast = accelerator.device, accelerator.autocast
    else:
        device, autocast = default_device(), None
    if todo:
        model, processor = load_encoder(model_path)
        model.to(device)
        model_dtype = next(model.parameters()).dtype
    if is_main and old is None:
        _write_meta(out_dir, meta)
    if accelerator is not None:
        accelerator.wait_for_everyone()

    # 4. encode: decode and preprocess the next batch on threads while this one runs
    def prepare(idx: range) -> torch.Tensor:
        with ThreadPoolExecutor(max_workers=min(8, len(idx))) as pool:
            batch = list(pool.map(load_image, (images[i] for i in idx)))
        return processor(images=batch, return_tensors="pt")["pixel_values"]  # (B, C, H, W)

    batches = [  # (shard, image indices of one batch)
        (s, spans[s][b : b + batch_size]) for s in todo for b in range(0, len(spans[s]), batch_size)
    ]
    bar = tqdm(
        total=sum(len(r) for r in spans.values()),
        disable=not (progress and is_main),
        unit="img",
        desc="features" if world == 1 else f"features (rank 0 of {world})",
    )
    parts: list[torch.Tensor] = []
    with ThreadPoolExecutor(max_workers=1) as prefetch, bar:
        ahead: Future | None = prefetch.submit(prepare, batches[0][1]) if batches else None
        for k, (s, idx) in enumerate(batches):
            pixel_values = ahead.result()
            ahead = prefetch.submit(prepare, batches[k + 1][1]) if k + 1 < len(batches) else None
            pixel_values = pixel_values.to(device, model_dtype)
            with autocast() if autocast is not None else contextlib.nullcontext():
                x = encode(model, pixel_values).float()  # (B, D)
            if normalize:
                x = F.normalize(x, dim=-1)
            if meta["dim"] is not None and x.shape[1] != meta["dim"]:
                raise ValueError(
                    f"the model gives {x.shape[1]} features, {out_dir} holds {meta['dim']}"
                )
            parts.append(x.cpu())
            bar.update(len(idx))
            if idx.stop == spans[s].stop:  # the shard is complete
                feats = torch.cat(parts).to(DTYPES[dtype])  # (n, D)
                save_feature_shard(paths[s], [ids[i] for i in spans[s]], feats)
                parts = []

    # 5. everyone is done (every process meets both barriers): record the dimension
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if is_main and meta["dim"] is None and paths[0].is_file():
        meta["dim"] = _shard_dim(paths[0])
        _write_meta(out_dir, meta)
    return paths
