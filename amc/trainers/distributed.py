"""DistributedDataParallel plumbing for the trainers, used only when launched by ``torchrun``.

Kept apart from the training loop so the loop reads the same with one process or many: every helper
here is a no-op (or the identity) when ``world_size == 1``.
"""
from __future__ import annotations

import atexit
import logging
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler

from amc.errors import DataError, TrainingError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job; ``world_size == 1`` means plain single-process training."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """torchrun (and torch.distributed.launch) set RANK and WORLD_SIZE for every worker."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_device(requested: Any, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """CUDA when available (one GPU per local rank under torchrun), CPU otherwise."""
    cuda = torch.cuda.is_available()
    if distributed:
        if cuda:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
            if requested is not None and torch.device(requested) != device:
                log.info("torchrun: using %s for local rank %d instead of device=%s", device, local_rank, requested)
            return device
        return torch.device("cpu")
    if requested is None or requested == "":
        return torch.device("cuda" if cuda else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not cuda:
        warnings.warn(f"device={requested!r} asked for CUDA but none is available; training on CPU", RuntimeWarning,
                      stacklevel=3)
        return torch.device("cpu")
    return device


_OWNED_GROUP = False


def _destroy_owned_group() -> None:
    if _OWNED_GROUP and dist.is_initialized():
        dist.destroy_process_group()


def setup(requested_device: Any) -> tuple:
    """Join the torchrun job if there is one; returns ``(DistInfo, device)``."""
    global _OWNED_GROUP
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return DistInfo(), pick_device(requested_device)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    device = pick_device(requested_device, local_rank, distributed=True)
    if not dist.is_available():
        raise TrainingError("launched by torchrun (RANK/WORLD_SIZE set) but torch.distributed is unavailable "
                            "in this build; run without torchrun")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        _OWNED_GROUP = True
        atexit.register(_destroy_owned_group)
    if dist.get_world_size() != world:
        raise TrainingError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    return DistInfo(rank=dist.get_rank(), world_size=world, local_rank=local_rank), device


def wrap(module: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel when distributed (gradients are averaged in backward), else the module."""
    if not info.enabled:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None)


def unwrap(module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


class ShardSampler(Sampler):
    """Every ``world_size``-th index, no padding: evaluation sees each sample exactly once across ranks."""

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self._indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices)

    def __len__(self) -> int:
        return len(self._indices)


def _rebuild(loader: DataLoader, sampler: Sampler) -> DataLoader:
    if loader.batch_size is None:
        raise DataError("cannot shard a DataLoader built with a custom batch_sampler for torchrun; build it with "
                        "a torch.utils.data.DistributedSampler yourself (the trainer then leaves it alone)")
    kwargs: Dict[str, Any] = dict(
        batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
        collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
    )
    if loader.num_workers > 0:
        kwargs.update(prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
                      multiprocessing_context=loader.multiprocessing_context)
    return DataLoader(loader.dataset, **kwargs)


def shard_train_loader(loader: Optional[DataLoader], info: DistInfo, seed: int = 0) -> Optional[DataLoader]:
    """Give each rank its part of the training set (DistributedSampler, shuffled when the original was)."""
    if loader is None or not info.enabled or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        warnings.warn("torchrun: the training loader wraps an IterableDataset; it is not sharded, so make it "
                      "yield different samples per rank", RuntimeWarning, stacklevel=3)
        return loader
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    shuffle = isinstance(loader.sampler, RandomSampler)
    sampler = DistributedSampler(loader.dataset, num_replicas=info.world_size, rank=info.rank, shuffle=shuffle,
                                 seed=seed, drop_last=loader.drop_last)
    return _rebuild(loader, sampler)


def shard_eval_loader(loader: Optional[DataLoader], info: DistInfo) -> Optional[DataLoader]:
    """Evaluation shards without padding so reduced metrics equal the single-process ones."""
    if loader is None or not info.enabled or not isinstance(loader, DataLoader):
        return loader
    if isinstance(loader.dataset, IterableDataset) or isinstance(loader.sampler, (DistributedSampler, ShardSampler)):
        return loader
    return _rebuild(loader, ShardSampler(len(loader.dataset), info.rank, info.world_size))


def set_epoch(loader: Any, epoch: int) -> None:
    """DistributedSampler reshuffles from ``seed + epoch``; it must be told the epoch."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def _reduce_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sums(values: Mapping[str, float], info: DistInfo, device: torch.device) -> Dict[str, float]:
    """Sum each named float over ranks in float64; keys missing on a rank count as zero."""
    if not info.enabled:
        return dict(values)
    # Union of keys: a rank whose evaluation shard is empty reports nothing, and contributes zeros.
    keys = sorted(set().union(*all_gather_object(sorted(values), info)))
    tensor = torch.tensor([float(values.get(k, 0.0)) for k in keys], dtype=torch.float64, device=_reduce_device(device))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, tensor.tolist())}


def any_true(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """One rank wanting to stop stops all, so no rank waits forever in a collective."""
    if not info.enabled:
        return bool(flag)
    tensor = torch.tensor([1.0 if flag else 0.0], device=_reduce_device(device))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def all_gather_object(obj: Any, info: DistInfo) -> List[Any]:
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to all ranks (after plug-ins that edit weights with randomness)."""
    if not info.enabled:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=0)


def average_gradients(params: Iterable[nn.Parameter], info: DistInfo) -> None:
    """Average grads of parameters that live outside the DDP module (e.g. distillation adapters)."""
    if not info.enabled:
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad.div_(info.world_size)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
