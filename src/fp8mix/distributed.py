"""Processes and devices: data-parallel ranks on torch.distributed (launched by ``torchrun`` or ``fp8mix score
--gpus N``) and the GPUs each process uses. A neutral module: scoring, model loading and the CLI all use it.

Every rank builds the same calibration batches and scores whole batches: batch i runs on rank i mod world size.
The AutoQuant scores are sums over batches of per-batch terms that depend only on the batch (the loss is the mean
over that batch's reply tokens), so all-reducing the per-module sums gives the single-process result up to the
order of the float64 additions. fp8_static input scales are calibrated the same way with a max-reduce.

Without torchrun (no WORLD_SIZE in the environment) every function here is the identity for one process.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .errors import FP8MixError


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True inside a torchrun launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(device: str) -> str:
    """The device a stage runs on: "auto" is CUDA when a GPU is visible, else the CPU; cpu, cuda and cuda:N pass."""
    device = str(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise FP8MixError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N")
    return device


def init(device: str) -> str:
    """Join the process group torchrun set up (gloo on CPU, NCCL on CUDA); returns this rank's device ("auto"
    resolved)."""
    device = resolve_device(device)
    if not launched():
        return device
    cuda = str(device).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise FP8MixError("--device cuda was asked for but this machine has no CUDA GPU")
    if not active():
        # long: a rank may wait at a barrier while the main one runs the study's control
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=4))
    if not cuda:
        return device
    gpu = local_gpus()[0]
    torch.cuda.set_device(gpu)
    return f"cuda:{gpu}"


def local_gpus() -> list[int]:
    """The GPUs of this process: all visible ones split evenly among the processes of this machine (one each with
    one GPU per process; several each when the model is sharded with --device-map auto)."""
    n = torch.cuda.device_count()
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if n < per_node:
        raise FP8MixError(f"{per_node} processes on this machine but only {n} CUDA GPU(s) visible; "
                          f"use at most {n} processes")
    k = n // per_node
    return list(range(local * k, (local + 1) * k))


def shard(items: Sequence) -> list:
    """This rank's share of a list of batches: items rank, rank + world, …"""
    return list(items[rank()::world_size()])


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(values: list[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
    """Reduce scalar tensors across ranks in one call; each result comes back on its tensor's own device (they may
    sit on several GPUs under a device map) and dtype."""
    if not active() or not values:
        return values
    flat = torch.stack([v.detach().reshape(()).to(_comm_device(), torch.float64) for v in values])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return [flat[i].to(v.device, v.dtype) for i, v in enumerate(values)]


def barrier() -> None:
    if active():
        dist.barrier()


def close() -> None:
    if active():
        dist.barrier()
        dist.destroy_process_group()


def leave() -> None:
    """Leave the group after a failure, without waiting for the others."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


__all__ = ["active", "all_reduce", "barrier", "close", "init", "is_main", "launched", "leave", "local_gpus", "rank",
           "resolve_device", "shard", "world_size"]


def release_gpu_cache() -> None:
    """Hand this process's cached, unused GPU memory back to the driver (before a vLLM engine, a separate process
    that sizes its KV cache from the GPU's free memory, starts)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
