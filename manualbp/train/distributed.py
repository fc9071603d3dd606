"""Distributed data parallel: the manual MLP under ``torch.nn.parallel.DistributedDataParallel``.

``torchrun --nproc_per_node=N experiments/train.py ...`` (or any launcher that sets ``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``) makes :func:`manualbp.train.run`
distributed: each process trains on its shard of every global batch (``optim.batch_size`` examples per
process, so a global batch of N x batch_size), DDP averages the gradients, and the result equals
single-process training on the concatenated batch. Rank 0 alone logs (W&B, progress bar) and writes files
and checkpoints; every rank evaluates the full splits (identical weights give identical numbers), and the
per-step stopping checks see the loss averaged over ranks and rank 0's clock, so every rank stops together.
Backend "gloo" on CPU, "nccl" on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DistInfo", "setup", "wrap", "reduce_step", "all_sum"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``world`` processes, this one is ``rank`` (``local_rank`` on its node)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group that the launcher describes (if any); returns (info, this rank's device).

    With ``WORLD_SIZE`` unset or 1 nothing happens. On CUDA each rank takes ``cuda:LOCAL_RANK``.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(), device
    info = DistInfo(world, _env_int("RANK", 0), _env_int("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
        if missing:
            raise ValueError(
                f"WORLD_SIZE={world} asks for distributed training, but {', '.join(missing)} is not set "
                "(launch with torchrun --nproc_per_node=N)"
            )
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=info.rank, world_size=world)
    return info, device


def wrap(module: nn.Module, info: DistInfo) -> nn.Module:
    """``DistributedDataParallel(module)`` when distributed, else ``module`` itself."""
    if not info.enabled:
        return module
    device = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)


def all_sum(tensor: Tensor, info: DistInfo) -> Tensor:
    """The sum over ranks (in place); a no-op for one process."""
    if info.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def reduce_step(loss: Tensor, elapsed: float, info: DistInfo) -> tuple[Tensor, float]:
    """(loss averaged over ranks, rank 0's elapsed seconds): what every rank's per-step checks must see."""
    if not info.enabled:
        return loss, elapsed
    packed = torch.stack(
        [loss.detach().to(torch.float64), loss.new_tensor(elapsed if info.is_main else 0.0, dtype=torch.float64)]
    )
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    mean_loss, main_elapsed = packed.tolist()
    return loss.new_tensor(mean_loss / info.world), main_elapsed
