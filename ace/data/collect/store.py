"""Feature shards on disk: the format ``features`` writes and ``pairing`` reads.

    DIR/features-00000.safetensors   tensor "features" (N, D) float32 or float16, one
                                     row per image; metadata "ids": JSON list of N image
                                     ids (str, e.g. paths relative to the image root)
    DIR/features-00001.safetensors   ...

Shards are numbered from 0, written to a temporary name and renamed, so a shard on disk
is always complete; a reader takes every ``features-*.safetensors`` in name order.

    save_feature_shard(DIR / shard_name(0), ["a.png", "b.png"], np.zeros((2, 768), np.float32))
    ids, feats = load_features(DIR)   # list[str], float32 (N, D)
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ace.atomic import atomic_write

PATTERN = "features-*.safetensors"
META = "features.json"
"""Beside the shards, when ``features.extract_features`` made them: what made them,
with the number of images and a hash of their ids (``check_complete``)."""


def shard_name(index: int) -> str:
    return f"features-{index:05d}.safetensors"


def save_feature_shard(path: str | os.PathLike, ids: list[str], features) -> Path:
    """Write one shard atomically: ``ids`` (N str) and ``features`` (N, D) float."""
    path = Path(path)
    x = torch.as_tensor(
        np.asarray(features) if not isinstance(features, torch.Tensor) else features
    )
    if x.ndim != 2 or x.dtype not in (torch.float32, torch.float16):
        raise ValueError(
            f"features must be a float32 or float16 array (N, D), got {tuple(x.shape)} {x.dtype}"
        )
    if len(ids) != x.shape[0]:
        raise ValueError(f"{len(ids)} ids for {x.shape[0]} feature rows")
    if not all(isinstance(i, str) for i in ids):
        raise ValueError("image ids must be str")
    meta = {"ids": json.dumps(list(ids))}
    return atomic_write(
        path, lambda tmp: save_file({"features": x.contiguous()}, tmp, metadata=meta)
    )


def read_feature_shard(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """(ids, float32 (N, D)) of one shard; ValueError naming the file if it is unreadable."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            ids = json.loads((f.metadata() or {})["ids"])
            x = f.get_tensor("features").float().numpy()
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ValueError(f"unreadable feature shard {path}: {e}") from e
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise ValueError(f'feature shard {path}: metadata "ids" must be a JSON list of str')
    if x.ndim != 2 or len(ids) != x.shape[0]:
        raise ValueError(f"feature shard {path}: {len(ids)} ids for features {x.shape}")
    return ids, x


def load_features(root: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Every shard of ``root`` in name order: (ids, float32 (N, D))."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"no feature directory at {root}")
    paths = sorted(root.glob(PATTERN))
    if not paths:
        raise ValueError(f"no feature shards ({PATTERN}) in {root}")
    ids, parts = [], []
    for path in paths:
        shard_ids, x = read_feature_shard(path)
        ids.extend(shard_ids)
        parts.append(x)
    dims = {x.shape[1] for x in parts}
    if len(dims) > 1:
        raise ValueError(f"feature shards in {root} disagree on the dimension: {sorted(dims)}")
    check_complete(root, ids)
    return ids, np.concatenate(parts)


def ids_digest(ids: list[str]) -> str:
    """``META``'s ``ids_sha256``: the image ids, in order."""
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()


def check_complete(root: Path, ids: list[str]) -> None:
    """ValueError unless the shards hold every image ``META`` records (when there is one):
    an extraction killed midway, or one process of several that died, leaves a subset,
    which would be mined as if it were all."""
    path = root / META
    if not path.is_file():
        return
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable {path}: {e}") from e
    count = meta.get("count")
    if count is not None and len(ids) != count:
        raise ValueError(
            f"{root} holds {len(ids)} of the {count} features its {META} records: the "
            "extraction did not finish; rerun it (it computes only the missing shards)"
        )
    digest = ids_digest(ids)
    if meta.get("ids_sha256", digest) != digest:
        raise ValueError(
            f"{root}: its shards hold other images (or another order) than its {META} "
            "records; extract again into an empty directory"
        )
