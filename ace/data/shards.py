"""WebDataset tar shards of LCU records (docs/DATA.md): writing them and streaming them.

Layout. ``write_shards`` turns a manifest directory into ``shard-000000.tar``,
``shard-000001.tar``, ... with ``samples_per_shard`` LCUs each, in manifest order. LCU i
is the sample with key ``f"{i:09d}"``; its members are::

    000000007.json            the manifest record; every image path replaced by the
                              member's name after the key ("t0_i0.png"), "meta" kept
    000000007.t0_i0.png       image 0 of turn 0 (RGB)     000000007.t0_m0.png  its mask ("L")
    000000007.target.png      the target                  000000007.target_mask.png

Streaming. ``ShardStream`` yields the LCUs of a list of shards (paths, brace patterns,
``pipe:`` URLs; webdataset opens them). Epoch e of one rank and one DataLoader worker:

1. the shard list, permuted by ``Random(f"{seed}:{e}")`` when shuffling (the same on
   every rank, so the split below is a partition);
2. rank r of R takes shards ``r::R``, then worker w of W takes ``w::W`` of those
   (webdataset's ``split_by_node`` / ``split_by_worker`` rule, with explicit ids);
3. the samples of those shards in order, through a shuffle buffer seeded by
   ``(seed, e, r, w)`` when ``shuffle_buffer > 1``;
4. each sample decoded like ``manifest.read_record``; a corrupt one (bad JSON, bad PNG,
   missing member, an LCU that fails validation) is skipped with a warning and counted.

Resume. The position of a stream is, per worker of this rank, ``(epoch, n)``: n samples
of that epoch's shuffled sample order have been handed out (skipped ones included); the
next pass over the stream continues from it. ``state_dict()`` / ``load_state_dict()``
save and restore it; a resumed worker replays its epoch and discards the first n
samples *before decoding*. Cost: reading (I/O and untar, no PNG decoding) the samples
already handed out in the current epoch, per worker. Resuming needs the same shards,
seed, world size and number of workers. In the process that iterates
(``num_workers=0``) the position is kept directly. With DataLoader workers iterate
``stream.loader(num_workers)``: every sample comes tagged with its worker and position,
the main process keeps them, and the loader fixes the order itself (workers take turns;
whose turn it is is saved too), so a resumed loader gives exactly the rest. A plain
DataLoader over the stream splits the same way, but its position cannot be saved, and
each pass reads epoch 0 again (the workers' copies advance, not the stream): call
``set_epoch`` between passes, or use ``loader()``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
import os
import random
import re
import tarfile
import uuid
import warnings
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, url_opener

from ace.data.manifest import LCUManifest, _check_record, _to_pil
from ace.images import open_image
from ace.lcu import LCU, ConditionUnit


def _expand(item: str | Path) -> list[str]:
    """webdataset's brace and ``::`` expansion of a string; a ``Path`` is one file as it is
    (``runs/{a,b}/x.tar`` names a directory); ValueError for an unset ``${VAR}``."""
    if isinstance(item, Path):
        return [str(item)]
    try:
        return expand_urls(item)
    except AssertionError as e:  # webdataset's way of saying "no such environment variable"
        raise ValueError(f"shard URL {item!r}: {e}") from None


SHARD_NAME = "shard-%06d.tar"
"""File name of shard k (``SHARD_NAME % k``)."""

# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _png(path: Path, image: Image.Image | torch.Tensor, mode: str) -> bytes:
    """The file's bytes when it already is a PNG of ``mode``; else ``image`` encoded as PNG."""
    with Image.open(path) as im:  # the header only
        if im.format == "PNG" and im.mode == mode:
            return path.read_bytes()
    buf = io.BytesIO()
    _to_pil(image, mode).save(buf, format="PNG")
    return buf.getvalue()


def _shard_sample(ds: LCUManifest, i: int) -> dict[str, Any]:
    """Record i of the manifest as a webdataset sample (key, json, one PNG per image)."""
    record, lcu = ds.records[i], ds[i]  # ds[i] loads and validates every image
    members: dict[str, bytes] = {}

    def add(rel: str, name: str, image: Any, mode: str) -> str:
        members[name] = _png(ds.root / rel, image, mode)
        return name

    turns = []
    for t, (turn, cu) in enumerate(zip(record["turns"], lcu.turns)):
        paths = turn.get("masks") or [None] * len(turn["images"])
        images = [
            add(p, f"t{t}_i{k}.png", im, "RGB")
            for k, (p, im) in enumerate(zip(turn["images"], cu.images))
        ]
        masks = [
            None if p is None else add(p, f"t{t}_m{k}.png", mk, "L")
            for k, (p, mk) in enumerate(zip(paths, cu.masks))
        ]
        out_turn = {"instruction": turn["instruction"], "images": images, "masks": masks}
        turns.append({**out_turn, "task": turn["task"]} if turn.get("task") else out_turn)
    mask = record.get("target_mask")
    out: dict[str, Any] = {
        "turns": turns,
        "target": add(record["target"], "target.png", lcu.target, "RGB"),
        "target_mask": None if mask is None else add(mask, "target_mask.png", lcu.target_mask, "L"),
        "task": record["task"],
    }
    if "meta" in record:
        out["meta"] = record["meta"]
    return {"__key__": f"{i:09d}", "json": json.dumps(out, ensure_ascii=False).encode(), **members}


def write_shards(
    manifest: str | Path,
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    progress: bool = True,
    *,
    overwrite: bool = False,
) -> list[Path]:
    """Convert an LCU manifest (its directory or ``manifest.jsonl``) into tar shards.

    Every record is loaded and validated as it is written (a bad one is a ``ValueError``
    naming its line); PNGs of the right mode are copied byte for byte. Shards are written
    under hidden temporary names in ``out_dir`` and renamed into place together at the
    end; an exception (a failed rename, Ctrl-C) removes the new ones and puts back any set
    they were replacing, so ``out_dir`` never holds a partial or mixed shard set (only
    SIGKILL during the renames can, and it may leave hidden ``.shard-*`` files). Existing
    ``shard-*.tar`` files are a ``ValueError`` unless ``overwrite=True``, which replaces the
    whole set. The same manifest gives the same
    bytes (fixed mtime, sorted members). Returns the shard paths in order.
    """
    if not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be a positive int, got {samples_per_shard!r}")
    ds = LCUManifest(manifest)
    if not len(ds):
        raise ValueError(f"{ds.path}: no records")
    out = Path(os.path.abspath(out_dir))
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    existing = sorted(out.glob("shard-*.tar")) if out.is_dir() else []
    if existing and not overwrite:
        raise ValueError(f"{out} already holds shards (overwrite=True replaces them)")
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    starts = range(0, len(ds), samples_per_shard)
    finals = [out / (SHARD_NAME % k) for k in range(len(starts))]
    tmps = [p.with_name(f".{p.name}.tmp-{token}") for p in finals]
    olds = [p.with_name(f".{p.name}.old-{token}") for p in existing]
    renamed: list[Path] = []
    try:
        with tqdm(total=len(ds), disable=not progress, unit="LCU", desc=out.name) as bar:
            for start, tmp in zip(starts, tmps):
                with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as w:
                    for i in range(start, min(start + samples_per_shard, len(ds))):
                        w.write(_shard_sample(ds, i))
                        bar.update()
        for old, aside in zip(existing, olds):  # the old set steps aside, whole
            os.replace(old, aside)
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)
            renamed.append(final)
    except BaseException:  # no partial or mixed set: the new shards go, the old come back
        for tmp in [*tmps, *renamed]:
            tmp.unlink(missing_ok=True)
        for old, aside in zip(existing, olds):
            if aside.exists():
                os.replace(aside, old)
        for p in created:  # directories this call made, innermost first
            if p.exists() and not any(p.iterdir()):
                p.rmdir()
        raise
    for aside in olds:  # after the commit: an interrupt here leaves the new set whole
        aside.unlink(missing_ok=True)
    return finals


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


def sample_to_lcu(sample: Mapping[str, Any]) -> LCU:
    """Decode one shard sample (``{"json": bytes, "t0_i0.png": bytes, ...}``) into an LCU.

    Images are RGB, masks "L", exactly as ``manifest.read_record`` loads them; any
    problem is a ``ValueError``.
    """
    if "json" not in sample:
        raise ValueError("no json member")
    try:
        record = json.loads(sample["json"])
        _check_record(record, 0)
    except ValueError as e:
        raise ValueError(f"json: {str(e).removeprefix('line 0: ')}") from e

    def load(name: str, mode: str, what: str) -> Image.Image:
        data = sample.get(name.lower())  # webdataset lower-cases member suffixes
        if not isinstance(data, bytes):
            raise ValueError(f"{what}: missing member {name!r}")
        try:
            return open_image(data, mode)
        except Exception as e:
            raise ValueError(f"{what}: unreadable image {name!r}: {e}") from e

    units = []
    for t, turn in enumerate(record["turns"]):
        images = [load(p, "RGB", f"turns[{t}].images[{k}]") for k, p in enumerate(turn["images"])]
        masks = [
            None if p is None else load(p, "L", f"turns[{t}].masks[{k}]")
            for k, p in enumerate(turn.get("masks") or [None] * len(images))
        ]
        try:
            units.append(ConditionUnit(turn["instruction"], images, masks, turn.get("task", "")))
        except ValueError as e:
            raise ValueError(f"turns[{t}]: {e}") from e
    target = load(record["target"], "RGB", "target")
    mask = record.get("target_mask")
    target_mask = None if mask is None else load(mask, "L", "target_mask")
    return LCU(units[-1], units[:-1], target, target_mask, record["task"])


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """The arguments; else torch.distributed when initialised; else RANK/WORLD_SIZE; else (0, 1)."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun; spawned workers
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def _identity(x: Any) -> Any:
    return x


class _CheckedTarInfo(tarfile.TarInfo):
    """A tar header that must be whole: Python's tarfile ends a stream quietly at a missing,
    truncated or corrupt header past the first (a shard cut at a 512-byte block, or a bad
    checksum), which lost the rest of the shard with no warning. Only the zero block that
    marks a real end of archive ends it."""

    @classmethod
    def fromtarfile(cls, tarfile_):
        try:
            return super().fromtarfile(tarfile_)
        except tarfile.EOFHeaderError:  # the end-of-archive marker
            raise
        except tarfile.HeaderError as e:
            raise tarfile.ReadError(
                f"corrupt or truncated tar at byte {tarfile_.offset}: {e}"
            ) from e


def _tar_members(sources, handler) -> Iterator[dict[str, Any]]:
    """webdataset's ``tar_file_expander`` with checked headers, and an end-of-shard marker
    (``{}``) after every shard, read to its end or not: a half-read sample never merges with
    the next shard's first one when their keys match."""
    for source in sources:
        try:
            with tarfile.open(  # closing it closes tarfile's reader, not the source's stream
                fileobj=source["stream"], mode="r|*", tarinfo=_CheckedTarInfo
            ) as stream:
                for info in stream:
                    if not info.isreg() or info.name is None or _META.match(info.name):
                        continue
                    data = stream.extractfile(info).read()
                    yield {"fname": info.name, "data": data, "__url__": source["url"]}
                    stream.members = []  # a stream of any length: keep no member list
        except Exception as e:  # the rest of this shard: warned and counted by the handler
            if not handler(e):
                break
        yield {}


_META = re.compile(r"__[^/]*__($|/)")
"""Members webdataset skips: its own metadata files."""


class ShardStream(IterableDataset):
    """The LCUs of tar shards, split across ranks and DataLoader workers (module docstring).

    ``urls``: a path or URL, a brace pattern (``"shards/shard-{000000..000009}.tar"``),
    several joined by ``::``, or a list of them; ``pipe:CMD`` runs CMD and reads its
    stdout. ``shuffle_buffer > 1`` shuffles samples through a buffer of that size and
    (unless ``shuffle_shards=False``) the shard order per epoch; 0 keeps the written order.
    ``rank`` / ``world_size`` default to torch.distributed (or RANK / WORLD_SIZE). Each
    rank needs at least one shard; give ranks equal shard counts for equal epochs.
    ``repeat=True`` iterates epochs e, e + 1, ... endlessly, each reshuffled; otherwise
    one pass runs one epoch and the next pass the next epoch (``set_epoch`` picks one).

    ``skipped`` counts samples skipped as corrupt plus shard read errors (missing shard,
    truncated tar), each with a warning; with workers it is current through ``loader``.
    """

    def __init__(
        self,
        urls: str | Path | list[str | Path],
        seed: int = 0,
        shuffle_buffer: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        repeat: bool = False,
        shuffle_shards: bool | None = None,
    ) -> None:
        super().__init__()
        items = [urls] if isinstance(urls, (str, Path)) else list(urls)
        self.urls: list[str] = [u for item in items for u in _expand(item)]
        """The expanded shard URLs."""
        if not self.urls:
            raise ValueError("no shard URLs")
        if (rank is None) != (world_size is None):
            raise ValueError("give both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.seed, self.shuffle_buffer, self.repeat = seed, shuffle_buffer, repeat
        self.rank, self.world_size = rank, world_size
        self.shuffle_shards = shuffle_buffer > 1 if shuffle_shards is None else shuffle_shards
        self.epoch = 0
        """The epoch a worker with no saved position starts at."""
        self.num_workers: int | None = None
        """Workers the saved positions belong to (set by iterating, ``loader`` or a state)."""
        self._pos: dict[int, tuple[int, int]] = {}  # worker -> (epoch, samples handed out)
        self._skips: dict[int, int] = {}  # worker -> samples skipped so far
        self._turn = 0  # ``loader``: the worker whose event comes next
        self._tagged = False  # inside ``loader``: yield (tag, lcu) events

    @property
    def skipped(self) -> int:
        """Samples skipped as corrupt plus shard read errors, over all workers of this rank."""
        return sum(self._skips.values())

    def set_epoch(self, epoch: int) -> None:
        """Start every worker at the beginning of ``epoch`` (forgets saved positions)."""
        self.epoch, self._turn = epoch, 0
        self._pos.clear()

    def worker_shards(self, epoch: int, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards worker ``worker`` of this rank reads in ``epoch``, in reading order."""
        rank, world = _rank_world(self.rank, self.world_size)
        if len(self.urls) < world:
            raise ValueError(f"{len(self.urls)} shard(s) for {world} ranks: each needs one")
        order = list(self.urls)
        if self.shuffle_shards:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order[rank::world][worker::num_workers]

    # -- iteration -------------------------------------------------------------

    def _events(self, worker: int, num_workers: int) -> Iterator[tuple[tuple, LCU | None]]:
        """``((worker, epoch, pos, skips, done), LCU or None)`` per sample and per epoch end.

        ``(epoch, pos)`` is the position after the event; ``done`` marks the worker's
        last event of this pass.
        """
        rank, _ = _rank_world(self.rank, self.world_size)
        epoch, pos = self._pos.get(worker, (self.epoch, 0))
        skips = self._skips.get(worker, 0)
        starts = [self._pos.get(w, (self.epoch, 0))[0] for w in range(num_workers)]
        if not self.repeat and epoch > min(starts):  # resumed after finishing this pass
            yield (worker, epoch, pos, skips, True), None
            return

        current: list[str] = [""]  # the shard being read
        failed: set[str] = set()
        seen = [0]  # samples of this epoch read so far

        def on_error(exn: Exception) -> bool:  # a shard that cannot be opened or read on
            nonlocal skips
            warnings.warn(f"ShardStream: skipping the rest of a shard: {exn}", stacklevel=2)
            if current[0] not in failed:  # counted once per shard and epoch ...
                failed.add(current[0])
                skips += int(seen[0] >= pos)  # ... and not again when a resume replays it
            return True

        def opened(shards: list[str]) -> Iterator[dict[str, Any]]:
            """webdataset's url_opener, one shard at a time, closing each when read."""
            for url in shards:
                current[0] = url
                for src in url_opener(iter([{"url": url}]), handler=on_error):
                    try:
                        yield src
                    except GeneratorExit:  # the reader stopped early: a pipe may complain
                        with contextlib.suppress(Exception):
                            src["stream"].close()
                        raise
                    try:
                        src["stream"].close()  # a pipe reports its exit status here
                    except Exception as e:
                        on_error(e)

        empty = 0  # epochs in a row that gave this worker nothing
        while True:
            failed.clear()
            shards = self.worker_shards(epoch, worker, num_workers)
            files = _tar_members(opened(shards), handler=on_error)
            src = group_by_keys(files, handler=on_error)
            if self.shuffle_buffer > 1:
                rng = random.Random(f"{self.seed}:{epoch}:{rank}:{worker}")
                src = wds.shuffle(self.shuffle_buffer, self.shuffle_buffer, rng=rng)(src)
            n = seen[0] = decoded = 0
            whole = pos == 0  # not an epoch resumed midway
            for n, sample in enumerate(src, start=1):
                seen[0] = n
                if n <= pos:
                    continue  # resuming: discard what was handed out, before decoding
                try:
                    lcu = sample_to_lcu(sample)
                    decoded += 1
                except Exception as e:  # never crash on one sample
                    skips += 1
                    lcu = None
                    where = f"{sample.get('__url__')}: sample {sample.get('__key__')}"
                    warnings.warn(f"ShardStream: skipping {where}: {e}", stacklevel=2)
                yield (worker, epoch, n, skips, False), lcu
            # at the end of an epoch the position moves to the next one. A worker stops
            # after one epoch; an endless one when it has no shards, or when as many epochs
            # in a row as there are shards gave it nothing it could decode (every shard
            # unreadable, or every sample broken: never spin on no data). One empty or
            # unreadable shard only empties the epochs that deal it to this worker alone,
            # and shard shuffling deals it elsewhere next.
            epoch, pos = epoch + 1, 0
            if decoded:
                empty = 0
            elif whole:  # a resumed epoch's tail may hold nothing new: it does not count
                empty += 1
            done = not self.repeat or not shards or empty >= len(self.urls)
            if self.repeat and n == 0 and shards:
                warnings.warn(f"ShardStream: worker {worker} read no samples", stacklevel=2)
            yield (worker, epoch, pos, skips, done), None
            if done:
                return

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if info is None:
            self._check_workers(1)
        for tag, lcu in self._events(worker, num_workers):
            self._pos[worker], self._skips[worker] = tag[1:3], tag[3]
            if self._tagged:
                yield tag, lcu
            elif lcu is not None:
                yield lcu

    def _check_workers(self, num_workers: int) -> None:
        """Positions of another worker count are usable only at a common epoch start."""
        if self.num_workers is not None and self.num_workers != num_workers and self._pos:
            epochs = {e for e, _ in self._pos.values()}
            if len(epochs) == 1 and all(n == 0 for _, n in self._pos.values()):
                self.set_epoch(epochs.pop())
                self.num_workers = num_workers
                return
            raise ValueError(
                f"the saved position belongs to {self.num_workers} worker(s), not "
                f"{num_workers}: resume with the same num_workers (or call set_epoch)"
            )
        self.num_workers = num_workers

    def loader(self, num_workers: int = 0, **kwargs: Any) -> ShardLoader:
        """An iterable of LCUs read by ``num_workers`` DataLoader workers, whose positions
        this stream keeps (``state_dict`` works); ``kwargs`` go to the DataLoader."""
        return ShardLoader(self, num_workers, **kwargs)

    # -- position --------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: per worker (epoch, samples handed out) and skip counts."""
        rank, world = _rank_world(self.rank, self.world_size)
        workers = range(self.num_workers or 1)
        return {
            "seed": self.seed,
            "rank": rank,
            "world_size": world,
            "num_workers": self.num_workers,
            "positions": [list(self._pos.get(w, (self.epoch, 0))) for w in workers],
            "skipped": [self._skips.get(w, 0) for w in workers],
            "turn": self._turn,
            **self._order(),
        }

    def _order(self) -> dict[str, Any]:
        """What fixes the order of samples: a resume with another would repeat some and miss
        others. Shards by file name, so a moved directory still resumes."""
        return {
            "shuffle_buffer": self.shuffle_buffer,
            "shuffle_shards": self.shuffle_shards,
            "repeat": self.repeat,
            "shard_names": self._shard_names,
        }

    @functools.cached_property
    def _shard_names(self) -> str:
        """Digest of the shard file names, hashed once: ``state_dict`` runs before every
        sample under token-budget batching."""
        names = "\n".join(os.path.basename(u.rstrip("/")) for u in self.urls)
        return hashlib.sha256(names.encode()).hexdigest()[:16]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state_dict()``: same seed, world size, shuffling, repeat and shard
        file names (the directory may move); ValueError naming what differs."""
        rank, world = _rank_world(self.rank, self.world_size)
        if state["seed"] != self.seed or (state["rank"], state["world_size"]) != (rank, world):
            raise ValueError(
                f"state of seed {state['seed']}, rank {state['rank']} of {state['world_size']} "
                f"does not fit a stream of seed {self.seed}, rank {rank} of {world}"
            )
        now = self._order()
        changed = [f"{k}={state[k]!r} there, {v!r} now" for k, v in now.items()
                   if k in state and state[k] != v]  # fmt: skip
        if changed:
            raise ValueError(
                f"the stream's saved position is for another order of samples "
                f"({'; '.join(changed)}): resume with the same shards and shuffling"
            )
        self.num_workers = state["num_workers"]
        self._pos.clear()  # in place: a loader's copy shares these dicts
        self._pos.update({w: (int(e), int(n)) for w, (e, n) in enumerate(state["positions"])})
        self._skips.clear()
        self._skips.update(dict(enumerate(state["skipped"])))
        self._turn = int(state.get("turn", 0))


class ShardLoader:
    """``ShardStream.loader``: a DataLoader (``batch_size=None``) over the stream that
    yields LCUs and keeps in the stream each worker's position.

    The order is fixed by the loader, not by the DataLoader's timing: workers take turns,
    one event each (a sample, a skipped sample or an epoch end), finished workers drop
    out, and the next turn is part of the saved state, so a resumed loader continues the
    rotation where it stopped. Positions reach the workers when a pass starts, so
    ``persistent_workers`` is refused.
    """

    def __init__(self, stream: ShardStream, num_workers: int = 0, **kwargs: Any) -> None:
        if kwargs.get("persistent_workers"):
            raise ValueError("ShardLoader: persistent_workers would keep stale positions")
        self.stream, self.num_workers, self.kwargs = stream, num_workers, kwargs

    def __iter__(self) -> Iterator[LCU]:
        s, nw = self.stream, self.num_workers
        if nw == 0:
            yield from s
            return
        s._check_workers(nw)
        tagged = copy.copy(s)  # shallow: shares _pos and _skips with ``s``
        tagged._tagged = True
        tagged.rank, tagged.world_size = _rank_world(s.rank, s.world_size)
        loader = DataLoader(
            tagged, batch_size=None, num_workers=nw, collate_fn=_identity, **self.kwargs
        )
        queues: list[deque] = [deque() for _ in range(nw)]
        active = set(range(nw))
        for tag, lcu in loader:
            queues[tag[0]].append((tag, lcu))
            while active and queues[s._turn]:
                (worker, epoch, pos, skips, done), lcu = queues[s._turn].popleft()
                s._pos[worker], s._skips[worker] = (epoch, pos), skips
                if done:
                    active.discard(worker)
                turns = [(worker + d) % nw for d in range(1, nw + 1)]
                s._turn = next((w for w in turns if w in active), 0)
                if lcu is not None:
                    yield lcu

    def state_dict(self) -> dict[str, Any]:
        """The stream's ``state_dict``."""
        return self.stream.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """The stream's ``load_state_dict``."""
        self.stream.load_state_dict(state)
