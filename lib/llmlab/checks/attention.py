"""Checks for lab 1 (attention): the reference is `llmlab.attention`, which the student may not call."""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llmlab import attention as A
from llmlab.checks._core import (Watch, atol_for, blame, call, close, expect_tensor, fail, max_err, ok, randn,
                                 random_mask, shape_of)
from llmlab.i18n import _

__all__ = ['check_sdpa', 'check_masks', 'check_heads', 'check_mha', 'check_sinusoidal', 'check_rope', 'check_attention_memory', 'check_bert_probs']

# torch functions and code a graded attention exercise must not delegate to
FORBIDDEN_TORCH = {
    F.scaled_dot_product_attention: "torch.nn.functional.scaled_dot_product_attention",
    F.multi_head_attention_forward: "torch.nn.functional.multi_head_attention_forward",
}
FORBIDDEN_CODE = {
    nn.MultiheadAttention.__init__.__code__: "torch.nn.MultiheadAttention",
    nn.MultiheadAttention.forward.__code__: "torch.nn.MultiheadAttention",
}
REFERENCE_FILES = {A.__file__: "llmlab.attention"}  # any code from llmlab.attention counts as the course's answer


def _call(name: str, fn: Callable, *args: Any) -> Any:
    """fn(*args) with ready-made attention refused."""
    return call(name, fn, *args, watch=Watch(FORBIDDEN_TORCH, FORBIDDEN_CODE, REFERENCE_FILES))

# ----------------------------------------------------------------------------------------
# Scaled dot-product attention


def _sdpa_weight_diagnosis(name: str, fn: Callable, q: Tensor, k: Tensor, mask: Tensor | None) -> str:
    """Recover the student's weights by attending over v = I, and name the mistake they show."""
    T_q, T_k, d = q.size(-2), k.size(-2), q.size(-1)
    eye = torch.eye(T_k, dtype=q.dtype).expand(*k.shape[:-1], T_k).contiguous()
    args = (q, k, eye) if mask is None else (q, k, eye, mask)
    try:
        W = _call(name, fn, *args)
    except AssertionError:
        W = None
    if not isinstance(W, Tensor) or shape_of(W) != (*q.shape[:-1], T_k):
        return _("values differ from the reference")
    want = A.attention_weights(q, k, mask)
    if close(W, want, 1e-8):
        return _("the attention weights are right, but the output is not the weighted sum weights @ v")
    if mask is not None:
        if close(W, A.attention_weights(q, k, ~mask), 1e-8):
            return _("the mask works the wrong way round: True means 'may attend', False means 'hide this key'")
        if close(W, A.attention_weights(q, k), 1e-8):
            return _("the mask is ignored: hidden keys get the same weight as without a mask")
        leak = float(W.masked_select(~mask.expand_as(W)).abs().max()) if (~mask).any() else 0.0
        if not math.isfinite(leak) or leak > 1e-6:
            return (_("keys hidden by the mask still get weight (up to {leak:.3g}); a masked score must become "
                      "so negative that the softmax turns it into exactly 0").format(leak=leak))
        sums = W.sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
            return (_("after masking, a query's weights no longer sum to 1: mask the scores before the "
                      "softmax, not the probabilities after it"))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    if mask is None and close(W, torch.softmax(scores, dim=-2), 1e-8):
        return (_("softmax over the wrong axis: each query's weights over the keys (the last axis) must sum to "
                  "1"))
    wrong_scales = [
        (1.0, _("the scores are missing the 1/sqrt(d) scale")),
        (1.0 / d, _("the scores are divided by d; divide by sqrt(d)")),
        (math.sqrt(d), _("the scores are multiplied by sqrt(d); they should be divided by it")),
        (1.0 / math.sqrt(T_k), _("the scale uses the number of keys; d is the size of each query/key vector")),
        (1.0 / math.sqrt(T_q), _("the scale uses the number of queries; d is the size of each query/key vector")),
    ]
    for scale, message in wrong_scales:
        if close(W, A.attention_weights(q, k, mask, scale=scale), 1e-8):
            return message
    sums = W.sum(-1)
    if not torch.isfinite(W).all():
        return _("the weights contain NaN or inf")
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
        return _("a query's weights over the keys do not sum to 1 (is the softmax there, over the last axis?)")
    return _("the attention weights differ from the reference")


def check_sdpa(fn: Callable) -> None:
    """Check scaled_dot_product_attention(q, k, v, mask=None) against the reference."""
    name = "scaled_dot_product_attention"
    gen = torch.Generator().manual_seed(1)
    B, H, T_q, T_k, d, d_v = 2, 3, 4, 6, 8, 5  # all different, so a swapped axis shows
    q, k, v = randn(gen, B, H, T_q, d), randn(gen, B, H, T_k, d), randn(gen, B, H, T_k, d_v)
    inputs = f"q {shape_of(q)}, k {shape_of(k)}, v {shape_of(v)}"
    hints = {(B, H, T_q, T_k): _("that is the shape of the attention weights; return weights @ v")}

    def compare(args: tuple, want: Tensor, what: str, diagnose: bool = True) -> Tensor:
        out = expect_tensor(name, _call(name, fn, *args), shape_of(want), want.dtype, inputs, hints)
        if not close(out, want, atol_for(want.dtype)):
            if diagnose:
                mask = args[3] if len(args) > 3 else None
                reason = _sdpa_weight_diagnosis(name, fn, args[0], args[1], mask)
            else:
                reason = _("values differ from the reference")
            fail(name, _("{what}: {reason} (max |error| {max_err:.2e})").format(what=what, reason=reason, max_err=max_err(out, want)))
        return out

    # 1. no mask: shape, scale, softmax axis
    compare((q, k, v), A.scaled_dot_product_attention(q, k, v), _("without a mask"))
    # 2. dtype follows the inputs
    q32, k32, v32 = q.float(), k.float(), v.float()
    compare((q32, k32, v32), A.scaled_dot_product_attention(q32, k32, v32), _("float32 inputs"), diagnose=False)
    # 3. a random mask, broadcast over heads
    mask = random_mask(gen, B, 1, T_q, T_k)
    compare((q, k, v, mask), A.scaled_dot_product_attention(q, k, v, mask), _("with a (B, 1, T_q, T_k) mask"))
    # 4. the two masks of this lab, as they broadcast: causal (T, T) and padding (B, 1, 1, T)
    qs = randn(gen, B, H, T_k, d)
    causal = torch.ones(T_k, T_k, dtype=torch.bool).tril()
    compare((qs, k, v, causal), A.scaled_dot_product_attention(qs, k, v, causal), _("with a causal (T, T) mask"))
    padding = (torch.arange(T_k) < torch.tensor([T_k, 2])[:, None]).view(B, 1, 1, T_k)
    compare((q, k, v, padding), A.scaled_dot_product_attention(q, k, v, padding),
            _("with a (B, 1, 1, T_k) padding mask"))
    # 5. a query that may attend to nothing: zeros, not NaN
    empty = mask.clone()
    empty[0, 0, 1] = False
    out = expect_tensor(name, _call(name, fn, q, k, v, empty), (B, H, T_q, d_v), q.dtype, inputs)
    row = out[0, :, 1]
    if not torch.isfinite(row).all():
        fail(name, _("a query whose keys are all masked comes out as NaN; return zeros for such a row (as "
                     "F.scaled_dot_product_attention does)"))
    if row.abs().max() > 1e-12:
        fail(name, _("a query whose keys are all masked should give a zero output row"))
    want = A.scaled_dot_product_attention(q, k, v, empty)
    if not close(out, want, 1e-10):
        fail(name, _("with one fully masked query, the other rows changed (max |error| {max_err:.2e})").format(max_err=max_err(out, want)))
    # 6. any leading shape: (T, d) with no batch or head axis
    q2, k2, v2 = q[0, 0], k[0, 0], v[0, 0]
    compare((q2, k2, v2), A.scaled_dot_product_attention(q2, k2, v2), _("2-D inputs (T, d)"), diagnose=False)
    ok(_("sdpa: shapes, scale, masking and softmax axis all correct"))


# ----------------------------------------------------------------------------------------
# Masks


def check_masks(causal_mask_fn: Callable, padding_mask_fn: Callable) -> None:
    """Check causal_mask(T) and padding_mask(lengths, T)."""
    name = "causal_mask"
    for T in (4, 1, 7):
        out = _call(name, causal_mask_fn, T)
        out = expect_tensor(name, out, (T, T), None, f"T={T}")
        if out.dtype != torch.bool:
            fail(name, _("returns dtype {dtype}; masks in this lab are bool tensors (True = may attend)").format(dtype=out.dtype))
        want = A.causal_mask(T)
        if torch.equal(out, want):
            continue
        if torch.equal(out, want.tril(-1)):
            fail(name, _("the diagonal is hidden: a token may attend to itself"))
        if torch.equal(out, ~want):
            fail(name, _("the mask is inverted: True must mean 'may attend'"))
        if torch.equal(out, want.T):
            fail(name, _("query i may attend to keys 0..i, not to the future: rows are queries, columns keys"))
        fail(name, _("wrong entries for T={T} (query i may attend to keys 0..i)").format(T=T))

    name = "padding_mask"
    gen = torch.Generator().manual_seed(2)
    for lengths, T in ((torch.tensor([3, 5, 1, 4]), 5), (torch.randint(1, 9, (3,), generator=gen), 9)):
        B = len(lengths)
        out = _call(name, padding_mask_fn, lengths, T)
        hints = {(B, T): _("add the two singleton axes so it broadcasts over heads and queries"),
                 (B, 1, T): _("the mask needs two singleton axes: (B, 1, 1, T) broadcasts over heads and "
                              "queries")}
        out = expect_tensor(name, out, (B, 1, 1, T), None, _("lengths {shape_of}, T={T}").format(shape_of=shape_of(lengths), T=T), hints)
        if out.dtype != torch.bool:
            fail(name, _("returns dtype {dtype}; masks in this lab are bool tensors (True = may attend)").format(dtype=out.dtype))
        want = A.padding_mask(lengths, T)
        if torch.equal(out, want):
            continue
        if torch.equal(out, ~want):
            fail(name, _("the mask is inverted: True must mean 'a real token', False 'padding'"))
        if torch.equal(out, A.padding_mask(lengths + 1, T)):
            fail(name, _("one position too many is kept: sequence b has real tokens at 0..lengths[b]-1"))
        if torch.equal(out, A.padding_mask(lengths - 1, T)):
            fail(name, _("the last real token is hidden: sequence b has real tokens at 0..lengths[b]-1"))
        fail(name, _("wrong entries for lengths={tolist}, T={T}").format(tolist=lengths.tolist(), T=T))
    ok(_("masks: causal and padding masks have the right shape, dtype and direction"))


# ----------------------------------------------------------------------------------------
# Heads


def check_heads(split_fn: Callable, merge_fn: Callable) -> None:
    """Check split_heads(x, n_heads) and merge_heads(x)."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, d = 2, 5, 3, 4
    x = randn(gen, B, T, H * d)
    name = "split_heads"
    hints = {(B, T, H, d): _("the heads axis must come before time, so each head attends over T"),
             (B, H, d, T): _("time and the head dimension are swapped")}
    out = expect_tensor(name, _call(name, split_fn, x, H), (B, H, T, d), x.dtype,
                         _("x {shape_of} and n_heads={H}").format(shape_of=shape_of(x), H=H), hints)
    if not torch.equal(out, A.split_heads(x, H)):
        if torch.equal(out, x.view(B, T, d, H).permute(0, 3, 1, 2)):
            fail(name, _("heads split in the wrong order: head h must own one contiguous block of d_head "
                         "columns, not every n_heads-th column"))
        if torch.equal(out, x.reshape(B, H, T, d)):
            fail(name, _("reshaping straight to (B, H, T, d) mixes different tokens into one head's time axis; "
                         "split the last axis first, then move the heads axis"))
        fail(name, _("the shape is right but the values are not where they belong"))
    for n_heads in (1, H * d):  # the two extremes
        out = expect_tensor(name, _call(name, split_fn, x, n_heads), (B, n_heads, T, H * d // n_heads),
                             x.dtype, _("x {shape_of} and n_heads={n_heads}").format(shape_of=shape_of(x), n_heads=n_heads))
        if not torch.equal(out, A.split_heads(x, n_heads)):
            fail(name, _("wrong values with n_heads={n_heads}").format(n_heads=n_heads))

    name = "merge_heads"
    y = randn(gen, B, H, T, d)  # as attention returns it: weights @ v is contiguous
    hints = {(B, T, H, d): _("the heads still need to be concatenated into one axis of size H * d")}
    out = expect_tensor(name, _call(name, merge_fn, y), (B, T, H * d), y.dtype, f"x {shape_of(y)}", hints)
    if not torch.equal(out, A.merge_heads(y)):
        if torch.equal(out, y.reshape(B, T, H * d)):
            fail(name, _("reshaping (B, H, T, d) straight to (B, T, H*d) mixes tokens; move the heads axis "
                         "back next to d first"))
        fail(name, _("the shape is right but the values are not where they belong"))
    back = _call("merge_heads(split_heads(x))", lambda t: merge_fn(split_fn(t, H)), x)
    if not isinstance(back, Tensor) or not torch.equal(back, x):
        fail("merge_heads", _("merge_heads(split_heads(x, n_heads)) does not give x back"))
    ok(_("heads: split_heads and merge_heads give the right shapes and head order, and undo each other"))


# ----------------------------------------------------------------------------------------
# Multi-head attention


def _mha_variant(x: Tensor, w: list[Tensor | None], n_heads: int, mask: Tensor | None, *,
                 scale: float | None = None, transpose: bool = False, bias: bool = True,
                 out_proj: bool = True, interleave: bool = False) -> Tensor:
    """Multi-head attention with one deliberate mistake, to recognise it in a student's output."""
    w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o = w
    lin = (lambda t, W, b: t @ W + (b if bias else 0)) if transpose else \
          (lambda t, W, b: F.linear(t, W, b if bias else None))
    B, T, D = x.shape
    split = (lambda t: t.view(B, T, D // n_heads, n_heads).permute(0, 3, 1, 2)) if interleave else \
            (lambda t: A.split_heads(t, n_heads))
    merge = (lambda t: t.permute(0, 2, 3, 1).reshape(B, T, D)) if interleave else A.merge_heads
    q, k, v = split(lin(x, w_q, b_q)), split(lin(x, w_k, b_k)), split(lin(x, w_v, b_v))
    y = merge(A.scaled_dot_product_attention(q, k, v, mask, scale=scale))
    return lin(y, w_o, b_o) if out_proj else y


def _earlier(uses: tuple) -> dict[str, Callable[[], None]]:
    """The checks of the lab's earlier functions a composite exercise may call:
    uses = (scaled_dot_product_attention, split_heads, merge_heads)."""
    if not uses:
        return {}
    sdpa, split, merge = uses
    return {"scaled_dot_product_attention": lambda: check_sdpa(sdpa),
            "split_heads / merge_heads": lambda: check_heads(split, merge)}


def check_mha(fn: Callable, uses: tuple = ()) -> None:
    """Check multi_head_attention(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, n_heads, mask=None).

    uses: the student's (scaled_dot_product_attention, split_heads, merge_heads), blamed when they fail too."""
    blame("multi_head_attention", lambda: _check_mha(fn), _earlier(uses))


def _check_mha(fn: Callable) -> None:
    name = "multi_head_attention"
    gen = torch.Generator().manual_seed(4)
    B, T, D, H = 2, 5, 16, 4
    x = randn(gen, B, T, D)
    # the projections are not square-symmetric and the biases are large enough to matter
    w = [t for _ in range(4) for t in (randn(gen, D, D) * 0.5, randn(gen, D))]
    inputs = _("x {shape_of} and n_heads={H}").format(shape_of=shape_of(x), H=H)
    head_dim = D // H
    mistakes = [
        (dict(scale=1.0), _("the scores are missing the 1/sqrt(d_head) scale")),
        (dict(scale=1.0 / math.sqrt(D)), _("the scale uses d_model; each head's scores are dot products over "
                                           "d_head = d_model / n_heads dimensions")),
        (dict(scale=1.0 / head_dim), _("the scores are divided by d_head; divide by sqrt(d_head)")),
        (dict(transpose=True), _("the weights follow nn.Linear: y = x @ W.T + b, not x @ W")),
        (dict(bias=False), _("the biases are ignored")),
        (dict(out_proj=False), _("the output projection (w_o, b_o) is missing")),
        (dict(interleave=True), _("heads split in the wrong order: head h must own one contiguous block of "
                                  "d_head columns")),
    ]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    padding = (torch.arange(T) < torch.tensor([T, 3])[:, None]).view(B, 1, 1, T)
    for mask, what in ((None, _("without a mask")), (causal, _("with a causal mask")),
                       (padding, _("with a padding mask"))):
        args = (x, *w, H) if mask is None else (x, *w, H, mask)
        want = A.multi_head_attention(x, *w, H, mask)
        out = expect_tensor(name, _call(name, fn, *args), (B, T, D), x.dtype, inputs)
        if close(out, want, 1e-10):
            continue
        for kwargs, message in mistakes:
            if close(out, _mha_variant(x, w, H, mask, **kwargs), 1e-8):
                fail(name, _("{what}: {message}").format(what=what, message=message))
        if close(out, A.multi_head_attention(x, *w, 1, mask), 1e-8):
            fail(name, _("{what}: this is single-head attention; split into n_heads heads").format(what=what))
        if mask is not None:
            if close(out, A.multi_head_attention(x, *w, H, None), 1e-8):
                fail(name, _("{what}: the mask is ignored").format(what=what))
            if close(out, A.multi_head_attention(x, *w, H, ~mask), 1e-8):
                fail(name, _("{what}: the mask works the wrong way round (True = may attend)").format(what=what))
        fail(name, _("{what}: values differ from the reference (max |error| {max_err:.2e})").format(what=what, max_err=max_err(out, want)))
    # float32 stays float32, and biases may be None (a bias-free layer, as in Llama)
    x32, w32 = x.float(), [t.float() for t in w]
    for t in (1, 3, 5, 7):
        w32[t] = None
    want = A.multi_head_attention(x32, *w32, H)
    out = expect_tensor(name, _call(name, fn, x32, *w32, H), (B, T, D), torch.float32, inputs)
    if not close(out, want, 1e-5):
        fail(name, _("float32 inputs with all biases None: values differ (max |error| {max_err:.2e})").format(max_err=max_err(out, want)))
    ok(_("mha: projections, head split, scale, masking and output projection all correct"))


# ----------------------------------------------------------------------------------------
# Positions


def check_sinusoidal(fn: Callable) -> None:
    """Check sinusoidal_positions(T, d)."""
    name = "sinusoidal_positions"
    for T, d in ((9, 12), (50, 16)):
        out = _call(name, fn, T, d)
        hints = {(d, T): _("one row per position: (T, d)")}
        out = expect_tensor(name, out, (T, d), None, f"T={T}, d={d}", hints)
        if not out.is_floating_point():
            fail(name, _("returns dtype {dtype}; expected a floating-point table").format(dtype=out.dtype))
        want = A.sinusoidal_positions(T, d)
        if close(out, want, 1e-5):
            continue
        angles = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
        if close(out, torch.cat([angles.sin(), angles.cos()], dim=1), 1e-5):
            fail(name, _("sin and cos must interleave: even columns sin, odd columns cos"))
        swapped = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(1)
        if close(out, swapped, 1e-5):
            fail(name, _("sin and cos are swapped: even columns hold sin, odd columns cos"))
        if not close(out[0], want[0], 1e-5):
            fail(name, _("row 0 (position 0) is wrong: there every angle is 0"))
        fail(name, _("wrong frequencies: columns 2i and 2i+1 share the angle position / 10000^(2i/d)"))
    ok(_("sinusoidal: shape, frequencies and sin/cos layout all correct"))


def _rope_variant(x: Tensor, positions: Tensor, base: float = 10000.0, *, sign: float = 1.0,
                  interleaved: bool = False, exponent: float = 2.0) -> Tensor:
    """RoPE with one deliberate change of convention, to recognise it in a student's output."""
    hd = x.size(-1)
    inv_freq = base ** (-exponent * torch.arange(hd // 2, dtype=x.dtype) / hd)
    angles = sign * positions.to(x.dtype)[..., None] * inv_freq  # (..., T, hd/2)
    cos, sin = angles.cos(), angles.sin()
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _rope_pairs(name: str, fn: Callable, hd: int) -> tuple[int, int] | None:
    """Rotate each basis vector e_j at position 1: the dimension it turns into names the pairing.

    Returns (j, p) for the first dimension j paired with p other than j +- head_dim/2, else None."""
    out = _call(name, fn, torch.eye(hd, dtype=torch.float64), torch.ones(hd, dtype=torch.int64))
    if not isinstance(out, Tensor) or shape_of(out) != (hd, hd):
        return None
    for j in range(hd):
        others = [p for p in range(hd) if p != j and abs(float(out[j, p])) > 1e-9]
        if len(others) == 1 and others[0] != (j + hd // 2) % hd:
            return j, others[0]
    return None


def check_rope(fn: Callable) -> None:
    """Check apply_rope(x, positions, base=10000.0): rotate-half RoPE."""
    name = "apply_rope"
    gen = torch.Generator().manual_seed(5)
    B, H, T, hd = 2, 3, 6, 8
    x = randn(gen, B, H, T, hd)
    positions = torch.tensor([7, 0, 3, 3, 12, 1])  # not 0..T-1: positions must really be used
    inputs = _("x {shape_of}, positions {shape_of2}").format(shape_of=shape_of(x), shape_of2=shape_of(positions))
    out = expect_tensor(name, _call(name, fn, x, positions), shape_of(x), x.dtype, inputs)
    want = A.apply_rope(x, positions)
    if not close(out, want, 1e-10):
        norm_err = float((out.norm(dim=-1) - x.norm(dim=-1)).abs().max())
        if close(out, A.apply_rope(x, torch.arange(T)), 1e-8):
            fail(name, _("`positions` is ignored: token t is rotated by angle t, not by positions[t]"))
        if not math.isfinite(norm_err) or norm_err > 1e-8:
            fail(name, _("RoPE is a rotation, so it must keep every vector's length (changed by up to "
                         "{norm_err:.3g})").format(norm_err=norm_err))
        if not close(out[..., 1, :], x[..., 1, :], 1e-8):
            fail(name, _("at position 0 the angle is 0, so the vector must come back unchanged"))
        if close(out, _rope_variant(x, positions, interleaved=True), 1e-8):
            fail(name, _("rotates adjacent pairs (x0, x1), (x2, x3), ...; this lab uses the rotate-half "
                         "convention of Llama / Hugging Face: dimension i pairs with i + head_dim/2"))
        for sign, interleaved in ((-1.0, False), (-1.0, True)):
            if close(out, _rope_variant(x, positions, sign=sign, interleaved=interleaved), 1e-8):
                fail(name, _("rotates the wrong way: check the signs of the sin terms"))
        pairs = _rope_pairs(name, fn, hd)
        if pairs:
            fail(name, _("pairs dimension {pairs} with dimension {pairs2}; rotate-half RoPE turns each pair "
                         "(i, i + head_dim/2): dimension {pairs} goes with {value}").format(pairs=pairs[0], pairs2=pairs[1], value=(pairs[0] + hd // 2) % hd))
        if close(out, _rope_variant(x, positions, exponent=1.0), 1e-8):
            fail(name, _("wrong frequencies: pair i turns by base^(-2i/head_dim) radians per position"))
        fail(name, _("values differ from the reference (max |error| {max_err:.2e})").format(max_err=max_err(out, want)))
    # relative positions: <rope(q, m), rope(k, n)> must depend only on m - n
    q, k = randn(gen, 1, hd), randn(gen, 1, hd)
    m = torch.tensor([0, 5, 40])
    qs = _call(name, fn, q.expand(3, hd).contiguous(), m)
    ks = _call(name, fn, k.expand(3, hd).contiguous(), m + 3)
    for got in (qs, ks):
        expect_tensor(name, got, (3, hd), x.dtype, _("x (3, {hd}), positions (3,)").format(hd=hd))
    scores = (qs * ks).sum(-1)
    if not torch.allclose(scores, scores[:1].expand(3), atol=1e-10):
        fail(name, _("<rope(q, m), rope(k, m + 3)> changes with m; it must depend only on the offset"))
    # the base is a parameter, and float32 stays float32
    out = _call(name, fn, x, positions, 500.0)
    if not (isinstance(out, Tensor) and close(out, A.apply_rope(x, positions, 500.0), 1e-10)):
        fail(name, _("the `base` argument is ignored (try base=500.0)"))
    x32 = x.float()
    out = expect_tensor(name, _call(name, fn, x32, positions), shape_of(x), torch.float32, inputs)
    if not close(out, A.apply_rope(x32, positions), 1e-5):
        fail(name, _("float32 inputs: values differ (max |error| {max_err:.2e})").format(max_err=max_err(out, A.apply_rope(x32, positions))))
    ok(_("rope: rotate-half pairs, frequencies, norms and relative positions all correct"))


# ----------------------------------------------------------------------------------------
# The quadratic cost


def check_attention_memory(fn: Callable) -> None:
    """Check attention_memory_bytes(batch, n_heads, T, bytes_per_element=4)."""
    name = "attention_memory_bytes"
    cases = [(1, 1, 1, 4), (2, 12, 128, 4), (3, 8, 1000, 2), (5, 7, 64, 4), (1, 4, 4096, 4)]
    for batch, heads, T, nbytes in cases:
        out = _call(name, fn, batch, heads, T, nbytes)
        if isinstance(out, Tensor) and out.numel() == 1:
            out = out.item()
        if isinstance(out, bool) or not isinstance(out, numbers.Real):
            fail(name, _("returns {type}; expected an int number of bytes").format(type=type(out).__name__))
        if isinstance(out, float) and not out.is_integer():
            fail(name, _("returns {out}, not a whole number of bytes").format(out=out))
        want = batch * heads * T * T * nbytes
        if out == want:
            continue
        case = _("({batch}, {heads}, {T}, {nbytes}) gives {out:,}").format(batch=batch, heads=heads, T=T, nbytes=nbytes, out=out)
        for factor, why in ((2, _("counts the scores twice (e.g. scores and probabilities); count one tensor "
                                  "of scores")),
                            (8, _("counts bits; the answer is in bytes")),
                            (1 / nbytes, _("forgets bytes_per_element")),
                            (1 / batch, _("forgets the batch")),
                            (1 / heads, _("forgets the heads: each head has its own score matrix")),
                            (1 / T, _("grows linearly with T; a score matrix holds one number per (query, key) "
                                      "pair"))):
            if factor != 1 and math.isclose(out, want * factor):
                fail(name, _("{case}: {why}").format(case=case, why=why))
        fail(name, _("{case}, expected {want:,}").format(case=case, want=want))
    ok(_("memory: byte counts right for every batch, head count and length tried"))


# ----------------------------------------------------------------------------------------
# A real model's attention probabilities


def check_bert_probs(fn: Callable, uses: tuple = ()) -> None:
    """Check bert_attention_probs(hidden_states, w_q, b_q, w_k, b_k, n_heads, head, attention_mask).

    uses: the student's (scaled_dot_product_attention, split_heads, merge_heads), blamed when they fail too."""
    blame("bert_attention_probs", lambda: _check_bert_probs(fn), _earlier(uses))


def _check_bert_probs(fn: Callable) -> None:
    name = "bert_attention_probs"
    gen = torch.Generator().manual_seed(6)
    B, T, D, H = 2, 6, 12, 3
    hs = randn(gen, B, T, D)
    w_q, b_q, w_k, b_k = randn(gen, D, D) * 0.5, randn(gen, D), randn(gen, D, D) * 0.5, randn(gen, D)
    attention_mask = torch.tensor([[1] * T, [1] * 4 + [0] * (T - 4)])  # the tokenizer's 0/1, int64
    keep = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T)

    def reference(head: int, *, scale: float | None = None, mask: Tensor | None = keep,
                  transpose: bool = False) -> Tensor:
        lin = (lambda t, W, b: t @ W + b) if transpose else F.linear
        q = A.split_heads(lin(hs, w_q, b_q), H)  # (B, H, T, d)
        k = A.split_heads(lin(hs, w_k, b_k), H)
        return A.attention_weights(q, k, mask, scale=scale)  # (B, H, T, T)

    for head in (1, 0, H - 1):
        args = (hs, w_q, b_q, w_k, b_k, H, head, attention_mask)
        hints = {(B, H, T, T): _("that is every head; return only head {head}").format(head=head)}
        out = expect_tensor(name, _call(name, fn, *args), (B, T, T), hs.dtype,
                             f"hidden_states {shape_of(hs)}, n_heads={H}", hints)
        want = reference(head)[:, head]
        if close(out, want, 1e-10):
            continue
        every = reference(head)
        for other in range(H):
            if other != head and close(out, every[:, other], 1e-8):
                fail(name, _("asked for head {head}, got head {other}").format(head=head, other=other))
        d = D // H
        for variant, message in (
            (dict(mask=None), _("padding tokens (attention_mask == 0) still receive attention")),
            (dict(mask=~keep), _("the mask works the wrong way round: attention_mask == 1 marks real tokens")),
            (dict(scale=1.0), _("the scores are missing the 1/sqrt(d_head) scale")),
            (dict(scale=1.0 / math.sqrt(D)), _("the scale uses the hidden size; use d_head = hidden / n_heads")),
            (dict(transpose=True), _("the weights follow nn.Linear: y = x @ W.T + b, not x @ W")),
            (dict(scale=1.0 / d), _("the scores are divided by d_head; divide by sqrt(d_head)")),
        ):
            if close(out, reference(head, **variant)[:, head], 1e-8):
                fail(name, message)
        sums = out.sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
            fail(name, _("each query's probabilities over the keys must sum to 1 (softmax over the last axis)"))
        fail(name, _("head {head}: values differ from the reference (max |error| {max_err:.2e})").format(head=head, max_err=max_err(out, want)))
    ok(_("bert-probs: one head's probabilities, with scale and padding, match the reference"))
