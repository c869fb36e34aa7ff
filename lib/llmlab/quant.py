"""Weight quantization and pruning: make a model smaller, and measure what it costs.

Read top-down:
1. the two round-to-nearest schemes on the rows of a tensor: absmax (symmetric, int8 codes)
   and zero-point (asymmetric, uint8 codes). Every row of the last axis gets its own scale,
   so the granularity is the shape you pass: `w.reshape(1, -1)` is per-tensor, a (out, in)
   weight is per-channel (one scale per output row), `w.reshape(out, -1, g)` is group-wise;
2. `quantize_groups`: a Linear weight in groups of `group_size` input weights per row;
3. int4 packing, two codes per byte;
4. `QuantLinear`, a Linear that stores packed codes + scales, and `quantize_model`;
5. a GPTQ-style quantizer that compensates each column's rounding error on the columns
   still to be quantized, using second-order statistics of real inputs;
6. measurements: model bytes, held-out perplexity, sentence-embedding similarity, latency,
   torch's dynamic int8 quantization (CPU), magnitude pruning;
7. a report table and plots.

The round-trip error of round-to-nearest is at most half a quantization step per element:
|x - dequantize(quantize(x))| <= scale / 2, as long as no value falls outside the range the
scale was chosen for, which absmax and min/max scales guarantee.
"""
from __future__ import annotations

import copy
import math
import statistics
import time
import warnings
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llmlab.evaluate import perplexity  # noqa: F401  (lab 4 scores its size/quality table with the evaluator)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BITS = (4, 8)  # the widths QuantLinear stores; the row functions accept 2..8


def _check_bits(bits: int, allowed: Sequence[int] = range(2, 9)) -> None:
    if bits not in allowed:
        raise ValueError(f"bits must be one of {list(allowed)}, got {bits!r}")


def _as_float(x: Tensor) -> Tensor:
    """float32 for 16-bit inputs (their rounding would blur the grid); float32/64 stay."""
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got {x.dtype}")
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


# ----------------------------------------------------------------------------------------
# 1. Round-to-nearest on rows: absmax and zero-point


def absmax_quantize(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor]:
    """Symmetric quantization of each row (last axis): codes in [-(2^(b-1)-1), 2^(b-1)-1].

    Args:
        x: (..., n) float. bits: code width, 2..8.
    Returns:
        q: (..., n) int8 codes, round(x / scale).
        scale: (..., 1) float, max|x| / (2^(b-1) - 1) per row (a row of zeros gets a tiny
            positive scale, so its codes are 0 and nothing divides by zero).
    """
    _check_bits(bits)
    x = _as_float(x)
    qmax = 2 ** (bits - 1) - 1  # 127 for int8, 7 for int4: -128 / -8 stay unused, so 0 is the centre
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    q = torch.round(x / scale).clamp(-qmax, qmax)  # clamp: a no-op but for float rounding
    return q.to(torch.int8), scale


def absmax_dequantize(q: Tensor, scale: Tensor) -> Tensor:
    """Codes back to floats: q * scale, in scale's dtype. q (..., n), scale (..., 1)."""
    return q.to(scale.dtype) * scale


def zeropoint_quantize(x: Tensor, bits: int = 8) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric quantization of each row (last axis): codes in [0, 2^b - 1].

    The range of a row is [min(x_min, 0), max(x_max, 0)]: it always holds 0, so 0 is exactly
    representable (code = zero) and the zero point is a valid code.
    Args:
        x: (..., n) float. bits: code width, 2..8.
    Returns:
        q: (..., n) uint8 codes, clamp(round(x / scale) + zero, 0, 2^b - 1).
        scale: (..., 1) float, (hi - lo) / (2^b - 1).
        zero: (..., 1) uint8, round(-lo / scale): the code that stands for 0.0.
    """
    _check_bits(bits)
    x = _as_float(x)
    qmax = 2**bits - 1
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (hi - lo).clamp(min=1e-12) / qmax
    zero = torch.round(-lo / scale)  # in [0, qmax] since lo <= 0 <= hi
    q = (torch.round(x / scale) + zero).clamp(0, qmax)
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


def zeropoint_dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Codes back to floats: (q - zero) * scale, in scale's dtype (no uint8 wrap-around)."""
    return (q.to(scale.dtype) - zero.to(scale.dtype)) * scale


# ----------------------------------------------------------------------------------------
# 2. A Linear weight in groups


def _groups(w: Tensor, group_size: int | None) -> tuple[Tensor, int]:
    """(out, in) -> (out, n_groups, group_size) and the group size.

    group_size None: one group per row (per-channel). A last group shorter than group_size
    is padded with copies of the row's last weight, which changes neither its max|w| nor
    its min/max, so it gets exactly the scale its own weights call for.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D (out_features, in_features) weight, got shape {tuple(w.shape)}")
    out_f, in_f = w.shape
    gs = in_f if group_size is None else group_size
    if gs < 1:
        raise ValueError(f"group_size must be >= 1 or None, got {group_size!r}")
    n_groups = math.ceil(in_f / gs)
    pad = n_groups * gs - in_f
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out_f, pad)], dim=1)
    return w.reshape(out_f, n_groups, gs), gs


def expand_groups(t: Tensor, group_size: int, in_features: int) -> Tensor:
    """Per-group values (out, n_groups) -> one per weight (out, in_features)."""
    return t.repeat_interleave(group_size, dim=1)[:, :in_features]


def quantize_groups(w: Tensor, bits: int = 8, group_size: int | None = None,
                    symmetric: bool = True) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest quantization of a (out, in) weight, one scale per group of inputs.

    Args:
        w: (out, in) float weight. bits: 2..8. group_size: None for one scale per output row
            (per-channel); k for groups of k consecutive input weights (the last group of a
            row may be shorter). symmetric: absmax (True) or zero-point (False).
    Returns:
        q: (out, in) codes (int8 for absmax, uint8 for zero-point).
        scale: (out, n_groups) float. zero: (out, n_groups) uint8, or None when symmetric.
    """
    groups, _ = _groups(w, group_size)
    in_f = w.shape[1]
    if symmetric:
        q, scale = absmax_quantize(groups, bits)
        zero = None
    else:
        q, scale, zero = zeropoint_quantize(groups, bits)
        zero = zero.squeeze(-1)
    return q.flatten(1)[:, :in_f], scale.squeeze(-1), zero


def dequantize_groups(q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int | None) -> Tensor:
    """Inverse of `quantize_groups`: (out, in) codes + (out, n_groups) scales -> (out, in) floats."""
    in_f = q.shape[1]
    gs = in_f if group_size is None else group_size
    scale = expand_groups(scale, gs, in_f)
    if zero is None:
        return absmax_dequantize(q, scale)
    return zeropoint_dequantize(q, scale, expand_groups(zero, gs, in_f))


def fake_quantize(w: Tensor, bits: int = 8, group_size: int | None = None, symmetric: bool = True) -> Tensor:
    """w after a quantize -> dequantize round trip (same shape, float): what the model computes with."""
    return dequantize_groups(*quantize_groups(w, bits, group_size, symmetric), group_size)


# ----------------------------------------------------------------------------------------
# 3. int4 packing: two codes per byte


def pack_int4(q: Tensor) -> Tensor:
    """Pack 4-bit codes two per byte: (..., n) integers in [0, 15], n even -> (..., n/2) uint8.

    Element 2i goes to the low nibble of byte i, element 2i+1 to the high nibble.
    """
    if q.is_floating_point():
        raise ValueError(f"pack_int4 packs integer codes, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even number of codes in the last axis, got {q.shape[-1]}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("pack_int4 codes must lie in [0, 15] (shift signed codes by +8 first)")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """Inverse of `pack_int4`: (..., m) uint8 -> (..., 2m) uint8 codes in [0, 15]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8 bytes, got {packed.dtype}")
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)  # (..., m, 2) -> (..., 2m), interleaved


# ----------------------------------------------------------------------------------------
# 4. A quantized Linear layer, and a whole model


class QuantLinear(nn.Module):
    """A Linear whose weight is stored as integer codes (int4: packed two per byte) + scales.

    forward dequantizes the weight and runs an ordinary float matmul: it saves memory, not
    time. (Fast kernels fuse the unpacking into the matmul; the numbers are the same.)
    Codes are stored unsigned: absmax codes shifted by 2^(bits-1), so w = (codes - zero) * scale
    with zero = 2^(bits-1) for absmax and a stored per-group zero for zero-point.
    """

    def __init__(self, linear: nn.Linear, bits: int = 8, group_size: int | None = None,
                 symmetric: bool = True, codes: tuple[Tensor, Tensor, Tensor | None] | None = None):
        """Quantize `linear`'s weight to nearest, or store `codes` = (q, scale, zero) laid out as
        `quantize_groups` returns them (e.g. from `gptq_quantize`)."""
        super().__init__()
        _check_bits(bits, BITS)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if bits == 4 and self.in_features % 2:
            raise ValueError(f"int4 packing needs an even in_features, got {self.in_features}")
        self.bits, self.symmetric = bits, symmetric
        self.group_size = self.in_features if group_size is None else group_size
        q, scale, zero = codes or quantize_groups(linear.weight.detach(), bits, group_size, symmetric)
        if (zero is None) != symmetric:
            raise ValueError("codes: zero must be None for symmetric (absmax) codes and a tensor otherwise")
        if symmetric:
            q = q.to(torch.int16) + 2 ** (bits - 1)  # offset binary: -7..7 -> 1..15, -127..127 -> 1..255
        stored = q.to(torch.uint8)
        self.register_buffer("qweight", pack_int4(stored) if bits == 4 else stored)  # (out, in) or (out, in/2)
        self.register_buffer("scale", scale)  # (out, n_groups)
        self.register_buffer("zero", zero)  # (out, n_groups) uint8, or None (absmax)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized_weight(self) -> Tensor:
        """The (out, in) float weight the layer computes with."""
        codes = unpack_int4(self.qweight) if self.bits == 4 else self.qweight
        scale = expand_groups(self.scale, self.group_size, self.in_features)
        if self.zero is None:
            zero = torch.tensor(2 ** (self.bits - 1), dtype=scale.dtype, device=scale.device)
        else:
            zero = expand_groups(self.zero, self.group_size, self.in_features).to(scale.dtype)
        return (codes.to(scale.dtype) - zero) * scale

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out), as nn.Linear with the dequantized weight."""
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight().to(x.dtype), bias)

    def extra_repr(self) -> str:
        kind = "absmax" if self.symmetric else "zero-point"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, {kind}")


def _skipped(name: str, skip: Sequence[str]) -> bool:
    return any(name == s or name.endswith("." + s) for s in skip)


def linear_layers(model: nn.Module, skip: Sequence[str] = ()) -> dict[str, nn.Linear]:
    """{qualified name: module} of every nn.Linear in `model` whose name does not end with a `skip` entry."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and not _skipped(name, skip)}


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def quantize_model(model: nn.Module, bits: int = 8, group_size: int | None = None, symmetric: bool = True,
                   skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear of `model` by a QuantLinear, in place; return the model.

    skip: layers to keep in full precision, by qualified name or its ending ("lm_head" skips
    `lm_head`, "mlp.down_proj" every MLP's down projection). The output layer is skipped by
    default: it is often tied to the embedding, and quantizing it hurts most.
    Embeddings and norms are not Linear layers and stay as they are.
    """
    _check_bits(bits, BITS)
    for name, linear in linear_layers(model, skip).items():
        _replace(model, name, QuantLinear(linear, bits, group_size, symmetric))
    return model


# ----------------------------------------------------------------------------------------
# 5. GPTQ-style error compensation


def gptq_quantize(w: Tensor, H: Tensor, bits: int = 4, group_size: int | None = None,
                  symmetric: bool = True, damp: float = 0.01, block: int = 128) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantize (out, in) `w` column by column, spreading each column's rounding error onto
    the columns not yet quantized, so that the layer's OUTPUTS on real inputs change least.

    Minimises ||X w^T - X w_hat^T||^2 where H = X^T X (in, in) sums the layer's inputs
    (Frantar et al., 2022, "GPTQ"), using the Cholesky factor of H^-1, `block` columns at a
    time. Each group's scale is chosen when its first column comes up, from the weights as
    updated so far. Returns (q, scale, zero) laid out as `quantize_groups` returns them.
    """
    W = w.detach().float().clone()  # (out, in), on w's device
    out_f, in_f = W.shape
    gs = in_f if group_size is None else group_size
    n_groups = math.ceil(in_f / gs)
    H = H.detach().to(W).clone()
    dead = torch.diag(H) == 0  # inputs that were always 0: their weights do not matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(in_f, dtype=H.dtype, device=H.device)  # keeps H invertible
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    q = torch.zeros(out_f, in_f, dtype=torch.int8 if symmetric else torch.uint8, device=W.device)
    scales = torch.zeros(out_f, n_groups, device=W.device)
    zeros = None if symmetric else torch.zeros(out_f, n_groups, dtype=torch.uint8, device=W.device)
    for i1 in range(0, in_f, block):
        i2 = min(i1 + block, in_f)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2]), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # a new group starts: its scale from the weights as they are now
                g = col // gs
                group = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :gs]
                if symmetric:
                    _, scales[:, g:g + 1] = absmax_quantize(group, bits)
                else:
                    _, scales[:, g:g + 1], zeros[:, g:g + 1] = zeropoint_quantize(group, bits)
            x, scale = W1[:, i:i + 1], scales[:, col // gs:col // gs + 1]  # (out, 1) each
            if symmetric:
                qmax = 2 ** (bits - 1) - 1
                code = torch.round(x / scale).clamp(-qmax, qmax)
                deq = code * scale
            else:
                zero = zeros[:, col // gs:col // gs + 1].float()
                code = (torch.round(x / scale) + zero).clamp(0, 2**bits - 1)
                deq = (code - zero) * scale
            q[:, col:col + 1] = code.to(q.dtype)
            err = (x - deq) / Hinv1[i, i]  # (out, 1)
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]  # compensate on this block's remaining columns
            Err1[:, i:i + 1] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]  # ... and, lazily, on all later blocks
    return q, scales, zeros


@torch.no_grad()
def gptq_model(model: nn.Module, calibration: Tensor, bits: int = 4, group_size: int | None = None,
               symmetric: bool = True, skip: Sequence[str] = ("lm_head",), batch_size: int = 8) -> nn.Module:
    """Quantize every Linear of a Hugging Face causal LM with `gptq_quantize`, in place.

    calibration: (N, T) token ids. One forward pass of the full-precision model records each
    layer's H = sum of x x^T over all calibration tokens; then every layer is quantized at
    once (the original GPTQ goes layer by layer, feeding each the outputs of the already
    quantized ones; this one-pass version is simpler and close to it at these sizes).
    """
    layers = linear_layers(model, skip)
    device = next(model.parameters()).device
    hessians = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in layers.items()}

    def recorder(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().reshape(-1, module.in_features).float()  # (tokens, in)
            hessians[name] += x.T @ x
        return hook

    handles = [m.register_forward_hook(recorder(name)) for name, m in layers.items()]
    try:
        for batch in calibration.split(batch_size):
            model(input_ids=batch.to(device))
    finally:
        for h in handles:
            h.remove()
    for name, linear in layers.items():
        codes = gptq_quantize(linear.weight.detach(), hessians.pop(name), bits, group_size, symmetric)
        _replace(model, name, QuantLinear(linear, bits, group_size, symmetric, codes=codes))
    return model


# ----------------------------------------------------------------------------------------
# 6. Measurements


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's state (parameters and buffers, torch-quantized weights too); shared storage counts once."""
    seen, total = set(), 0

    def add(v: Any) -> None:
        nonlocal total
        if isinstance(v, Tensor):
            key = (v.device, v.data_ptr(), v.numel())
            if key not in seen:
                seen.add(key)
                total += v.numel() * v.element_size()
        elif isinstance(v, (tuple, list)):
            for item in v:
                add(item)

    for v in model.state_dict(keep_vars=True).values():
        add(v)
    return total


def token_ids(tokenizer: Any, texts: Sequence[str], max_tokens: int | None = None) -> Tensor:
    """Encode `texts` with a Hugging Face tokenizer into one 1-D stream, documents joined by EOS.

    max_tokens: keep the first this many tokens (held-out sets can be long).
    """
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + sep
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens], dtype=torch.long)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer: Any, sentences: Sequence[str]) -> Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the sentence-transformers recipe): (N, hidden)."""
    batch = tokenizer(list(sentences), padding=True, truncation=True, return_tensors="pt")
    device = next(iter(model.state_dict().values())).device
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state  # (N, T, hidden)
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (N, T, 1): padding counts 0
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
    return F.normalize(pooled.float(), dim=-1)


def latency(fn: Callable[[], Any], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall-clock seconds of fn() over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dynamic_int8(model: nn.Module, skip: Sequence[str] = ()) -> nn.Module:
    """A CPU copy of `model` whose nn.Linear layers (but those named in `skip`, as for
    `quantize_model`) run torch's dynamic int8 quantization.

    Weights become int8 once (per tensor); each call quantizes the activations on the fly
    from their observed range and runs an int8 x int8 matmul (fbgemm/x86 or qnnpack kernels):
    smaller AND faster on CPUs, unlike weight-only QuantLinear. CPU only. (torch announces
    that this API moves to the `torchao` package; its deprecation warnings are silenced here.)
    """
    import torch.ao.quantization as tq

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated", category=DeprecationWarning)
        model = copy.deepcopy(model).cpu().eval()
        return tq.quantize_dynamic(model, set(linear_layers(model, skip)), dtype=torch.qint8)


def magnitude_prune(w: Tensor, sparsity: float) -> Tensor:
    """A copy of `w` with its round(sparsity * numel) smallest-magnitude entries set to 0."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must lie in [0, 1], got {sparsity}")
    k = round(sparsity * w.numel())
    out = w.detach().clone()
    if k:
        smallest = w.detach().abs().flatten().argsort()[:k]
        out.view(-1)[smallest] = 0
    return out


@torch.no_grad()
def prune_model(model: nn.Module, sparsity: float, skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Magnitude-prune the weight of every nn.Linear (each layer to `sparsity`), in place; return the model.

    The weights stay dense tensors, so the model is no smaller in memory: unstructured zeros
    pay off only with sparse storage or kernels, and only at high sparsity.
    """
    for linear in linear_layers(model, skip).values():
        linear.weight.copy_(magnitude_prune(linear.weight, sparsity))
    return model


def sparsity(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> float:
    """Fraction of exactly-zero weights over the model's Linear layers (those not skipped)."""
    weights = [m.weight for m in linear_layers(model, skip).values()]
    return sum(int((w == 0).sum()) for w in weights) / max(1, sum(w.numel() for w in weights))


# ----------------------------------------------------------------------------------------
# 7. Report


def report_table(rows: Sequence[dict]) -> str:
    """An aligned text table of measured variants, each a dict with "name" and any of
    "bytes", "perplexity", "cosine", "seconds". Sizes, perplexities and times are also
    shown relative to the first row (the full-precision baseline)."""
    if not rows:
        raise ValueError("report_table needs at least one row")
    base = rows[0]

    def value(key: str, fmt: Callable) -> Callable[[dict], str]:  # "-" where a row lacks the key
        return lambda r: fmt(r[key]) if key in r else "-"

    def relative(key: str, fmt: Callable) -> Callable[[dict], str]:  # the row's figure against the first row's
        return lambda r: fmt(r[key], base[key]) if key in r and key in base else "-"

    columns = [("variant", value("name", str))]
    if any("bytes" in r for r in rows):
        columns += [("size (MB)", value("bytes", lambda b: f"{b / 1e6:.2f}")),
                    ("x smaller", relative("bytes", lambda b, b0: f"{b0 / b:.2f}"))]
    if any("perplexity" in r for r in rows):
        columns += [("perplexity", value("perplexity", lambda p: f"{p:.3f}")),
                    ("ppl change", relative("perplexity", lambda p, p0: f"{100 * (p / p0 - 1):+.2f}%"))]
    if any("cosine" in r for r in rows):
        columns += [("cosine to fp32", value("cosine", lambda c: f"{c:.5f}"))]
    if any("seconds" in r for r in rows):
        columns += [("latency (ms)", value("seconds", lambda t: f"{1e3 * t:.1f}")),
                    ("speed-up", relative("seconds", lambda t, t0: f"{t0 / t:.2f}x"))]
    table = [[header for header, _ in columns]] + [[fmt(r) for _, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def plot_size_quality(rows: Sequence[dict], metric: str = "perplexity", title: str | None = None) -> "Figure":
    """Scatter of model size (MB) against `metric` for each variant of `report_table`'s rows."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, r in enumerate(rows):
        ax.scatter(r["bytes"] / 1e6, r[metric], s=50, color=f"C{i}", zorder=3)
        ax.annotate(r["name"], (r["bytes"] / 1e6, r[metric]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.axhline(rows[0][metric], color="gray", ls="--", lw=1, label=f"{rows[0]['name']} {metric}")
    ax.set_xlabel("model size (MB)")
    ax.set_ylabel(f"held-out {metric}" if metric == "perplexity" else metric)
    ax.set_title(title or f"size vs {metric}: lower-left is better")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_group_error(group_sizes: Sequence[int], errors: dict[str, Sequence[float]],
                     references: dict[str, float] | None = None, ylabel: str = "mean squared error",
                     title: str | None = None) -> "Figure":
    """Quantization error against group size (log2 axis), one line per scheme; `references`
    (e.g. per-tensor, per-channel) are drawn as horizontal dashed lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (label, errs) in enumerate(errors.items()):
        ax.plot(group_sizes, errs, "o-", color=f"C{i}", label=label)
    for j, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=f"C{len(errors) + j}", ls="--", lw=1, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(group_sizes), labels=[str(g) for g in group_sizes])
    ax.set_xlabel("group size (weights sharing one scale)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or "smaller groups, smaller error (and more scales to store)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_sparsity(sparsities: Sequence[float], perplexities: Sequence[float],
                  references: dict[str, float] | None = None, title: str | None = None) -> "Figure":
    """Held-out perplexity against the fraction of pruned weights; `references` (e.g. the
    quantized variants' perplexities) as horizontal dashed lines."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot([100 * s for s in sparsities], perplexities, "o-", color="C0", label="magnitude pruning")
    for j, (label, value) in enumerate((references or {}).items()):
        ax.axhline(value, color=f"C{j + 1}", ls="--", lw=1, label=label)
    if max(perplexities) > 5 * min(perplexities):  # a blow-up: log scale, plain numbers
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("sparsity (% of Linear weights set to 0)")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title or "pruning: quality lost per weight removed")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
