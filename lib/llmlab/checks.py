"""Instant feedback for the lab exercises: call the student's function, explain what is off.

Each `check_xxx(fn)` calls `fn` on fresh, seeded inputs, compares the result with the
reference in `llmlab.attention` and, when they differ, tries the usual mistakes one by one
(missing scale, softmax over the wrong axis, inverted mask, ...) so the message names the
mistake without printing the answer. On success it prints one line starting with a tick.

`fn` is only ever called — never inspected — with tensors, numbers, bools and None, and only
tensors and numbers are read back. So the same checks run on a notebook function or on a
proxy that forwards the call to another process (the autograder's sandbox).
"""
from __future__ import annotations

import math
import numbers
import sys
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from llmlab import attention as A

# ----------------------------------------------------------------------------------------
# Calling the student's function: errors become messages, ready-made attention is refused

# torch functions a graded exercise must not delegate to (seen through __torch_function__)
FORBIDDEN_TORCH = {
    F.scaled_dot_product_attention: "torch.nn.functional.scaled_dot_product_attention",
    F.multi_head_attention_forward: "torch.nn.functional.multi_head_attention_forward",
}
# Python code objects that must not run (seen through the profiler hook)
FORBIDDEN_CODE = {
    nn.MultiheadAttention.__init__.__code__: "torch.nn.MultiheadAttention",
    nn.MultiheadAttention.forward.__code__: "torch.nn.MultiheadAttention",
}
REFERENCE_FILE = A.__file__  # any code from llmlab.attention counts as the course's answer


class _Watch(TorchFunctionMode):
    """Records forbidden calls made while the student's function runs."""

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = FORBIDDEN_TORCH.get(func) if _hashable(func) else None
        if name:
            self.hits.append(name)
        return func(*args, **(kwargs or {}))

    def profile(self, frame, event, arg) -> None:
        """sys.setprofile hook: catches nn.MultiheadAttention and llmlab.attention."""
        if event == "call":
            code = frame.f_code
            if code in FORBIDDEN_CODE:
                self.hits.append(FORBIDDEN_CODE[code])
            elif code.co_filename == REFERENCE_FILE:
                self.hits.append("llmlab.attention")
        elif event == "c_call" and _hashable(arg) and arg in FORBIDDEN_TORCH:
            self.hits.append(FORBIDDEN_TORCH[arg])


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _call(name: str, fn: Callable, *args: Any) -> Any:
    """fn(*args), turning any exception or forbidden call into an AssertionError about `name`."""
    watch = _Watch()
    previous = sys.getprofile()
    error: Exception | None = None
    try:
        with watch:
            sys.setprofile(watch.profile)
            try:
                out = fn(*args)
            finally:
                sys.setprofile(previous)
    except Exception as e:  # noqa: BLE001 — whatever the student's code raised
        error = e
    if watch.hits:
        raise AssertionError(f"{name} calls {watch.hits[0]}; this exercise asks you to implement it yourself")
    if error is not None:
        detail = str(error).strip()
        text = f"{name} raised {type(error).__name__}" + (f": {detail}" if detail else "")
        if "view size is not compatible" in str(error):
            text += "\n(hint: after a transpose a tensor is no longer contiguous; .view cannot handle that)"
        raise AssertionError(text) from None
    return out


def _fail(name: str, message: str) -> None:
    raise AssertionError(f"{name}: {message}")


def _shape(t: Tensor | torch.Size | tuple) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, Tensor) else tuple(t)


def _expect_tensor(name: str, out: Any, shape: tuple[int, ...], dtype: torch.dtype | None,
                   inputs: str, hints: dict[tuple[int, ...], str] | None = None) -> Tensor:
    """Fail unless `out` is a tensor of `shape` (and of `dtype`, when given); return it."""
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        _fail(name, f"returns a tuple of {len(out)} values; return a single tensor")
    if not isinstance(out, Tensor):
        _fail(name, f"returns {type(out).__name__}, expected a torch.Tensor")
    got = _shape(out)
    if got != shape:
        hint = (hints or {}).get(got, "")
        _fail(name, f"returns shape {got} for {inputs}; expected {shape}" + (f" — {hint}" if hint else ""))
    if dtype is not None and out.dtype != dtype:
        _fail(name, f"returns dtype {out.dtype} for {dtype} inputs; keep the input dtype "
                    "(a hard-coded dtype, or a new tensor created without dtype=?)")
    return out


def _close(got: Tensor, want: Tensor, atol: float) -> bool:
    """Same shape and all entries within atol (+ 1e-7 relative); NaN never matches."""
    if _shape(got) != _shape(want):
        return False
    got, want = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    return bool(torch.isfinite(got).all()) and torch.allclose(got, want, rtol=1e-7, atol=atol)


def _max_err(got: Tensor, want: Tensor) -> float:
    return float((got.detach().cpu().double() - want.detach().cpu().double()).abs().max())


def _atol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype)


def _random_mask(gen: torch.Generator, *shape: int) -> Tensor:
    """Random bool mask whose every row (last axis) has at least one True and one False."""
    mask = torch.rand(*shape, generator=gen) < 0.5
    mask[..., 0] = True  # guarantee one kept key per row...
    mask[..., -1] = False  # ...and one hidden key
    perm = torch.randperm(shape[-1], generator=gen)
    return mask[..., perm]


def _ok(message: str) -> None:
    print(f"✓ {message}")


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
    if not isinstance(W, Tensor) or _shape(W) != (*q.shape[:-1], T_k):
        return "values differ from the reference"
    want = A.attention_weights(q, k, mask)
    if _close(W, want, 1e-8):
        return "the attention weights are right, but the output is not the weighted sum weights @ v"
    if mask is not None:
        if _close(W, A.attention_weights(q, k, ~mask), 1e-8):
            return "the mask works the wrong way round: True means 'may attend', False means 'hide this key'"
        if _close(W, A.attention_weights(q, k), 1e-8):
            return "the mask is ignored: hidden keys get the same weight as without a mask"
        leak = float(W.masked_select(~mask.expand_as(W)).abs().max()) if (~mask).any() else 0.0
        if not math.isfinite(leak) or leak > 1e-6:
            return (f"keys hidden by the mask still get weight (up to {leak:.3g}); a masked score must "
                    "become so negative that the softmax turns it into exactly 0")
        sums = W.sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
            return ("after masking, a query's weights no longer sum to 1: mask the scores before the "
                    "softmax, not the probabilities after it")
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    if mask is None and _close(W, torch.softmax(scores, dim=-2), 1e-8):
        return ("softmax over the wrong axis: each query's weights over the keys (the last axis) "
                "must sum to 1")
    wrong_scales = [
        (1.0, "the scores are missing the 1/sqrt(d) scale"),
        (1.0 / d, "the scores are divided by d; divide by sqrt(d)"),
        (math.sqrt(d), "the scores are multiplied by sqrt(d); they should be divided by it"),
        (1.0 / math.sqrt(T_k), "the scale uses the number of keys; d is the size of each query/key vector"),
        (1.0 / math.sqrt(T_q), "the scale uses the number of queries; d is the size of each query/key vector"),
    ]
    for scale, message in wrong_scales:
        if _close(W, A.attention_weights(q, k, mask, scale=scale), 1e-8):
            return message
    sums = W.sum(-1)
    if not torch.isfinite(W).all():
        return "the weights contain NaN or inf"
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
        return "a query's weights over the keys do not sum to 1 (is the softmax there, over the last axis?)"
    return "the attention weights differ from the reference"


def check_sdpa(fn: Callable) -> None:
    """Check scaled_dot_product_attention(q, k, v, mask=None) against the reference."""
    name = "scaled_dot_product_attention"
    gen = torch.Generator().manual_seed(1)
    B, H, T_q, T_k, d, d_v = 2, 3, 4, 6, 8, 5  # all different, so a swapped axis shows
    q, k, v = _randn(gen, B, H, T_q, d), _randn(gen, B, H, T_k, d), _randn(gen, B, H, T_k, d_v)
    inputs = f"q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
    hints = {(B, H, T_q, T_k): "that is the shape of the attention weights; return weights @ v"}

    def compare(args: tuple, want: Tensor, what: str, diagnose: bool = True) -> Tensor:
        out = _expect_tensor(name, _call(name, fn, *args), _shape(want), want.dtype, inputs, hints)
        if not _close(out, want, _atol(want.dtype)):
            if diagnose:
                mask = args[3] if len(args) > 3 else None
                reason = _sdpa_weight_diagnosis(name, fn, args[0], args[1], mask)
            else:
                reason = "values differ from the reference"
            _fail(name, f"{what}: {reason} (max |error| {_max_err(out, want):.2e})")
        return out

    # 1. no mask: shape, scale, softmax axis
    compare((q, k, v), A.scaled_dot_product_attention(q, k, v), "without a mask")
    # 2. dtype follows the inputs
    q32, k32, v32 = q.float(), k.float(), v.float()
    compare((q32, k32, v32), A.scaled_dot_product_attention(q32, k32, v32), "float32 inputs", diagnose=False)
    # 3. a random mask, broadcast over heads
    mask = _random_mask(gen, B, 1, T_q, T_k)
    compare((q, k, v, mask), A.scaled_dot_product_attention(q, k, v, mask), "with a (B, 1, T_q, T_k) mask")
    # 4. the two masks of this lab, as they broadcast: causal (T, T) and padding (B, 1, 1, T)
    qs = _randn(gen, B, H, T_k, d)
    causal = torch.ones(T_k, T_k, dtype=torch.bool).tril()
    compare((qs, k, v, causal), A.scaled_dot_product_attention(qs, k, v, causal), "with a causal (T, T) mask")
    padding = (torch.arange(T_k) < torch.tensor([T_k, 2])[:, None]).view(B, 1, 1, T_k)
    compare((q, k, v, padding), A.scaled_dot_product_attention(q, k, v, padding),
            "with a (B, 1, 1, T_k) padding mask")
    # 5. a query that may attend to nothing: zeros, not NaN
    empty = mask.clone()
    empty[0, 0, 1] = False
    out = _expect_tensor(name, _call(name, fn, q, k, v, empty), (B, H, T_q, d_v), q.dtype, inputs)
    row = out[0, :, 1]
    if not torch.isfinite(row).all():
        _fail(name, "a query whose keys are all masked comes out as NaN; return zeros for such a row "
                    "(as F.scaled_dot_product_attention does)")
    if row.abs().max() > 1e-12:
        _fail(name, "a query whose keys are all masked should give a zero output row")
    want = A.scaled_dot_product_attention(q, k, v, empty)
    if not _close(out, want, 1e-10):
        _fail(name, "with one fully masked query, the other rows changed "
                    f"(max |error| {_max_err(out, want):.2e})")
    # 6. any leading shape: (T, d) with no batch or head axis
    q2, k2, v2 = q[0, 0], k[0, 0], v[0, 0]
    compare((q2, k2, v2), A.scaled_dot_product_attention(q2, k2, v2), "2-D inputs (T, d)", diagnose=False)
    _ok("sdpa: shapes, scale, masking and softmax axis all correct")


# ----------------------------------------------------------------------------------------
# Masks


def check_masks(causal_mask_fn: Callable, padding_mask_fn: Callable) -> None:
    """Check causal_mask(T) and padding_mask(lengths, T)."""
    name = "causal_mask"
    for T in (4, 1, 7):
        out = _call(name, causal_mask_fn, T)
        out = _expect_tensor(name, out, (T, T), None, f"T={T}")
        if out.dtype != torch.bool:
            _fail(name, f"returns dtype {out.dtype}; masks in this lab are bool tensors (True = may attend)")
        want = A.causal_mask(T)
        if torch.equal(out, want):
            continue
        if torch.equal(out, want.tril(-1)):
            _fail(name, "the diagonal is hidden: a token may attend to itself")
        if torch.equal(out, ~want):
            _fail(name, "the mask is inverted: True must mean 'may attend'")
        if torch.equal(out, want.T):
            _fail(name, "query i may attend to keys 0..i, not to the future: rows are queries, columns keys")
        _fail(name, f"wrong entries for T={T} (query i may attend to keys 0..i)")

    name = "padding_mask"
    gen = torch.Generator().manual_seed(2)
    for lengths, T in ((torch.tensor([3, 5, 1, 4]), 5), (torch.randint(1, 9, (3,), generator=gen), 9)):
        B = len(lengths)
        out = _call(name, padding_mask_fn, lengths, T)
        hints = {(B, T): "add the two singleton axes so it broadcasts over heads and queries",
                 (B, 1, T): "the mask needs two singleton axes: (B, 1, 1, T) broadcasts over heads and queries"}
        out = _expect_tensor(name, out, (B, 1, 1, T), None, f"lengths {_shape(lengths)}, T={T}", hints)
        if out.dtype != torch.bool:
            _fail(name, f"returns dtype {out.dtype}; masks in this lab are bool tensors (True = may attend)")
        want = A.padding_mask(lengths, T)
        if torch.equal(out, want):
            continue
        if torch.equal(out, ~want):
            _fail(name, "the mask is inverted: True must mean 'a real token', False 'padding'")
        if torch.equal(out, A.padding_mask(lengths + 1, T)):
            _fail(name, "one position too many is kept: sequence b has real tokens at 0..lengths[b]-1")
        if torch.equal(out, A.padding_mask(lengths - 1, T)):
            _fail(name, "the last real token is hidden: sequence b has real tokens at 0..lengths[b]-1")
        _fail(name, f"wrong entries for lengths={lengths.tolist()}, T={T}")
    _ok("masks: causal and padding masks have the right shape, dtype and direction")


# ----------------------------------------------------------------------------------------
# Heads


def check_heads(split_fn: Callable, merge_fn: Callable) -> None:
    """Check split_heads(x, n_heads) and merge_heads(x)."""
    gen = torch.Generator().manual_seed(3)
    B, T, H, d = 2, 5, 3, 4
    x = _randn(gen, B, T, H * d)
    name = "split_heads"
    hints = {(B, T, H, d): "the heads axis must come before time, so each head attends over T",
             (B, H, d, T): "time and the head dimension are swapped"}
    out = _expect_tensor(name, _call(name, split_fn, x, H), (B, H, T, d), x.dtype,
                         f"x {_shape(x)} and n_heads={H}", hints)
    if not torch.equal(out, A.split_heads(x, H)):
        if torch.equal(out, x.view(B, T, d, H).permute(0, 3, 1, 2)):
            _fail(name, "heads split in the wrong order: head h must own one contiguous block of "
                        "d_head columns, not every n_heads-th column")
        if torch.equal(out, x.reshape(B, H, T, d)):
            _fail(name, "reshaping straight to (B, H, T, d) mixes different tokens into one head's "
                        "time axis; split the last axis first, then move the heads axis")
        _fail(name, "the shape is right but the values are not where they belong")
    for n_heads in (1, H * d):  # the two extremes
        out = _expect_tensor(name, _call(name, split_fn, x, n_heads), (B, n_heads, T, H * d // n_heads),
                             x.dtype, f"x {_shape(x)} and n_heads={n_heads}")
        if not torch.equal(out, A.split_heads(x, n_heads)):
            _fail(name, f"wrong values with n_heads={n_heads}")

    name = "merge_heads"
    y = _randn(gen, B, H, T, d)  # as attention returns it: weights @ v is contiguous
    hints = {(B, T, H, d): "the heads still need to be concatenated into one axis of size H * d"}
    out = _expect_tensor(name, _call(name, merge_fn, y), (B, T, H * d), y.dtype, f"x {_shape(y)}", hints)
    if not torch.equal(out, A.merge_heads(y)):
        if torch.equal(out, y.reshape(B, T, H * d)):
            _fail(name, "reshaping (B, H, T, d) straight to (B, T, H*d) mixes tokens; move the heads "
                        "axis back next to d first")
        _fail(name, "the shape is right but the values are not where they belong")
    back = _call("merge_heads(split_heads(x))", lambda t: merge_fn(split_fn(t, H)), x)
    if not isinstance(back, Tensor) or not torch.equal(back, x):
        _fail("merge_heads", "merge_heads(split_heads(x, n_heads)) does not give x back")
    _ok("heads: split_heads and merge_heads give the right shapes and head order, and undo each other")


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


def check_mha(fn: Callable) -> None:
    """Check multi_head_attention(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, n_heads, mask=None)."""
    name = "multi_head_attention"
    gen = torch.Generator().manual_seed(4)
    B, T, D, H = 2, 5, 16, 4
    x = _randn(gen, B, T, D)
    # the projections are not square-symmetric and the biases are large enough to matter
    w = [t for _ in range(4) for t in (_randn(gen, D, D) * 0.5, _randn(gen, D))]
    inputs = f"x {_shape(x)} and n_heads={H}"
    head_dim = D // H
    mistakes = [
        (dict(scale=1.0), "the scores are missing the 1/sqrt(d_head) scale"),
        (dict(scale=1.0 / math.sqrt(D)), "the scale uses d_model; each head's scores are dot products "
                                         "over d_head = d_model / n_heads dimensions"),
        (dict(scale=1.0 / head_dim), "the scores are divided by d_head; divide by sqrt(d_head)"),
        (dict(transpose=True), "the weights follow nn.Linear: y = x @ W.T + b, not x @ W"),
        (dict(bias=False), "the biases are ignored"),
        (dict(out_proj=False), "the output projection (w_o, b_o) is missing"),
        (dict(interleave=True), "heads split in the wrong order: head h must own one contiguous block "
                                "of d_head columns"),
    ]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    padding = (torch.arange(T) < torch.tensor([T, 3])[:, None]).view(B, 1, 1, T)
    for mask, what in ((None, "without a mask"), (causal, "with a causal mask"),
                       (padding, "with a padding mask")):
        args = (x, *w, H) if mask is None else (x, *w, H, mask)
        want = A.multi_head_attention(x, *w, H, mask)
        out = _expect_tensor(name, _call(name, fn, *args), (B, T, D), x.dtype, inputs)
        if _close(out, want, 1e-10):
            continue
        for kwargs, message in mistakes:
            if _close(out, _mha_variant(x, w, H, mask, **kwargs), 1e-8):
                _fail(name, f"{what}: {message}")
        if _close(out, A.multi_head_attention(x, *w, 1, mask), 1e-8):
            _fail(name, f"{what}: this is single-head attention; split into n_heads heads")
        if mask is not None:
            if _close(out, A.multi_head_attention(x, *w, H, None), 1e-8):
                _fail(name, f"{what}: the mask is ignored")
            if _close(out, A.multi_head_attention(x, *w, H, ~mask), 1e-8):
                _fail(name, f"{what}: the mask works the wrong way round (True = may attend)")
        _fail(name, f"{what}: values differ from the reference (max |error| {_max_err(out, want):.2e})")
    # float32 stays float32, and biases may be None (a bias-free layer, as in Llama)
    x32, w32 = x.float(), [t.float() for t in w]
    for t in (1, 3, 5, 7):
        w32[t] = None
    want = A.multi_head_attention(x32, *w32, H)
    out = _expect_tensor(name, _call(name, fn, x32, *w32, H), (B, T, D), torch.float32, inputs)
    if not _close(out, want, 1e-5):
        _fail(name, f"float32 inputs with all biases None: values differ (max |error| {_max_err(out, want):.2e})")
    _ok("mha: projections, head split, scale, masking and output projection all correct")


# ----------------------------------------------------------------------------------------
# Positions


def check_sinusoidal(fn: Callable) -> None:
    """Check sinusoidal_positions(T, d)."""
    name = "sinusoidal_positions"
    for T, d in ((9, 12), (50, 16)):
        out = _call(name, fn, T, d)
        hints = {(d, T): "one row per position: (T, d)"}
        out = _expect_tensor(name, out, (T, d), None, f"T={T}, d={d}", hints)
        if not out.is_floating_point():
            _fail(name, f"returns dtype {out.dtype}; expected a floating-point table")
        want = A.sinusoidal_positions(T, d)
        if _close(out, want, 1e-5):
            continue
        angles = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
        if _close(out, torch.cat([angles.sin(), angles.cos()], dim=1), 1e-5):
            _fail(name, "sin and cos must interleave: even columns sin, odd columns cos")
        swapped = torch.stack([angles.cos(), angles.sin()], dim=-1).flatten(1)
        if _close(out, swapped, 1e-5):
            _fail(name, "sin and cos are swapped: even columns hold sin, odd columns cos")
        if not _close(out[0], want[0], 1e-5):
            _fail(name, "row 0 (position 0) is wrong: there every angle is 0")
        _fail(name, "wrong frequencies: columns 2i and 2i+1 share the angle position / 10000^(2i/d)")
    _ok("sinusoidal: shape, frequencies and sin/cos layout all correct")


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


def check_rope(fn: Callable) -> None:
    """Check apply_rope(x, positions, base=10000.0): rotate-half RoPE."""
    name = "apply_rope"
    gen = torch.Generator().manual_seed(5)
    B, H, T, hd = 2, 3, 6, 8
    x = _randn(gen, B, H, T, hd)
    positions = torch.tensor([7, 0, 3, 3, 12, 1])  # not 0..T-1: positions must really be used
    inputs = f"x {_shape(x)}, positions {_shape(positions)}"
    out = _expect_tensor(name, _call(name, fn, x, positions), _shape(x), x.dtype, inputs)
    want = A.apply_rope(x, positions)
    if not _close(out, want, 1e-10):
        norm_err = float((out.norm(dim=-1) - x.norm(dim=-1)).abs().max())
        if _close(out, A.apply_rope(x, torch.arange(T)), 1e-8):
            _fail(name, "`positions` is ignored: token t is rotated by angle t, not by positions[t]")
        if not math.isfinite(norm_err) or norm_err > 1e-8:
            _fail(name, f"RoPE is a rotation, so it must keep every vector's length (changed by up to {norm_err:.3g})")
        if not _close(out[..., 1, :], x[..., 1, :], 1e-8):
            _fail(name, "at position 0 the angle is 0, so the vector must come back unchanged")
        if _close(out, _rope_variant(x, positions, interleaved=True), 1e-8):
            _fail(name, "rotates adjacent pairs (x0, x1), (x2, x3), ...; this lab uses the rotate-half "
                        "convention of Llama / Hugging Face: dimension i pairs with i + head_dim/2")
        for sign, interleaved in ((-1.0, False), (-1.0, True)):
            if _close(out, _rope_variant(x, positions, sign=sign, interleaved=interleaved), 1e-8):
                _fail(name, "rotates the wrong way: check the signs of the sin terms")
        if _close(out, _rope_variant(x, positions, exponent=1.0), 1e-8):
            _fail(name, "wrong frequencies: pair i turns by base^(-2i/head_dim) radians per position")
        _fail(name, f"values differ from the reference (max |error| {_max_err(out, want):.2e})")
    # relative positions: <rope(q, m), rope(k, n)> must depend only on m - n
    q, k = _randn(gen, 1, hd), _randn(gen, 1, hd)
    m = torch.tensor([0, 5, 40])
    qs = _call(name, fn, q.expand(3, hd).contiguous(), m)
    ks = _call(name, fn, k.expand(3, hd).contiguous(), m + 3)
    for got in (qs, ks):
        _expect_tensor(name, got, (3, hd), x.dtype, f"x (3, {hd}), positions (3,)")
    scores = (qs * ks).sum(-1)
    if not torch.allclose(scores, scores[:1].expand(3), atol=1e-10):
        _fail(name, "<rope(q, m), rope(k, m + 3)> changes with m; it must depend only on the offset")
    # the base is a parameter, and float32 stays float32
    out = _call(name, fn, x, positions, 500.0)
    if not (isinstance(out, Tensor) and _close(out, A.apply_rope(x, positions, 500.0), 1e-10)):
        _fail(name, "the `base` argument is ignored (try base=500.0)")
    x32 = x.float()
    out = _expect_tensor(name, _call(name, fn, x32, positions), _shape(x), torch.float32, inputs)
    if not _close(out, A.apply_rope(x32, positions), 1e-5):
        _fail(name, f"float32 inputs: values differ (max |error| {_max_err(out, A.apply_rope(x32, positions)):.2e})")
    _ok("rope: rotate-half pairs, frequencies, norms and relative positions all correct")


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
            _fail(name, f"returns {type(out).__name__}; expected an int number of bytes")
        if isinstance(out, float) and not out.is_integer():
            _fail(name, f"returns {out}, not a whole number of bytes")
        want = batch * heads * T * T * nbytes
        if out == want:
            continue
        call = f"({batch}, {heads}, {T}, {nbytes}) gives {out:,}"
        for factor, why in ((2, "counts the scores twice (e.g. scores and probabilities); count one tensor of scores"),
                            (8, "counts bits; the answer is in bytes"),
                            (1 / nbytes, "forgets bytes_per_element"),
                            (1 / batch, "forgets the batch"),
                            (1 / heads, "forgets the heads: each head has its own score matrix"),
                            (1 / T, "grows linearly with T; a score matrix holds one number per (query, key) pair")):
            if factor != 1 and math.isclose(out, want * factor):
                _fail(name, f"{call}: {why}")
        _fail(name, f"{call}, expected {want:,}")
    _ok("memory: byte counts right for every batch, head count and length tried")


# ----------------------------------------------------------------------------------------
# A real model's attention probabilities


def check_bert_probs(fn: Callable) -> None:
    """Check bert_attention_probs(hidden_states, w_q, b_q, w_k, b_k, n_heads, head, attention_mask)."""
    name = "bert_attention_probs"
    gen = torch.Generator().manual_seed(6)
    B, T, D, H = 2, 6, 12, 3
    hs = _randn(gen, B, T, D)
    w_q, b_q, w_k, b_k = _randn(gen, D, D) * 0.5, _randn(gen, D), _randn(gen, D, D) * 0.5, _randn(gen, D)
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
        hints = {(B, H, T, T): f"that is every head; return only head {head}"}
        out = _expect_tensor(name, _call(name, fn, *args), (B, T, T), hs.dtype,
                             f"hidden_states {_shape(hs)}, n_heads={H}", hints)
        want = reference(head)[:, head]
        if _close(out, want, 1e-10):
            continue
        every = reference(head)
        for other in range(H):
            if other != head and _close(out, every[:, other], 1e-8):
                _fail(name, f"asked for head {head}, got head {other}")
        d = D // H
        for variant, message in (
            (dict(mask=None), "padding tokens (attention_mask == 0) still receive attention"),
            (dict(mask=~keep), "the mask works the wrong way round: attention_mask == 1 marks real tokens"),
            (dict(scale=1.0), "the scores are missing the 1/sqrt(d_head) scale"),
            (dict(scale=1.0 / math.sqrt(D)), "the scale uses the hidden size; use d_head = hidden / n_heads"),
            (dict(transpose=True), "the weights follow nn.Linear: y = x @ W.T + b, not x @ W"),
            (dict(scale=1.0 / d), "the scores are divided by d_head; divide by sqrt(d_head)"),
        ):
            if _close(out, reference(head, **variant)[:, head], 1e-8):
                _fail(name, message)
        sums = out.sum(-1)
        if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
            _fail(name, "each query's probabilities over the keys must sum to 1 (softmax over the last axis)")
        _fail(name, f"head {head}: values differ from the reference (max |error| {_max_err(out, want):.2e})")
    _ok("bert-probs: one head's probabilities, with scale and padding, match the reference")


# ========================================================================================
# Lab 2 — pretraining
#
# These exercises may build on the library (lab 2's block uses `llmlab.attention`), so
# the calls below only turn errors into messages; the grader refuses ready-made answers.


def _run(name: str, fn: Callable, *args: Any) -> Any:
    """fn(*args), turning any exception into an AssertionError about `name`."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 — whatever the student's code raised
        detail = str(e).strip()
        raise AssertionError(f"{name} raised {type(e).__name__}" + (f": {detail}" if detail else "")) from None


def _as_float(name: str, out: Any) -> float:
    if isinstance(out, Tensor) and out.numel() == 1:
        out = out.item()
    if isinstance(out, bool) or not isinstance(out, numbers.Real):
        _fail(name, f"returns {type(out).__name__}; expected a number")
    return float(out)


# ----------------------------------------------------------------------------------------
# Byte-pair encoding


def check_bpe(merge_fn: Callable, pair_fn: Callable) -> None:
    """Check merge(ids, pair, new_id) and most_frequent_pair(ids)."""
    from llmlab import tokenizer as tok

    gen = torch.Generator().manual_seed(21)
    cases = [([1, 2, 3, 1, 2], (1, 2), 9), ([5, 5, 5, 5, 5], (5, 5), 7), ([4], (4, 4), 8), ([], (1, 2), 3)]
    cases += [(torch.randint(0, 4, (40,), generator=gen).tolist(), (1, 2), 256) for _ in range(3)]
    for ids, pair, new_id in cases:
        out = _run("merge", merge_fn, list(ids), pair, new_id)
        if isinstance(out, Tensor):
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            _fail("merge", f"returns {type(out).__name__}; expected a list of ints")
        out, want = list(out), tok.merge(ids, pair, new_id)
        if out == want:
            continue
        shown = f"merge({ids[:12]}{'...' if len(ids) > 12 else ''}, {pair}, {new_id})"
        if len(out) == len(ids):
            _fail("merge", f"{shown} keeps the length: a merged pair of two ids must become ONE id")
        if pair[0] == pair[1] and len(out) < len(want):
            _fail("merge", f"{shown}: overlapping occurrences — once a pair is merged, its second id is used up")
        _fail("merge", f"{shown} gives {out[:12]}{'...' if len(out) > 12 else ''}, expected another list")
    for ids in ([1, 2, 3, 1, 2], [3, 4, 1, 2], [9, 9, 9, 1, 9, 9], [7, 1, 7, 1, 0, 2, 0, 2]):
        out = _run("most_frequent_pair", pair_fn, list(ids))
        if not isinstance(out, (list, tuple)) or len(out) != 2:
            _fail("most_frequent_pair", f"returns {out!r}; expected a pair (left id, right id)")
        out = tuple(int(i) for i in out)
        want = tok.most_frequent_pair(tok.pair_counts(ids))
        if out != want:
            counts = tok.pair_counts(ids)
            if out in counts and counts[out] == counts[want]:
                _fail("most_frequent_pair", f"on {ids}: {out} ties with another pair; break ties by the smallest pair")
            _fail("most_frequent_pair", f"on {ids}: {out} is not the most frequent adjacent pair")
    _ok("bpe: merges left to right without overlaps, picks the most frequent pair with the smallest on ties")


# ----------------------------------------------------------------------------------------
# The causal language-modelling loss


def check_clm_loss(fn: Callable) -> None:
    """Check causal_lm_loss(logits, tokens)."""
    name = "causal_lm_loss"
    gen = torch.Generator().manual_seed(22)
    B, T, V = 3, 7, 11
    logits = _randn(gen, B, T, V)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    out = _run(name, fn, logits, tokens)
    if not isinstance(out, Tensor):
        _fail(name, f"returns {type(out).__name__}; expected a scalar tensor")
    if out.dim() != 0:
        _fail(name, f"returns shape {_shape(out)}; expected a scalar (the mean over positions)")
    want = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
    if _close(out, want, 1e-10):
        _ok("causal LM loss: shifted targets, mean over the B x (T-1) predictions")
        return
    if _close(out, F.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1)), 1e-10):
        _fail(name, "scores each position against its OWN token; position t must predict token t + 1")
    if _close(out, F.cross_entropy(logits[:, 1:].reshape(-1, V), tokens[:, :-1].reshape(-1)), 1e-10):
        _fail(name, "shifted the wrong way: the logits at position t predict tokens[:, t + 1]")
    if _close(out, want * B * (T - 1), 1e-8):
        _fail(name, "returns the sum; the loss is the mean over the predictions")
    _fail(name, f"differs from the reference (max |error| {_max_err(out, want):.2e})")


# ----------------------------------------------------------------------------------------
# One transformer block as a function


def check_block(fn: Callable) -> None:
    """Check transformer_block(x, params, n_head, rope_theta=10000.0, eps=1e-5)."""
    from llmlab.model import GPT, GPTConfig

    name = "transformer_block"
    torch.manual_seed(23)
    config = GPTConfig(vocab_size=16, block_size=12, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config).double().eval()
    block = model.layers[0]
    with torch.no_grad():
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
    params = {k: v.detach().clone() for k, v in block.state_dict().items()}
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    with torch.no_grad():
        want = block(x, (model.rope_cos[:9].double(), model.rope_sin[:9].double()))
        no_rope = block(x, None)
    out = _expect_tensor(name, _run(name, fn, x, params, 2), _shape(x), x.dtype, f"x {_shape(x)}")
    if _close(out, want, 1e-8):
        _ok("block: pre-norm attention with RoPE and a SwiGLU MLP, matches llmlab.model.Block")
        return
    if _close(out, no_rope, 1e-8):
        _fail(name, "the output ignores positions: rotate q and k with RoPE before the scores")
    if _close(out[:, 0], want[:, 0], 1e-8):
        _fail(name, "the first token is right but later ones are not: check the causal mask, "
                    "the head split, or the rotation of positions > 0")
    if _close(out, want - x, 1e-8):
        _fail(name, "the residual connections are missing: x = x + attn(...), then x = x + mlp(...)")
    _fail(name, f"differs from llmlab.model.Block (max |error| {_max_err(out, want):.2e})")


# ----------------------------------------------------------------------------------------
# Learning-rate schedule


def check_lr_schedule(fn: Callable) -> None:
    """Check lr_at(step, max_lr, min_lr, warmup_steps, decay_steps)."""
    from llmlab import train

    name = "lr_at"
    max_lr, min_lr, warmup, decay = 1e-3, 1e-4, 10, 50
    cfg = train.TrainConfig(max_steps=decay, lr=max_lr, min_lr=min_lr, warmup_steps=warmup)
    got = [_as_float(name, _run(name, fn, s, max_lr, min_lr, warmup, decay)) for s in range(decay + 5)]
    want = [train.lr_at(s, cfg) for s in range(decay + 5)]
    bad = [s for s in range(decay + 5) if not math.isclose(got[s], want[s], rel_tol=1e-9, abs_tol=1e-15)]
    if not bad:
        _ok("lr schedule: linear warmup to max_lr, half cosine to min_lr, then flat")
        return
    s = bad[0]
    if s < warmup:
        if math.isclose(got[s], max_lr):
            _fail(name, f"step {s} already uses max_lr: there is no warmup")
        if math.isclose(got[s], max_lr * s / warmup, abs_tol=1e-15):
            _fail(name, f"step {s}: off by one — step 0 must already take a small step: max_lr * (step + 1) / warmup_steps")
        _fail(name, f"step {s} (warmup): {got[s]:.3g}, expected a linear rise to max_lr")
    if s >= decay:
        _fail(name, f"step {s} (after decay_steps): {got[s]:.3g}; the schedule stays at min_lr")
    if math.isclose(got[warmup], max_lr) and got[decay - 1] < min_lr + 0.01 * (max_lr - min_lr) and got[s] < want[s]:
        _fail(name, f"step {s}: {got[s]:.3g}; a linear decay? The decay is a half cosine")
    _fail(name, f"step {s} (decay): {got[s]:.3g}, expected {want[s]:.3g}")


# ----------------------------------------------------------------------------------------
# Gradient accumulation


def check_accumulate(fn: Callable) -> None:
    """Check accumulate(micro_grads, sizes)."""
    name = "accumulate"
    gen = torch.Generator().manual_seed(24)
    grads = [{"w": _randn(gen, 3, 2), "b": _randn(gen, 3)} for _ in range(3)]
    for sizes in ([4, 4, 4], [8, 8, 2]):
        out = _run(name, fn, grads, sizes)
        if not isinstance(out, dict) or set(out) != {"w", "b"}:
            _fail(name, "returns something other than a dict with the same names as each micro-batch's gradients")
        n = sum(sizes)
        want = {k: sum(g[k] * s for g, s in zip(grads, sizes)) / n for k in ("w", "b")}
        if all(_close(out[k], want[k], 1e-10) for k in want):
            continue
        total = {k: sum(g[k] for g in grads) for k in want}
        mean = {k: total[k] / len(grads) for k in want}
        if all(_close(out[k], total[k], 1e-10) for k in want):
            _fail(name, "adds the micro-batch gradients: each is already a mean, so the sum is k times too big")
        if all(_close(out[k], mean[k], 1e-10) for k in want):
            _fail(name, f"sizes {sizes}: a plain mean gives a small last micro-batch as much weight as a "
                        "full one; weight each by its number of examples")
        _fail(name, f"sizes {sizes}: not the gradient of the mean loss over the whole batch")
    _ok("accumulate: size-weighted mean of micro-batch gradients = the gradient of the whole batch")


# ----------------------------------------------------------------------------------------
# Sampling


def _reference_probs(logits: Tensor, temperature: float, top_k: int | None) -> Tensor:
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).to(logits.dtype)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.softmax(logits, dim=-1)


def check_next_token_probs(fn: Callable) -> None:
    """Check next_token_probs(logits, temperature, top_k=None)."""
    name = "next_token_probs"
    gen = torch.Generator().manual_seed(25)
    logits = _randn(gen, 3, 10) * 2
    for temperature, top_k in ((1.0, None), (0.5, None), (2.0, 3), (1.0, 1), (0.0, None), (0.7, 10)):
        call = f"temperature={temperature}, top_k={top_k}"
        out = _expect_tensor(name, _run(name, fn, logits, temperature, top_k), (3, 10), logits.dtype,
                             f"logits (3, 10), {call}")
        want = _reference_probs(logits, temperature, top_k)
        if _close(out, want, 1e-10):
            continue
        if not torch.allclose(out.sum(-1), torch.ones(3, dtype=out.dtype), atol=1e-8):
            _fail(name, f"{call}: rows do not sum to 1; return probabilities (softmax at the end)")
        if top_k is not None and _close(out, _reference_probs(logits, temperature, None), 1e-10):
            _fail(name, f"{call}: top_k is ignored; every token outside the k likeliest must get probability 0")
        if temperature and _close(out, _reference_probs(logits * temperature * temperature, temperature, top_k), 1e-10):
            _fail(name, f"{call}: multiplies by the temperature; divide the logits by it")
        if temperature == 0:
            _fail(name, "temperature=0 is greedy decoding: probability 1 on the argmax, 0 elsewhere")
        _fail(name, f"{call}: differs from the reference (max |error| {_max_err(out, want):.2e})")
    _ok("sampling: temperature, top-k and greedy all give the right distribution")


# ----------------------------------------------------------------------------------------
# Perplexity


def check_perplexity(fn: Callable) -> None:
    """Check perplexity(total_nll, n_tokens)."""
    name = "perplexity"
    for total, n in ((0.0, 10), (10 * math.log(50), 10), (123.4, 57), (3.0, 1)):
        out = _as_float(name, _run(name, fn, total, n))
        want = math.exp(total / n)
        if math.isclose(out, want, rel_tol=1e-9):
            continue
        if math.isclose(out, total / n, rel_tol=1e-9):
            _fail(name, f"({total:.4g}, {n}) gives the mean NLL; perplexity is its exponential")
        if math.isclose(out, math.exp(total), rel_tol=1e-9):
            _fail(name, f"({total:.4g}, {n}): exponentiate the MEAN negative log-likelihood per token")
        _fail(name, f"({total:.4g}, {n}) gives {out:.6g}, expected another value")
    _ok("perplexity: exp of the mean negative log-likelihood per token")
