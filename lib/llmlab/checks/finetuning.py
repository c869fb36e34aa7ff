"""Checks for lab 3 (fine-tuning): LoRA's init, forward and merge, target matching and parameter
counts, instruction-tuning examples, peft's key names, mean pooling and classification metrics.
References come from `llmlab.lora`; the grader refuses student code that calls it."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from llmlab.checks._core import (as_float, blame, call, close, expect_tensor, fail, max_err, ok, randn, shape_of,
                                 wrong_number)
from llmlab.i18n import _

__all__ = ['check_lora_init', 'check_lora_forward', 'check_merged_weight', 'check_match_targets',
           'check_lora_param_count', 'check_sft_example', 'check_to_peft_key', 'check_mean_pool',
           'check_classification_metrics']


def _int_list(name: str, value: Any, what: str) -> list[int]:
    """A student's sequence of ints (list, tuple or 1-D tensor) as a list, or a clear failure."""
    if isinstance(value, Tensor):
        if value.dim() != 1:
            fail(name, _("{what} has shape {shape_of}; expected a 1-D sequence").format(what=what, shape_of=shape_of(value)))
        return [int(v) for v in value.tolist()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        fail(name, _("{what} is a {type}; expected a list (or 1-D tensor) of ints").format(what=what, type=type(value).__name__))
    return list(value)


# ----------------------------------------------------------------------------------------
# Init


def check_lora_init(fn: Callable) -> None:
    """Check lora_init(in_features, out_features, r, seed) -> (lora_A, lora_B)."""
    name = "lora_init"
    in_f, out_f, r = 256, 96, 16
    out = call(name, fn, in_f, out_f, r, 0)
    if not isinstance(out, (tuple, list)) or len(out) != 2 or not all(isinstance(t, Tensor) for t in out):
        fail(name, _("return a pair of tensors (lora_A, lora_B)"))
    A, B = out
    if shape_of(A) == (in_f, r) or shape_of(B) == (r, out_f):
        fail(name, _("lora_A {shape_of}, lora_B {shape_of2}: nn.Linear stores its weight as (out_features, "
                     "in_features); lora_A maps in_features -> r, so it is (r, in_features), and lora_B maps r "
                     "-> out_features: (out_features, r)").format(shape_of=shape_of(A), shape_of2=shape_of(B)))
    if shape_of(A) != (r, in_f) or shape_of(B) != (out_f, r):
        fail(name, _("lora_A {shape_of}, lora_B {shape_of2}; expected ({r}, {in_f}) and ({out_f}, {r}) for "
                     "in_features={in_f}, out_features={out_f}, r={r}").format(shape_of=shape_of(A), shape_of2=shape_of(B), r=r, in_f=in_f, out_f=out_f))
    if A.dtype != torch.float32 or B.dtype != torch.float32:
        fail(name, _("dtypes {dtype}, {dtype2}; expected float32 weights").format(dtype=A.dtype, dtype2=B.dtype))
    A, B = A.double(), B.double()
    if not torch.count_nonzero(A) and torch.count_nonzero(B):
        fail(name, _("lora_A is zero and lora_B random: the other way round. peft starts B at zero, so the "
                     "update B A is zero at step 0, and A random"))
    if torch.count_nonzero(B):
        fail(name, _("lora_B must start at exactly zero: then B A = 0 and the adapted model is exactly the "
                     "pretrained one at step 0"))
    if not torch.count_nonzero(A):
        fail(name, _("lora_A is zero too: with A = 0 and B = 0 both gradients are zero (dL/dB needs A x, dL/dA "
                     "needs B), so nothing would ever train"))
    bound = 1 / math.sqrt(in_f)
    spread = A.std().item()
    if spread > 3 * bound:
        fail(name, _("lora_A has std {spread:.3f}: far too large (torch.randn?). Kaiming-uniform with "
                     "a=sqrt(5), as nn.Linear and peft use, draws from U(-1/sqrt(in_features), "
                     "+1/sqrt(in_features))").format(spread=spread))
    if A.abs().max() > bound * (1 + 1e-6):
        for fan, label in ((out_f, "out_features"), (r, "r")):
            if A.abs().max() <= (1 + 1e-6) / math.sqrt(fan):
                fail(name, _("lora_A's bound is 1/sqrt({label}); the fan-in of lora_A is in_features").format(label=label))
        fail(name, _("lora_A has entries up to {max:.4f}, beyond 1/sqrt(in_features) = {bound:.4f}: use "
                     "Kaiming-uniform with a=sqrt(5)").format(max=A.abs().max(), bound=bound))
    if not (0.8 < spread / (bound / math.sqrt(3)) < 1.2) or abs(A.mean().item()) > 0.1 * bound:
        fail(name, _("lora_A's values are not spread like U(-{bound:.4f}, {bound:.4f}) (std {spread:.4f}, "
                     "expected about {value:.4f}, mean about 0)").format(bound=bound, spread=spread, value=bound / math.sqrt(3)))
    again, other = call(name, fn, in_f, out_f, r, 0), call(name, fn, in_f, out_f, r, 1)
    if not torch.equal(again[0].double(), A):
        fail(name, _("two calls with the same seed give different lora_A: draw from a generator seeded with "
                     "`seed`"))
    if torch.equal(other[0].double(), A):
        fail(name, _("seed 0 and seed 1 give the same lora_A: use the seed"))
    ok(_("lora_init: lora_A Kaiming-uniform (r, in), lora_B zeros (out, r): the update starts at exactly zero"))


# ----------------------------------------------------------------------------------------
# Forward


def check_lora_forward(fn: Callable) -> None:
    """Check lora_forward(x, weight, bias, lora_A, lora_B, scaling)."""
    from llmlab import lora

    name = "lora_forward"
    gen = torch.Generator().manual_seed(31)
    in_f, out_f, r, scaling = 10, 6, 3, 2.5
    x = randn(gen, 2, 4, in_f)
    W, b = randn(gen, out_f, in_f), randn(gen, out_f)
    A, B = randn(gen, r, in_f), randn(gen, out_f, r)
    inputs = _("x {shape_of}, weight {shape_of2}, lora_A {shape_of3}, lora_B {shape_of4}").format(shape_of=shape_of(x), shape_of2=shape_of(W), shape_of3=shape_of(A), shape_of4=shape_of(B))
    zero = expect_tensor(name, call(name, fn, x, W, b, A, torch.zeros_like(B), scaling), (2, 4, out_f), x.dtype,
                         inputs, {(2, 4, in_f): _("return the output of the layer (out_features), not the input")})
    if not close(zero, F.linear(x, W, b), 1e-10):
        if close(zero, F.linear(x, W), 1e-10):
            fail(name, _("the bias of the base layer is missing"))
        if close(zero, torch.zeros_like(zero), 1e-12):
            fail(name, _("returns only the low-rank update; add the frozen base layer's output x W^T + b"))
        fail(name, _("with lora_B = 0 the result must be exactly the base layer x W^T + b (max |error| "
                     "{max_err:.2e})").format(max_err=max_err(zero, F.linear(x, W, b))))
    out = expect_tensor(name, call(name, fn, x, W, b, A, B, scaling), (2, 4, out_f), x.dtype, inputs)
    want = lora.lora_forward(x, W, b, A, B, scaling)
    if close(out, want, 1e-10):
        nobias = expect_tensor(name, call(name, fn, x, W, None, A, B, scaling), (2, 4, out_f), x.dtype, inputs)
        if not close(nobias, lora.lora_forward(x, W, None, A, B, scaling), 1e-10):
            fail(name, _("wrong with bias=None: a layer without bias adds nothing"))
        ok(_("lora_forward: base layer + scaling * B (A x), and exactly the base layer while B = 0"))
        return
    delta = lora.lora_forward(x, W * 0, None, A, B, 1.0)
    base = F.linear(x, W, b)
    if close(out, base + delta, 1e-10):
        fail(name, _("the low-rank path is not multiplied by `scaling`"))
    if close(out, base + delta / scaling, 1e-10):
        fail(name, _("the low-rank path is divided by `scaling`; multiply (scaling = lora_alpha / r)"))
    if close(out, scaling * delta, 1e-10):
        fail(name, _("returns only the low-rank update; add the frozen base layer's output x W^T + b"))
    if close(out, F.linear(x, W) + scaling * delta, 1e-10):
        fail(name, _("the bias of the base layer is missing"))
    fail(name, _("differs from base + scaling * (x A^T) B^T (max |error| {max_err:.2e})").format(max_err=max_err(out, want)))


# ----------------------------------------------------------------------------------------
# Merge


def check_merged_weight(fn: Callable) -> None:
    """Check merged_weight(weight, lora_A, lora_B, scaling)."""
    from llmlab import lora

    name = "merged_weight"
    gen = torch.Generator().manual_seed(32)
    in_f, out_f, r, scaling = 9, 5, 2, 0.75
    W, A, B = randn(gen, out_f, in_f), randn(gen, r, in_f), randn(gen, out_f, r)
    W0 = W.clone()
    out = expect_tensor(name, call(name, fn, W, A, B, scaling), (out_f, in_f), W.dtype,
                        _("weight {shape_of}, lora_A {shape_of2}, lora_B {shape_of3}").format(shape_of=shape_of(W), shape_of2=shape_of(A), shape_of3=shape_of(B)),
                        {(in_f, out_f): _("transposed: the merged weight has nn.Linear's shape (out, in)")})
    if not torch.equal(W, W0):
        fail(name, _("modifies `weight` in place; return a new tensor (the frozen weight must stay as it was)"))
    want = lora.merged_weight(W, A, B, scaling)
    if not close(out, want, 1e-10):
        if close(out, W + B @ A, 1e-10):
            fail(name, _("forgets `scaling`: the adapter's output is scaled, so its merged weight must be too"))
        if close(out, scaling * (B @ A), 1e-10):
            fail(name, _("returns only the update; add the frozen weight W"))
        if close(out, W + scaling * (A.T @ B.T).T, 1e-10) or close(out, W + scaling * (B.T @ A.T).T, 1e-10):
            fail(name, _("the update is B @ A: (out, r) @ (r, in) gives nn.Linear's (out, in)"))
        fail(name, _("differs from W + scaling * B A (max |error| {max_err:.2e})").format(max_err=max_err(out, want)))
    # a bf16 base model with float32 adapters (as peft trains them): the merged Linear stays bf16
    W16 = W.to(torch.bfloat16)
    out = call(name, fn, W16.clone(), A.float(), B.float(), scaling)
    if not isinstance(out, Tensor) or out.dtype != torch.bfloat16:
        fail(name, _("returns {getattr} for a bfloat16 weight and float32 adapters; the merged weight replaces "
                     "the bfloat16 one, so keep weight's dtype (convert the update to it)").format(getattr=getattr(out, 'dtype', type(out).__name__)))
    ok(_("merged_weight: W + scaling * B A in the weight's dtype, one Linear with the adapter's outputs"))


# ----------------------------------------------------------------------------------------
# Target matching and parameter counts


def check_match_targets(fn: Callable) -> None:
    """Check match_targets(names, target_modules)."""
    from llmlab import lora

    name = "match_targets"
    names = ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.xq_proj",
             "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj", "q_proj", "q_proj_norm",
             "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "lm_head"]
    for targets in (["q_proj", "v_proj"], ["v_proj", "q_proj"], ["lm_head"], ["self_attn"], ["layers.1.self_attn.q_proj"]):
        out = call(name, fn, list(names), list(targets))
        if not isinstance(out, (list, tuple)) or not all(isinstance(n, str) for n in out):
            fail(name, _("returns {type}; expected a list of names").format(type=type(out).__name__))
        out, want = list(out), lora.match_targets(names, targets)
        if out == want:
            continue
        if set(out) == set(want):
            fail(name, _("targets {targets}: the right names in another order; keep the order of `names`").format(targets=targets))
        if set(want) < set(out) and any("xq_proj" in n or n.endswith("_norm") for n in out):
            fail(name, _("targets {targets}: a substring test also catches {value}; a name matches when it IS "
                         "the target or ends with '.' + the target").format(targets=targets, value=[n for n in out if n not in want][:2]))
        if set(out) < set(want):
            fail(name, _("targets {targets}: misses {value}; a target is the last part(s) of a dotted name, so "
                         "compare with endswith('.' + target)").format(targets=targets, value=[n for n in want if n not in out][:2]))
        fail(name, _("targets {targets}: {out} is not the list of matching names").format(targets=targets, out=out[:4]))
    ok(_("match_targets: a name matches a target exactly or as its dotted suffix, in model order"))


def check_lora_param_count(fn: Callable, uses: tuple = ()) -> None:
    """Check lora_param_count(linear_shapes, target_modules, r); uses: the student's (match_targets,), blamed too."""
    earlier = {"match_targets": lambda: check_match_targets(uses[0])} if uses else {}
    blame("lora_param_count", lambda: _check_lora_param_count(fn), earlier)


def _check_lora_param_count(fn: Callable) -> None:
    from llmlab import lora

    name = "lora_param_count"
    shapes = {}
    for i in range(3):
        shapes |= {f"model.layers.{i}.self_attn.q_proj": [64, 64], f"model.layers.{i}.self_attn.k_proj": [16, 64],
                   f"model.layers.{i}.self_attn.v_proj": [16, 64], f"model.layers.{i}.self_attn.o_proj": [64, 64],
                   f"model.layers.{i}.mlp.up_proj": [160, 64], f"model.layers.{i}.mlp.down_proj": [64, 160]}
    shapes["lm_head"] = [500, 64]
    for targets, r in ((["q_proj", "v_proj"], 4), (["o_proj"], 1), (["k_proj", "up_proj", "down_proj"], 8), (["lm_head"], 2)):
        out = call(name, fn, {k: list(v) for k, v in shapes.items()}, list(targets), r)
        if isinstance(out, Tensor) and out.numel() == 1:
            out = out.item()
        if not isinstance(out, int) or isinstance(out, bool):
            fail(name, _("returns {type}; expected an int").format(type=type(out).__name__))
        matched = lora.match_targets(shapes, targets)
        want = sum(r * (shapes[n][0] + shapes[n][1]) for n in matched)
        if out == want:
            continue
        if out == sum(r * shapes[n][0] * shapes[n][1] for n in matched):
            fail(name, _("targets {targets}, r={r}: counts r * in * out; A is (r, in) and B (out, r): r * (in "
                         "+ out)").format(targets=targets, r=r))
        if out == sum(r * (shapes[n][0] + shapes[n][1]) for n in shapes):
            fail(name, _("targets {targets}: counts every Linear layer; only the matched targets get adapters").format(targets=targets))
        if out in (sum(r * shapes[n][1] for n in matched), sum(r * shapes[n][0] for n in matched)):
            fail(name, _("targets {targets}: counts only one of lora_A and lora_B").format(targets=targets))
        fail(name, _("targets {targets}, r={r}: {out}, expected {want}").format(targets=targets, r=r, out=out, want=want))
    ok(_("lora_param_count: r * (in + out) for each targeted Linear"))


# ----------------------------------------------------------------------------------------
# Instruction-tuning examples


def check_sft_example(fn: Callable) -> None:
    """Check sft_example(prompt_ids, response_ids, max_len, pad_id) -> (x, y)."""
    from llmlab import lora
    from llmlab.model import IGNORE_INDEX

    name = "sft_example"
    cases = [([11, 12, 13, 14], [21, 22, 23], 10, 0), ([11, 12], [21, 22, 23, 24], 5, 2),
             ([11, 12, 13, 14, 15], [21, 22, 23], 6, 0), ([5], [6], 3, 1), ([11, 12, 13], [21, 22], 4, 7)]
    for prompt, response, max_len, pad_id in cases:
        shown = f"sft_example({prompt}, {response}, max_len={max_len}, pad_id={pad_id})"
        out = call(name, fn, list(prompt), list(response), max_len, pad_id)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            fail(name, _("return a pair (x, y)"))
        x, y = _int_list(name, out[0], "x"), _int_list(name, out[1], "y")
        want_x, want_y = (t.tolist() for t in lora.sft_example(prompt, response, max_len, pad_id))
        if (x, y) == (want_x, want_y):
            continue
        if len(x) != max_len or len(y) != max_len:
            fail(name, _("{shown}: x and y have lengths {n_x} and {n_y}; both must be padded/cut to max_len").format(shown=shown, n_x=len(x), n_y=len(y)))
        ids, labels = prompt + response, [IGNORE_INDEX] * len(prompt) + response
        unshifted = [labels[: max_len + 1][:-1], labels[:max_len]]  # y[t] = the label of x[t] itself
        if any(y[: len(u)] == u and len(u) > len(prompt) for u in unshifted):
            fail(name, _("{shown}: y is not shifted: y[t] must be the label of the token AFTER x[t] (x = "
                         "ids[:-1], y = labels[1:])").format(shown=shown))
        if x != want_x:
            fail(name, _("{shown}: x = {x}; expected the first max_len tokens of prompt + response (without "
                         "the last token) then pad_id").format(shown=shown, x=x))
        real = min(len(ids) - 1, max_len)
        if y[real:] != want_y[real:]:
            fail(name, _("{shown}: the padding positions of y must be IGNORE_INDEX ({IGNORE_INDEX}), not a "
                         "token id").format(shown=shown, IGNORE_INDEX=IGNORE_INDEX))
        first = len(prompt) - 1  # x[first] is the last prompt token: its target is the first response token
        if first < max_len and y[first] == IGNORE_INDEX and want_y[first] != IGNORE_INDEX:
            fail(name, _("{shown}: y[{first}] is masked, but it is the first response token (predicted from "
                         "the last prompt token): keep it, or the model never learns how to start").format(shown=shown, first=first))
        if any(v != IGNORE_INDEX for v in y[: max(first, 0)]):
            fail(name, _("{shown}: prompt tokens are kept as targets; set them to IGNORE_INDEX so the loss "
                         "covers the response only").format(shown=shown))
        fail(name, _("{shown}: y = {y}, not the expected targets").format(shown=shown, y=y))
    ok(_("sft_example: shifted targets, prompt and padding masked with IGNORE_INDEX, cut and padded to max_len"))


def check_to_peft_key(fn: Callable) -> None:
    """Check to_peft_key(key, adapter_name)."""
    from llmlab import lora

    name = "to_peft_key"
    for key, adapter in (("model.layers.0.self_attn.q_proj.lora_A.weight", "default"),
                         ("model.layers.11.self_attn.v_proj.lora_B.weight", "default"),
                         ("encoder.layer.2.attention.self.query.lora_A.weight", "sst"),
                         ("model.norm.weight", "default")):
        out = call(name, fn, key, adapter)
        want = lora.to_peft_key(key, adapter)
        if out == want:
            continue
        if not isinstance(out, str):
            fail(name, _("returns {type}; expected a str").format(type=type(out).__name__))
        if not out.startswith("base_model.model.") or out == "base_model." + want[len("base_model.model."):]:
            fail(name, _("{key!r} -> {out!r}: peft wraps the model twice: keys start with 'base_model.model.'").format(key=key, out=out))
        if f".{adapter}." not in out:
            fail(name, _("{key!r} -> {out!r}: peft keeps adapters in a dict by name: "
                         "'...lora_A.{adapter}.weight'").format(key=key, out=out, adapter=adapter))
        fail(name, _("{key!r} -> {out!r}: the peft key is 'base_model.model.' + the key, with the adapter name "
                     "inserted before '.weight' for lora_A / lora_B weights only (other keys keep their name)").format(key=key, out=out))
    ok(_("to_peft_key: 'base_model.model.' + the key, with the adapter name before '.weight'"))


# ----------------------------------------------------------------------------------------
# Classification


def check_mean_pool(fn: Callable) -> None:
    """Check mean_pool(hidden_states, attention_mask)."""
    from llmlab import lora

    name = "mean_pool"
    gen = torch.Generator().manual_seed(33)
    h = randn(gen, 3, 6, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    out = expect_tensor(name, call(name, fn, h, mask), (3, 4), h.dtype, "hidden_states (3, 6, 4), attention_mask (3, 6)",
                        {(3, 6): _("averaged over the hidden axis; average over the tokens (dim 1)")})
    want = lora.mean_pool(h, mask)
    if close(out, want, 1e-10):
        ok(_("mean_pool: the average of each sequence's real tokens, padding left out"))
        return
    if close(out, h.mean(1), 1e-10):
        fail(name, _("averages the padding positions too; weight by attention_mask and divide by the number of "
                     "real tokens"))
    if close(out, (h * mask[..., None]).sum(1), 1e-10):
        fail(name, _("returns the sum; divide by each sequence's number of real tokens"))
    if close(out, (h * mask[..., None]).sum(1) / 6, 1e-10):
        fail(name, _("divides by the padded length; divide by the number of real tokens (mask.sum)"))
    if close(out, h[:, 0], 1e-10):
        fail(name, _("returns the first token's vector ([CLS] pooling); this exercise is mean pooling"))
    fail(name, _("differs from the masked mean (max |error| {max_err:.2e})").format(max_err=max_err(out, want)))


def check_classification_metrics(cm_fn: Callable, f1_fn: Callable) -> None:
    """Check confusion_matrix(preds, labels, n_classes) and macro_f1(confusion)."""
    from llmlab import lora

    gen = torch.Generator().manual_seed(34)
    labels = torch.randint(0, 4, (60,), generator=gen)
    preds = torch.where(torch.rand(60, generator=gen) < 0.6, labels, torch.randint(0, 4, (60,), generator=gen))
    name = "confusion_matrix"
    out = expect_tensor(name, call(name, cm_fn, preds.tolist(), labels.tolist(), 4), (4, 4), None, _("60 predictions, 4 classes"))
    want = lora.confusion_matrix(preds, labels, 4)
    if not torch.equal(out.long(), want):
        if torch.equal(out.long(), want.T):
            fail(name, _("transposed: rows are the TRUE classes, columns the predictions"))
        if int(out.sum()) != 60:
            fail(name, _("the counts add up to {sum}; every example counts once").format(sum=int(out.sum())))
        fail(name, _("wrong counts: entry [i, j] is the number of examples of class i predicted as j"))
    out5 = call(name, cm_fn, [0, 1], [0, 1], 5)
    if not isinstance(out5, Tensor) or shape_of(out5) != (5, 5):
        fail(name, _("with n_classes=5 and only classes 0-1 present, the matrix must still be 5 x 5"))

    name = "macro_f1"
    for cm in (want, torch.tensor([[5, 0, 0], [2, 0, 0], [1, 0, 7]]), torch.tensor([[3, 1], [0, 0]])):
        raw = call(name, f1_fn, cm.clone())
        got = as_float(name, raw)
        target = lora.macro_f1(cm)
        if math.isclose(got, target, rel_tol=1e-9, abs_tol=1e-12):
            continue
        if math.isnan(got):
            fail(name, _("NaN for {tolist}: a class with no prediction has precision 0/0; count its F1 as 0 "
                         "(or use F1 = 2 TP / (2 TP + FP + FN))").format(tolist=cm.tolist()))
        cm_d = cm.double()
        accuracy = float(cm_d.diag().sum() / cm_d.sum())
        if math.isclose(got, accuracy, rel_tol=1e-9):
            fail(name, _("returns the accuracy (= micro-F1); macro-F1 averages each class's F1, so rare "
                         "classes count as much as common ones"))
        tp, predicted, actual = cm_d.diag(), cm_d.sum(0), cm_d.sum(1)
        mean_pr = float(((tp / predicted.clamp(min=1) + tp / actual.clamp(min=1)) / 2).mean())
        if math.isclose(got, mean_pr, rel_tol=1e-9):
            fail(name, _("averages precision and recall; F1 is their HARMONIC mean, 2 P R / (P + R)"))
        wrong_number(name, f"on {cm.tolist()}", raw, got, target)
    ok(_("metrics: confusion matrix with true classes as rows, macro-F1 as the mean of per-class F1"))
