"""Data parallelism by hand: every rank holds the whole model, sees its own slice of the
batch, and the ranks average their gradients before each (identical) optimizer step.

The mean of the ranks' mean-loss gradients is the gradient of the mean loss over the global
batch (equal shards), so N ranks take exactly the step one process would on all the data.
Naively that is one all-reduce per parameter: many small messages, each paying the network's
latency. Bucketing packs consecutive gradients into flat buffers of about `bucket_bytes`
and all-reduces each buffer once. DistributedDataParallel does this too, and overlaps it with
backward: a bucket goes out as soon as the gradients in it are ready.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor


def allreduce_mean_(tensors: Sequence[Tensor]) -> None:
    """Average each tensor across ranks in place: one all-reduce per tensor."""
    world = dist.get_world_size()
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world)


def make_buckets(nbytes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Group consecutive tensors (by index) greedily: a bucket is closed when the next one would
    push it past bucket_bytes; a tensor larger than bucket_bytes gets a bucket of its own."""
    buckets: list[list[int]] = []
    size = 0
    for i, n in enumerate(nbytes):
        if buckets and size + n <= bucket_bytes:
            buckets[-1].append(i)
            size += n
        else:
            buckets.append([i])
            size = n
    return buckets


def bucketed_allreduce_mean_(tensors: Sequence[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Average tensors across ranks in place, one all-reduce per bucket; return the buckets used."""
    world = dist.get_world_size()
    buckets = make_buckets([t.numel() * t.element_size() for t in tensors], bucket_bytes)
    for bucket in buckets:
        flat = torch.cat([tensors[i].reshape(-1) for i in bucket])  # (sum of numels,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for i in bucket:
            n = tensors[i].numel()
            tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
            offset += n
    return buckets


def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Make every rank start from rank src's weights (and buffers)."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src)


def sync_gradients(model: nn.Module, bucket_bytes: int | None = 25 * 2**20) -> None:
    """After backward: average the gradients across ranks (bucketed unless bucket_bytes is None)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if bucket_bytes is None:
        allreduce_mean_(grads)
    else:
        bucketed_allreduce_mean_(grads[::-1], bucket_bytes)  # backward produces the last layers first
