"""ZeRO stages 1 and 2: shard Adam's state (and the gradients) across data-parallel ranks.

All parameters are seen as one flat vector of N numbers, padded to a multiple of the world
size W; rank r owns the slice [r * N/W, (r + 1) * N/W). Each rank keeps Adam's two moments
only for its slice (stage 1: optimizer state / W) and updates only that slice, then the
ranks all-gather the updated slices so everyone has the full weights again.
Stage 1 all-reduces the full gradient and uses its own slice of it; stage 2 reduce-scatters,
so each rank only ever holds the averaged gradient of its slice (gradients / W as well).
Stage 3 (FSDP) would also shard the weights and gather each layer just before it is used.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import Tensor


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of rank's slice of a flat vector of n numbers padded to a multiple of world."""
    size = math.ceil(n / world)
    return rank * size, (rank + 1) * size


class ZeroAdam:
    """Adam (AdamW-style decoupled weight decay) with ZeRO stage 1 or 2 sharding; torch.optim.Adam's math."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, stage: int = 1):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {stage!r}")
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.betas, self.eps, self.weight_decay, self.stage = lr, betas, eps, weight_decay, stage
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.numel = sum(p.numel() for p in self.params)
        self.start, self.stop = shard_range(self.numel, self.rank, self.world)
        size = self.stop - self.start
        dtype = self.params[0].dtype
        self.exp_avg = torch.zeros(size, dtype=dtype)  # only this rank's slice: 1/W of Adam's state
        self.exp_avg_sq = torch.zeros(size, dtype=dtype)
        self.grad_shard: Tensor | None = None  # stage 2: the averaged gradient of our slice
        self.t = 0

    def _flat(self, tensors: list[Tensor]) -> Tensor:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        return torch.nn.functional.pad(flat, (0, self.world * (self.stop - self.start) - self.numel))

    def state_bytes(self) -> int:
        """Bytes of optimizer state this rank holds."""
        return (self.exp_avg.numel() + self.exp_avg_sq.numel()) * self.exp_avg.element_size()

    @torch.no_grad()
    def step(self) -> None:
        """Average the gradients, update this rank's slice, all-gather the new weights."""
        grads = self._flat([p.grad for p in self.params])  # (W * shard,)
        if self.stage == 1:
            dist.all_reduce(grads)
            g = grads[self.start:self.stop] / self.world
        else:
            g = torch.empty(self.stop - self.start, dtype=grads.dtype)
            dist.reduce_scatter(g, list(grads.chunk(self.world)))
            g /= self.world
            for p in self.params:
                p.grad = None  # the full gradient is not kept: that is stage 2's saving
        self.grad_shard = g
        self.t += 1
        beta1, beta2 = self.betas
        self.exp_avg.lerp_(g, 1 - beta1)
        self.exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step_size = self.lr / (1 - beta1**self.t)
        denom = (self.exp_avg_sq.sqrt() / math.sqrt(1 - beta2**self.t)).add_(self.eps)
        weights = self._flat([p.detach() for p in self.params])
        mine = weights[self.start:self.stop].clone()
        mine.mul_(1 - self.lr * self.weight_decay).addcdiv_(self.exp_avg, denom, value=-step_size)
        dist.all_gather(list(weights.chunk(self.world)), mine)
        offset = 0
        for p in self.params:
            p.copy_(weights[offset:offset + p.numel()].view_as(p))
            offset += p.numel()

    def zero_grad(self) -> None:
        """Drop the gradients (set them to None)."""
        for p in self.params:
            p.grad = None
