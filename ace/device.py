"""Which device to run on when the user names none: the first accelerator this machine
has, in the order accelerate uses for training, else the CPU; and what a device can run
(``has_device``, ``fused_adamw``); and the dtype names configs and scripts take (``DTYPES``).

    from ace.device import default_device
    pipe.to(default_device())
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtype names configs and command lines take, and the torch dtypes they mean."""

ACCELERATORS = ("cuda", "xpu", "mps")
"""The device types ``default_device`` tries, in this order, before the CPU."""


def has_device(device_type: str) -> bool:
    """Whether this machine has a device of ``device_type`` ("cpu" always; a type torch
    has no ``torch.<type>.is_available()`` for, such as "meta", never)."""
    if device_type == "cpu":
        return True
    if device_type == "mps":
        return torch.backends.mps.is_available()
    is_available = getattr(getattr(torch, device_type, None), "is_available", None)
    return bool(callable(is_available) and is_available())


def device_count(device_type: str) -> int | None:
    """How many devices of ``device_type`` this machine has, where torch can tell
    (``torch.<type>.device_count()``); None for "cpu", whose index means nothing."""
    if device_type == "cpu":
        return None
    count = getattr(getattr(torch, device_type, None), "device_count", None)
    return int(count()) if callable(count) else None


def default_device() -> torch.device:
    """The first of ``ACCELERATORS`` this machine has, else the CPU."""
    return torch.device(next((t for t in ACCELERATORS if has_device(t)), "cpu"))


FUSED_ADAMW = ("cpu", "cuda")
"""Device types whose fused AdamW kernel every torch this library supports has."""


def fused_adamw(device: torch.device) -> bool:
    """Whether the training loops build torch's fused AdamW for ``device`` (one kernel for
    every parameter); elsewhere they leave torch its default."""
    return device.type in FUSED_ADAMW
