"""Loading transformers models from local directories only, and seeded generation.

Nothing is downloaded: a model is a directory written by ``save_pretrained`` (with its
tokenizer or processor), and a wrong path is a ``ValueError`` naming it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from ace.device import default_device

T = TypeVar("T")


def check_model_dir(path: str | Path, what: str = "model") -> Path:
    """``path`` as a Path if it is a directory with a ``config.json``; else ValueError."""
    p = Path(path).expanduser()
    hint = "a local directory written by save_pretrained (nothing is downloaded)"
    if not p.exists():
        raise ValueError(f"{what}: no model at {p}; need {hint}")
    if not p.is_dir():
        raise ValueError(f"{what}: {p} is not a directory; need {hint}")
    if not (p / "config.json").is_file():
        raise ValueError(f"{what}: {p} has no config.json; need {hint}")
    return p


def load_local(loader: Callable[..., T], path: Path, what: str, **kwargs: Any) -> T:
    """``loader(path, local_files_only=True, **kwargs)``; any failure becomes a ValueError
    naming ``what`` and the path."""
    try:
        return loader(str(path), local_files_only=True, **kwargs)
    except Exception as e:  # transformers raises OSError, ValueError, KeyError, ...
        msg = " ".join(str(e).split())
        raise ValueError(f"{what}: cannot load {path}: {type(e).__name__}: {msg[:300]}") from e


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device``, or ``ace.device.default_device()`` (cuda, xpu or mps when available)."""
    return torch.device(device) if device is not None else default_device()


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (the same on every machine and run)."""
    text = "\0".join(map(str, parts)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch for the block and restore the global random state afterwards."""
    kind, devices = device.type, None  # None: every device of the type
    if kind == "cpu":
        kind, devices = "cuda", []  # the CPU state is always saved; no accelerator state
    elif kind == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices, device_type=kind):
        torch.manual_seed(seed)
        yield
