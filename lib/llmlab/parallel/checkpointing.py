"""Activation checkpointing: keep a block's input, not its insides, and recompute in backward.

Autograd normally saves every intermediate a block's backward needs: for the course GPT that
is many (B, T, C)-sized tensors per block plus the (B, n_head, T, T) attention weights.
`checkpoint(fn, x)` runs fn without recording, saves only x, and in backward runs fn again
with recording on, then backpropagates through that fresh graph. The price is one extra
forward per block; the gain is that only one block's intermediates live at a time.
Dropout stays the same across the recomputation: the RNG state is saved and restored.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor


class Recompute(torch.autograd.Function):
    """y = fn(x), saving only x (and the RNG state); backward recomputes fn with autograd on."""

    @staticmethod
    def forward(ctx, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        ctx.fn = fn
        ctx.rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(x.device) if x.is_cuda else None
        ctx.save_for_backward(x)
        with torch.no_grad():
            return fn(x)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[None, Tensor | None]:
        (x,) = ctx.saved_tensors
        x = x.detach().requires_grad_(x.requires_grad)
        devices = [x.device] if ctx.cuda_rng is not None else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng)  # the same dropout masks as the forward pass
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, x.device)
            y = ctx.fn(x)
        torch.autograd.backward(y, grad_out)  # the block's parameters get their .grad here
        return None, x.grad


def checkpoint(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """fn(x) with activation checkpointing when autograd records, plain fn(x) otherwise."""
    if not torch.is_grad_enabled():
        return fn(x)
    return Recompute.apply(fn, x)


class CheckpointedBlock(nn.Module):
    """Wraps a block: forward(x, *args) = block(x, *args), checkpointed. Only x receives a gradient."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return checkpoint(lambda h: self.block(h, *args, **kwargs), x)


def checkpoint_blocks(model: nn.Module) -> nn.Module:
    """Wrap every block of a course GPT (model.layers) in CheckpointedBlock, in place; return the model.

    Parameters keep their objects (an optimizer built before still works); their names gain
    a `.block` (layers.0.block.mlp...), so load state dicts before wrapping or after unwrapping.
    """
    for i, block in enumerate(model.layers):
        if not isinstance(block, CheckpointedBlock):
            model.layers[i] = CheckpointedBlock(block)
    return model


def unwrap_blocks(model: nn.Module) -> nn.Module:
    """Undo checkpoint_blocks in place; return the model."""
    for i, block in enumerate(model.layers):
        if isinstance(block, CheckpointedBlock):
            model.layers[i] = block.block
    return model
