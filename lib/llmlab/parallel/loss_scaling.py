"""Dynamic loss scaling: keep fp16 gradients out of the underflow zone without overflowing.

fp16's smallest normal number is 6e-5 (subnormals reach 6e-8): small gradients become 0.
Multiplying the loss by S multiplies every gradient by S (the chain rule is linear), lifting
them into range; dividing by S before the optimizer step gives the true gradient back. Too
large an S overflows to inf, so the scale adapts: a step whose gradients hold an inf or NaN
is skipped and S is multiplied by `backoff_factor`; after `growth_interval` good steps in a
row S is multiplied by `growth_factor`. These are `torch.amp.GradScaler`'s decisions.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor


class DynamicLossScaler:
    """scale(loss) -> backward -> unscale_(params) -> step if finite -> update()."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1")
        self.scale = torch.tensor(float(init_scale))  # fp32, as GradScaler keeps it
        self.growth_factor, self.backoff_factor, self.growth_interval = growth_factor, backoff_factor, growth_interval
        self.good_steps = 0  # finite steps since the last change of scale
        self.found_inf = False

    def scale_loss(self, loss: Tensor) -> Tensor:
        """loss * S: backward then yields S times the true gradients."""
        return loss * self.scale.to(loss.device)

    def unscale_(self, params: Iterable[Tensor]) -> bool:
        """Divide every .grad by S in place; return (and remember) whether any is inf or NaN."""
        inv = self.scale.double().reciprocal().float()  # 1/S computed as GradScaler does
        found = False
        for p in params:
            if p.grad is not None:
                p.grad.mul_(inv.to(p.grad.device))
                found |= not bool(torch.isfinite(p.grad).all())
        self.found_inf = found
        return found

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """optimizer.step() unless the unscaled gradients overflowed; return whether it stepped."""
        if self.found_inf:
            return False
        optimizer.step()
        return True

    def update(self) -> float:
        """Back off after an overflow, grow after growth_interval good steps; return the new scale."""
        if self.found_inf:
            self.scale = self.scale * self.backoff_factor
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                grown = self.scale * self.growth_factor
                if torch.isfinite(grown):
                    self.scale = grown
                self.good_steps = 0
        self.found_inf = False
        return float(self.scale)
