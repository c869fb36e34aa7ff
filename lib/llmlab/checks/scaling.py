"""Checks for lab 8 (training past one device): the reference is `llmlab.parallel`.

The multi-process exercises are checked through their Given runners (`run_allreduce`,
`run_data_parallel`, `run_zero`), which start real gloo processes: a check sends plain
tensors in and reads plain results back, as the grader does.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
from torch import Tensor

from llmlab import parallel as P
from llmlab.checks._core import Watch, as_float, call, close, fail, max_err, ok
from llmlab.i18n import _
from llmlab.model import GPT, GPTConfig

__all__ = ["check_memory", "check_loss_scaler", "check_checkpoint", "check_allreduce", "check_data_parallel",
           "check_zero", "check_router"]

FORBIDDEN_CODE: dict = {}
for _cls in (torch.amp.GradScaler, nn.parallel.DistributedDataParallel):
    FORBIDDEN_CODE[_cls.__init__.__code__] = f"{_cls.__module__}.{_cls.__name__}"
REFERENCE_FILES = {getattr(P, m.rsplit(".", 1)[-1]).__file__: m for m in P.ANSWER_MODULES}


def _call(name: str, fn: Callable, *args: Any) -> Any:
    """fn(*args) with the course's reference and torch's ready-made versions refused (this process only)."""
    import torch.utils.checkpoint as tuc

    files = {**REFERENCE_FILES, tuc.__file__: "torch.utils.checkpoint"}
    return call(name, fn, *args, watch=Watch({}, FORBIDDEN_CODE, files))


def _same(got: Any, want: Any, atol: float) -> bool:
    """Tensors, lists and dicts of them, numbers and bools compared recursively."""
    if isinstance(want, Tensor):
        return isinstance(got, Tensor) and close(got, want, atol)
    if isinstance(want, dict):
        return isinstance(got, dict) and set(got) == set(want) and all(_same(got[k], want[k], atol) for k in want)
    if isinstance(want, (list, tuple)):
        return isinstance(got, (list, tuple)) and len(got) == len(want) and all(_same(g, w, atol) for g, w in zip(got, want))
    if isinstance(want, float):
        return isinstance(got, (int, float)) and not isinstance(got, bool) and math.isclose(got, want, rel_tol=1e-9, abs_tol=atol)
    return got == want


# ----------------------------------------------------------------------------------------
# 1. Memory accounting


def check_memory(per_param_fn: Callable, device_fn: Callable, min_dp_fn: Callable) -> None:
    """Check state_bytes_per_param, bytes_per_device and min_data_parallel."""
    name = "state_bytes_per_param"
    for mixed in (False, True):
        for opt in ("adam", "sgd"):
            got = _call(name, per_param_fn, mixed, opt)
            want = P.memory.state_bytes_per_param(mixed, opt)
            if not isinstance(got, dict) or set(got) != set(want):
                fail(name, _('returns something other than a dict with keys "weights", "grads", "optimizer"'))
            if got == want:
                continue
            what = f"mixed_precision={mixed}, optimizer={opt!r}"
            if mixed and got["optimizer"] == want["optimizer"] - 4:
                fail(name, _("{what}: the fp32 master copy of the weights (4 bytes) belongs to the optimizer "
                             "state").format(what=what))
            if got["weights"] != want["weights"] or got["grads"] != want["grads"]:
                fail(name, _("{what}: weights and gradients are {want} bytes each in this recipe").format(what=what, want=want['weights']))
            if opt == "adam" and got["optimizer"] != want["optimizer"]:
                fail(name, _("{what}: Adam keeps two fp32 moments, exp_avg and exp_avg_sq").format(what=what))
            fail(name, _("{what}: the optimizer state is off").format(what=what))
    name = "bytes_per_device"
    n = 7e9
    cases = [(0, 1, 1, 1), (0, 8, 1, 1), (1, 8, 1, 1), (2, 8, 1, 1), (3, 8, 1, 1), (0, 1, 4, 2), (2, 4, 8, 2)]
    for stage, dp, tp, pp in cases:
        got = as_float(name, _call(name, device_fn, n, stage, dp, tp, pp))
        want = P.memory.bytes_per_device(n, stage, dp, tp, pp)
        if math.isclose(got, want, rel_tol=1e-9):
            continue
        what = f"zero_stage={stage}, dp={dp}, tp={tp}, pp={pp}"
        shards = {s: P.memory.bytes_per_device(n, s, dp, tp, pp) for s in range(4)}
        wrong = [s for s, b in shards.items() if math.isclose(got, b, rel_tol=1e-9)]
        if tp * pp > 1 and math.isclose(got, P.memory.bytes_per_device(n, stage, dp), rel_tol=1e-9):
            fail(name, _("{what}: tensor and pipeline parallelism split the whole model over tp * pp devices").format(what=what))
        if wrong:
            fail(name, _("{what}: you shard what stage {wrong} shards; stage 1 shards the optimizer state, "
                         "stage 2 also the gradients, stage 3 also the weights").format(what=what, wrong=wrong[0]))
        fail(name, _("{what}: {got:.4g} bytes, expected {want:.4g}").format(what=what, got=got, want=want))
    name = "min_data_parallel"
    for args in [(70e9, 80e9, 3, 1, 1), (70e9, 80e9, 2, 8, 1), (70e9, 80e9, 1, 8, 4), (1e6, 80e9, 0, 1, 1),
                 (70e9, 80e9, 0, 1, 1), (70e9, 80e9, 1, 1, 1), (13e9, 24e9, 3, 1, 1)]:
        got = _call(name, min_dp_fn, *args)
        want = P.memory.min_data_parallel(*args)
        if got == want and (got is None or isinstance(got, int)):
            continue
        what = _("{args:.3g} parameters, {args2:.3g} bytes per device, zero_stage={args3}, tp={args4}, "
                 "pp={args5}").format(args=args[0], args2=args[1], args3=args[2], args4=args[3], args5=args[4])
        if want is None:
            fail(name, _("{what}: returns {got!r}, but the part ZeRO stage {args} does not shard never fits: "
                         "return None").format(what=what, got=got, args=args[2]))
        if isinstance(got, (int, float)) and not isinstance(got, bool) and got == want - 1:
            fail(name, _("{what}: one too few; the smallest dp that fits rounds up").format(what=what))
        if isinstance(got, float) and got == want:
            fail(name, _("{what}: return an int").format(what=what))
        fail(name, _("{what}: returns {got!r}; not the smallest dp whose bytes_per_device fits").format(what=what, got=got))
    ok(_("memory: bytes per parameter, ZeRO stages and 3D plans all correct"))


# ----------------------------------------------------------------------------------------
# 2. Loss scaling


def _scaler_reference(param: Tensor, grads: list, lr: float, **kw: Any) -> dict:
    scaler = P.loss_scaling.DynamicLossScaler(**kw)
    p = nn.Parameter(param.clone())
    opt = torch.optim.SGD([p], lr=lr)
    scales, stepped = [], []
    for g in grads:
        p.grad = g * float(scaler.scale)
        scaler.unscale_([p])
        stepped.append(scaler.step(opt))
        scales.append(scaler.update())
    return {"param": p.detach(), "scales": scales, "stepped": stepped}


def check_loss_scaler(unscale_fn: Callable, update_fn: Callable, run_fn: Callable) -> None:
    """Check unscale_grads, update_scale and scaled_sgd against the decisions of a dynamic scaler."""
    name = "unscale_grads"
    gen = torch.Generator().manual_seed(8)
    grads = [torch.randn(3, 2, generator=gen) * 64, torch.randn(4, generator=gen) * 64]
    before = [g.clone() for g in grads]
    out = _call(name, unscale_fn, grads, 64.0)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        fail(name, _("returns something other than a pair (unscaled gradients, found_inf)"))
    unscaled, found = out
    if not all(torch.equal(g, b) for g, b in zip(grads, before)):
        fail(name, _("changes its input gradients; return new tensors"))
    if isinstance(unscaled, (list, tuple)) and len(unscaled) == 2 and close(unscaled[0], before[0] * 64, 1e-6):
        fail(name, _("multiplies by the scale: backward produced S times the gradient, so divide by the scale"))
    if not _same(list(unscaled), [b / 64 for b in before], 1e-6):
        fail(name, _("the unscaled gradients are not the gradients divided by the scale"))
    if found is not False:
        fail(name, _("found_inf is {found!r} for finite gradients; expected False").format(found=found))
    for bad, label in ((float("inf"), "inf"), (float("-inf"), "-inf"), (float("nan"), "NaN")):
        g = [torch.ones(3), torch.tensor([1.0, bad, 2.0])]
        if _call(name, unscale_fn, g, 2.0)[1] is not True:
            fail(name, _("found_inf must be True when a gradient holds {label}").format(label=label))
    name = "update_scale"
    cases = [((1024.0, 3, True, 2.0, 0.5, 5), (512.0, 0)), ((1024.0, 3, False, 2.0, 0.5, 5), (1024.0, 4)),
             ((1024.0, 4, False, 2.0, 0.5, 5), (2048.0, 0)), ((8.0, 0, False, 3.0, 0.25, 1), (24.0, 0)),
             ((8.0, 0, True, 3.0, 0.25, 1), (2.0, 0))]
    for args, want in cases:
        got = _call(name, update_fn, *args)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            fail(name, _("returns something other than a pair (new scale, new count of good steps)"))
        got = (float(got[0]), int(got[1]))
        if got == want:
            continue
        scale, good, found, growth, backoff, interval = args
        if found and got[0] == want[0]:
            fail(name, _("after an overflow the count of good steps restarts at 0"))
        if found:
            fail(name, _("after an overflow, multiply the scale by backoff_factor"))
        if good + 1 == interval and got[0] == scale:
            fail(name, _("the scale must grow when the count of good steps reaches growth_interval ({interval})").format(interval=interval))
        if good + 2 == interval and got[0] == scale * growth:
            fail(name, _("grows one step early: the count must reach growth_interval ({interval}), not "
                         "growth_interval - 1").format(interval=interval))
        if got[0] == want[0]:
            fail(name, _("the count of good steps is off: +1 after a good step, back to 0 after growing"))
        fail(name, _("update_scale{args} returns {got}, expected {want}").format(args=args, got=got, want=want))
    name = "scaled_sgd"
    inf, nan = float("inf"), float("nan")
    script = [torch.tensor([v, -1.0]) for v in (1.0, 2.0, inf, 1.0, 1.0, nan, 1.0, 1.0, 1.0, 2.0)]
    kw = dict(init_scale=16.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2)
    param = torch.tensor([0.5, 0.5])
    got = _call(name, run_fn, param, script, 0.1, *kw.values())
    want = _scaler_reference(param, script, 0.1, **kw)
    if not isinstance(got, dict) or set(got) != {"param", "scales", "stepped"}:
        fail(name, _('returns something other than a dict with keys "param", "scales", "stepped"'))
    if not torch.equal(param, torch.tensor([0.5, 0.5])):
        fail(name, _("changes the param it was given; work on a copy"))
    if list(got["stepped"]) != want["stepped"]:
        if all(got["stepped"]):
            fail(name, _("takes every step; a step whose gradients hold inf or NaN must be skipped"))
        fail(name, _("skipped steps {got}, expected {want}").format(got=got['stepped'], want=want['stepped']))
    if [float(s) for s in got["scales"]] != want["scales"]:
        fail(name, _("scales after each update {got}, expected {want}").format(got=list(got['scales']), want=want['scales']))
    if not isinstance(got["param"], Tensor) or not close(got["param"], want["param"], 1e-6):
        fail(name, _("the right steps and scales, but the final weights differ: step with the unscaled gradient"))
    ok(_("loss scaling: overflow skipped, backoff and growth as GradScaler decides"))


# ----------------------------------------------------------------------------------------
# 3. Activation checkpointing


def check_checkpoint(grads_fn: Callable) -> None:
    """Check gpt_gradients(config, state, idx, targets, use_checkpoint) with the student's checkpoint."""
    name = "gpt_gradients"
    config = dict(vocab_size=40, block_size=16, n_layer=3, n_head=2, n_embd=32)
    torch.manual_seed(11)
    ref = GPT(GPTConfig(**config))
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    gen = torch.Generator().manual_seed(12)
    idx, targets = torch.randint(0, 40, (8, 16), generator=gen), torch.randint(0, 40, (8, 16), generator=gen)
    ref(idx, targets)[1].backward()
    plain = _call(name, grads_fn, config, state, idx, targets, False)
    got = _call(name, grads_fn, config, state, idx, targets, True)
    if not isinstance(got, dict) or not isinstance(got.get("grads"), dict):
        fail(name, _('returns something other than {"loss", "grads", "peak_bytes"}'))
    missing = [n for n, _ in ref.named_parameters() if got["grads"].get(n) is None]
    if missing:
        inside = [n for n in missing if n.startswith("layers.")]
        if inside and len(inside) == len([n for n, _ in ref.named_parameters() if n.startswith("layers.")]):
            fail(name, _("the blocks' parameters get no gradient: backward must backpropagate through the "
                         "recomputed block (torch.autograd.backward(y, grad_out)), not only return x's gradient"))
        fail(name, _("{missing} gets no gradient: return the gradient of x from backward (recompute on "
                     "x.detach().requires_grad_())").format(missing=missing[0]))
    for n, p in ref.named_parameters():
        g = got["grads"][n]
        if close(g, 2 * p.grad, 1e-6) and not close(g, p.grad, 1e-6):
            fail(name, _("{n}: twice the true gradient: backpropagate through the recomputed block once").format(n=n))
        if not close(g, p.grad, 1e-6):
            fail(name, _("{n}: the gradient differs from plain autograd (max |error| {max_err:.2e})").format(n=n, max_err=max_err(g, p.grad)))
    if got["peak_bytes"] >= 0.8 * plain["peak_bytes"]:
        fail(name, _("the gradients are right, but the peak memory ({got:,} bytes) is not lower than without "
                     "checkpointing ({plain:,}): run the forward under torch.no_grad() and save only x").format(got=got['peak_bytes'], plain=plain['peak_bytes']))
    ok(_("checkpoint: identical gradients, peak memory {value:.0%} of plain autograd").format(value=got['peak_bytes'] / plain['peak_bytes']))


# ----------------------------------------------------------------------------------------
# 4. All-reduce


def check_allreduce(run_fn: Callable, buckets_fn: Callable) -> None:
    """Check make_buckets, then allreduce_mean and bucketed_allreduce_mean through run_allreduce."""
    name = "make_buckets"
    for sizes, cap in (([40, 24, 8, 100, 4, 4], 64), ([16, 16, 16], 32), ([4, 4], 4), ([200], 64), ([], 8)):
        got = _call(name, buckets_fn, sizes, cap)
        want = P.data_parallel.make_buckets(sizes, cap)
        if _same(got, want, 0):
            continue
        flat = [i for b in (got or []) if isinstance(b, (list, tuple)) for i in b]
        if flat != list(range(len(sizes))):
            fail(name, _("sizes {sizes}: every index must appear once, in order, in consecutive buckets").format(sizes=sizes))
        if any(sum(sizes[i] for i in b) > cap and len(b) > 1 for b in got):
            fail(name, _("sizes {sizes}, bucket_bytes {cap}: a bucket grows past bucket_bytes").format(sizes=sizes, cap=cap))
        fail(name, _("sizes {sizes}, bucket_bytes {cap}: returns {got}, expected {want} (a tensor joins the "
                     "bucket when the bucket stays <= bucket_bytes)").format(sizes=sizes, cap=cap, got=got, want=want))
    name = "run_allreduce"
    gen = torch.Generator().manual_seed(4)
    shapes = [(2, 3), (4,), (1,), (3, 3)]
    per_rank = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(2)]
    mean = [(a + b) / 2 for a, b in zip(*per_rank)]
    for bucket_bytes in (None, 40):
        what = "allreduce_mean" if bucket_bytes is None else "bucketed_allreduce_mean"
        out = _call(name, run_fn, per_rank, bucket_bytes)
        for rank, r in enumerate(out):
            got = r["tensors"]
            if _same(got, mean, 1e-6):
                continue
            if _same(got, [2 * m for m in mean], 1e-6):
                fail(what, _("the ranks hold the sum; divide by the world size for the mean"))
            if _same(got, per_rank[rank], 0):
                fail(what, _("the tensors are unchanged: the mean must be written into them, in place "
                             "(all_reduce works in place; copy a bucket's result back into its tensors)"))
            if _same(got, [m / 2 for m in mean], 1e-6):
                fail(what, _("divided by the world size twice"))
            fail(what, _("rank {rank} does not hold the mean of the ranks' tensors").format(rank=rank))
        if bucket_bytes is not None and not _same(out[0]["buckets"], P.data_parallel.make_buckets(
                [t.numel() * 4 for t in per_rank[0]], bucket_bytes), 0):
            fail(what, _("returns buckets {out}; expected those of make_buckets for these tensors").format(out=out[0]['buckets']))
    ok(_("all-reduce: every rank holds the mean, naive and bucketed"))


# ----------------------------------------------------------------------------------------
# 5. Data-parallel training


def _train(config: dict, state: dict, shards: list, lr: float, zero_grad: bool = True) -> dict:
    model = GPT(GPTConfig(**config))
    model.load_state_dict(state)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for x, y in shards:
        if zero_grad:
            opt.zero_grad()
        model(x, y)[1].backward()
        opt.step()
    return model.state_dict()


def check_data_parallel(run_fn: Callable) -> None:
    """Check run_data_parallel against one process on the whole batch, and name the usual slips."""
    name = "train_data_parallel"
    config = dict(vocab_size=32, block_size=8, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(21)
    state = {k: v.clone() for k, v in GPT(GPTConfig(**config)).state_dict().items()}
    gen = torch.Generator().manual_seed(22)
    batches = [[(torch.randint(0, 32, (2, 8), generator=gen), torch.randint(0, 32, (2, 8), generator=gen))
                for _ in range(3)] for _ in range(2)]
    whole = [(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]])) for a, b in zip(*batches)]
    lr = 0.5
    out = _call(name, run_fn, config, state, batches, lr, 256)
    want = _train(config, state, whole, lr)
    if not isinstance(out, list) or len(out) != 2 or not all(isinstance(r, dict) for r in out):
        fail(name, _("run_data_parallel must return one state dict per rank"))
    if not _same(out[0], want, 1e-5) and all(_same(r, _train(config, state, batches[0], lr), 1e-5) for r in out):
        fail(name, _("every rank trains on rank 0's shards: use batches[dist.get_rank()]"))
    for rank, got in enumerate(out):
        if _same(got, want, 1e-5):
            continue
        if set(got) != set(want):
            fail(name, _("return model.state_dict() of the rank's model"))
        if _same(got, _train(config, state, batches[rank], lr), 1e-5):
            fail(name, _("rank {rank} trained on its shard alone: the gradients were not averaged across ranks").format(rank=rank))
        if _same(got, _train(config, state, whole, lr * 2), 1e-5):
            fail(name, _("the gradients are summed across ranks, not averaged"))
        if _same(got, _train(config, state, whole, lr, zero_grad=False), 1e-5):
            fail(name, _("the gradients accumulate from step to step: clear them before each backward"))
        fail(name, _("rank {rank}'s weights differ from one process trained on the whole batch").format(rank=rank))
    ok(_("data parallel: every rank ends on the weights of one process trained on the whole batch"))


# ----------------------------------------------------------------------------------------
# 6. ZeRO


def _adam(params: list, grads: list, lr: float, betas: tuple, eps: float, bias_correction: bool = True) -> tuple:
    """Flat weights, exp_avg, exp_avg_sq after Adam on the rank-averaged gradients (or without bias correction)."""
    flat = lambda ts: torch.cat([t.detach().reshape(-1) for t in ts])  # noqa: E731
    w = flat(params)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for t, step in enumerate(grads, 1):
        g = flat([sum(r[i] for r in step) / len(step) for i in range(len(params))])
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        if bias_correction:
            w = w - lr / (1 - betas[0] ** t) * m / (v.sqrt() / math.sqrt(1 - betas[1] ** t) + eps)
        else:
            w = w - lr * m / (v.sqrt() + eps)
    return w, m, v


def check_zero(run_fn: Callable) -> None:
    """Check run_zero (the student's zero_adam on two processes) for stages 1 and 2."""
    name = "zero_adam"
    gen = torch.Generator().manual_seed(31)
    shapes = [(3, 3), (4,)]  # 13 numbers: slices of 7, rank 1's ends with one pad
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(2)] for _ in range(4)]
    betas, eps, lr = (0.9, 0.99), 1e-8, 0.05
    w, m, v = _adam(params, grads, lr, betas, eps)
    last = torch.cat([(grads[-1][0][i] + grads[-1][1][i]).reshape(-1) / 2 for i in range(len(shapes))])
    for stage in (1, 2):
        out = _call(name, run_fn, params, grads, lr, betas, eps, stage)
        for rank, r in enumerate(out):
            if not isinstance(r, dict) or not {"params", "exp_avg", "exp_avg_sq", "grad_shard"} <= set(r):
                fail(name, _('return {"params", "exp_avg", "exp_avg_sq", "grad_shard"}'))
            what = _("stage {stage}, rank {rank}").format(stage=stage, rank=rank)
            lo, hi = 7 * rank, min(7 * rank + 7, 13)
            if r["exp_avg"].numel() == 13 or r["exp_avg"].numel() == 14:
                fail(name, _("{what}: exp_avg holds every parameter's moment; keep only this rank's slice").format(what=what))
            if r["exp_avg"].numel() != 7 or r["exp_avg_sq"].numel() != 7:
                fail(name, _("{what}: the moments should have ceil(13 / 2) = 7 entries (the slice, padding "
                             "included)").format(what=what))
            got_w = torch.cat([p.reshape(-1) for p in r["params"]])
            if close(r["grad_shard"][: hi - lo], 2 * last[lo:hi], 1e-10):
                fail(name, _("{what}: grad_shard is the sum over ranks; divide by the world size").format(what=what))
            if not close(r["grad_shard"][: hi - lo], last[lo:hi], 1e-10):
                other = 7 * (1 - rank), min(7 * (1 - rank) + 7, 13)
                if close(r["grad_shard"][: other[1] - other[0]], last[other[0]:other[1]], 1e-10):
                    fail(name, _("{what}: holds the other rank's slice; rank r owns [r * S, (r + 1) * S)").format(what=what))
                fail(name, _("{what}: grad_shard is not the averaged gradient of this rank's slice").format(what=what))
            if close(got_w, w, 1e-9):
                if not close(r["exp_avg"][: hi - lo], m[lo:hi], 1e-10) or not close(r["exp_avg_sq"][: hi - lo], v[lo:hi], 1e-10):
                    fail(name, _("{what}: the weights are right but the returned moments are not this rank's "
                                 "slice").format(what=what))
                continue
            if close(got_w, _adam(params, grads, lr, betas, eps, bias_correction=False)[0], 1e-9):
                fail(name, _("{what}: Adam's bias correction (1 - beta ** t) is missing").format(what=what))
            if close(got_w[lo:hi], w[lo:hi], 1e-9):
                fail(name, _("{what}: this rank's slice is right, but the other slices are stale: all-gather "
                             "the updated slices").format(what=what))
            fail(name, _("{what}: the weights differ from torch.optim.Adam on the averaged gradients (max "
                         "|error| {max_err:.2e})").format(what=what, max_err=max_err(got_w, w)))
    ok(_("ZeRO: stages 1 and 2 match Adam, each rank keeps half the state"))


# ----------------------------------------------------------------------------------------
# 7. Mixture of experts


def check_router(route_fn: Callable, aux_fn: Callable, capacity_fn: Callable, mask_fn: Callable) -> None:
    """Check top_k_routing, load_balancing_loss, expert_capacity and capacity_mask."""
    name = "top_k_routing"
    gen = torch.Generator().manual_seed(41)
    logits = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    probs = logits.softmax(-1)
    for k in (2, 1, 3):
        out = _call(name, route_fn, logits, k)
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            fail(name, _("returns something other than a pair (weights, experts)"))
        weights, experts = out
        top = probs.topk(k, dim=-1)
        if not isinstance(experts, Tensor) or experts.shape != (12, k):
            fail(name, _("experts should be ({value}, {k}) for k={k}").format(value=12, k=k))
        if not torch.equal(experts, top.indices):
            if torch.equal(experts, logits.softmax(0).topk(k, dim=-1).indices):
                fail(name, _("softmax over the wrong axis: each token's probabilities are over the experts "
                             "(last axis)"))
            fail(name, _("k={k}: the experts are not each token's top-k by router probability, best first").format(k=k))
        if close(weights, top.values, 1e-9) and k > 1:
            fail(name, _("the weights are the raw top-k probabilities: renormalise them to sum to 1 per token"))
        if not close(weights, top.values / top.values.sum(-1, keepdim=True), 1e-9):
            fail(name, _("k={k}: the weights are not the top-k probabilities renormalised").format(k=k))
    name = "load_balancing_loss"
    logits = torch.randn(40, 4, generator=gen, dtype=torch.float64)
    for k in (1, 2):
        got = as_float(name, _call(name, aux_fn, logits, k))
        want = float(P.moe.load_balancing_loss(logits, k))
        if math.isclose(got, want, rel_tol=1e-6):
            continue
        if math.isclose(got, want / k, rel_tol=1e-6) and k > 1:
            fail(name, _("f_e counts top-k assignments per token (they sum to k): do not divide by k"))
        if math.isclose(got, want / 4, rel_tol=1e-6):
            fail(name, _("missing the factor E (number of experts)"))
        fail(name, _("k={k}: {got:.6g}, expected {want:.6g}").format(k=k, got=got, want=want))
    name = "expert_capacity"
    for args in ((10, 4, 1, 1.0), (64, 8, 2, 1.25), (7, 7, 1, 1.0), (100, 8, 2, 1.5)):
        got = _call(name, capacity_fn, *args)
        want = P.moe.expert_capacity(*args)
        if got == want and isinstance(got, int):
            continue
        if got == math.floor(args[3] * args[0] * args[2] / args[1]):
            fail(name, _("{args}: rounds down; round up (ceil), so the slots cover the tokens").format(args=args))
        if got == math.ceil(args[3] * args[0] / args[1]):
            fail(name, _("{args}: each token makes k assignments: count n_tokens * k").format(args=args))
        fail(name, _("{args}: returns {got!r}, expected {want}").format(args=args, got=got, want=want))
    name = "capacity_mask"
    experts = torch.randint(0, 3, (15, 2), generator=gen)
    for cap in (4, 6, 30):
        got = _call(name, mask_fn, experts, 3, cap)
        want = P.moe.capacity_mask(experts, 3, cap)
        if isinstance(got, Tensor) and got.dtype == torch.bool and torch.equal(got, want):
            continue
        if not isinstance(got, Tensor) or got.shape != want.shape:
            fail(name, _("return a bool tensor of the shape of experts, (n_tokens, k)"))
        got = got.bool()
        rowwise = torch.zeros_like(want)
        used = [0, 0, 0]
        for t in range(15):
            for c in range(2):
                e = int(experts[t, c])
                rowwise[t, c] = used[e] < cap
                used[e] += rowwise[t, c].item()
        if torch.equal(got, rowwise):
            fail(name, _("serves token by token; all first choices come before any second choice"))
        if torch.equal(got, P.moe.capacity_mask(experts, 3, cap + 1)):
            fail(name, _("an expert takes one assignment too many (capacity {cap})").format(cap=cap))
        if torch.equal(got, P.moe.capacity_mask(experts, 3, cap - 1)):
            fail(name, _("an expert takes one assignment too few (capacity {cap})").format(cap=cap))
        fail(name, _("capacity {cap}: the kept assignments differ").format(cap=cap))
    ok(_("routing: top-k weights, load-balancing loss, capacity and drops all correct"))
