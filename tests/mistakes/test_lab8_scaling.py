"""Lab 8 (training past one device): the usual mistakes of each exercise, and right answers written otherwise.

The multi-process exercises are checked and graded through their Given runners, so every
answer here runs on real gloo processes.
"""
from __future__ import annotations

from catalogue import Answer, suite, tweak

ANSWERS = [
    # memory accounting
    tweak("memory", "no-master-copy", '"optimizer": 4 + moments}', '"optimizer": moments}', words="master copy"),
    tweak("memory", "three-adam-moments", '{"adam": 8, "sgd": 0}', '{"adam": 12, "sgd": 0}', words="two fp32 moments"),
    tweak("memory", "stage-1-shards-grads", 'per["grads"] / (dp if zero_stage >= 2 else 1)',
          'per["grads"] / (dp if zero_stage >= 1 else 1)', words="stage 1 shards the optimizer state"),
    tweak("memory", "model-parallel-ignored", "local = n_params / (tp * pp)", "local = n_params",
          words="tensor and pipeline parallelism"),
    tweak("memory", "impossible-is-infinite", "        return None\n", "        return math.inf\n", words="never fits"),
    Answer("memory", "rounds-down", """
def min_data_parallel(n_params, device_bytes, zero_stage, tp=1, pp=1, mixed_precision=True):
    one = bytes_per_device(n_params, zero_stage, 1, tp, pp, mixed_precision)
    never = bytes_per_device(n_params, zero_stage, math.inf, tp, pp, mixed_precision)
    if one <= device_bytes:
        return 1
    if never >= device_bytes:
        return None
    return int((one - never) // (device_bytes - never))
""", words="one too few"),
    Answer("memory", "search", """
def min_data_parallel(n_params, device_bytes, zero_stage, tp=1, pp=1, mixed_precision=True):
    if bytes_per_device(n_params, zero_stage, 10**12, tp, pp, mixed_precision) > device_bytes:
        return None
    dp = 1
    while bytes_per_device(n_params, zero_stage, dp, tp, pp, mixed_precision) > device_bytes:
        dp += 1
    return dp
"""),
    Answer("memory", "arithmetic", """
def state_bytes_per_param(mixed_precision, optimizer="adam"):
    w = 2 if mixed_precision else 4
    extra = (4 if mixed_precision else 0) + (8 if optimizer == "adam" else 0)
    return {"weights": w, "grads": w, "optimizer": extra}
"""),
    # loss scaling
    tweak("loss-scaler", "multiplies", "inv = 1.0 / scale", "inv = scale", words="multiplies by the scale"),
    tweak("loss-scaler", "nan-slips-through", "found_inf = any(not bool(torch.isfinite(g).all()) for g in unscaled)",
          "found_inf = any(bool(torch.isinf(g).any()) for g in unscaled)", words="NaN"),
    tweak("loss-scaler", "count-not-reset", "return scale * backoff_factor, 0", "return scale * backoff_factor, good_steps",
          words="restarts at 0"),
    tweak("loss-scaler", "grows-early", "if good_steps == growth_interval:", "if good_steps + 1 >= growth_interval:",
          words="grows one step early"),
    tweak("loss-scaler", "in-place", "unscaled = [g * inv for g in grads]", "unscaled = [g.mul_(inv) for g in grads]",
          words="changes its input gradients"),
    tweak("loss-scaler", "steps-on-overflow", "        if not found_inf:\n            param = param - lr * unscaled",
          "        param = param - lr * unscaled", words="final weights differ"),
    Answer("loss-scaler", "division", """
def unscale_grads(grads, scale):
    out = [g / scale for g in grads]
    return out, not all(bool(torch.isfinite(g).all()) for g in out)
"""),
    Answer("loss-scaler", "modulo", """
def update_scale(scale, good_steps, found_inf, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000):
    if found_inf:
        return scale * backoff_factor, 0
    good_steps = (good_steps + 1) % growth_interval
    if good_steps == 0:
        scale = scale * growth_factor
    return scale, good_steps
"""),
    # activation checkpointing
    tweak("checkpoint", "no-recompute",
          "        with torch.enable_grad():\n            y = ctx.fn(x)\n        torch.autograd.backward(y, grad_out)\n"
          "        return None, x.grad", "        return None, grad_out", words="parameters get no gradient"),
    tweak("checkpoint", "recompute-without-grad", "        with torch.enable_grad():\n            y = ctx.fn(x)",
          "        y = ctx.fn(x)", words="does not require grad"),
    tweak("checkpoint", "keeps-the-graph",
          "        ctx.fn = fn\n        ctx.save_for_backward(x)\n        with torch.no_grad():\n            return fn(x)",
          "        with torch.enable_grad():\n            ctx.x = x.detach().requires_grad_()\n            ctx.y = fn(ctx.x)\n"
          "        return ctx.y.detach()",
          "        (x,) = ctx.saved_tensors\n        x = x.detach().requires_grad_()\n        with torch.enable_grad():\n"
          "            y = ctx.fn(x)\n        torch.autograd.backward(y, grad_out)\n        return None, x.grad",
          "        torch.autograd.backward(ctx.y, grad_out)\n        return None, ctx.x.grad", words="is not lower than"),
    tweak("checkpoint", "not-detached", "x = x.detach().requires_grad_()", "x = x.requires_grad_()",
          words="backward through the graph a second time"),
    tweak("checkpoint", "gradients-swapped", "return None, x.grad", "return x.grad, None", words="raised RuntimeError"),
    tweak("checkpoint", "attribute-not-saved-tensors", "ctx.save_for_backward(x)", "ctx.x = x", "(x,) = ctx.saved_tensors", "x = ctx.x"),
    tweak("checkpoint", "tensor-backward", "torch.autograd.backward(y, grad_out)", "y.backward(grad_out)"),
    # all-reduce
    tweak("allreduce", "sum", "        t /= world\n", "", words="hold the sum"),
    tweak("allreduce", "twice", "        t /= world", "        t /= world * world", words="twice"),
    tweak("allreduce", "bucket-not-copied-back", "            tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))\n", "",
          words="tensors are unchanged"),
    tweak("allreduce", "strict-limit", "if buckets and size + n <= bucket_bytes:", "if buckets and size + n < bucket_bytes:",
          words="stays <= bucket_bytes"),
    tweak("allreduce", "bucket-overflows", "if buckets and size + n <= bucket_bytes:", "if buckets and size <= bucket_bytes:",
          words="grows past bucket_bytes"),
    tweak("allreduce", "div-in-place", "        t /= world", "        t.div_(world)"),
    Answer("allreduce", "sum-of-sizes", """
def make_buckets(nbytes, bucket_bytes):
    out = []
    for i, n in enumerate(nbytes):
        if out and sum(nbytes[j] for j in out[-1]) + n <= bucket_bytes:
            out[-1] = out[-1] + [i]
        else:
            out.append([i])
    return out
"""),
    # data-parallel training
    tweak("ddp", "no-averaging", "        bucketed_allreduce_mean([p.grad for p in model.parameters()], bucket_bytes)\n", "",
          words="not averaged across ranks"),
    tweak("ddp", "no-zero-grad", "        opt.zero_grad()\n", "", words="accumulate"),
    tweak("ddp", "rank-0-data", "for x, y in batches[rank]:", "for x, y in batches[0]:", words="rank 0's shards"),
    tweak("ddp", "summed", "bucketed_allreduce_mean([p.grad for p in model.parameters()], bucket_bytes)",
          "bucketed_allreduce_mean([p.grad for p in model.parameters()], bucket_bytes)\n"
          "        for p in model.parameters():\n            p.grad *= dist.get_world_size()", words="summed across ranks"),
    tweak("ddp", "naive-all-reduce", "bucketed_allreduce_mean([p.grad for p in model.parameters()], bucket_bytes)",
          "allreduce_mean([p.grad for p in model.parameters()])"),
    Answer("ddp", "sgd-by-hand", """
def train_data_parallel(config, state, batches, lr, bucket_bytes):
    model = GPT(GPTConfig(**config))
    model.load_state_dict(state)
    for x, y in batches[dist.get_rank()]:
        model.zero_grad()
        model(x, y)[1].backward()
        bucketed_allreduce_mean([p.grad for p in model.parameters()], bucket_bytes)
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
    return model.state_dict()
"""),
    # ZeRO
    tweak("zero", "no-bias-correction", "mine = weights[start:stop] - lr / (1 - beta1**t) * exp_avg / denom",
          "mine = weights[start:stop] - lr * exp_avg / (exp_avg_sq.sqrt() + eps)", words="bias correction"),
    tweak("zero", "reduce-scatter-sum", "            shard = shard / world\n", "", words="sum over ranks"),
    tweak("zero", "no-all-gather", "        dist.all_gather(pieces, mine)\n        weights = torch.cat(pieces)",
          "        weights = torch.cat([weights[:start], mine, weights[stop:]])", words="stale"),
    tweak("zero", "swapped-slices", "start, stop = rank * size, (rank + 1) * size",
          "start, stop = (world - 1 - rank) * size, (world - rank) * size", words="other rank's slice"),
    tweak("zero", "no-second-moment-correction", "denom = exp_avg_sq.sqrt() / math.sqrt(1 - beta2**t) + eps",
          "denom = exp_avg_sq.sqrt() + eps", words="differ from torch.optim.Adam"),
    tweak("zero", "lerp", "exp_avg = beta1 * exp_avg + (1 - beta1) * shard", "exp_avg = exp_avg.lerp(shard, 1 - beta1)"),
    tweak("zero", "reduce-to-owner", "            dist.reduce_scatter(shard, list(g.chunk(world)))",
          "            for r, piece in enumerate(g.chunk(world)):\n                dist.reduce(piece, dst=r)\n"
          "            shard = g.chunk(world)[rank].clone()"),
    # routing
    tweak("router", "softmax-over-tokens", "probs = torch.softmax(router_logits, dim=-1)\n    weights, experts",
          "probs = torch.softmax(router_logits, dim=0)\n    weights, experts", words="wrong axis"),
    tweak("router", "not-renormalised", "return weights / weights.sum(dim=-1, keepdim=True), experts",
          "return weights, experts", words="renormalise"),
    tweak("router", "aux-divided-by-k", "((counts / n_tokens) * probs.mean(dim=0))",
          "((counts / (n_tokens * k)) * probs.mean(dim=0))", words="do not divide by k"),
    tweak("router", "aux-without-E", "return n_experts * ((counts", "return ((counts", words="factor E"),
    tweak("router", "capacity-floor", "return math.ceil(capacity_factor * n_tokens * k / n_experts)",
          "return math.floor(capacity_factor * n_tokens * k / n_experts)", words="rounds down"),
    tweak("router", "token-by-token", "    for choice in range(k):\n        for token in range(n_tokens):",
          "    for token in range(n_tokens):\n        for choice in range(k):", words="token by token"),
    Answer("router", "softmax-of-top-logits", """
def top_k_routing(router_logits, k):
    top = router_logits.topk(k, dim=-1)
    return torch.softmax(top.values, dim=-1), top.indices
"""),
    Answer("router", "vectorised-capacity", """
def capacity_mask(experts, n_experts, capacity):
    n_tokens, k = experts.shape
    order = experts.t().reshape(-1)
    onehot = F.one_hot(order, n_experts)
    position = (onehot.cumsum(0) * onehot).sum(-1) - 1
    return (position < capacity).view(k, n_tokens).t()
"""),
]

# a wrong answer to one exercise, an exercise that calls it, and what that exercise's check says
BLAMES = [("allreduce/bucket-not-copied-back", "ddp", "not averaged across ranks")]

(test_every_exercise_has_four_mistakes_and_two_right_answers, test_check_names_the_mistake,
 test_composite_check_names_the_earlier_function, graded,
 test_grader_prices_it_and_agrees_with_the_check) = suite("08-scaling", ANSWERS, BLAMES)
