"""Lab 4 (quantization): the usual mistakes of each exercise, and right answers written otherwise."""
from __future__ import annotations

from catalogue import Answer, suite, tweak

ANSWERS = [
    # absmax
    tweak("absmax", "scale-by-2-pow", "/ qmax  # (..., 1)", "/ 2 ** (bits - 1)  # (..., 1)", words="scale = max|x| / "),
    tweak("absmax", "max-not-absmax", "x.abs().amax(dim=-1, keepdim=True)", "x.amax(dim=-1, keepdim=True)",
          words="the scale comes from max(x)"),
    tweak("absmax", "truncated", "q = torch.round(x / scale).clamp(-qmax, qmax)", "q = (x / scale).clamp(-qmax, qmax)",
          words="truncated towards zero"),
    tweak("absmax", "one-scale", "x.abs().amax(dim=-1, keepdim=True)", "x.abs().amax()", words="ONE scale"),
    tweak("absmax", "unsigned-clamp", "clamp(-qmax, qmax)", "clamp(0, qmax)", words="negative codes are clamped away"),
    tweak("absmax", "floor", "torch.round(x / scale)", "torch.floor(x / scale)", words="codes use floor"),
    tweak("absmax", "float-codes", "return q.to(torch.int8), scale", "return q, scale", words="return torch.int8 codes"),
    Answer("absmax", "where-and-divide", """
def absmax_quantize(x, bits=8):
    top = 2 ** (bits - 1) - 1
    amax = torch.amax(torch.abs(x), dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / top, torch.full_like(amax, 1.0))
    return torch.clamp(torch.round(x / scale), -top, top).to(torch.int8), scale


def absmax_dequantize(q, scale):
    return scale * q.float().to(scale.dtype)
"""),
    Answer("absmax", "max-values", """
def absmax_quantize(x, bits=8):
    qmax = (1 << (bits - 1)) - 1
    scale = x.abs().max(dim=-1, keepdim=True).values.clamp_min(1e-12) / qmax
    return (x / scale).round().to(torch.int8), scale


def absmax_dequantize(q, scale):
    return q.to(scale.dtype).mul(scale)
"""),
    # zero-point
    tweak("zeropoint", "range-without-zero", ".clamp(max=0)\n", "\n", ".clamp(min=0)\n", "\n", words="the range must still include 0"),
    tweak("zeropoint", "steps-2-pow-bits", "/ qmax  # (..., 1)", "/ 2**bits  # (..., 1)", words="divide the range by 2^bits - 1"),
    tweak("zeropoint", "zero-not-rounded", "zero = torch.round(-lo / scale)", "zero = -lo / scale",
          "return q.to(torch.uint8), scale, zero.to(torch.uint8)", "return q.to(torch.uint8), scale, zero",
          words="the zero point is not an integer"),
    tweak("zeropoint", "signed-codes", "return q.to(torch.uint8), scale, zero.to(torch.uint8)",
          "return (q - 2 ** (bits - 1)).to(torch.int8), scale, zero.to(torch.uint8)", words="signed range"),
    tweak("zeropoint", "uint8-subtraction", "return (q.to(scale.dtype) - zero.to(scale.dtype)) * scale",
          "return (q - zero).to(scale.dtype) * scale", words="uint8 arithmetic wraps around"),
    tweak("zeropoint", "signed-clamp", "(torch.round(x / scale) + zero).clamp(0, qmax)",
          "(torch.round(x / scale) + zero).clamp(0, 2 ** (bits - 1) - 1)", words="clamped to the signed range's top"),
    Answer("zeropoint", "min-max", """
def zeropoint_quantize(x, bits=8):
    levels = (1 << bits) - 1
    lo = torch.minimum(x.min(dim=-1, keepdim=True).values, torch.zeros(()))
    hi = torch.maximum(x.max(dim=-1, keepdim=True).values, torch.zeros(()))
    scale = torch.clamp((hi - lo) / levels, min=1e-12)
    zero = (-lo / scale).round()
    q = torch.clamp(torch.round(x / scale + zero), 0, levels)
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


def zeropoint_dequantize(q, scale, zero):
    return (q.double() - zero.double()).to(scale.dtype) * scale
"""),
    Answer("zeropoint", "int-arithmetic", """
def zeropoint_quantize(x, bits=8):
    qmax = 2 ** bits - 1
    lo = x.amin(-1, keepdim=True).clamp(max=0.0)
    hi = x.amax(-1, keepdim=True).clamp(min=0.0)
    scale = ((hi - lo) / qmax).clamp(min=1e-12)
    zero = (-lo / scale).round().long()
    q = (torch.round(x / scale).long() + zero).clamp(0, qmax)
    return q.to(torch.uint8), scale, zero.to(torch.uint8)


def zeropoint_dequantize(q, scale, zero):
    return (q.long() - zero.long()).to(scale.dtype) * scale
"""),
    # group-wise
    tweak("group-quantize", "one-scale-per-row", "q, scale = absmax_quantize(groups, bits)",
          "q, scale = absmax_quantize(w, bits)", "return absmax_dequantize(q, scale).reshape(out_f, in_f)",
          "return absmax_dequantize(q, scale)", words="one scale per row"),
    tweak("group-quantize", "groups-down-columns", "groups = w.reshape(out_f, in_f // group_size, group_size)",
          "groups = w.T.reshape(in_f, out_f // group_size, group_size)", "return absmax_dequantize(q, scale).reshape(out_f, in_f)",
          "return absmax_dequantize(q, scale).reshape(in_f, out_f).T", words="the shapes do not fit together"),
    tweak("group-quantize", "one-scale", "q, scale = absmax_quantize(groups, bits)", "q, scale = absmax_quantize(w.reshape(1, -1), bits)",
          words="one scale for the whole tensor"),
    tweak("group-quantize", "codes-not-dequantized", "return absmax_dequantize(q, scale).reshape(out_f, in_f)",
          "return q.reshape(out_f, in_f).float()", words="differs from absmax round trips per group"),
    Answer("group-quantize", "by-hand", """
def fake_quantize_groups(w, bits, group_size):
    qmax = 2 ** (bits - 1) - 1
    g = w.view(w.shape[0], -1, group_size)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
    return (torch.round(g / scale).clamp(-qmax, qmax) * scale).view_as(w)
"""),
    Answer("group-quantize", "loop-over-groups", """
def fake_quantize_groups(w, bits, group_size):
    out = torch.empty_like(w)
    for start in range(0, w.shape[1], group_size):
        q, s = absmax_quantize(w[:, start:start + group_size], bits)
        out[:, start:start + group_size] = absmax_dequantize(q, s)
    return out
"""),
    # int4 packing
    tweak("int4-packing", "nibbles-swapped", "return q[..., 0::2] | (q[..., 1::2] << 4)", "return q[..., 1::2] | (q[..., 0::2] << 4)",
          words="the nibbles are swapped"),
    tweak("int4-packing", "halves", "return q[..., 0::2] | (q[..., 1::2] << 4)",
          "n = q.shape[-1] // 2\n    return q[..., :n] | (q[..., n:] << 4)", words="not the first half with the second"),
    tweak("int4-packing", "unpack-not-interleaved", "torch.stack([low, high], dim=-1).flatten(-2)", "torch.cat([low, high], dim=-1)",
          words="interleave them"),
    tweak("int4-packing", "int64-bytes", "    q = q.to(torch.uint8)\n", "    q = q.long()\n", words="bytes are torch.uint8"),
    tweak("int4-packing", "unpack-stacked", "torch.stack([low, high], dim=-1).flatten(-2)", "torch.stack([low, high], dim=-1)",
          words="flatten the last two"),
    Answer("int4-packing", "arithmetic", """
def pack_int4(q):
    q = q.to(torch.int16)
    return (q[..., 0::2] + 16 * q[..., 1::2]).to(torch.uint8)


def unpack_int4(packed):
    p = packed.to(torch.int16)
    out = torch.empty(*p.shape[:-1], 2 * p.shape[-1], dtype=torch.uint8)
    out[..., 0::2] = (p % 16).to(torch.uint8)
    out[..., 1::2] = (p // 16).to(torch.uint8)
    return out
"""),
    Answer("int4-packing", "view-pairs", """
def pack_int4(q):
    pairs = q.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | pairs[..., 1] << 4


def unpack_int4(packed):
    return torch.stack((packed & 15, (packed >> 4) & 15), dim=-1).reshape(*packed.shape[:-1], -1)
"""),
    # int4 linear
    tweak("int4-linear", "no-offset", "unpack_int4(packed).to(scale.dtype) - 8", "unpack_int4(packed).to(scale.dtype)",
          words="shifted by +8"),
    tweak("int4-linear", "bias-forgotten", "return y if bias is None else y + bias", "return y", words="the bias is missing"),
    tweak("int4-linear", "first-group-scale", "scale.repeat_interleave(group_size, dim=1)", "scale[:, :1]",
          words="first group's scale"),
    tweak("int4-linear", "offset-7", "unpack_int4(packed).to(scale.dtype) - 8", "unpack_int4(packed).to(scale.dtype) - 7",
          words="subtracts 7"),
    tweak("int4-linear", "scales-tiled", "scale.repeat_interleave(group_size, dim=1)", "scale.repeat(1, group_size)",
          words="differs from QuantLinear's output"),
    Answer("int4-linear", "grouped-matmul", """
def int4_linear(x, packed, scale, group_size, bias=None):
    codes = unpack_int4(packed).to(torch.int8) - 8  # (out, in)
    out_f, in_f = codes.shape
    w = (codes.view(out_f, in_f // group_size, group_size).to(scale.dtype) * scale[..., None]).view(out_f, in_f)
    y = torch.nn.functional.linear(x, w)
    return y + bias if bias is not None else y
"""),
    Answer("int4-linear", "einsum-per-group", """
def int4_linear(x, packed, scale, group_size, bias=None):
    low, high = packed & 15, packed >> 4
    codes = torch.stack([low, high], -1).flatten(-2).float() - 8  # (out, in)
    out_f, in_f = codes.shape
    xg = x.unflatten(-1, (in_f // group_size, group_size))  # (..., groups, group_size)
    cg = codes.view(out_f, in_f // group_size, group_size)
    y = torch.einsum("...gs,ogs,og->...o", xg, cg, scale.to(x.dtype))
    return y if bias is None else y + bias
"""),
    # pruning
    tweak("prune", "in-place", "out = w.clone()", "out = w", words="changes its input in place"),
    tweak("prune", "signed-values", "w.abs().flatten().argsort()", "w.flatten().argsort()", words="most NEGATIVE"),
    tweak("prune", "int-instead-of-round", "k = round(sparsity * w.numel())", "k = int(sparsity * w.numel())",
          words="round(sparsity * numel)"),
    tweak("prune", "keeps-the-smallest", "w.abs().flatten().argsort()[:k]", "w.abs().flatten().argsort(descending=True)[:k]",
          words="larger in magnitude than a kept one"),
    Answer("prune", "threshold-mask", """
def magnitude_prune(w, sparsity):
    k = round(sparsity * w.numel())
    if k == 0:
        return w.clone()
    flat = w.abs().flatten()
    order = torch.argsort(flat, stable=True)
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep[order[:k]] = False
    return torch.where(keep.view_as(w), w, torch.zeros_like(w))
"""),
    Answer("prune", "topk", """
def magnitude_prune(w, sparsity):
    n = w.numel()
    k = round(sparsity * n)
    out = w.flatten().clone()
    if k:
        out[torch.topk(w.abs().flatten(), k, largest=False).indices] = 0.0
    return out.reshape(w.shape)
"""),
]

BLAMES = [("absmax/max-not-absmax", "group-quantize", "uses your absmax_quantize / absmax_dequantize"),
     ("int4-packing/unpack-not-interleaved", "int4-linear", "uses your pack_int4 / unpack_int4")]

(test_every_exercise_has_four_mistakes_and_two_right_answers, test_check_names_the_mistake,
 test_composite_check_names_the_earlier_function, graded,
 test_grader_prices_it_and_agrees_with_the_check) = suite("04-quantization", ANSWERS, BLAMES)
