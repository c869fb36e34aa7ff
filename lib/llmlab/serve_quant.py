"""Weight-only quantized Linear layers for serving (`llmlab serve --quantize int8|int4`).

Lab 4's formats, run by torch's packed kernels instead of a dequantize-then-matmul:
* int8: per-channel absmax codes (`quant.quantize_groups(w, 8, None)`), one scale per output
  row, multiplied by `torch.ops.aten._weight_int8pack_mm`;
* int4: group-wise zero-point codes in groups of 32 inputs
  (`quant.quantize_groups(w, 4, 32, symmetric=False)`: w = (q - z) * s), packed for
  `_weight_int4pack_mm_for_cpu`, whose dequantization is (q - 8) * s + zero: so its zero is
  lab 4's (8 - z) * s. The head stays int8: in int4 it costs the most quality (measured on
  SmolLM2-135M, 2,048 Shakespeare tokens: perplexity +88% with absmax g64 everywhere, +23%
  with zero-point g32 and an int8 head).

A decode step at batch 1 reads every weight once, so its time follows the bytes of the weights:
4x fewer with int8, 8x with int4. The kernels take bfloat16 activations (their fast path);
each layer casts x to bfloat16 and the result back. The head is quantized too (a tied
embedding keeps its float table for the lookup, which reads one row per token). Off the CPU
the layers fall back to `quant.QuantLinear` (the same numbers, dequantized at every call).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from llmlab import quant

INT4_GROUP = 32  # inputs per int4 scale and zero
KINDS = ("int8", "int4")


class Int8WeightOnlyLinear(nn.Module):
    """nn.Linear with per-channel absmax int8 weights (out, in) and bfloat16 scales (out,)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale, _ = quant.quantize_groups(linear.weight.detach().float(), 8, None, symmetric=True)
        self.register_buffer("qweight", q.contiguous())  # (out, in) int8, -127..127
        self.register_buffer("scale", scale.squeeze(1).to(torch.bfloat16).contiguous())  # (out,)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) = x @ (q * scale).T + bias."""
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                               self.qweight, self.scale)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


class Int4WeightOnlyLinear(nn.Module):
    """nn.Linear with group-wise zero-point int4 weights, packed for torch's CPU int4 kernel."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP):
        super().__init__()
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        if self.in_features % group_size:
            raise ValueError(f"int4 needs in_features divisible by {group_size}, got {self.in_features}")
        q, scale, zero = quant.quantize_groups(linear.weight.detach().float(), 4, group_size, symmetric=False)
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        kernel_zero = (8 - zero.float()) * scale  # (q - z) * s == (q - 8) * s + (8 - z) * s
        # (n_groups, out, 2): each group's scale and zero in the kernel's layout
        self.register_buffer("scales_and_zeros", torch.stack([scale.T, kernel_zero.T], dim=-1)
                             .to(torch.bfloat16).contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) = x @ ((q - z) * s).T + bias."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                       self.qweight, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def quantized_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """The packed layer of `kind` for `linear` on the CPU; lab 4's QuantLinear elsewhere."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if linear.weight.device.type != "cpu":
        return (quant.QuantLinear(linear, 8, None) if kind == "int8"
                else quant.QuantLinear(linear, 4, INT4_GROUP, symmetric=False))
    return Int8WeightOnlyLinear(linear) if kind == "int8" else Int4WeightOnlyLinear(linear)


@torch.no_grad()
def quantize_weights(model: nn.Module, kind: str) -> nn.Module:
    """Replace every nn.Linear of `model` by its weight-only `kind` version (the head: int8), in place."""
    for name, linear in quant.linear_layers(model).items():
        parent, _, child = name.rpartition(".")
        layer = quantized_linear(linear, "int8" if name.endswith("lm_head") else kind)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    if hasattr(model, "config") and hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # the head is its own (quantized) module now
    return model
