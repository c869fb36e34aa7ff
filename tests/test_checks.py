"""llmlab.checks: correct work passes, each typical mistake gets its own diagnostic.

The correct functions are the lab's own solution cells, executed from the source notebook,
so the notebook and the checks cannot drift apart. The mistakes are small variations of them.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from llmlab import attention as A
from llmlab import checks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "solutions" / "01-attention" / "attention.ipynb"
PARTIAL = ROOT / "tests" / "fixtures" / "01-attention" / "partial.json"


def _solution_namespace() -> dict:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    ns: dict = {"math": math, "torch": torch, "nn": nn, "F": F}
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.metadata.get("nbgrader", {}).get("solution"):
            exec(compile(cell.source, f"<solution {cell.metadata['nbgrader']['grade_id']}>", "exec"), ns)
    return ns


S = _solution_namespace()


class Proxy:
    """An opaque callable like the grader's: copies tensors both ways, hides the function."""

    __slots__ = ("_call",)

    def __init__(self, fn):
        def call(*args):
            copy = lambda v: v.clone() if isinstance(v, torch.Tensor) else v
            return copy(fn(*(copy(a) for a in args)))

        self._call = call

    def __call__(self, *args):
        return self._call(*args)


class RemoteError(Exception):
    """What a proxy might raise when the student's code failed in the other process."""


# ----------------------------------------------------------------------------------------
# correct work passes, also behind a proxy

CORRECT = {
    "sdpa": lambda wrap: checks.check_sdpa(wrap(S["scaled_dot_product_attention"])),
    "masks": lambda wrap: checks.check_masks(wrap(S["causal_mask"]), wrap(S["padding_mask"])),
    "heads": lambda wrap: checks.check_heads(wrap(S["split_heads"]), wrap(S["merge_heads"])),
    "mha": lambda wrap: checks.check_mha(wrap(S["multi_head_attention"])),
    "sinusoidal": lambda wrap: checks.check_sinusoidal(wrap(S["sinusoidal_positions"])),
    "rope": lambda wrap: checks.check_rope(wrap(S["apply_rope"])),
    "memory": lambda wrap: checks.check_attention_memory(wrap(S["attention_memory_bytes"])),
    "bert-probs": lambda wrap: checks.check_bert_probs(wrap(S["bert_attention_probs"])),
}


@pytest.mark.parametrize("name", CORRECT)
@pytest.mark.parametrize("wrap", [lambda f: f, Proxy], ids=["function", "proxy"])
def test_correct_solution_passes(name, wrap, capsys):
    CORRECT[name](wrap)
    out = capsys.readouterr().out.strip()
    assert out.startswith("✓ ") and "\n" not in out


def test_sdpa_accepts_other_correct_styles():
    def with_where(q, k, v, mask=None):
        s = torch.einsum("...id,...jd->...ij", q, k) / q.shape[-1] ** 0.5
        if mask is not None:
            s = torch.where(mask, s, torch.finfo(s.dtype).min)
            p = s.softmax(-1) * mask.any(-1, keepdim=True)
        else:
            p = s.softmax(-1)
        return torch.einsum("...ij,...jd->...id", p, v)

    checks.check_sdpa(with_where)


# ----------------------------------------------------------------------------------------
# helpers to write mistakes compactly


def _sdpa(q, k, v, mask=None, *, scale=None, dim=-1, fill=float("-inf"), invert=False,
          nan_to_num=True, after=False):
    s = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is not None and not after:
        s = s.masked_fill(mask if invert else ~mask, fill)
    p = torch.softmax(s, dim=dim)
    if mask is not None and after:
        p = p * mask
    return (torch.nan_to_num(p) if nan_to_num else p) @ v


def _split(x, H):
    B, T, D = x.shape
    return x.view(B, T, H, D // H).transpose(1, 2)


def _mha(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, H, mask=None, *, scale=None, linear=F.linear,
         out_proj=True, biases=True):
    lin = lambda t, w, b: linear(t, w, b if biases else None)
    q, k, v = _split(lin(x, w_q, b_q), H), _split(lin(x, w_k, b_k), H), _split(lin(x, w_v, b_v), H)
    y = _sdpa(q, k, v, mask, scale=scale)
    B, _, T, d = y.shape
    y = y.transpose(1, 2).reshape(B, T, H * d)
    return lin(y, w_o, b_o) if out_proj else y


def _rope(x, positions, base=10000.0, *, sign=1.0, interleaved=False, exponent=2.0, fixed_base=None):
    base = fixed_base or base
    hd = x.shape[-1]
    theta = base ** (-exponent * torch.arange(hd // 2, dtype=torch.float64) / hd)
    a = sign * positions.double()[:, None] * theta
    cos, sin = a.cos().to(x.dtype), a.sin().to(x.dtype)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).flatten(-2)
    x1, x2 = x.chunk(2, -1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _bert(hs, w_q, b_q, w_k, b_k, H, head, am, *, scale=None, use_mask=True, pick=None, linear=F.linear):
    q, k = _split(linear(hs, w_q, b_q), H), _split(linear(hs, w_k, b_k), H)
    s = q @ k.mT * (q.shape[-1] ** -0.5 if scale is None else scale)
    if use_mask:
        s = s.masked_fill(~am.bool()[:, None, None, :], float("-inf"))
    p = s.softmax(-1)
    return p if pick == "all" else p[:, head if pick is None else pick]


def _not_implemented(*args):
    raise NotImplementedError()


def _xW(t, w, b):
    return t @ w if b is None else t @ w + b


def _remote_failure(*args):
    raise RemoteError("ZeroDivisionError: division by zero (in the student's process)")


# ----------------------------------------------------------------------------------------
# each mistake, and the words its message must contain

MISTAKES = {
    # scaled dot-product attention
    "sdpa/no-scale": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v, m, scale=1.0), "missing the 1/sqrt(d) scale"),
    "sdpa/scale-1/d": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v, m, scale=1 / q.shape[-1]), "divided by d"),
    "sdpa/scale-T": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v, m, scale=k.shape[-2] ** -0.5), "number of keys"),
    "sdpa/axis": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v, m, dim=-2), "softmax over the wrong axis"),
    "sdpa/weights": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, torch.eye(k.shape[-2], dtype=q.dtype), m),
                     "shape of the attention weights"),
    "sdpa/mask-inverted": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v, m, invert=True), "wrong way round"),
    "sdpa/mask-ignored": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v), "mask is ignored"),
    "sdpa/fill-zero": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v, m, fill=0.0), "still get weight"),
    "sdpa/mask-after": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v, m, after=True), "no longer sum to 1"),
    "sdpa/nan": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v, m, nan_to_num=False), "NaN"),
    "sdpa/finfo-min": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v, m, fill=torch.finfo(q.dtype).min),
                       "zero output row"),
    "sdpa/float32": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q.float(), k.float(), v.float(), m), "dtype"),
    "sdpa/numpy": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k, v, m).numpy(), "expected a torch.Tensor"),
    "sdpa/tuple": (checks.check_sdpa, lambda q, k, v, m=None: (_sdpa(q, k, v, m), None), "return a single tensor"),
    "sdpa/only-4d": (checks.check_sdpa, lambda q, k, v, m=None: _sdpa(q, k.transpose(2, 3).transpose(2, 3), v, m),
                     "raised IndexError"),
    "sdpa/stub": (checks.check_sdpa, _not_implemented, "scaled_dot_product_attention raised NotImplementedError"),
    "sdpa/remote": (checks.check_sdpa, _remote_failure, "raised RemoteError: ZeroDivisionError"),
    "sdpa/torch": (checks.check_sdpa, lambda q, k, v, m=None: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                   "calls torch.nn.functional.scaled_dot_product_attention; this exercise asks you to implement it yourself"),
    "sdpa/library": (checks.check_sdpa, lambda q, k, v, m=None: A.scaled_dot_product_attention(q, k, v, m),
                     "calls llmlab.attention"),
    # masks
    "masks/float": (lambda f: checks.check_masks(f, S["padding_mask"]), lambda T: torch.ones(T, T).tril(), "bool tensors"),
    "masks/inverted": (lambda f: checks.check_masks(f, S["padding_mask"]),
                       lambda T: torch.ones(T, T, dtype=torch.bool).triu(1), "inverted"),
    "masks/future": (lambda f: checks.check_masks(f, S["padding_mask"]),
                     lambda T: torch.ones(T, T, dtype=torch.bool).triu(), "not to the future"),
    "masks/diagonal": (lambda f: checks.check_masks(f, S["padding_mask"]),
                       lambda T: torch.ones(T, T, dtype=torch.bool).tril(-1), "attend to itself"),
    "masks/padding-2d": (lambda f: checks.check_masks(S["causal_mask"], f),
                         lambda lengths, T: torch.arange(T)[None] < lengths[:, None], "two singleton axes"),
    "masks/padding-inverted": (lambda f: checks.check_masks(S["causal_mask"], f),
                               lambda lengths, T: ~S["padding_mask"](lengths, T), "inverted"),
    "masks/padding-off-by-one": (lambda f: checks.check_masks(S["causal_mask"], f),
                                 lambda lengths, T: S["padding_mask"](lengths + 1, T), "one position too many"),
    # heads
    "heads/no-transpose": (lambda f: checks.check_heads(f, S["merge_heads"]),
                           lambda x, H: x.view(*x.shape[:2], H, -1), "before time"),
    "heads/interleaved": (lambda f: checks.check_heads(f, S["merge_heads"]),
                          lambda x, H: x.view(*x.shape[:2], -1, H).permute(0, 3, 1, 2), "wrong order"),
    "heads/straight-reshape": (lambda f: checks.check_heads(f, S["merge_heads"]),
                               lambda x, H: x.reshape(x.shape[0], H, x.shape[1], -1), "mixes different tokens"),
    "heads/merge-view": (lambda f: checks.check_heads(S["split_heads"], f),
                         lambda x: x.transpose(1, 2).view(x.shape[0], x.shape[2], -1), "contiguous"),
    "heads/merge-straight": (lambda f: checks.check_heads(S["split_heads"], f),
                             lambda x: x.reshape(x.shape[0], x.shape[2], -1), "move the heads axis back"),
    # multi-head attention
    "mha/no-scale": (checks.check_mha, lambda *a: _mha(*a, scale=1.0), "missing the 1/sqrt(d_head) scale"),
    "mha/d-model-scale": (checks.check_mha, lambda *a: _mha(*a, scale=a[0].shape[-1] ** -0.5), "uses d_model"),
    "mha/x-at-W": (checks.check_mha, lambda *a: _mha(*a, linear=_xW), "nn.Linear"),
    "mha/no-bias": (checks.check_mha, lambda *a: _mha(*a, biases=False), "biases are ignored"),
    "mha/no-out-proj": (checks.check_mha, lambda *a: _mha(*a, out_proj=False), "output projection"),
    "mha/one-head": (checks.check_mha, lambda *a: _mha(*a[:9], 1, *a[10:]), "single-head"),
    "mha/mask-inverted": (checks.check_mha, lambda *a: _mha(*a[:10], ~a[10]) if len(a) > 10 else _mha(*a),
                          "wrong way round"),
    "mha/nn": (checks.check_mha, lambda x, *w_and_h: _nn_mha(x, *w_and_h), "calls torch.nn.MultiheadAttention"),
    "mha/functional": (checks.check_mha, lambda x, *w_and_h: _functional_mha(x, *w_and_h),
                       "calls torch.nn.functional.multi_head_attention_forward"),
    # sinusoidal
    "sin/concatenated": (checks.check_sinusoidal, lambda T, d: torch.cat(_angles(T, d), 1), "interleave"),
    "sin/swapped": (checks.check_sinusoidal, lambda T, d: torch.stack(_angles(T, d)[::-1], -1).flatten(1), "swapped"),
    "sin/frequencies": (checks.check_sinusoidal, lambda T, d: torch.stack(_angles(T, d, 1.0), -1).flatten(1),
                        "wrong frequencies"),
    "sin/transposed": (checks.check_sinusoidal, lambda T, d: S["sinusoidal_positions"](T, d).T, "one row per position"),
    # rope
    "rope/interleaved": (checks.check_rope, lambda x, p, base=10000.0: _rope(x, p, base, interleaved=True), "rotate-half"),
    "rope/sign": (checks.check_rope, lambda x, p, base=10000.0: _rope(x, p, base, sign=-1.0), "wrong way"),
    "rope/arange": (checks.check_rope, lambda x, p, base=10000.0: _rope(x, torch.arange(x.shape[-2]), base),
                    "`positions` is ignored"),
    "rope/frequencies": (checks.check_rope, lambda x, p, base=10000.0: _rope(x, p, base, exponent=1.0),
                         "wrong frequencies"),
    "rope/norm": (checks.check_rope, lambda x, p, base=10000.0: x * 1.1, "length"),
    "rope/base": (checks.check_rope, lambda x, p, base=10000.0: _rope(x, p, fixed_base=10000.0), "`base` argument"),
    "rope/float64": (checks.check_rope, lambda x, p, base=10000.0: _rope(x.double(), p, base), "dtype"),
    # memory
    "memory/two": (checks.check_attention_memory, lambda b, h, T, n=4: 2 * b * h * T * T * n, "counts the scores twice"),
    "memory/linear": (checks.check_attention_memory, lambda b, h, T, n=4: b * h * T * n, "linearly"),
    "memory/heads": (checks.check_attention_memory, lambda b, h, T, n=4: b * T * T * n, "forgets the heads"),
    "memory/bits": (checks.check_attention_memory, lambda b, h, T, n=4: 8 * b * h * T * T * n, "bits"),
    "memory/string": (checks.check_attention_memory, lambda b, h, T, n=4: f"{b * h * T * T * n} bytes", "expected an int"),
    # bert
    "bert/all-heads": (checks.check_bert_probs, lambda *a: _bert(*a, pick="all"), "every head"),
    "bert/wrong-head": (checks.check_bert_probs, lambda *a: _bert(*a, pick=(a[6] + 1) % a[5]), "asked for head"),
    "bert/no-mask": (checks.check_bert_probs, lambda *a: _bert(*a, use_mask=False), "padding tokens"),
    "bert/no-scale": (checks.check_bert_probs, lambda *a: _bert(*a, scale=1.0), "missing the 1/sqrt(d_head) scale"),
    "bert/x-at-W": (checks.check_bert_probs, lambda *a: _bert(*a, linear=_xW), "nn.Linear"),
    "bert/stub": (checks.check_bert_probs, _not_implemented, "bert_attention_probs raised NotImplementedError"),
}


def _angles(T, d, exponent=2.0):
    a = torch.arange(T, dtype=torch.float64)[:, None] * 10000.0 ** (-exponent * torch.arange(d // 2) / d)
    return a.sin(), a.cos()


def _nn_mha(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, H, mask=None):
    layer = nn.MultiheadAttention(x.shape[-1], H, batch_first=True, dtype=x.dtype)
    with torch.no_grad():
        layer.in_proj_weight.copy_(torch.cat([w_q, w_k, w_v]))
        layer.in_proj_bias.copy_(torch.cat([b_q, b_k, b_v]))
        layer.out_proj.weight.copy_(w_o)
        layer.out_proj.bias.copy_(b_o)
        return layer(x, x, x, need_weights=False, attn_mask=None if mask is None else ~mask)[0]


def _functional_mha(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, H, mask=None):
    t = x.transpose(0, 1)
    return F.multi_head_attention_forward(
        t, t, t, x.shape[-1], H, torch.cat([w_q, w_k, w_v]), torch.cat([b_q, b_k, b_v]), None, None, False,
        0.0, w_o, b_o, need_weights=False)[0].transpose(0, 1)


@pytest.mark.parametrize("case", MISTAKES)
def test_mistake_gets_its_diagnostic(case):
    check, fn, words = MISTAKES[case]
    with pytest.raises(AssertionError) as info:
        check(fn)
    assert words in str(info.value), f"{case}: got {info.value}"


@pytest.mark.parametrize("case", ["sdpa/no-scale", "mha/x-at-W", "rope/interleaved", "bert/no-mask"])
def test_diagnostics_survive_a_proxy(case):
    check, fn, words = MISTAKES[case]
    with pytest.raises(AssertionError, match=re.escape(words)):
        check(Proxy(fn))


def test_messages_do_not_print_the_answer():
    """A failing check names the mistake; it never shows expected numbers."""
    with pytest.raises(AssertionError) as info:
        checks.check_sdpa(lambda q, k, v, m=None: _sdpa(q, k, v, m) + 0.01)
    message = str(info.value)
    assert "max |error|" in message and "tensor(" not in message


def test_check_leaves_no_profiler_or_mode_behind():
    import sys

    from torch.overrides import _get_current_function_mode_stack

    before = sys.getprofile()
    with pytest.raises(AssertionError):
        checks.check_sdpa(_not_implemented)
    checks.check_sdpa(S["scaled_dot_product_attention"])
    assert sys.getprofile() is before
    assert not _get_current_function_mode_stack()


# ----------------------------------------------------------------------------------------
# the lab's test cells: the solution earns everything, the stub nothing, the fixture its points


def _run_test_cells(answers: dict[str, str] | None = None, stub: bool = False) -> dict[str, int]:
    """Execute params + setup + solution cells (or substitutes) + every test cell in one kernel."""
    from nbclient import NotebookClient
    from nbgrader.preprocessors import ClearSolutions

    nb = nbformat.read(NOTEBOOK, as_version=4)
    if stub:
        nb, _ = ClearSolutions().preprocess(nb, {})
    cells, points = [], {}
    for cell in nb.cells:
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type != "code" or "demo" in cell.metadata.get("tags", []):
            continue
        source = cell.source
        if "parameters" in cell.metadata.get("tags", []):
            source = source.replace("QUICK = False", "QUICK = True")
        elif meta.get("solution") and answers is not None:
            source = answers[meta["grade_id"]]
        cells.append(nbformat.v4.new_code_cell(source, metadata=cell.metadata))
    run = nbformat.v4.new_notebook(cells=cells, metadata={"kernelspec": nb.metadata.kernelspec})
    NotebookClient(run, kernel_name="python3", allow_errors=True, timeout=120,
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    for cell in run.cells:
        meta = cell.metadata.get("nbgrader", {})
        failed = any(o.output_type == "error" for o in cell.outputs)
        if meta.get("grade"):
            points[meta["grade_id"]] = 0 if failed else meta["points"]
        else:
            assert not failed, f"template/solution cell failed: {cell.source[:80]}"
    return points


@pytest.mark.slow
def test_solution_earns_every_point():
    points = _run_test_cells()
    assert len(points) == 8 and all(points.values()), points


@pytest.mark.slow
def test_released_stub_fails_every_test_cell():
    points = _run_test_cells(stub=True)
    assert len(points) == 8 and not any(points.values()), points


@pytest.mark.slow
def test_partial_fixture_earns_its_expected_points():
    fixture = json.loads(PARTIAL.read_text())
    assert _run_test_cells(answers=fixture["answers"]) == fixture["expected"]
