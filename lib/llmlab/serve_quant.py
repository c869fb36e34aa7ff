"""Weight-only quantized Linear layers for serving (`llmlab serve --quantize int8|int4`).

Lab 4's formats, run by torch's packed kernels instead of a dequantize-then-matmul:
* int8: per-channel absmax codes (`quant.quantize_groups(w, 8, None)`), one scale per output
  row (lab 4's per-channel format: a group is the whole row), multiplied by
  `torch.ops.aten._weight_int8pack_mm`; `w8a8` packs the same codes for fbgemm's int8 x int8
  GEMM and quantizes activations too (faster, and less exact: see `Int8WeightOnlyLinear`);
* int4: group-wise zero-point codes in groups of 32 inputs
  (`quant.quantize_groups(w, 4, 32, symmetric=False)`: w = (q - z) * s), packed for
  `_weight_int4pack_mm_for_cpu`, whose dequantization is (q - 8) * s + zero: so its zero is
  lab 4's (8 - z) * s. The head stays int8: in int4 it costs the most quality (measured on
  SmolLM2-135M, 2,048 Shakespeare tokens: perplexity +88% with absmax g64 everywhere, +23%
  with zero-point g32 and an int8 head).

A decode step at batch 1 reads every weight once, so its time follows the bytes of the weights:
4x fewer with int8, 8x with int4. The weight-only kernels take bfloat16 activations (their
fast path); each layer casts x to bfloat16 and the result back. `llmlab.serve_model` fuses the
q/k/v (and gate/up) int8 layers of a Llama model into one (`Int8WeightOnlyLinear.fuse`). The head is quantized too (a tied
embedding keeps its float table for the lookup, which reads one row per token). Off the CPU
the layers fall back to `quant.QuantLinear` (the same numbers, dequantized at every call).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torch import Tensor

from llmlab import quant

INT4_GROUP = 32  # inputs per int4 scale and zero
KINDS = ("int8", "int4", "w8a8")  # w8a8: int8 weights and int8 activations (not weight-only)


class Int8WeightOnlyLinear(nn.Module):
    """nn.Linear with per-channel absmax int8 weights (out, in) and float32 scales (out,).

    Weight-only (the default): `_weight_int8pack_mm` multiplies bfloat16 activations by the
    codes. With `int8_activations` (W8A8, the `w8a8` kind) the codes are packed for torch's
    int8 x int8 GEMM (`quantized::linear_dynamic`, fbgemm on x86): each row of x is quantized
    to 8 bits on the fly, the sums are int32. Faster, but an activation's outlier channels then
    share 256 levels with the rest: measured on SmolLM2-135M, perplexity +4.5% against +0.1%.
    Both use exactly these codes and scales.
    """

    def __init__(self, linear: nn.Linear, int8_activations: bool = False):
        super().__init__()
        q, scale, _ = quant.quantize_groups(linear.weight.detach().float(), 8, None, symmetric=True)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self._set(q, scale.squeeze(1), bias, int8_activations)

    def _set(self, q: Tensor, scale: Tensor, bias: Tensor | None, int8_activations: bool) -> None:
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q.to(torch.int8).contiguous())  # (out, in), -127..127
        self.register_buffer("scale", scale.float().contiguous())  # (out,)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.packed = _pack_int8(self.qweight, self.scale) if int8_activations else None

    @classmethod
    def fuse(cls, layers: list["Int8WeightOnlyLinear"]) -> "Int8WeightOnlyLinear":
        """One layer whose outputs are the layers' outputs side by side (per-channel codes stack as rows)."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        biases = [m.bias for m in layers]
        bias = None if all(b is None for b in biases) else torch.cat(
            [b.detach() if b is not None else torch.zeros(m.out_features) for b, m in zip(biases, layers)])
        out._set(torch.cat([m.qweight for m in layers]), torch.cat([m.scale for m in layers]), bias,
                 layers[0].packed is not None)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) = x @ (q * scale).T + bias."""
        x2 = x.reshape(-1, self.in_features)
        if self.packed is not None:
            # The kernel quantizes x per tensor; each row scaled to absmax 1 first makes that per token.
            x2 = x2.float()
            amax = x2.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # (N, 1)
            y = torch.ops.quantized.linear_dynamic(x2 / amax, self.packed, False) * amax
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight,
                                                   self.scale.to(torch.bfloat16))
        y = y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


def _pack_int8(q: Tensor, scale: Tensor) -> object | None:
    """The codes packed for `quantized::linear_dynamic` on this CPU, or None (no quantized engine, or not a CPU)."""
    if q.device.type != "cpu" or torch.backends.quantized.engine == "none":
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensor constructors warn about their future
        weight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        try:
            return torch.ops.quantized.linear_prepack(weight, None)  # the bias is added after the row scales
        except RuntimeError:
            return None


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
        return (quant.QuantLinear(linear, 4, INT4_GROUP, symmetric=False) if kind == "int4"
                else quant.QuantLinear(linear, 8, None))
    return Int4WeightOnlyLinear(linear) if kind == "int4" else Int8WeightOnlyLinear(linear, kind == "w8a8")


@torch.no_grad()
def quantize_weights(model: nn.Module, kind: str) -> nn.Module:
    """Replace every nn.Linear of `model` by its `kind` version (with int4, the head: int8), in place."""
    for name, linear in quant.linear_layers(model).items():
        parent, _, child = name.rpartition(".")
        layer = quantized_linear(linear, "int8" if kind == "int4" and name.endswith("lm_head") else kind)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    if hasattr(model, "config") and hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # the head is its own (quantized) module now
    return model
