"""The generating stages (mine, eval) under torchrun: every process generates, rank 0 writes.

    torchrun --nproc_per_node=4 -m tools.train --stages mine,eval ...

Each process computes its share of every generation and planning batch and receives all the
others' (:mod:`decesc.esc.sharding`: whole batches of ``gen_batch_size`` of the single-process
batch list, batch j on rank j mod world, each batch with its single-process seed), so every
process holds the outputs a single process would compute, and rank 0 alone

- reads and writes the stage's files (a stored sub-step is reused by all: rank 0 says whether it
  found one, :func:`stored_or_generated`);
- judges (the judge cache is one sqlite file) and routes, scores and reports, while the other
  ranks wait for it at the end of the stage (:func:`decesc.pipeline.run.run_pipeline`).

The files are those of a single-process run, byte for byte. The gathers are
``torch.distributed.all_gather_object`` of plain Python lists and strings (never tensors), so
they work on a gloo (CPU) and an nccl (GPU) process group alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from decesc.esc.sharding import SINGLE, Shard
from decesc.pipeline.results import cached_rows


def process_shard() -> Shard:
    """This process's shard: rank and world size of the torchrun process group, or a single
    process when there is none."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return SINGLE
    from decesc.train.fsdp import all_gather_object

    return Shard(dist.get_rank(), dist.get_world_size(), all_gather_object)


def stored_or_generated(path: Path, generate: Callable[[], list[dict]], shard: Shard,
                        log=print) -> list[dict]:
    """:func:`decesc.pipeline.results.cached_rows` across processes: rank 0 reads the stored rows
    of ``path`` (an unreadable file is moved aside) or, when there are none, tells the other
    ranks to join ``generate`` (a collective) and writes its rows. The other ranks return the
    rows they generated, or [] when rank 0 read them from the file."""
    if not shard.is_main:
        return generate() if shard.from_main(lambda: None) else []
    joined = []

    def announced() -> list[dict]:
        shard.from_main(lambda: True)  # the other ranks join the generation
        joined.append(True)
        return generate()

    rows = cached_rows(path, announced, log)
    if not joined:
        shard.from_main(lambda: False)  # read from the file: nothing to generate
    return rows
