"""Process topology for training: one process, or many under ``torchrun`` (DistributedDataParallel).

A run is distributed when ``WORLD_SIZE`` > 1 in the environment (torchrun and
``python -m torch.distributed.run`` set ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``). Each
process then drives one device: ``cuda:LOCAL_RANK`` with the NCCL backend on GPUs, the CPU with
Gloo otherwise. Small control messages (the "stop now" flag after Ctrl-C/SIGTERM) travel on a
separate Gloo group so that they never force a GPU synchronisation.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = [
    "DistEnv",
    "topology",
    "resolve_device",
    "setup",
    "cleanup",
    "all_reduce_sum",
    "any_rank",
    "barrier",
]


@dataclass
class DistEnv:
    """Where this process sits: ``rank`` of ``world_size`` processes, driving ``device``."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    owns_group: bool = False
    control_group: object | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None


def topology() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from the torchrun environment variables (1, 0, 0 without)."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent WORLD_SIZE={world}, RANK={rank}, LOCAL_RANK={local}")
    return world, rank, local


def resolve_device(spec: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """``"auto"`` -> the local GPU when CUDA is available, else the CPU; ``"cuda"`` under torchrun
    -> ``cuda:LOCAL_RANK``; anything else is parsed by :class:`torch.device`."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank if distributed else torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {device} does not exist ({torch.cuda.device_count()} GPU(s) visible)")
    elif device.type != "cpu":
        raise ValueError(f"training supports cpu and cuda devices, not {device.type!r}")
    return device


def setup(device: str = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Reads the topology, picks this process's device and, when distributed, joins the process
    group (NCCL for CUDA, Gloo for CPU). A group that already exists (the caller's) is reused."""
    world, rank, local = topology()
    dev = resolve_device(device, local, world > 1)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1:
        return DistEnv(device=dev)
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    owns = False
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
        owns = True
    else:
        backend = dist.get_backend()
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise ValueError("the process group does not match WORLD_SIZE/RANK")
    control = dist.new_group(backend="gloo") if backend != "gloo" else None
    return DistEnv(world, rank, local, dev, backend, owns, control)


def cleanup(env: DistEnv) -> None:
    """Leaves the process group if :func:`setup` created it."""
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sums ``tensor`` over all processes (in place; returns it). A no-op in a single process."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, env: DistEnv) -> bool:
    """True on every process if ``flag`` is true on any of them (a CPU-side Gloo reduction)."""
    if not env.distributed:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=env.control_group)
    return bool(t.item())


def barrier(env: DistEnv) -> None:
    """Waits for every process (on the CPU-side group, so no GPU work is implied)."""
    if env.distributed:
        dist.barrier(group=env.control_group)
