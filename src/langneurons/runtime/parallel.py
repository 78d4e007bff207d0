"""Data parallelism of the runtime: under ``torchrun`` every pass splits its batches over the ranks and
gathers the results (see :mod:`langneurons.runtime`)."""

from __future__ import annotations

import os

import torch


def dist_info() -> tuple[int, int]:
    """``(rank, world size)`` from the torchrun environment (``(0, 1)`` outside it)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> None:
    """Join the process group of a torchrun launch (once; nccl on GPUs, gloo on CPUs)."""
    import torch.distributed as dist
    if dist_info()[1] > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun on GPUs each rank takes ``cuda:LOCAL_RANK``."""
    if dist_info()[1] > 1 and device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def gather(results: dict) -> dict:
    """Union of every rank's ``{index: result}`` (every rank gets all of it)."""
    rank, world = dist_info()
    if world == 1:
        return results
    import torch.distributed as dist
    if not dist.is_initialized():
        return results
    parts: list = [None] * world
    dist.all_gather_object(parts, results)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return merged
