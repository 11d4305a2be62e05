"""Ranks for calibration stages: who am I, host copies, gathering to every rank.

Calibration stages that record data on each rank's share of the images
(observers, search caches, block reconstruction) use these, so that every
rank ends with exactly what one process seeing every image would hold.
"""
import torch
import torch.distributed as dist


def rank_world():
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def to_host(obj):
    """``obj`` with every tensor (in nested dicts, lists, tuples) moved to the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: to_host(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_host(v) for v in obj)
    return obj


def gather_to_all(obj):
    """Every rank's ``obj`` (host copies, in rank order) on every rank;
    ``[obj]`` in a single process."""
    _, world = rank_world()
    if world == 1:
        return [obj]
    gathered = [None] * world
    dist.all_gather_object(gathered, to_host(obj))
    return gathered


__all__ = ['rank_world', 'to_host', 'gather_to_all']
