"""Several processes, one training run: data parallelism through torch.distributed (launched by torchrun).

    torchrun --nproc_per_node=2 -m minildm train          # two GPUs of one machine (README, "More GPUs")

torchrun starts one process per GPU and tells each who it is through environment variables: RANK (0 .. N-1 over
all machines), WORLD_SIZE (N), LOCAL_RANK (which GPU of this machine), MASTER_ADDR and MASTER_PORT (where rank 0
listens). `init` (called by `device.setup`, the first cell of every notebook and command) reads them and joins the
process group: NCCL between GPUs, gloo between CPU processes. Without them (a plain `python` or a notebook) nothing
changes: one process, no process group, and every helper below answers "rank 0 of 1".

What data parallelism means here (the `Trainer` does it):
- every rank holds the same model (rank 0's weights are broadcast at the start) and draws its own part of each
  global batch: `batch_size` in the configs is the global batch, each of N ranks trains on batch_size / N images,
  and the N parts together are exactly the batch one process would draw (`part_of`);
- after each backward pass the gradients are averaged over the ranks (`average_gradients`): every rank then takes
  the same optimiser step, so the weights and their EMA stay identical, and the step equals one process's step on
  the global batch. The learning rate is the one for that global batch;
- random numbers of a step (noise, timesteps, dropped captions) are drawn for the whole global batch from a generator
  seeded by the step, and each rank keeps its part (`step_generator`, `part_of`): N ranks compute what one would;
- only rank 0 writes logs, pictures and checkpoints (`is_main`).

A collective operation waits for every rank. If one rank fails, the others must not wait for ever: collectives run
through `collective`, which turns a lost peer into a `DistributedError` that says so, and the process group has a
timeout (MINILDM_DIST_TIMEOUT seconds, default 600) after which a rank that waits for a silent peer gives up.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

TIMEOUT_ENV = "MINILDM_DIST_TIMEOUT"


class DistributedError(RuntimeError):
    """A collective operation failed: another rank stopped (its own error says why) or never answered."""


@dataclass(frozen=True)
class Place:
    """Where this process stands in the run: rank `rank` of `world_size`, on GPU `local_rank` of its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    if value == "":
        return default
    if not value.strip().isdigit():
        raise ValueError(f"environment variable {name}={value!r} must be a non-negative integer (torchrun sets it)")
    return int(value)


def timeout_seconds() -> float:
    """How long a collective may wait for the other ranks (MINILDM_DIST_TIMEOUT, default 600 s)."""
    return float(os.environ.get(TIMEOUT_ENV, "600"))


def init(device: torch.device | None = None) -> Place:
    """Join the process group torchrun's environment describes, or do nothing for a single process.

    Reads RANK, WORLD_SIZE and LOCAL_RANK; picks NCCL when `device` is CUDA (and makes GPU LOCAL_RANK this
    process's current device), gloo otherwise. Calling it again returns the same place."""
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return Place()
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if rank >= world_size:
        raise ValueError(f"RANK={rank} but WORLD_SIZE={world_size}: ranks run from 0 to WORLD_SIZE - 1")
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed; run a single process")
    if not dist.is_initialized():
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if not os.environ.get(name):
                raise ValueError(f"WORLD_SIZE={world_size} but {name} is not set: start the processes with torchrun "
                                 "(it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)")
        cuda = device is not None and torch.device(device).type == "cuda"
        if cuda:
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {torch.cuda.device_count()} GPUs; "
                                 "start at most one process per GPU (--nproc_per_node)")
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_seconds()))
    return Place(rank, world_size, local_rank)


def place() -> Place:
    """This process's place: from the process group when one is initialised, else rank 0 of 1."""
    if dist.is_available() and dist.is_initialized():
        return Place(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))
    return Place()


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes logs, pictures and checkpoints."""
    return place().is_main


def cleanup() -> None:
    """Leave the process group (after a last barrier, so no rank leaves while another still needs it)."""
    if dist.is_available() and dist.is_initialized():
        barrier("the end of the run")
        dist.destroy_process_group()


# ---- each rank's part of a global batch ----------------------------------------------------------


def local_batch_size(global_batch: int, world_size: int | None = None) -> int:
    """Images per rank: global_batch / world_size, or a clear error when it does not divide."""
    world_size = place().world_size if world_size is None else world_size
    if global_batch % world_size:
        lower = global_batch - global_batch % world_size
        raise ValueError(f"the global batch size {global_batch} does not divide among {world_size} processes; "
                         f"use a batch size that is a multiple of {world_size} (e.g. {lower or world_size}) "
                         f"or another number of processes (--nproc_per_node)")
    return global_batch // world_size


def rank_slice(global_batch: int, rank: int | None = None, world_size: int | None = None) -> slice:
    """Which items of a global batch rank `rank` of `world_size` trains on: the contiguous block
    rank * b .. (rank + 1) * b - 1 with b = global_batch / world_size. Both default to this process's place."""
    here = place()
    rank = here.rank if rank is None else rank
    b = local_batch_size(global_batch, here.world_size if world_size is None else world_size)
    return slice(rank * b, (rank + 1) * b)


def part_of(x: torch.Tensor | list, rank: int | None = None, world_size: int | None = None):
    """Rank `rank`'s contiguous part of a global batch (first dimension of a tensor, or a list)."""
    return x[rank_slice(len(x), rank, world_size)]


def step_generator(step: int, device, seed: int = 0) -> torch.Generator:
    """A generator seeded by (seed, step) on `device`: the random numbers of one training step. Every rank draws
    the same numbers for the whole global batch and keeps its part, so N ranks draw what one process would, and a
    resumed run draws what the interrupted one would have drawn."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


# ---- collectives that fail loudly ----------------------------------------------------------------


@contextlib.contextmanager
def collective(what: str):
    """Run a collective operation; if a peer is gone, raise a DistributedError that names this rank and `what`."""
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as err:  # gloo: "Connection closed by peer"; NCCL: a watchdog timeout or abort
        here = place()
        raise DistributedError(
            f"rank {here.rank} of {here.world_size}: lost contact with the other processes during {what}. Another "
            f"rank probably failed (its own error message, printed above, says why), or did not answer within "
            f"{timeout_seconds():.0f} s ({TIMEOUT_ENV}); stopping this one too. Details: "
            f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err


def barrier(what: str = "a barrier") -> None:
    if place().distributed:
        with collective(what):
            dist.barrier()


def broadcast_tensors(tensors: Iterable[torch.Tensor], what: str = "broadcasting rank 0's weights") -> None:
    """Overwrite every tensor (in place) with rank 0's copy."""
    if not place().distributed:
        return
    with collective(what), torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


def average_gradients(params: Iterable[torch.Tensor], what: str = "averaging gradients") -> None:
    """Replace every parameter's gradient by its mean over the ranks: one all-reduce of all gradients flattened
    into one buffer (one message instead of hundreds). This is what torch's DistributedDataParallel does, written
    out (it also overlaps the messages with the backward pass). Parameters without a gradient (None on every rank:
    all ranks run the same code) are skipped."""
    here = place()
    if not here.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    with collective(what):
        dist.all_reduce(flat)  # a sum (gloo has no average)
    flat /= here.world_size
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


def mean_over_ranks(values: dict[str, float], device) -> dict[str, float]:
    """Average a dict of numbers over the ranks (the logs: each rank saw its own part of the batch)."""
    if not place().distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    with collective("averaging the logs"):
        dist.all_reduce(t)
    return dict(zip(keys, (t / place().world_size).tolist()))


def from_main(value: float, device) -> float:
    """Rank 0's value of a number on every rank (e.g. its clock, so that all ranks stop at the same step)."""
    if not place().distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    with collective("sharing rank 0's clock"):
        dist.broadcast(t, src=0)
    return t.item()
