"""Batched inference split over several processes, with the outputs of one process.

The unit of work is a batch of the single-process batch list. With packing "turn" and ``size``
prompts per batch, batch j holds examples ``[j size, (j + 1) size)``; with packing "tree", batch
j is the j-th batch of dialogue trees (:mod:`decesc.esc.inference`). Process ``rank`` of
``world`` computes batches ``rank, rank + world, rank + 2 world, ...`` exactly as a single
process computes them: the same rows, so the same padding and tensor shapes. Then every process
receives every batch's results (``gather``) and puts them in place.

Why whole batches: a row's numbers depend on its batch-mates through the padding and the tree
layout (other shapes make the softmax and matmul reductions round differently). Sampling draws
every item's tokens from its own generator, seeded from the seed and the item's index
(:func:`decesc.esc.inference.item_seed`), so no draw depends on the batch. Keeping every batch
as it is keeps every greedy argmax and every sampled token of a single process, so the outputs
are identical byte for byte (on the same device type and threads per process).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def alone(obj: Any) -> list:
    """The gather of a single process: [obj]."""
    return [obj]


@dataclass(frozen=True)
class Shard:
    """This process's share of batched inference (see the module docstring).

    rank, world  this process's index and the number of processes
    gather       ``gather(obj) -> [obj of rank 0, obj of rank 1, ...]`` on every process (a
                 collective: every process calls it at the same point); plain Python objects
    """

    rank: int = 0
    world: int = 1
    gather: Callable[[Any], list] = alone

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def starts(self, n: int, size: int) -> range:
        """The first example of each batch this process computes, of n examples in batches of size."""
        return range(self.rank * size, n, self.world * size)

    def collect(self, rows: list, size: int) -> list:
        """``rows`` (one entry per example, this process's batches filled in) with every
        process's batches in place. A collective when world > 1."""
        if self.world == 1:
            return rows
        mine = {b0: rows[b0:b0 + size] for b0 in self.starts(len(rows), size)}
        out = list(rows)
        for part in self.gather(mine):
            for b0, chunk in part.items():
                out[b0:b0 + len(chunk)] = chunk
        return out

    def merge(self, found: dict) -> dict:
        """``found`` (this process's results, by key) together with every other process's
        (a collective when world > 1): for units of work that are not runs of examples, e.g.
        the tree batches of :func:`decesc.esc.inference.score_trees` (unit j on rank j mod world)."""
        if self.world == 1:
            return found
        out: dict = {}
        for part in self.gather(found):
            out.update(part)
        return out

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` run by rank 0 only; every process gets its value (a collective when
        world > 1). For decisions only rank 0 may take, e.g. reading a file it may move aside."""
        if self.world == 1:
            return compute()
        return self.gather(compute() if self.is_main else None)[0]


SINGLE = Shard()
