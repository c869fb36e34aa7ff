"""Weight-only quantized Linear layers for serving (`llmlab serve --quantize int8|int4`).

Lab 4's formats, run by torch's packed kernels instead of a dequantize-then-matmul (except an
int8 prefill where the CPU has native bfloat16: there one bfloat16 GEMM on the dequantized
weight is faster than the packed kernel's pass per row, see `MANY_ROWS`):
* int8: per-channel absmax codes (`quant.quantize_groups(w, 8, None)`), one scale per output
  row (lab 4's per-channel format: a group is the whole row), multiplied by
  `torch.ops.aten._weight_int8pack_mm`; `w8a8` packs 7-bit codes of the same format for
  fbgemm's int8 x int8 GEMM and quantizes activations too, after SmoothQuant's rescaling
  (`smooth_activations`): faster, and less exact (see `Int8WeightOnlyLinear`);
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

import functools
import warnings
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from llmlab import quant

INT4_GROUP = 32  # inputs per int4 scale and zero
KINDS = ("int8", "int4", "w8a8")  # w8a8: int8 weights and int8 activations (not weight-only)
W8A8_BITS = 7  # w8a8's weight codes: -63..63, so that fbgemm's AVX2 kernel never saturates (see below)
# From this many rows on (a prefill) the int8 codes are dequantized to bfloat16 for one GEMM where
# the CPU has native bfloat16: `_weight_int8pack_mm`'s time grows with the rows, a GEMM's far less
# (the README's serving section has the figures).
MANY_ROWS = 16
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength (measured best of 0.35-0.8 on SmolLM2-135M)


@functools.cache
def native_bf16() -> bool:
    """True when oneDNN multiplies bfloat16 natively on this CPU (AVX-512 or AMX), where a bf16 GEMM is fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class Int8WeightOnlyLinear(nn.Module):
    """nn.Linear with per-channel absmax int8 weights (out, in) and float32 scales (out,).

    Weight-only (the default): `_weight_int8pack_mm` multiplies bfloat16 activations by the
    codes. With `int8_activations` (W8A8, the `w8a8` kind) the codes are packed for torch's
    int8 x int8 GEMM (`quantized::linear_dynamic`, fbgemm on x86): each row of x is quantized
    to 8 bits on the fly (uint8 with a zero point), the sums are int32. Without VNNI (AVX2)
    fbgemm sums pairs of uint8 x int8 products in int16 (`vpmaddubsw`), which saturates past
    32,767: with 8-bit codes 2 x 255 x 127 overflows, so the w8a8 codes have 7 bits
    (2 x 255 x 63 fits; oneDNN halves its weights on such CPUs for the same reason). Measured on
    SmolLM2-135M (4,096 held-out tokens): 8-bit codes +4.9% perplexity (the saturation), 7-bit
    +6.7%, 7-bit after `smooth_activations` +2.6%; weight-only +0.35%.
    """

    def __init__(self, linear: nn.Linear, int8_activations: bool = False):
        super().__init__()
        bits = W8A8_BITS if int8_activations else 8
        q, scale, _ = quant.quantize_groups(linear.weight.detach().float(), bits, None, symmetric=True)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self._set(q, scale.squeeze(1), bias, int8_activations)

    def _set(self, q: Tensor, scale: Tensor, bias: Tensor | None, int8_activations: bool) -> None:
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q.to(torch.int8).contiguous())  # (out, in), -127..127
        self.register_buffer("scale", scale.float().contiguous())  # (out,)
        self.register_buffer("scale_bf16", self.scale.to(torch.bfloat16), persistent=False)  # the kernel's, cast once
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
        if self.packed is not None and x2.size(0) == 1:  # one row (decoding one stream): per tensor is per token
            y = torch.ops.quantized.linear_dynamic(x2.float(), self.packed, False)
        elif self.packed is not None:
            # The kernel quantizes x per tensor; each row scaled to absmax 1 first makes that per token.
            x2 = x2.float()
            amax = x2.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12)  # (N, 1)
            y = torch.ops.quantized.linear_dynamic(x2 / amax, self.packed, False) * amax
        elif x2.size(0) >= MANY_ROWS and native_bf16():  # a prefill: one bfloat16 GEMM on the dequantized weight
            y = nn.functional.linear(x2.to(torch.bfloat16), self.qweight.to(torch.bfloat16) * self.scale_bf16[:, None])
        else:
            y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), self.qweight, self.scale_bf16)
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


@torch.no_grad()
def smooth_activations(model: nn.Module, ids: Tensor, alpha: float = SMOOTH_ALPHA, block_size: int = 256) -> nn.Module:
    """SmoothQuant for a Hugging Face Llama, in place: each matmul's input outlier channels scaled into its weights.

    x @ W.T == (x / s) @ (W * s).T for any per-input-channel s (in,), so the float model
    computes the same; with s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha) (maxima over the
    calibration tokens `ids` (N,), 1-D) the activations' outlier channels shrink and the
    weights' grow until both quantize about equally well. Each 1/s is folded into what makes
    x: the RMSNorm weights before q/k/v, gate/up and the head, up_proj's rows before
    down_proj, v_proj's rows before o_proj (one s per key/value channel, shared by the query
    heads of its group). The head gets its own weight (a tied embedding keeps its table).
    Calibrate on training text, never on what is then measured.
    """
    from llmlab.serve_model import is_llama

    if not is_llama(model):
        raise ValueError("smooth_activations needs a Hugging Face Llama model")
    layers, config = model.model.layers, model.config
    inputs = {"head": model.lm_head}
    for i, layer in enumerate(layers):
        inputs.update({(i, "qkv"): layer.self_attn.q_proj, (i, "o"): layer.self_attn.o_proj,
                       (i, "gate_up"): layer.mlp.gate_proj, (i, "down"): layer.mlp.down_proj})
    amax: dict = {}  # key -> (in,) max |x_j| over the calibration tokens

    def hook(key: Any) -> Any:
        def record(module: nn.Module, args: tuple) -> None:
            a = args[0].detach().abs().reshape(-1, args[0].size(-1)).amax(0).float()
            amax[key] = a if key not in amax else torch.maximum(amax[key], a)
        return record

    hooks = [m.register_forward_pre_hook(hook(key)) for key, m in inputs.items()]
    try:
        for window in ids.to(model.lm_head.weight.device).split(block_size):
            model(window[None])
    finally:
        for h in hooks:
            h.remove()

    def scales(act: Tensor, weights: list[Tensor]) -> Tensor:
        w = torch.stack([x.abs().amax(0) for x in weights]).amax(0)  # (in,)
        return (act.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)

    def into(norm: nn.Module, linears: list[nn.Linear], s: Tensor) -> None:
        norm.weight.div_(s)
        for m in linears:
            m.weight.mul_(s)

    heads, groups = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        into(layer.input_layernorm, qkv, scales(amax[i, "qkv"], [m.weight for m in qkv]))
        into(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj],
             scales(amax[i, "gate_up"], [mlp.gate_proj.weight, mlp.up_proj.weight]))
        s = scales(amax[i, "down"], [mlp.down_proj.weight])
        mlp.up_proj.weight.div_(s[:, None])
        mlp.down_proj.weight.mul_(s)
        # o_proj's input channel (head h, dim e) is v's channel (group of h, e): one s per group's channel
        act = amax[i, "o"].view(groups, heads // groups, head_dim).amax(1)  # (groups, head_dim)
        w = attn.o_proj.weight.abs().amax(0).view(groups, heads // groups, head_dim).amax(1)
        s = (act.clamp(min=1e-5) ** alpha / w.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        attn.v_proj.weight.div_(s.reshape(-1)[:, None])
        attn.o_proj.weight.mul_(s[:, None, :].expand(groups, heads // groups, head_dim).reshape(-1))
    s = scales(amax["head"], [model.lm_head.weight])
    model.lm_head.weight = nn.Parameter(model.lm_head.weight * s, requires_grad=False)  # untied from the embedding
    model.model.norm.weight.div_(s)
    if hasattr(config, "tie_word_embeddings"):
        config.tie_word_embeddings = False
    return model


def quantized_linear(linear: nn.Linear, kind: str) -> nn.Module:
    """The packed layer of `kind` for `linear` on the CPU; lab 4's QuantLinear elsewhere."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if linear.weight.device.type != "cpu":
        return (quant.QuantLinear(linear, 4, INT4_GROUP, symmetric=False) if kind == "int4"
                else quant.QuantLinear(linear, 8, None))
    return Int4WeightOnlyLinear(linear) if kind == "int4" else Int8WeightOnlyLinear(linear, kind == "w8a8")


@torch.no_grad()
def quantize_weights(model: nn.Module, kind: str, calibration: Tensor | None = None) -> nn.Module:
    """Replace every nn.Linear of `model` by its `kind` version (with int4, the head: int8), in place.

    calibration: token ids (N,) of training text; with w8a8 on a Llama, `smooth_activations` on them first.
    """
    if kind == "w8a8" and calibration is not None:
        smooth_activations(model, calibration)
    for name, linear in quant.linear_layers(model).items():
        parent, _, child = name.rpartition(".")
        layer = quantized_linear(linear, "int8" if kind == "int4" and name.endswith("lm_head") else kind)
        setattr(model.get_submodule(parent) if parent else model, child, layer)
    if hasattr(model, "config") and hasattr(model.config, "tie_word_embeddings"):
        model.config.tie_word_embeddings = False  # the head is its own (quantized) module now
    return model
