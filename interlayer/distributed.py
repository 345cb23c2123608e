"""Several processes under ``torchrun``: the process group, which sites a rank trains, and the few
collectives the SAE trainer needs.

    torchrun --standalone --nproc-per-node 4 -m interlayer sae train --model M --sites 'layers.*' ...

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process's environment; the group is
joined with NCCL when the run uses CUDA and gloo on the CPU. Without ``WORLD_SIZE`` (or with 1) everything
here is the single process and costs nothing.

Two ways to share SAE training among W ranks (``--distribute``):

- ``sites`` (module parallelism, the default): the sites s₀ … s_{n−1} are cut into W contiguous blocks whose
  sizes differ by at most one, and rank r trains the SAEs of block r. Every rank reads the same data and
  computes activations only up to its last site, so the ranks holding early layers run shorter forward
  passes. A site's SAE depends only on its own activation stream, so each SAE is exactly (bit for bit) the
  one a single process trains.
- ``data`` (data parallelism): every rank trains every SAE. The model batches of each chunk are dealt out
  (rank r runs batches r, r+W, …) and the chunk is reassembled in batch order on every rank, so all ranks
  hold the single-process chunk; of each shuffled batch of B rows rank r takes rows [rB/W, (r+1)B/W). The
  loss is normalised by statistics of the whole batch (x̄ and Σ‖x − x̄‖² are all-reduced), the gradients are
  summed over the ranks and the dead-latent counters see every rank's firings, so each step is the
  single-process step up to the order of floating-point sums. For many sites the model forward is shared
  as well; for one wide SAE it is the only way to use more devices.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from interlayer.errors import UserError

T = TypeVar("T")
COLLECTIVE_TIMEOUT = timedelta(hours=1)


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among the ranks of a run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes shared files and talks to the user."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast(self, value: T) -> T:
        """Rank 0's ``value``, on every rank."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Replace ``tensor`` on every rank by its sum (or ``op="max"``) over the ranks; returns it."""
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor

    def all_gather_rows(self, rows_ND: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``rows_ND`` (row counts may differ, the rest of the shape may not), in rank order."""
        if self.world == 1:
            return [rows_ND]
        counts: list[Any] = [None] * self.world
        dist.all_gather_object(counts, rows_ND.shape[0])
        padded = rows_ND.new_zeros((max(counts), *rows_ND.shape[1:]))
        padded[: rows_ND.shape[0]] = rows_ND
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return [part[:count] for part, count in zip(parts, counts, strict=True)]

    def gather(self, value: T) -> list[T]:
        """Every rank's ``value`` in rank order on rank 0; an empty list on the other ranks."""
        if self.world == 1:
            return [value]
        gathered: list[Any] | None = [None] * self.world if self.is_main else None
        dist.gather_object(value, gathered, dst=0)
        return gathered or []


SINGLE = ProcessGroup()


def process_group(device: str = "cpu") -> ProcessGroup:
    """The group ``torchrun`` launched this process in (joined on first call), or :data:`SINGLE`.

    On CUDA the process binds to ``cuda:LOCAL_RANK`` before joining NCCL (NCCL's object collectives use the
    current device). The collective timeout is an hour: rank 0 writing a checkpoint or the final SAEs of
    large dictionaries keeps the others waiting in the next collective.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    if not dist.is_initialized():
        if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
            local = torch.device(rank_device("cuda"))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=local, timeout=COLLECTIVE_TIMEOUT)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
        # Leave the group before the interpreter tears down its threads; without it gloo's threads can
        # abort the process at exit ("terminate called without an active exception").
        atexit.register(dist.destroy_process_group)
    return ProcessGroup(dist.get_rank(), dist.get_world_size())


def rank_device(device: str) -> str:
    """The device of this rank under ``torchrun``: ``cuda`` (or ``auto`` on a GPU node) is ``cuda:LOCAL_RANK``;
    naming one GPU (``cuda:N``) for several processes is a :class:`UserError`."""
    if "LOCAL_RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return device
    if device.startswith("cuda:"):
        raise UserError(
            f"--device {device} would put every process on one GPU; under torchrun pass --device cuda "
            "(each process takes cuda:LOCAL_RANK)"
        )
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def site_blocks(sites: Sequence[str], world: int) -> list[list[str]]:
    """``sites`` cut into ``world`` contiguous blocks whose sizes differ by at most one (the larger first)."""
    if len(sites) < world:
        raise UserError(
            f"{len(sites)} site(s) cannot be shared among {world} processes (each trains at least one "
            "site); pass more --sites, start fewer processes, or use --distribute data"
        )
    base, extra = divmod(len(sites), world)
    bounds = [0]
    for rank in range(world):
        bounds.append(bounds[-1] + base + (rank < extra))
    return [list(sites[bounds[r] : bounds[r + 1]]) for r in range(world)]


DISTRIBUTE_MODES = ("sites", "data")


def local_sites(sites: Sequence[str], group: ProcessGroup, mode: str) -> list[str]:
    """The sites this rank trains: its block of ``sites`` when sharing by sites, every site by data."""
    return site_blocks(sites, group.world)[group.rank] if mode == "sites" else list(sites)


def check_mode(mode: str, batch_size: int, world: int) -> None:
    """A :class:`UserError` unless ``mode`` is a known way to share work and the batch splits evenly."""
    if mode not in DISTRIBUTE_MODES:
        raise UserError(f"unknown --distribute {mode!r}; choose one of {', '.join(DISTRIBUTE_MODES)}")
    if mode == "data" and batch_size % world:
        raise UserError(
            f"--distribute data splits each batch among {world} processes: --batch-size {batch_size} "
            f"is not a multiple of {world}"
        )
