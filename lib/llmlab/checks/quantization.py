"""Checks for lab 4 (quantization): absmax and zero-point round trips, group-wise scales,
int4 packing, an int4 linear layer and magnitude pruning, against `llmlab.quant`.

Codes are compared allowing a rare off-by-one: x / scale computed in another (equally
valid) order can land on the other side of a rounding tie.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from llmlab.checks._core import blame, call, close, expect_tensor, fail, max_err, ok, shape_of
from llmlab.i18n import _

__all__ = ['check_absmax', 'check_zeropoint', 'check_group_quantize', 'check_int4_packing',
           'check_int4_linear', 'check_prune']


def codes_match(got: Tensor, want: Tensor) -> bool:
    """Same shape, and the codes equal but for at most one in a thousand off by one (rounding ties)."""
    if shape_of(got) != shape_of(want):
        return False
    diff = (got.to(torch.int64) - want.to(torch.int64)).abs()
    return (not diff.numel() or int(diff.max()) <= 1) and int((diff > 0).sum()) <= max(1, want.numel() // 1000)


def _rows(gen: torch.Generator, n_rows: int, n: int) -> Tensor:
    """(n_rows, n) float32 rows of very different magnitudes, signs mixed."""
    magnitude = 10 ** (torch.rand(n_rows, 1, generator=gen) * 3 - 2)  # 0.01 .. 10
    return (torch.randn(n_rows, n, generator=gen) * magnitude).float()


def _pair(name: str, out: Any, n: int) -> tuple:
    if not isinstance(out, (tuple, list)) or len(out) != n:
        what = "(q, scale)" if n == 2 else "(q, scale, zero)"
        fail(name, _("returns {type}{value}; expected a tuple {what}").format(type=type(out).__name__, value='' if not isinstance(out, (tuple, list)) else _(" of {n}").format(n=len(out)), what=what))
    return tuple(out)


def _check_scale(name: str, scale: Any, x: Tensor) -> Tensor:
    rows = shape_of(x)[:-1]
    if not isinstance(scale, Tensor):
        fail(name, _("returns a scale of type {type}; expected a tensor of shape {value}").format(type=type(scale).__name__, value=rows + (1,)))
    hints = {(): _("that is ONE scale for the whole tensor; each row of the last axis gets its own"),
             rows: _("keep the reduced axis (keepdim=True) so the scale broadcasts against x")}
    return expect_tensor(name, scale, rows + (1,), None, f"x {shape_of(x)}", hints)


# ----------------------------------------------------------------------------------------
# Absmax (symmetric)


def check_absmax(quantize_fn: Callable, dequantize_fn: Callable) -> None:
    """Check absmax_quantize(x, bits) -> (q, scale) and absmax_dequantize(q, scale)."""
    from llmlab import quant

    name = "absmax_quantize"
    gen = torch.Generator().manual_seed(41)
    for bits in (8, 4):
        x = _rows(gen, 6, 32)
        q, scale = _pair(name, call(name, quantize_fn, x.clone(), bits), 2)
        want_q, want_scale = quant.absmax_quantize(x, bits)
        qmax = 2 ** (bits - 1) - 1
        scale = _check_scale(name, scale, x)
        if not close(scale, want_scale, 1e-7 * float(want_scale.max())):
            amax = x.abs().amax(-1, keepdim=True)
            if close(scale, amax / 2 ** (bits - 1), 1e-9):
                fail(name, _("bits={bits}: scale = max|x| / {value}; the largest code is 2^(bits-1) - 1 = "
                             "{qmax}, so that max|x| maps exactly onto it").format(bits=bits, value=2 ** (bits - 1), qmax=qmax))
            if close(scale, amax / (2**bits - 1), 1e-9):
                fail(name, _("bits={bits}: scale = max|x| / {value} uses the unsigned range; symmetric codes "
                             "run from -{qmax} to {qmax}").format(bits=bits, value=2**bits - 1, qmax=qmax))
            if close(scale, x.amax(-1, keepdim=True) / qmax, 1e-9):
                fail(name, _("bits={bits}: the scale comes from max(x); use max(|x|), or large negative values "
                             "get clipped").format(bits=bits))
            fail(name, _("bits={bits}: the scales differ from max|x| / {qmax} per row").format(bits=bits, qmax=qmax))
        if not isinstance(q, Tensor) or q.dtype != torch.int8:
            fail(name, _("returns codes of {getattr}; return torch.int8 codes (one byte per weight is the "
                         "point of quantizing)").format(getattr=getattr(q, 'dtype', type(q).__name__)))
        if shape_of(q) != shape_of(x):
            fail(name, _("returns codes of shape {shape_of} for x {shape_of2}").format(shape_of=shape_of(q), shape_of2=shape_of(x)))
        if not codes_match(q, want_q):
            if codes_match(q, want_q.clamp(min=0)):
                fail(name, _("bits={bits}: negative codes are clamped away; absmax codes are signed, from "
                             "-{qmax} to {qmax} (clamp to that range)").format(bits=bits, qmax=qmax))
            if codes_match(q, (x / want_scale).trunc()):
                fail(name, _("bits={bits}: codes are truncated towards zero (.to(torch.int8) alone); round to "
                             "nearest first").format(bits=bits))
            if codes_match(q, (x / want_scale).floor()):
                fail(name, _("bits={bits}: codes use floor; round to the NEAREST integer").format(bits=bits))
            fail(name, _("bits={bits}: the codes are not round(x / scale) (e.g. {tolist} vs what the scale "
                         "gives)").format(bits=bits, tolist=q.flatten()[:4].tolist()))
        out = call("absmax_dequantize", dequantize_fn, want_q.clone(), want_scale.clone())
        deq = expect_tensor("absmax_dequantize", out, shape_of(x), None, _("q {shape_of}, scale {shape_of2}").format(shape_of=shape_of(x), shape_of2=shape_of(want_scale)))
        if not deq.is_floating_point():
            fail("absmax_dequantize", _("returns {dtype}; return floats (q * scale)").format(dtype=deq.dtype))
        if not close(deq, quant.absmax_dequantize(want_q, want_scale), 1e-6 * float(want_scale.max())):
            fail("absmax_dequantize", _("bits={bits}: differs from q * scale (max |error| {max_err:.2e})").format(bits=bits, max_err=max_err(deq, quant.absmax_dequantize(want_q, want_scale))))
        if bool(((deq - x).abs() > want_scale / 2 * (1 + 1e-5)).any()):
            fail("absmax_dequantize", _("the round trip misses x by more than half a step somewhere"))
    zero_row = torch.cat([torch.zeros(1, 8), torch.randn(1, 8, generator=gen)])
    q, scale = _pair(name, call(name, quantize_fn, zero_row.clone(), 8), 2)
    deq = call("absmax_dequantize", dequantize_fn, q, scale)
    if not isinstance(deq, Tensor) or not bool(torch.isfinite(deq).all()) or not bool((deq[0] == 0).all()):
        fail(name, _("a row of zeros gives NaN or non-zero values: max|x| = 0 makes the scale 0; keep the "
                     "scale positive (e.g. clamp it to a tiny minimum)"))
    ok(_("absmax: per-row scale max|x| / (2^(b-1) - 1), int8 codes rounded to nearest, error <= scale / 2"))


# ----------------------------------------------------------------------------------------
# Zero-point (asymmetric)


def check_zeropoint(quantize_fn: Callable, dequantize_fn: Callable) -> None:
    """Check zeropoint_quantize(x, bits) -> (q, scale, zero) and zeropoint_dequantize(q, scale, zero)."""
    from llmlab import quant

    name = "zeropoint_quantize"
    gen = torch.Generator().manual_seed(42)
    for bits in (8, 4):
        x = _rows(gen, 6, 32)
        x[1] = x[1].abs() + 0.5  # all positive: the range must still reach down to 0
        x[2] = -x[2].abs() - 0.5  # all negative
        q, scale, zero = _pair(name, call(name, quantize_fn, x.clone(), bits), 3)
        want_q, want_scale, want_zero = quant.zeropoint_quantize(x, bits)
        qmax = 2**bits - 1
        scale = _check_scale(name, scale, x)
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        if not close(scale, want_scale, 1e-7 * float(want_scale.max())):
            if close(scale, (hi - lo) / qmax, 1e-9):
                fail(name, _("bits={bits}: on rows that are all positive (or all negative) the range must "
                             "still include 0: use [min(x_min, 0), max(x_max, 0)], so 0.0 has an exact code").format(bits=bits))
            if close(scale, (hi.clamp(min=0) - lo.clamp(max=0)) / 2**bits, 1e-9):
                fail(name, _("bits={bits}: divide the range by 2^bits - 1 = {qmax}: there are {qmax} steps "
                             "between code 0 and code {qmax}").format(bits=bits, qmax=qmax))
            fail(name, _("bits={bits}: the scales differ from (hi - lo) / {qmax} per row").format(bits=bits, qmax=qmax))
        if not isinstance(zero, Tensor) or shape_of(zero) != shape_of(want_zero):
            fail(name, _("returns zero of shape {value}; expected a tensor of shape {shape_of}, one zero point "
                         "per row").format(value=shape_of(zero) if isinstance(zero, Tensor) else type(zero).__name__, shape_of=shape_of(want_zero)))
        if zero.is_floating_point() and not bool((zero == zero.round()).all()):
            fail(name, _("bits={bits}: the zero point is not an integer; round it, so 0.0 maps to an exact code").format(bits=bits))
        if not codes_match(zero, want_zero):
            fail(name, _("bits={bits}: zero points differ from round(-lo / scale)").format(bits=bits))
        half = 2 ** (bits - 1)
        if isinstance(q, Tensor) and codes_match(q.to(torch.int64), want_q.to(torch.int64) - half):
            fail(name, _("bits={bits}: the codes are shifted into the signed range [-{half}, {value}]; "
                         "zero-point codes are unsigned, 0 .. {qmax}, with the zero point shifting 0.0 into "
                         "that range").format(bits=bits, half=half, value=half - 1, qmax=qmax))
        if not isinstance(q, Tensor) or q.dtype != torch.uint8:
            fail(name, _("returns codes of {getattr}; return torch.uint8 codes in [0, {qmax}]").format(getattr=getattr(q, 'dtype', type(q).__name__), qmax=qmax))
        if not codes_match(q, want_q):
            if codes_match(q, want_q.clamp(max=half - 1)):
                fail(name, _("bits={bits}: codes are clamped to the signed range's top, {value}; zero-point "
                             "codes run from 0 to 2^bits - 1 = {qmax}").format(bits=bits, value=half - 1, qmax=qmax))
            unclamped = torch.round(x / want_scale) + want_zero
            if bool((unclamped < 0).any() | (unclamped > qmax).any()) and codes_match(q, unclamped.remainder(256)):
                fail(name, _("bits={bits}: codes wrap around; clamp them to [0, {qmax}] before converting to "
                             "uint8").format(bits=bits, qmax=qmax))
            fail(name, _("bits={bits}: the codes are not round(x / scale) + zero").format(bits=bits))
        dq = "zeropoint_dequantize"
        deq = expect_tensor(dq, call(dq, dequantize_fn, want_q.clone(), want_scale.clone(), want_zero.clone()),
                            shape_of(x), None, f"q {shape_of(x)}")
        want = quant.zeropoint_dequantize(want_q, want_scale, want_zero)
        if not close(deq.double(), want, 1e-6 * float(want_scale.max())):
            wrapped = (want_q - want_zero).to(want_scale.dtype) * want_scale  # uint8 subtraction wraps
            if close(deq.double(), wrapped, 1e-6 * float(want_scale.max())):
                fail(dq, _("uint8 arithmetic wraps around (3 - 5 = 254): convert q and zero to float before "
                           "subtracting"))
            fail(dq, _("bits={bits}: differs from (q - zero) * scale (max |error| {max_err:.2e})").format(bits=bits, max_err=max_err(deq, want)))
        if bool(((deq - x).abs() > want_scale / 2 * (1 + 1e-5)).any()):
            fail(dq, _("the round trip misses x by more than half a step somewhere"))
    rows = torch.stack([torch.zeros(8), torch.linspace(-1, 3, 8)])
    q, scale, zero = _pair(name, call(name, quantize_fn, rows.clone(), 8), 3)
    deq = call(dq, dequantize_fn, q, scale, zero)
    if not isinstance(deq, Tensor) or not bool(torch.isfinite(deq).all()) or not bool((deq[0] == 0).all()):
        fail(name, _("a row of zeros gives NaN or non-zero values: keep the scale positive when hi == lo"))
    if float(deq[1].sub(rows[1]).abs().max()) > float(scale[1]) / 2 * (1 + 1e-5):
        fail(name, _("the round trip misses x by more than half a step"))
    ok(_("zero-point: range [min(x,0), max(x,0)], integer zero point, uint8 codes, no wrap-around, error <= "
         "scale / 2"))


# ----------------------------------------------------------------------------------------
# Group-wise


def check_group_quantize(fn: Callable, uses: tuple = ()) -> None:
    """Check fake_quantize_groups(w, bits, group_size) -> the (out, in) round-tripped weight.

    uses: the student's (absmax_quantize, absmax_dequantize), blamed when they fail too."""
    earlier = {"absmax_quantize / absmax_dequantize": lambda: check_absmax(*uses)} if uses else {}
    blame("fake_quantize_groups", lambda: _check_group_quantize(fn), earlier)


def _check_group_quantize(fn: Callable) -> None:
    from llmlab import quant

    name = "fake_quantize_groups"
    gen = torch.Generator().manual_seed(43)
    w = torch.randn(8, 48, generator=gen) * 0.05
    w[2, 5] = 3.0  # one outlier
    for bits, gs in ((4, 16), (8, 8), (4, 48), (4, 4)):
        out = expect_tensor(name, call(name, fn, w.clone(), bits, gs), shape_of(w), None,
                            f"w {shape_of(w)}, group_size={gs}")
        want = quant.fake_quantize(w, bits, gs)
        if close(out, want, 1e-7):
            continue
        step = float(quant.quantize_groups(w, bits, gs)[1].max())
        if close(out, want, step * 1e-3):  # equal but for a rare rounding tie
            continue
        if gs < w.shape[1] and close(out, quant.fake_quantize(w, bits, None), 1e-7):
            fail(name, _("group_size={gs}: one scale per row; every group of {gs} consecutive weights needs "
                         "its own").format(gs=gs))
        if close(out, quant.fake_quantize(w.T.contiguous(), bits, gs).T, 1e-7):
            fail(name, _("group_size={gs}: the groups run down the columns; group along each ROW (the input "
                         "features), the axis the matmul sums over").format(gs=gs))
        q, s = quant.absmax_quantize(w.reshape(1, -1), bits)
        if close(out, quant.absmax_dequantize(q, s).reshape(w.shape), 1e-7):
            fail(name, _("group_size={gs}: one scale for the whole tensor; each group needs its own").format(gs=gs))
        fail(name, _("bits={bits}, group_size={gs}: differs from absmax round trips per group (max |error| "
                     "{max_err:.2e})").format(bits=bits, gs=gs, max_err=max_err(out, want)))
    ok(_("group-wise: one absmax scale per group of consecutive input weights in each row"))


# ----------------------------------------------------------------------------------------
# int4 packing


def check_int4_packing(pack_fn: Callable, unpack_fn: Callable) -> None:
    """Check pack_int4(q) -> uint8 (..., n/2) and unpack_int4(packed) -> uint8 (..., n)."""
    from llmlab import quant

    gen = torch.Generator().manual_seed(44)
    q = torch.randint(0, 16, (3, 10), generator=gen, dtype=torch.uint8)
    packed = call("pack_int4", pack_fn, q.clone())
    want = quant.pack_int4(q)
    packed = expect_tensor("pack_int4", packed, shape_of(want), None, "q (3, 10)",
                           {(3, 10): _("two codes go in ONE byte: the last axis halves"),
                            (3, 5, 2): _("combine each pair into one byte")})
    if packed.dtype != torch.uint8:
        fail("pack_int4", _("returns {dtype}; bytes are torch.uint8").format(dtype=packed.dtype))
    if not torch.equal(packed, want):
        if torch.equal(packed, q[..., 1::2] | (q[..., 0::2] << 4)):
            fail("pack_int4", _("the nibbles are swapped: element 2i goes to the LOW 4 bits, element 2i+1 to "
                                "the HIGH 4 bits"))
        if torch.equal(packed, q[..., :5] | (q[..., 5:] << 4)):
            fail("pack_int4", _("pairs neighbours: element 2i with element 2i+1, not the first half with the "
                                "second"))
        fail("pack_int4", _("pack([[1, 2]]) should be [[0x21]] (low nibble 1, high nibble 2); yours packs the "
                            "codes otherwise"))
    single = call("pack_int4", pack_fn, torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8))
    if not isinstance(single, Tensor) or single.tolist() != [[0x21, 0x0F]]:
        fail("pack_int4", _("pack([[1, 2, 15, 0]]) should give [[0x21, 0x0F]]"))
    out = expect_tensor("unpack_int4", call("unpack_int4", unpack_fn, want.clone()), shape_of(q), None,
                        _("packed {shape_of}").format(shape_of=shape_of(want)),
                        {(3, 5, 2): _("interleave the pairs back into one axis (flatten the last two)")})
    if out.dtype != torch.uint8:
        fail("unpack_int4", _("returns {dtype}; return the codes as torch.uint8").format(dtype=out.dtype))
    if not torch.equal(out, q):
        if torch.equal(out, torch.cat([want & 15, want >> 4], dim=-1)):
            fail("unpack_int4", _("returns all low nibbles, then all high ones; interleave them: low, high, "
                                  "low, high, ..."))
        fail("unpack_int4", _("unpack(pack(q)) is not q"))
    ok(_("int4 packing: two codes per byte, low nibble first, and back"))


# ----------------------------------------------------------------------------------------
# int4 linear


def _int4_layer(gen: torch.Generator, in_f: int, out_f: int, gs: int, bias: bool) -> tuple:
    from llmlab import quant

    with torch.random.fork_rng(devices=[]), torch.no_grad():  # leave the notebook's global RNG as it was
        linear = nn.Linear(in_f, out_f, bias=bias)
        linear.weight.copy_(torch.randn(out_f, in_f, generator=gen) / in_f**0.5)
        if bias:
            linear.bias.copy_(torch.randn(out_f, generator=gen) * 0.1)
    layer = quant.QuantLinear(linear, bits=4, group_size=gs)
    b = None if linear.bias is None else linear.bias.detach().clone()
    return layer, layer.qweight.clone(), layer.scale.clone(), b


def check_int4_linear(fn: Callable, uses: tuple = ()) -> None:
    """Check int4_linear(x, packed, scale, group_size, bias) against llmlab.quant.QuantLinear.

    uses: the student's (pack_int4, unpack_int4), blamed when they fail too."""
    earlier = {"pack_int4 / unpack_int4": lambda: check_int4_packing(*uses)} if uses else {}
    blame("int4_linear", lambda: _check_int4_linear(fn), earlier)


def _check_int4_linear(fn: Callable) -> None:
    from llmlab import quant

    name = "int4_linear"
    gen = torch.Generator().manual_seed(45)
    for in_f, out_f, gs, bias in ((32, 6, 8, True), (16, 5, 16, False)):
        layer, packed, scale, b = _int4_layer(gen, in_f, out_f, gs, bias)
        x = torch.randn(3, in_f, generator=gen)
        with torch.no_grad():
            want = layer(x)
        out = call(name, fn, x.clone(), packed.clone(), scale.clone(), gs, None if b is None else b.clone())
        out = expect_tensor(name, out, (3, out_f), None, _("x (3, {in_f}), weight ({out_f}, {in_f})").format(in_f=in_f, out_f=out_f),
                            {(3, in_f): _("multiply by the weight's transpose: y = x @ W.T"),
                             (out_f, 3): _("y = x @ W.T has shape (batch, out_features)")})
        if close(out, want, 1e-4):
            continue
        codes = quant.unpack_int4(packed).float()
        s = quant.expand_groups(scale, gs, in_f)
        if close(out, x @ (codes * s).T + (0 if b is None else b), 1e-4):
            fail(name, _("the codes are stored shifted by +8 (offset binary); subtract 8 before scaling"))
        if close(out, x @ ((codes - 7) * s).T + (0 if b is None else b), 1e-4):
            fail(name, _("subtracts 7; the stored codes are q + 8 (q in -7..7 becomes 1..15), so subtract 8"))
        if b is not None and close(out, want - b, 1e-4):
            fail(name, _("the bias is missing"))
        if close(out, x @ ((codes - 8) * scale[:, :1]).T + (0 if b is None else b), 1e-4):
            fail(name, _("every group uses the first group's scale; expand each group's scale over its "
                         "group_size columns"))
        fail(name, _("differs from QuantLinear's output (max |error| {max_err:.2e})").format(max_err=max_err(out, want)))
    ok(_("int4 linear: unpack, subtract the offset, scale each group, then an ordinary matmul + bias"))


# ----------------------------------------------------------------------------------------
# Pruning


def check_prune(fn: Callable) -> None:
    """Check magnitude_prune(w, sparsity) -> a copy with the smallest-|w| fraction zeroed."""
    name = "magnitude_prune"
    gen = torch.Generator().manual_seed(46)
    w = torch.randn(10, 10, generator=gen)
    for sparsity in (0.5, 0.29, 0.0, 1.0, 0.9):
        original = w.clone()
        out = expect_tensor(name, call(name, fn, w, sparsity), shape_of(w), w.dtype, f"w {shape_of(w)}")
        if not torch.equal(w, original):
            fail(name, _("changes its input in place; return a pruned copy"))
        k = round(sparsity * w.numel())
        zeros = out == 0
        if int(zeros.sum()) != k:
            fail(name, _("sparsity={sparsity}: {sum} zeros out of {numel}; expected round(sparsity * numel) = "
                         "{k}").format(sparsity=sparsity, sum=int(zeros.sum()), numel=w.numel(), k=k))
        if not torch.equal(out[~zeros], w[~zeros]):
            fail(name, _("sparsity={sparsity}: the kept weights must keep their values").format(sparsity=sparsity))
        if k and k < w.numel():
            if float(w[zeros].abs().max()) > float(w[~zeros].abs().min()):
                if float(w[zeros].max()) <= float(w[~zeros].min()):
                    fail(name, _("prunes the most NEGATIVE weights; prune by magnitude |w| (a weight of -3 "
                                 "matters as much as +3)"))
                fail(name, _("sparsity={sparsity}: a pruned weight is larger in magnitude than a kept one").format(sparsity=sparsity))
    ok(_("pruning: exactly round(sparsity * numel) smallest-magnitude weights set to 0, the rest untouched"))
