"""Training data: the LCU manifest (docs/DATA.md), made from the toy world when asked, and
a deterministic global batch order that a resumed run can recompute from the step alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ace.train.config import DataConfig


def build_dataset(cfg: DataConfig, accelerator=None):
    """The ``LCUManifest`` of ``cfg.manifest``; with ``toy_n > 0`` and no manifest there yet,
    the main process first writes a toy split of that size (the others wait)."""
    from ace.data.manifest import LCUManifest

    path = Path(cfg.manifest)
    manifest = path / "manifest.jsonl" if path.suffix != ".jsonl" else path
    is_main = accelerator is None or accelerator.is_main_process
    if not manifest.is_file() and cfg.toy_n > 0 and is_main:
        from ace.data.manifest import write_manifest
        from ace.data.toy import sample_stream

        root = manifest.parent
        write_manifest(
            (s.lcu for s in sample_stream(cfg.toy_n, cfg.toy_seed, size=cfg.toy_size)), root
        )
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not manifest.is_file():
        raise ValueError(
            f"data.manifest: no manifest at {manifest} (set data.toy_n to generate a toy split)"
        )
    return LCUManifest(manifest)


def global_batch_indices(n: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Dataset indices of global batch ``step``: epochs are permutations seeded by (seed, epoch),
    read back to back, so any step's batch is known without replaying the ones before it."""
    if n < 1:
        raise ValueError("the dataset is empty")
    start, out = step * global_batch, []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(order[offset : offset + global_batch - len(out)].tolist())
    return out
