"""Weight-only quantized Linear layers for serving (`llmlab serve --quantize int8|int4`).

Lab 4's formats, run by torch's packed kernels instead of a dequantize-then-matmul:
* int8: per-channel absmax codes (`quant.quantize_groups(w, 8, None)`), one scale per output
  row, multiplied by `torch.ops.aten._weight_int8pack_mm`;
* int4: group-wise absmax codes in groups of 64 inputs (`quant.quantize_groups(w, 4, 64)`),
  stored as lab 4's offset-binary codes q + 8, packed for `_weight_int4pack_mm_for_cpu`
  (whose dequantization is (code - 8) * scale + zero, with zero = 0 for absmax).

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

INT4_GROUP = 64  # inputs per int4 scale (lab 4's "int4 g64"); 32 where in_features is not a multiple of 64
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
    """nn.Linear with group-wise absmax int4 weights, packed for torch's CPU int4 kernel."""

    def __init__(self, linear: nn.Linear, group_size: int | None = None):
        super().__init__()
        group_size = group_size or int4_group(linear.in_features)
        self.in_features, self.out_features, self.group_size = linear.in_features, linear.out_features, group_size
        if self.in_features % group_size:
            raise ValueError(f"int4 needs in_features divisible by {group_size}, got {self.in_features}")
        q, scale, _ = quant.quantize_groups(linear.weight.detach().float(), 4, group_size, symmetric=True)
        codes = q.to(torch.int32) + 8  # lab 4's offset binary: -7..7 -> 1..15
        self.register_buffer("qweight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        zeros = torch.zeros_like(scale)
        # (n_groups, out, 2): each group's scale and its zero (0: absmax) in the kernel's layout
        self.register_buffer("scales_and_zeros", torch.stack([scale.T, zeros.T], dim=-1).to(torch.bfloat16)
                             .contiguous())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) = x @ ((codes - 8) * scale).T + bias."""
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                       self.qweight, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def int4_group(in_features: int) -> int:
    """The int4 group size for a layer: INT4_GROUP, or 32 when in_features is not a multiple of it."""
    return INT4_GROUP if in_features % INT4_GROUP == 0 else 32


def quantized_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """The packed layer of `kind` for `linear` on the CPU; lab 4's QuantLinear elsewhere."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if linear.weight.device.type != "cpu":
        return quant.QuantLinear(linear, 8 if kind == "int8" else 4,
                                 None if kind == "int8" else int4_group(linear.in_features))
    return Int8WeightOnlyLinear(linear) if kind == "int8" else Int4WeightOnlyLinear(linear)


@torch.no_grad()
def quantize_weights(model: nn.Module, kind: str) -> nn.Module:
    """Replace every nn.Linear of `model` (the head included) by its weight-only `kind` version, in place."""
    for name, linear in quant.linear_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, quantized_linear(linear, kind))
    if hasattr(model, "config") and hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # the head is its own (quantized) module now
    return model
