"""Sharding across `accelerate launch` processes.

Work over N items is cut into fixed chunks of `batch_size` consecutive indices; chunk k belongs to rank
k % world_size. Chunk boundaries do not depend on the number of processes, so every batch that goes through a
network is the same batch whether one or eight processes run: results are identical, not merely close.
Per-item results are gathered to every rank in index order.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np


class Dist:
    def __init__(self, device=None):
        self.rank, self.world = 0, 1
        self.state = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import PartialState

            # PartialState ignores ACCELERATE_USE_CPU (only AcceleratorState reads it): pass it on ourselves
            cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or str(device) == "cpu"
            self.state = PartialState(cpu=cpu)
            self.rank, self.world = self.state.process_index, self.state.num_processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def default_device(self) -> str:
        import torch

        if self.state is not None:
            return str(self.state.device)
        return "cuda" if torch.cuda.is_available() else "cpu"

    def barrier(self) -> None:
        if self.world > 1:
            self.state.wait_for_everyone()

    def all_gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """rank 0's object on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as td

        box = [obj if self.is_main else None]
        td.broadcast_object_list(box, src=0)
        return box[0]


def release_process_group() -> None:
    """Destroy the process group of a finished multi-process command while the interpreter is whole: left to
    interpreter exit, a gloo worker thread can abort the process (see Trainer.close)."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def chunks(n: int, batch_size: int) -> list[range]:
    return [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def my_chunks(n: int, batch_size: int, dist: Dist) -> list[range]:
    return [c for k, c in enumerate(chunks(n, batch_size)) if k % dist.world == dist.rank]


def sharded_map(n: int, batch_size: int, fn: Callable[[Sequence[int]], np.ndarray], dist: Dist) -> np.ndarray:
    """Run fn on this rank's chunks; return every item's result (stacked, in index order) on every rank."""
    mine = {c.start: np.asarray(fn(list(c))) for c in my_chunks(n, batch_size, dist)}
    if dist.world > 1:
        merged = {}
        for part in dist.all_gather(mine):
            merged.update(part)
        mine = merged
    if not mine:
        return np.zeros((0,))
    return np.concatenate([mine[k] for k in sorted(mine)], axis=0)
