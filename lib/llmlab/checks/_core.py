"""Shared machinery of the instant-feedback checks: calling the student's function, comparing results.

`fn` is only ever called — never inspected — with tensors, numbers, strings, bools, None and
lists/dicts of them, and only such values are read back. So the same checks run on a
notebook function or on a proxy that forwards the call to the autograder's sandbox.
"""
from __future__ import annotations

import contextlib
import io
import math
import numbers
import sys
from typing import Any, Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from llmlab.i18n import _


class Watch(TorchFunctionMode):
    """Records calls of forbidden torch functions or Python code while the student's function runs."""

    def __init__(self, torch_funcs: dict, code: dict, files: dict[str, str]):
        super().__init__()
        self.torch_funcs, self.code, self.files = torch_funcs, code, files
        self.hits: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = self.torch_funcs.get(func) if _hashable(func) else None
        if name:
            self.hits.append(name)
        return func(*args, **(kwargs or {}))

    def profile(self, frame, event, arg) -> None:
        """sys.setprofile hook: catches forbidden Python code and whole reference files."""
        if event == "call":
            code = frame.f_code
            if code in self.code:
                self.hits.append(self.code[code])
            elif code.co_filename in self.files:
                self.hits.append(self.files[code.co_filename])
        elif event == "c_call" and _hashable(arg) and arg in self.torch_funcs:
            self.hits.append(self.torch_funcs[arg])


def _hashable(obj: Any) -> bool:
    try:
        hash(obj)
    except TypeError:
        return False
    return True


SHAPE_ERRORS = ("is invalid for input of size", "Sizes of tensors must match", "must match the size of tensor",
                "shapes cannot be multiplied", "size mismatch", "Dimension out of range")


def call(name: str, fn: Callable, *args: Any, watch: Watch | None = None) -> Any:
    """fn(*args), turning any exception (or a call `watch` forbids) into an AssertionError about `name`."""
    previous = sys.getprofile()
    error: Exception | None = None
    try:
        if watch is None:
            out = fn(*args)
        else:
            with watch:
                sys.setprofile(watch.profile)
                try:
                    out = fn(*args)
                finally:
                    sys.setprofile(previous)
    except Exception as e:  # noqa: BLE001 — whatever the student's code raised
        error = e
    if watch is not None and watch.hits:
        raise AssertionError(_("{name} calls {hits}; this exercise asks you to implement it yourself").format(name=name, hits=watch.hits[0]))
    if error is not None:
        detail = str(error).strip()
        text = _("{name} raised {type}").format(name=name, type=type(error).__name__) + (f": {detail}" if detail else "")
        if "view size is not compatible" in str(error):
            text += _("\n(hint: after a transpose a tensor is no longer contiguous; .view cannot handle that)")
        elif any(s in str(error) for s in SHAPE_ERRORS):
            text += (_("\n(hint: the shapes do not fit together: print the .shape of each tensor on the "
                       "failing line and compare them with the shapes the docstring gives)"))
        raise AssertionError(text) from None
    return out


def fail(name: str, message: str) -> None:
    raise AssertionError(_("{name}: {message}").format(name=name, message=message))


def shape_of(t: Tensor | torch.Size | tuple) -> tuple[int, ...]:
    return tuple(t.shape) if isinstance(t, Tensor) else tuple(t)


def expect_tensor(name: str, out: Any, shape: tuple[int, ...], dtype: torch.dtype | None,
                   inputs: str, hints: dict[tuple[int, ...], str] | None = None) -> Tensor:
    """Fail unless `out` is a tensor of `shape` (and of `dtype`, when given); return it."""
    if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
        fail(name, _("returns a tuple of {n_out} values; return a single tensor").format(n_out=len(out)))
    if not isinstance(out, Tensor):
        fail(name, _("returns {type}, expected a torch.Tensor").format(type=type(out).__name__))
    got = shape_of(out)
    if got != shape:
        hint = (hints or {}).get(got, "")
        fail(name, _("returns shape {got} for {inputs}; expected {shape}").format(got=got, inputs=inputs, shape=shape) + (_(" — {hint}").format(hint=hint) if hint else ""))
    if dtype is not None and out.dtype != dtype:
        fail(name, _("returns dtype {dtype} for {dtype2} inputs; keep the input dtype (a hard-coded dtype, or "
                     "a new tensor created without dtype=?)").format(dtype=out.dtype, dtype2=dtype))
    return out


def close(got: Tensor, want: Tensor, atol: float) -> bool:
    """Same shape and all entries within atol (+ 1e-7 relative); NaN never matches."""
    if shape_of(got) != shape_of(want):
        return False
    got, want = got.detach().to("cpu", torch.float64), want.detach().to("cpu", torch.float64)
    return bool(torch.isfinite(got).all()) and torch.allclose(got, want, rtol=1e-7, atol=atol)


def max_err(got: Tensor, want: Tensor) -> float:
    return float((got.detach().cpu().double() - want.detach().cpu().double()).abs().max())


def atol_for(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(*shape, generator=gen, dtype=dtype)


def random_mask(gen: torch.Generator, *shape: int) -> Tensor:
    """Random bool mask whose every row (last axis) has at least one True and one False."""
    mask = torch.rand(*shape, generator=gen) < 0.5
    mask[..., 0] = True  # guarantee one kept key per row...
    mask[..., -1] = False  # ...and one hidden key
    perm = torch.randperm(shape[-1], generator=gen)
    return mask[..., perm]


def ok(message: str) -> None:
    print(f"✓ {message}")


def blame(name: str, run: Callable[[], None], earlier: dict[str, Callable[[], None]]) -> None:
    """Run a composite exercise's check; if it fails and the check of an earlier function it uses
    fails too, say that the earlier function is the cause (`earlier`: {its name: its check})."""
    try:
        run()
    except AssertionError as failure:
        for label, check in earlier.items():
            try:
                with contextlib.redirect_stdout(io.StringIO()):
                    check()
            except AssertionError as cause:
                raise AssertionError(_("{failure}\n... but the cause may be earlier: {name} uses your {label}, "
                                       "whose own check fails ({cause}). Fix {label} first.").format(failure=failure, name=name, label=label, cause=cause)) from None
        raise


def unchanged(name: str, before: Any, after: Any, what: str) -> None:
    """Fail when the student's call changed an input (tensors, or lists/dicts of them) in place."""
    if isinstance(before, Tensor):
        if not (isinstance(after, Tensor) and shape_of(after) == shape_of(before) and torch.equal(after, before)):
            fail(name, _("modifies {what} in place; the caller still needs it as it was: work on a copy (or "
                         "build new tensors) instead of assigning into it or using +=, *=, .add_()").format(what=what))
    elif isinstance(before, dict):
        for key in before:
            unchanged(name, before[key], after[key], f"{what}[{key!r}]")
    elif isinstance(before, (list, tuple)):
        for i, (b, a) in enumerate(zip(before, after)):
            unchanged(name, b, a, f"{what}[{i}]")


def snapshot(value: Any) -> Any:
    """A deep copy of tensors and lists/dicts of them, to compare with after a call (see `unchanged`)."""
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, dict):
        return {k: snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [snapshot(v) for v in value]
    return value


def wrong_number(name: str, case: str, raw: Any, got: float, want: float) -> None:
    """Fail for a number that is off, saying so precisely: enough digits, and a float32 tensor named as such."""
    if isinstance(raw, Tensor) and raw.dtype in (torch.float32, torch.float16, torch.bfloat16) \
            and math.isclose(got, want, rel_tol=1e-2 if raw.dtype != torch.float32 else 1e-6):
        fail(name, _("{case} returns a {dtype} tensor ({got!r}, expected {want!r}); return a Python float: "
                     "{dtype} keeps only about {value} significant digits (compute with math, or call "
                     "float(...) on a float64 result)").format(case=case, dtype=raw.dtype, got=got, want=want, value=7 if raw.dtype == torch.float32 else 3))
    fail(name, _("{case} gives {got:.10g}, expected {want:.10g}").format(case=case, got=got, want=want))


def as_float(name: str, out: Any) -> float:
    """The student's scalar result as a float (a one-element tensor counts), or a clear failure."""
    if isinstance(out, Tensor) and out.numel() == 1:
        out = out.item()
    if isinstance(out, bool) or not isinstance(out, numbers.Real):
        fail(name, _("returns {type}; expected a number").format(type=type(out).__name__))
    return float(out)
