"""What every process takes from the main one.

A value that must be the same on every rank, and that only the main process should make
(it reads files another rank might see otherwise, or takes a lock), is made there and sent:

    costs = from_main(lambda: dataset_costs(...), rank, world)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def from_main(make: Callable[[], T], rank: int, world: int) -> T:
    """``make()`` run by the main process alone, its (picklable) result sent to every
    process; without a process group (one process), each caller's own ``make()``."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return make()
    holder = [make() if rank == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]
