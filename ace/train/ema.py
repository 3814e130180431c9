"""The EMA of a sharded (FSDP) model, one file per rank in each checkpoint.

Under FSDP each rank holds only its shard of every parameter (FSDP1: a flat slice, empty
where the parameter lies in another rank's shard; FSDP2: a DTensor's local part, possibly
empty), and diffusers' ``EMAModel`` over those parameters averages that shard:
elementwise, so the shards together are the EMA of the whole model.
accelerate saves registered objects from the main process only, which would keep rank 0's
shard and lose the others; so each rank writes its own ``ema_shard_{rank}.safetensors``
into the checkpoint and reads its own back (a resume keeps the world size, so the shards
line up). The export copies the shards into the parameters and gathers them with the
weights (``Trainer.export``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from safetensors import safe_open
from safetensors.torch import save_file

from ace.atomic import fsync_tree


def local_part(t):
    """This rank's part of a tensor: FSDP2's parameters are DTensors, FSDP1's plain."""
    return t.to_local() if hasattr(t, "to_local") else t


def shard_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"ema_shard_{rank}.safetensors"


def save_ema_shard(ema: EMAModel, directory: str | Path, rank: int) -> Path:
    """Write this rank's EMA state: the shadow tensors, and its counters as metadata."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    path = shard_path(directory, rank)
    save_file(
        {f"shadow.{i}": local_part(p).detach().contiguous().cpu() for i, p in enumerate(shadow)},
        str(path),
        metadata={"ema": json.dumps(state), "count": str(len(shadow))},
    )
    fsync_tree(path)  # by its writer: the main process's fsync of the checkpoint may run
    return path  # on another node, whose flush does not reach this node's cache


def load_ema_shard(ema: EMAModel, directory: str | Path, rank: int) -> None:
    """Read this rank's EMA state back; a missing or mismatched file is a ValueError."""
    path = shard_path(directory, rank)
    if not path.is_file():
        raise ValueError(
            f"train.resume: {path} is missing: the checkpoint holds no EMA shard for rank "
            f"{rank} (was it saved with ema.enabled=false, or without FSDP?)"
        )
    with safe_open(str(path), framework="pt") as f:  # on the CPU, copied to the device below
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    count = int(meta.get("count", -1))
    ours = [local_part(p) for p in ema.shadow_params]
    if count != len(ours) or any(
        tensors[f"shadow.{i}"].shape != p.shape for i, p in enumerate(ours)
    ):
        raise ValueError(
            f"train.resume: {path} does not match this rank's shard of the model "
            f"({count} tensors saved, {len(ours)} here, or other shapes): resume with the "
            "FSDP settings and world size it was saved with"
        )
    ema.load_state_dict(json.loads(meta["ema"]))  # the counters; the tensors keep their type
    with torch.no_grad():
        for i, p in enumerate(ours):  # into the shadow tensors (FSDP2: their local parts)
            p.copy_(tensors[f"shadow.{i}"])
