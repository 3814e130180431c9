"""Training: config dataclasses, a thin accelerate trainer, data order and batching."""

from ace.train.config import Config, load_config

__all__ = ["Config", "Trainer", "load_config"]


def __getattr__(name: str):
    if name == "Trainer":
        from ace.train.trainer import Trainer

        return Trainer
    raise AttributeError(f"module 'ace.train' has no attribute {name!r}")
