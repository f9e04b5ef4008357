"""Process-group set-up from the launcher's environment, and small collective helpers.

Works under ``torchrun`` and the ``deepspeed`` launcher (both export ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and as a plain single process. The backend is NCCL
on CUDA and gloo on CPU (DeepSpeed's CPU accelerator also speaks gloo when oneCCL is not installed).
Every helper is a no-op / identity when no process group exists, so the same trainer code runs
single-process.
"""

from __future__ import annotations

import datetime
import os
import random
import socket
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup_distributed",
    "find_free_port",
    "get_local_rank",
    "get_rank",
    "get_world_size",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "seed_everything",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its host, its ``device``."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise ValueError(f"environment variable {name}={raw!r} must be an integer (set by the launcher)") from err


def find_free_port() -> int:
    """A TCP port on localhost that is free right now (for single-process groups in tests)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(
    backend: str | None = None, *, force: bool = False, timeout_s: float = 1800.0
) -> DistInfo:
    """Initialise ``torch.distributed`` from the launcher's environment.

    Args:
        backend: ``"nccl"`` / ``"gloo"``; default NCCL when CUDA is available, else gloo.
        force: create a process group even for a single process (``WORLD_SIZE`` unset or 1); DeepSpeed
            needs one. Missing ``MASTER_ADDR``/``MASTER_PORT`` are then filled with localhost and a free port.
        timeout_s: collective timeout.

    Returns the ``DistInfo``; on CUDA the current device is set to ``cuda:LOCAL_RANK``. Calling it again
    when a group exists just reports it.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid launcher environment: RANK={rank}, WORLD_SIZE={world_size}")
    # MMFM_DEVICE=cpu keeps a job on the CPU on a GPU machine (mmfm demo --device cpu)
    use_cuda = torch.cuda.is_available() and os.environ.get("MMFM_DEVICE", "").lower() != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), device)
    if world_size == 1 and not force:
        return DistInfo(0, 1, local_rank, None, device)
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend not in ("nccl", "gloo", "mpi", "ccl"):
        raise ValueError(f"init_distributed: backend must be 'nccl' or 'gloo', got {backend!r}")
    if world_size == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(find_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(
                f"{name} is not set although WORLD_SIZE={world_size}: launch with torchrun or deepspeed"
            )
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return DistInfo(rank, world_size, local_rank, backend, device)


def cleanup_distributed() -> None:
    """Destroy the default process group if one exists.

    When DeepSpeed has used the group, its own ``destroy_process_group`` is called so that it also
    drops its cached sub-groups; otherwise a later ``deepspeed.initialize`` in the same process would
    find groups of the destroyed world.
    """
    if not is_distributed():
        return
    ds_comm = sys.modules.get("deepspeed.comm.comm")
    if ds_comm is not None and getattr(ds_comm, "cdb", None) is not None:
        ds_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_local_rank() -> int:
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on global rank 0 (and in a single process)."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed() and get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is left unchanged)."""
    out = tensor.detach().clone()
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks (a new tensor; integer inputs are averaged in float32)."""
    out = tensor.detach().clone()
    if not out.is_floating_point():
        out = out.float()
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        out /= get_world_size()
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s (picklable, trusted, in-process) ``obj`` on every rank."""
    if not (is_distributed() and get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int, rank: int | None = None) -> int:
    """Seed python ``random``, numpy and torch (CPU and CUDA) with ``seed + rank``; returns that seed.

    ``rank`` defaults to this process's global rank, so ranks draw different dropout masks and
    augmentations while the whole run stays reproducible.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed_everything: seed must be a non-negative int, got {seed!r}")
    rank = get_rank() if rank is None else rank
    s = seed + rank
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(s)
    return s
