"""An embedding cache: the frozen encoders' outputs of a manifest, computed once.

T5 and the VAE are frozen, so for a long run (or many epochs of a small set) their
outputs can be computed once and read back every step. Set ``data.cache=DIR`` and the
trainer builds DIR on first use (every process takes its share of the shards) and then
reads it instead of running either encoder:

    python scripts/train.py --config configs/toy.yaml data.cache=outputs/toy-cache

or build it ahead of time (``build_cache`` is what the trainer calls):

    from ace.train.cache import EmbeddingCache, build_cache
    cache = build_cache(manifest, conditioner, "cache/", max_seq_len=1024)
    # later, e.g. in another process: the fingerprint check refuses a stale cache
    from ace.train.cache import cache_fingerprint
    cache = EmbeddingCache("cache/", fingerprint=cache_fingerprint(manifest, conditioner, 1024))
    cache[0].texts, cache[0].means  # T5 states per turn; VAE posterior means per frame

What is stored, per LCU: the T5 states of each instruction (valid tokens only, as
``ConditionTokenizer.encode_text`` gives them), the VAE posterior (mean and std, unscaled)
and the latent-resolution mask of each frame (target first), and which turn each frame
reads. The posterior, not one sample of it, is stored, so every step still draws fresh
latent noise, from the step's generator exactly as the uncached path does. Files:

    DIR/shard-00000.safetensors   tensors "{i}/text/{turn}", "{i}/mean/{frame}",
                                  "{i}/std/{frame}", "{i}/mask/{frame}", plus "empty_text";
                                  metadata "samples": {i: {turns, frame_turns}, or null
                                  if it failed to load}
    DIR/cache.json                written last: the fingerprint, shard size and counts

A shard is written to a temporary file and renamed, so an interrupted build leaves whole
shards, and the next build of the same fingerprint and shard size skips them
(``building.json``, written before the first shard, holds both; shards left by a build of
another fingerprint or shard size are deleted first, and so are the temporary files of a
killed one). ``cache.json`` holds a fingerprint of the manifest (a hash of the whole
file and of the byte size and modification time of every image it names), the tokenizer,
the encoders (their configs and a checksum of their weights), the token budget and the
text length; a cache whose fingerprint differs from the run's is refused with a
ValueError that names what changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import stat
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ace.atomic import atomic_write, fsync_dir, fsync_tree, nearest_existing
from ace.conditioning import downsample_mask
from ace.train.batch import prepare_training_lcu
from ace.train.dist import from_main
from ace.train.lock import run_lock

CACHE_FILE = "cache.json"
BUILDING_FILE = "building.json"  # the fingerprint and shard size of a build in progress
FORMAT = 10  # 6: 0/1 PIL masks read as 0/1; 7: history images filled by their own turn's
# task (prepare_lcu); 8: the tokenizer digest leaves out padding and truncation, the module
# digest transformers_version; 9: the VAE digest covers only what encodes (no decoder, no
# scaling factor); 10: the unmasked images of a partly masked inpainting turn are left
# whole. Bump when what a shard holds, or the fingerprint means, changes
CHUNK = 32  # LCUs per encoder call while building


@dataclass
class EncodedLCU:
    """One LCU as the encoders saw it; ``encode_batch`` packs a list of these."""

    texts: list[Tensor]  # per turn (L, E): T5 states of its instruction, oldest first
    empty_text: Tensor  # (L0, E): the states of "", what a dropped instruction reads
    frame_turns: list[int]  # per frame (target first): the turn whose text it reads
    means: list[Tensor]  # per frame (C, h, w): VAE posterior mean, unscaled
    stds: list[Tensor]  # per frame (C, h, w): VAE posterior std
    masks: list[Tensor]  # per frame (1, h, w): the mask at latent resolution


# ---------------------------------------------------------------------------
# Fingerprint
# ---------------------------------------------------------------------------


VAE_DECODING = frozenset(
    {"out_channels", "up_block_types", "use_post_quant_conv", "scaling_factor", "shift_factor",
     "latents_mean", "latents_std", "force_upcast"}
)  # fmt: skip
"""VAE config keys that do not change the posteriors a cache stores (they are unscaled)."""
VAE_ENCODING = ("encoder.", "quant_conv.")
"""The VAE weights that make the posteriors: a decoder fine-tuned alone keeps the cache."""


def _module_digest(
    module: torch.nn.Module, only: tuple[str, ...] = (), drop: frozenset = frozenset()
) -> str:
    """sha256 of a module's config and of (name, shape, dtype, sum, sum of |x|) per tensor;
    with ``only``, of the tensors whose names start with one of those prefixes, and without
    the config keys in ``drop``.

    Config keys that start with "_", and ``transformers_version``, are left out: they say
    where the weights were loaded from and by which library version (``_name_or_path``,
    ``_diffusers_version``), not what the module computes, so the same VAE read through
    another path, or the same T5 after a transformers upgrade, still matches.
    """
    h = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        # the library version that made the config says nothing of what it computes
        as_dict = {
            k: v
            for k, v in as_dict.items()
            if not str(k).startswith("_") and k != "transformers_version" and k not in drop
        }
        h.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if only and not name.startswith(only):
                continue
            x = t.detach().double()
            h.update(f"{name}{tuple(t.shape)}{t.dtype}{x.sum().item():.10e}".encode())
            h.update(f"{x.abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]


def vae_digest(vae) -> str:
    """What a VAE's latents mean to a DiT trained on them: the digest of what encodes
    (``VAE_ENCODING``) and its scaling factor, which scales every latent."""
    digest = _module_digest(vae, VAE_ENCODING, VAE_DECODING)
    return f"{digest}:{float(vae.config.scaling_factor)!r}"


def tokenizer_digest(tokenizer, legacy: bool = False) -> str:
    """sha256 of what a tokenizer maps text to: the definition of a fast tokenizer
    (normalizer, pre-tokenizer, vocabulary) less its padding and truncation, which
    transformers sets on the first padded call (the conditioner pads and truncates to its
    own length either way), else its class and vocabulary. The word encoder refits its
    vocabulary every run, and the same words can get other ids. ``legacy``: the digest
    before padding and truncation were left out (checkpoints of earlier runs hold it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
        if not legacy:
            definition = json.loads(text)
            definition.pop("padding", None)
            definition.pop("truncation", None)
            text = json.dumps(definition, sort_keys=True)
    else:
        text = type(tokenizer).__name__ + json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _manifest_digest(dataset) -> str:
    """sha256 of the whole manifest file and of the byte size and modification time of
    every image it names: a regenerated or edited image changes the fingerprint, as in
    make and rsync. A copy that does not keep modification times (``cp -r`` without
    ``-p``) does too, and the cache is then refused; ``cp -a`` and ``rsync -a`` keep them."""
    h = hashlib.sha256()
    with open(dataset.path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    for record in dataset.records:
        paths = [record["target"], record.get("target_mask")]
        for turn in record["turns"]:
            paths += [*turn.get("images", []), *(turn.get("masks") or [])]
        for rel in paths:
            if rel is not None:
                try:  # missing, or a name the file system refuses: the sample skips later
                    st = (dataset.root / rel).stat()
                    regular = stat.S_ISREG(st.st_mode)
                    size, mtime = (st.st_size, st.st_mtime_ns) if regular else (-1, -1)
                except OSError:
                    size, mtime = -1, -1
                h.update(f"{rel}:{size}:{mtime};".encode())
    return h.hexdigest()[:16]


def cache_fingerprint(dataset, conditioner, max_seq_len: int) -> dict[str, Any]:
    """What a cache must agree with to be reused: manifest, tokenizer, encoders, token
    budget, text length."""
    return {
        "format": FORMAT,
        "manifest": _manifest_digest(dataset),
        "num_samples": len(dataset),
        "tokenizer": tokenizer_digest(conditioner.tokenizer),
        "text_encoder": _module_digest(conditioner.text_encoder),
        "vae": _module_digest(conditioner.vae, VAE_ENCODING, VAE_DECODING),
        "max_seq_len": int(max_seq_len),
        "max_length": int(conditioner.max_length),
    }


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def num_shards(num_samples: int, shard_size: int) -> int:
    return math.ceil(num_samples / shard_size)


def shard_path(root: Path, shard: int) -> Path:
    return root / f"shard-{shard:05d}.safetensors"


def build_shards(
    dataset,
    conditioner,
    root: str | os.PathLike,
    max_seq_len: int,
    shard_size: int = 1024,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> int:
    """Write this rank's missing shards (shard s belongs to rank s % world_size); returns
    the number of samples skipped because they failed to load (each warned about)."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    todo = [
        s
        for s in range(num_shards(len(dataset), shard_size))
        if s % world_size == rank and not _usable_shard(shard_path(root, s))
    ]
    empty = conditioner.encode_text([""])[0].float().cpu().contiguous()  # (L0, E)
    skipped = 0
    bar = tqdm(
        total=sum(min(shard_size, len(dataset) - s * shard_size) for s in todo),
        desc="embedding cache",
        unit="LCU",
        disable=not progress,
    )
    for s in todo:
        tensors: dict[str, Tensor] = {"empty_text": empty}
        samples: dict[str, dict | None] = {}
        indices = range(s * shard_size, min(len(dataset), (s + 1) * shard_size))
        for start in range(indices.start, indices.stop, CHUNK):
            chunk = []
            for i in range(start, min(indices.stop, start + CHUNK)):
                try:
                    chunk.append((i, prepare_training_lcu(dataset[i], max_seq_len)))
                except ValueError as e:
                    skipped += 1
                    samples[str(i)] = None
                    warnings.warn(f"embedding cache: skipping sample {i}: {e}", stacklevel=2)
            if chunk:
                _encode_chunk(chunk, conditioner, tensors, samples)
            bar.update(min(indices.stop, start + CHUNK) - start)
        path = shard_path(root, s)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            save_file(tensors, tmp, metadata={"samples": json.dumps(samples)})
            fsync_tree(tmp)  # on disk before its name says it is done: a resumed build
            os.replace(tmp, path)  # takes a shard that is there for complete
            fsync_dir(root)
        finally:
            tmp.unlink(missing_ok=True)
    bar.close()
    return skipped


def read_shard_samples(path: Path) -> dict:
    """The sample table in a shard's header; ValueError naming the shard if it cannot be
    read (a damaged file, or one cut short)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["samples"])
    except Exception as e:  # safetensors' own error types, OSError, KeyError, JSON errors
        raise ValueError(f"{path.name} is unreadable ({type(e).__name__}: {e})") from e


def _usable_shard(path: Path) -> bool:
    """Whether a resumed build can keep the shard at ``path``; a damaged one is deleted
    (warned) and built again."""
    if not path.is_file():
        return False
    try:
        read_shard_samples(path)
    except ValueError as e:
        warnings.warn(f"embedding cache {path.parent}: {e}; building it again", stacklevel=3)
        path.unlink()
        return False
    return True


def _encode_chunk(chunk, conditioner, tensors: dict, samples: dict) -> None:
    """Encode the prepared LCUs of a chunk: one T5 call, VAE calls shared by
    equal-size images (``encode_posteriors``)."""
    prompts = [t for _, item in chunk for t in item.turns]
    states = iter(conditioner.encode_text(prompts))
    posteriors = iter(conditioner.encode_posteriors([f for _, item in chunk for f in item.frames]))
    for i, item in chunk:
        for t in range(len(item.turns)):
            tensors[f"{i}/text/{t}"] = next(states).float().cpu().contiguous()
        for f, mask in enumerate(item.masks):
            mean, std = next(posteriors)
            tensors[f"{i}/mean/{f}"] = mean.cpu().contiguous()
            tensors[f"{i}/std/{f}"] = std.cpu().contiguous()
            lmask = downsample_mask(mask, conditioner.vae_factor)  # (1, h, w)
            tensors[f"{i}/mask/{f}"] = lmask.float().cpu().contiguous()
        samples[str(i)] = {"turns": len(item.turns), "frame_turns": list(item.frame_turns)}


def build_cache(
    dataset,
    conditioner,
    root: str | os.PathLike,
    max_seq_len: int,
    shard_size: int = 1024,
    accelerator=None,
    progress: bool = True,
) -> EmbeddingCache:
    """Build (or finish) the cache of ``dataset`` in ``root`` and open it.

    With an ``accelerator`` every process writes its share of the shards and the main
    process writes ``cache.json`` once all are there. An existing complete cache is
    opened as is, after its fingerprint is checked against this run's.
    """
    root = Path(root)
    parent = nearest_existing(root)
    if not parent.is_dir():
        raise ValueError(f"embedding cache {root}: {parent} is a file, not a directory")
    fingerprint = cache_fingerprint(dataset, conditioner, max_seq_len)
    rank = 0 if accelerator is None else accelerator.process_index
    world = 1 if accelerator is None else accelerator.num_processes
    is_main = rank == 0

    def barrier():
        if accelerator is not None:
            accelerator.wait_for_everyone()

    # one build at a time per directory: another run's build (a sweep sharing data.cache)
    # would delete this one's shards in progress, or mix its own into them. The main
    # process takes the lock and decides (built, to build, or refused); every rank acts on
    # its decision, so none skips a barrier the others wait at
    with contextlib.ExitStack() as held:

        def decide() -> str:
            if not is_main or (root / CACHE_FILE).is_file():
                return "built"
            try:
                held.enter_context(run_lock(root, "data.cache"))
            except ValueError as e:
                return f"refused:{e}"
            built = (root / CACHE_FILE).is_file()  # by the run that held the lock before
            return "built" if built else "build"

        decision = from_main(decide, rank, world)
        if decision.startswith("refused:"):
            raise ValueError(decision.removeprefix("refused:"))
        if decision == "build":
            if is_main:  # shards are reused only by a build of the same fingerprint and
                _start_build(root, fingerprint, shard_size)  # shard size
            barrier()
            skipped = build_shards(
                dataset, conditioner, root, max_seq_len, shard_size, rank, world,
                progress and is_main,
            )  # fmt: skip
            barrier()
            if is_main:
                info = {
                    "fingerprint": fingerprint,
                    "shard_size": shard_size,
                    "num_shards": num_shards(len(dataset), shard_size),
                    "skipped_by_rank0": skipped,
                }
                _write_json(root / CACHE_FILE, info)
                (root / BUILDING_FILE).unlink(missing_ok=True)
            barrier()
    return EmbeddingCache(root, fingerprint)


def _write_json(path: Path, value) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(value, indent=2) + "\n"))


def _start_build(root: Path, fingerprint: dict, shard_size: int) -> None:
    """Record the fingerprint and shard size of the build about to run; shards of an
    interrupted build of another fingerprint or shard size (or of unknown origin) are
    deleted, not mixed into this one (a shard of another size holds other samples). The
    temporary file of a shard whose writer was killed is deleted too."""
    root.mkdir(parents=True, exist_ok=True)
    for tmp in root.glob(".shard-*.tmp-*"):
        tmp.unlink(missing_ok=True)
    marker = root / BUILDING_FILE
    build = {"fingerprint": fingerprint, "shard_size": shard_size}
    try:
        previous = json.loads(marker.read_text()) if marker.is_file() else None
    except (OSError, ValueError):  # unreadable: of unknown origin, so its shards go
        previous = None
    if previous != build:
        stale = sorted(root.glob("shard-*.safetensors"))
        if stale:
            warnings.warn(
                f"embedding cache {root}: deleting {len(stale)} shards of an interrupted "
                "build of other data, encoders or shard size",
                stacklevel=3,
            )
        for path in stale:
            path.unlink()
        _write_json(marker, build)


# ---------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------


class EmbeddingCache:
    """Map-style access to a built cache: ``cache[i]`` is the ``EncodedLCU`` of sample i.

    A sample that was skipped while building raises ValueError (the trainer counts and
    skips it, as it does a corrupt image). ``fingerprint``, when given, must equal the
    stored one (ValueError naming the fields that differ).
    """

    def __init__(self, root: str | os.PathLike, fingerprint: dict[str, Any] | None = None):
        self.root = Path(root)
        info_path = self.root / CACHE_FILE
        if not info_path.is_file():
            raise ValueError(f"{self.root} is not a built embedding cache (no {CACHE_FILE})")
        try:
            self.info = json.loads(info_path.read_text(encoding="utf-8"))
            stored = dict(self.info["fingerprint"])
            self.shard_size = int(self.info["shard_size"])
            self._n, num_shards = int(stored["num_samples"]), int(self.info["num_shards"])
        except (ValueError, KeyError, TypeError) as e:  # JSON and Unicode errors are ValueErrors
            raise ValueError(
                f"embedding cache {self.root}: {CACHE_FILE} is unreadable ({type(e).__name__}: "
                f"{e}); delete the directory to rebuild it"
            ) from e
        if fingerprint is not None and stored != fingerprint:
            changed = sorted(
                k for k in {*stored, *fingerprint} if stored.get(k) != fingerprint.get(k)
            )
            raise ValueError(
                f"embedding cache {self.root} was built for a different {', '.join(changed)}; "
                "delete it, or point data.cache at a new directory"
            )
        for s in range(num_shards):  # every header read now, not a damaged one mid-run
            path = shard_path(self.root, s)
            if not path.is_file():
                raise ValueError(f"embedding cache {self.root}: {path.name} is missing")
            try:
                read_shard_samples(path)
            except ValueError as e:
                raise ValueError(
                    f"embedding cache {self.root}: {e}; delete the directory to rebuild it"
                ) from e
        self._open: dict[int, tuple[Any, dict, Tensor]] = {}

    def __len__(self) -> int:
        return self._n

    def _shard(self, s: int):
        if s not in self._open:  # the empty prompt's states: read once per shard
            f = safe_open(str(shard_path(self.root, s)), framework="pt")
            self._open[s] = (f, json.loads(f.metadata()["samples"]), f.get_tensor("empty_text"))
        return self._open[s]

    def __getitem__(self, i: int) -> EncodedLCU:
        if not 0 <= i < self._n:
            raise IndexError(f"sample {i} out of range for a cache of {self._n}")
        f, samples, empty = self._shard(i // self.shard_size)
        meta = samples.get(str(i))
        if meta is None:
            raise ValueError(f"sample {i} failed to load when the cache was built")
        frame_turns, num_turns = meta["frame_turns"], meta["turns"]
        num_frames = len(frame_turns)
        get = f.get_tensor
        return EncodedLCU(
            texts=[get(f"{i}/text/{t}") for t in range(num_turns)],
            empty_text=empty,
            frame_turns=frame_turns,
            means=[get(f"{i}/mean/{k}") for k in range(num_frames)],
            stds=[get(f"{i}/std/{k}") for k in range(num_frames)],
            masks=[get(f"{i}/mask/{k}") for k in range(num_frames)],
        )
