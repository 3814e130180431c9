"""Training data: where each step's LCUs come from.

- a manifest (docs/DATA.md), made from the toy world first when asked; the global batch
  order is a pure function of (seed, step): fixed-size batches from per-epoch
  permutations, or token-budget batches (``data.max_tokens``) from per-epoch packings;
- or WebDataset shards, streamed and split across ranks and workers; their position is
  saved with every checkpoint.

Either way ``batches.take(step)`` gives this rank's LCUs for a step, and a resumed run
takes exactly what the uninterrupted run took.
"""

from __future__ import annotations

import functools
import hashlib
import json
import warnings
from pathlib import Path

import numpy as np

from ace.atomic import atomic_write
from ace.train.config import DataConfig


def records_digest(dataset) -> str:
    """A digest of a manifest (the file's bytes, read 1 MiB at a time: about a second per
    GB) and its record count: a checkpoint keeps it, and a resume on another manifest is
    warned that its sample order is not the uninterrupted run's."""
    h = hashlib.sha256()
    with open(dataset.path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return f"{len(dataset.records)}:{h.hexdigest()[:16]}"


def build_dataset(cfg: DataConfig, accelerator=None):
    """The ``LCUManifest`` of ``cfg.manifest``; with ``toy_n > 0`` and no manifest there yet,
    the main process first writes a toy split of that size (the others wait)."""
    from ace.data.manifest import LCUManifest

    path = Path(cfg.manifest)
    # a directory holds manifest.jsonl; a file is the manifest, whatever its name
    manifest = path if path.suffix == ".jsonl" or path.is_file() else path / "manifest.jsonl"
    if not manifest.is_file() and cfg.toy_n > 0 and manifest.name != "manifest.jsonl":
        raise ValueError(
            f"data.manifest={cfg.manifest}: data.toy_n writes a toy split as DIR/manifest.jsonl; "
            "give data.manifest as that directory"
        )
    is_main = accelerator is None or accelerator.is_main_process
    if not manifest.is_file() and cfg.toy_n > 0 and is_main:
        from ace.data.manifest import write_manifest
        from ace.data.toy import sample_stream

        root = manifest.parent
        weights = dict(cfg.toy_weights) or None  # the rest: toy.DEFAULT_WEIGHTS
        stream = sample_stream(cfg.toy_n, cfg.toy_seed, size=cfg.toy_size, weights=weights)
        write_manifest((s.lcu for s in stream), root)
        # how it was made, for a later run that asks for another split (warned below)
        atomic_write(
            root / TOY_RECORD, lambda tmp: Path(tmp).write_text(json.dumps(toy_settings(cfg)))
        )
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if not manifest.is_file():
        raise ValueError(
            f"data.manifest: no manifest at {manifest} (set data.toy_n to generate a toy split)"
        )
    dataset = LCUManifest(manifest)
    if not len(dataset):
        raise ValueError(f"data.manifest: {manifest} holds no LCUs")
    if cfg.toy_n > 0 and is_main:
        made = manifest.parent / TOY_RECORD
        then = read_toy_record(made)
        then["toy_n"] = len(dataset)
        now = toy_settings(cfg)
        differ = [f"data.{k}={now[k]} (the split's: {then[k]})" for k in now if k in then and then[k] != now[k]]  # fmt: skip
        if differ:
            warnings.warn(  # the toy_* settings make a manifest only where there is none
                f"{'; '.join(differ)}: not used, {manifest} already holds {len(dataset)} "
                "LCUs, which this run trains on (the data.toy_* settings make a split only "
                "where there is no manifest; delete it to make the one asked for, or set "
                "data.toy_n=0 to train on it as it is)",
                stacklevel=2,
            )
    return dataset


TOY_RECORD = "toy.json"
"""Beside a generated toy split's manifest: the data.toy_* settings that made it."""


def read_toy_record(path: Path) -> dict:
    """The settings in a toy split's ``toy.json``; {} where there is none, or (warned) where it
    cannot be read: it only serves the warning about a split made with other settings."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        record = e
    if not isinstance(record, dict):
        warnings.warn(
            f"{path}: unreadable ({record!r:.80}), so this run cannot tell which data.toy_* "
            "settings made the split beside it; training on the split as it is",
            stacklevel=3,
        )
        return {}
    return record


def toy_settings(cfg: DataConfig) -> dict:
    return {"toy_n": cfg.toy_n, "toy_seed": cfg.toy_seed, "toy_size": cfg.toy_size,
            "toy_weights": dict(sorted(dict(cfg.toy_weights).items()))}  # fmt: skip


def global_batch_indices(n: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Dataset indices of global batch ``step``: epochs are permutations seeded by (seed, epoch),
    read back to back, so any step's batch is known without replaying the ones before it."""
    if n < 1:
        raise ValueError("the dataset is empty")
    start, out = step * global_batch, []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(n, seed, epoch)
        out.extend(order[offset : offset + global_batch - len(out)].tolist())
    return out


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The permutation of epoch ``epoch``, drawn once per epoch and process instead of on
    every micro-batch (at 4M samples a draw takes 0.1 s on a 2-core VM)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def costs_digest(costs: list) -> str:
    """A digest of a token-budget run's per-record costs, which decide every epoch's packing:
    ``"{left out}:{sha256[:16]}"``, where left out counts the records whose cost is unknown."""
    h = hashlib.sha256(json.dumps(costs).encode())
    return f"{sum(c is None for c in costs)}:{h.hexdigest()[:16]}"


def shared_costs(dataset, max_seq_len: int, patch_pixels: int, rank: int, world: int) -> list:
    """The token costs of the manifest's records (``batching.dataset_costs``), read by the
    first process and sent to the others: every rank packs the epochs from them, and a
    header one rank alone failed to read (a network file system's hiccup) gave that rank
    other batches for the whole run, some samples twice and others never."""
    from ace.data.batching import dataset_costs
    from ace.train.dist import from_main

    return from_main(
        lambda: dataset_costs(dataset, max_seq_len, patch_pixels, progress=True), rank, world
    )


class ManifestBatches:
    """Map-style batches of a manifest; bad samples are skipped with a warning and counted."""

    def __init__(
        self,
        dataset,
        cfg: DataConfig,
        seed: int,
        rank: int,
        world: int,
        max_seq_len: int,
        patch_pixels: int = 16,
    ):
        self.dataset, self.cfg, self.seed, self.rank, self.world = dataset, cfg, seed, rank, world
        self.max_seq_len, self.patch_pixels = max_seq_len, patch_pixels
        self.skipped = 0
        self._stand_in: list | None = None
        self.items = dataset  # what take() reads: the manifest, or an embedding cache of it
        # token-budget mode: the number of batches of each epoch packed so far, and the
        # batches of the latest one (keeping every epoch's grew without bound)
        self._counts: list[int] = []
        self._packed: tuple[int, list[list[int]]] = (-1, [])
        if cfg.max_tokens:
            self.costs = shared_costs(dataset, max_seq_len, patch_pixels, rank, world)

    def indices(self, step: int) -> list[int]:
        if not self.cfg.max_tokens:
            idx = global_batch_indices(
                len(self.dataset), self.cfg.batch_size * self.world, step, self.seed
            )
            return idx[self.rank :: self.world]
        # token budget: global step s takes batches s*world .. s*world + world - 1 of the
        # epochs' packings read back to back; rank r takes the r-th of them
        want, seen = step * self.world + self.rank, 0
        for epoch in range(10**9):
            if epoch == len(self._counts):
                self._counts.append(len(self._epoch(epoch)))
            if not self._counts[epoch]:
                raise ValueError("data.max_tokens: no sample fits a batch (every cost unknown)")
            if want < seen + self._counts[epoch]:
                return self._epoch(epoch)[want - seen]
            seen += self._counts[epoch]
        raise AssertionError("unreachable")

    def _epoch(self, epoch: int) -> list[list[int]]:
        """Token-budget mode: the batches of ``epoch`` (packed again unless the latest)."""
        from ace.data.batching import budget_batches

        if self._packed[0] != epoch:
            batches = budget_batches(
                self.costs, self.cfg.max_tokens, self.seed, epoch, max_samples=self.cfg.batch_size
            )
            self._packed = (epoch, batches)
        return self._packed[1]

    def position_skipped(self) -> int:
        """``skipped`` as of the data position a checkpoint saves: the live count (the
        position is the step)."""
        return self.skipped

    def take(self, step: int) -> list:
        out = []
        for i in self.indices(step):
            try:
                out.append(self._load(i))
            except ValueError as e:
                self.skipped += 1
                warnings.warn(f"skipping sample {i}: {e}", stacklevel=2)
        return out

    def _load(self, i: int):
        from ace.data.batching import lcu_tokens
        from ace.lcu import LCU

        item = self.items[i]
        if isinstance(item, LCU):  # not cached: an image too small to train on raises here
            lcu_tokens(item, self.max_seq_len, self.patch_pixels)
        return item

    def stand_in(self) -> list:
        """One loadable sample (the first in dataset order), for a rank whose whole batch
        failed to load: it runs the step's forward and backward with its loss times zero,
        so that every rank's collectives still meet; the step itself is skipped."""
        if self._stand_in is None:
            for i in range(len(self.items)):
                try:
                    self._stand_in = [self._load(i)]
                    break
                except ValueError:
                    continue
            else:
                raise ValueError("no sample of the dataset loads")
        return self._stand_in


class ShardBatches:
    """Batches streamed from WebDataset shards; ``state_dict`` makes a checkpoint resume exactly."""

    def __init__(
        self,
        cfg: DataConfig,
        seed: int,
        rank: int,
        world: int,
        max_seq_len: int,
        patch_pixels: int = 16,
    ):
        from ace.data.batching import TokenBudgetBatcher
        from ace.data.shards import ShardStream

        self.cfg, self.rank, self.world = cfg, rank, world
        self.stream = ShardStream(
            cfg.shards,
            seed=seed,
            shuffle_buffer=cfg.shuffle_buffer,
            rank=rank,
            world_size=world,
            repeat=True,
        )
        self.loader = _Trainable(self.stream.loader(cfg.num_workers), max_seq_len, patch_pixels)
        if cfg.max_tokens:
            self.source = TokenBudgetBatcher(
                self.loader,
                cfg.max_tokens,
                max_seq_len,
                max_samples=cfg.batch_size,
                patch_pixels=patch_pixels,
            )
        else:
            self.source = _Chunks(self.loader, cfg.batch_size)
        self._it = None

    @property
    def skipped(self) -> int:
        return self.stream.skipped + self.loader.skipped

    def position_skipped(self) -> int:
        """``skipped`` as of the position ``state_dict`` saves now. The token-budget batcher
        saves the position before the sample that closed its last batch, so samples skipped
        on the way to that one are counted live and again when a resume reads them."""
        state = self.source.state_dict()
        state = state["source"] if self.cfg.max_tokens else state  # the _Trainable's
        return int(state["skipped"]) + sum(state["stream"]["skipped"])

    def take(self, step: int) -> list:
        if self._it is None:
            self._it = iter(self.source)
        try:
            return next(self._it)
        except StopIteration:
            raise ValueError(
                f"data.shards={self.cfg.shards}: the stream gave no sample "
                f"({self.skipped} skipped): are the shards there and readable?"
            ) from None

    def state_dict(self) -> dict:
        """Every rank's stream position: accelerate calls this on every rank but writes
        only the main process's copy, so the ranks' positions are gathered into it."""
        import torch.distributed as dist

        own = self.source.state_dict()
        if self.world == 1 or not (dist.is_available() and dist.is_initialized()):
            return own
        states: list = [None] * self.world
        dist.all_gather_object(states, own)  # a collective: every rank saves together
        return {"ranks": states}

    def load_state_dict(self, state: dict) -> None:
        if "ranks" in state:
            if len(state["ranks"]) != self.world:
                raise ValueError(
                    f"data.shards: the checkpoint holds the stream positions of "
                    f"{len(state['ranks'])} ranks; resume with that many processes"
                )
            state = state["ranks"][self.rank]
        self.source.load_state_dict(state)
        self._it = None


UNTRAINABLE_IN_A_ROW = 10_000
"""Streamed samples in a row too small to train on after which a run stops."""


class _Trainable:
    """The LCUs of a resumable stream that can be trained on. One whose image is too small
    for a patch decodes fine and would then end the run in ``encode_batch``: it is skipped,
    with a warning, and counted (the count is part of the position, so a resumed run counts
    as the uninterrupted one did)."""

    def __init__(self, loader, max_seq_len: int, patch_pixels: int = 16):
        self.loader, self.max_seq_len, self.skipped = loader, max_seq_len, 0
        self.patch_pixels = patch_pixels

    def __iter__(self):
        from ace.data.batching import lcu_tokens

        in_a_row = 0
        for lcu in self.loader:
            try:
                lcu_tokens(lcu, self.max_seq_len, self.patch_pixels)
            except ValueError as e:
                self.skipped += 1
                in_a_row += 1
                warnings.warn(f"skipping a streamed sample: {e}", stacklevel=2)
                if in_a_row >= UNTRAINABLE_IN_A_ROW:  # an endless stream would spin forever
                    raise ValueError(
                        f"{in_a_row} streamed samples in a row could not be trained on (the "
                        f"last: {e}): are the shards' images large enough?"
                    ) from e
                continue
            in_a_row = 0
            yield lcu

    def state_dict(self) -> dict:
        return {"stream": self.loader.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["stream"])
        self.skipped = int(state["skipped"])


class _Chunks:
    """Fixed-size batches of a resumable stream (positions saved at batch boundaries)."""

    def __init__(self, loader, size: int):
        self.loader, self.size = loader, size

    def __iter__(self):
        batch = []
        for lcu in self.loader:
            batch.append(lcu)
            if len(batch) == self.size:
                yield batch
                batch = []

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def make_batches(
    cfg: DataConfig,
    accelerator,
    seed: int,
    max_seq_len: int,
    dataset=None,
    patch_pixels: int = 16,
):
    """Shard batches (``cfg.shards``) or manifest batches, on ``dataset`` if the caller has
    already read the manifest. ``patch_pixels`` is the side in pixels of one DiT token
    (VAE factor x patch size: 16 for the released model, 8 for the toy VAE); the token
    budget ``cfg.max_tokens`` counts tokens of that size."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if cfg.shards:
        return ShardBatches(cfg, seed, rank, world, max_seq_len, patch_pixels)
    if dataset is None:
        dataset = build_dataset(cfg, accelerator)
    return ManifestBatches(dataset, cfg, seed, rank, world, max_seq_len, patch_pixels)
