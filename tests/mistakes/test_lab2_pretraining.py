"""Lab 2 (pretraining): the usual mistakes of each exercise, and right answers written otherwise."""
from __future__ import annotations

from catalogue import Answer, suite, tweak

MERGE_BODY = """    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2"""
ATTENTION = "y = F.scaled_dot_product_attention(q, k, v, is_causal=True)"
BY_HAND = ("y = torch.softmax((q @ k.transpose(-1, -2) * SCALE).masked_fill("
           "~torch.ones(T, T, dtype=torch.bool).tril(), float('-inf')), dim=-1) @ v")

ANSWERS = [
    # BPE
    tweak("bpe-merge", "merged-pair-not-skipped", "            i += 2", "            i += 1", words="keeps the length"),
    tweak("bpe-merge", "last-id-dropped", "    while i < len(ids):", "    while i < len(ids) - 1:", words="last id is dropped"),
    tweak("bpe-merge", "new-id-plus-one", "out.append(new_id)", "out.append(new_id + 1)", words="goes wrong at index"),
    tweak("bpe-merge", "ties-to-first-seen", "min(counts, key=lambda pair: (-counts[pair], pair))",
          "max(counts, key=counts.get)", words="break ties by the smallest pair"),
    tweak("bpe-merge", "largest-pair", "min(counts, key=lambda pair: (-counts[pair], pair))", "max(counts)",
          words="is not the most frequent adjacent pair"),
    tweak("bpe-merge", "ties-to-largest", "min(counts, key=lambda pair: (-counts[pair], pair))",
          "max(counts, key=lambda pair: (counts[pair], pair))", words="break ties by the smallest pair"),
    Answer("bpe-merge", "flag-and-counter", """
from collections import Counter


def merge(ids, pair, new_id):
    out, skip = [], False
    for a, b in zip(ids, ids[1:] + [None]):
        if skip:
            skip = False
        elif (a, b) == tuple(pair):
            out.append(new_id)
            skip = True
        else:
            out.append(a)
    return out


def most_frequent_pair(ids):
    counts = Counter(zip(ids, ids[1:]))
    best = max(counts.values())
    return sorted(p for p, c in counts.items() if c == best)[0]
"""),
    Answer("bpe-merge", "slices-and-sort", """
def merge(ids, pair, new_id):
    ids = list(ids)
    i = 0
    while i < len(ids) - 1:
        if ids[i:i + 2] == list(pair):
            ids[i:i + 2] = [new_id]
        i += 1
    return ids


def most_frequent_pair(ids):
    counts = {}
    for i in range(len(ids) - 1):
        counts[(ids[i], ids[i + 1])] = counts.get((ids[i], ids[i + 1]), 0) + 1
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[0][0]
"""),
    # causal-LM loss
    tweak("clm-loss", "no-shift", "logits[:, :-1]", "logits", "tokens[:, 1:]", "tokens", words="its OWN token"),
    tweak("clm-loss", "shifted-the-wrong-way", "logits[:, :-1]", "logits[:, 1:]", "tokens[:, 1:]", "tokens[:, :-1]",
          words="shifted the wrong way"),
    tweak("clm-loss", "sum", "F.cross_entropy(predictions, targets)", "F.cross_entropy(predictions, targets, reduction='sum')",
          words="returns the sum"),
    tweak("clm-loss", "per-position", "F.cross_entropy(predictions, targets)", "F.cross_entropy(predictions, targets, reduction='none')",
          words="expected a scalar"),
    tweak("clm-loss", "probabilities-not-logs", "F.cross_entropy(predictions, targets)",
          "-predictions.softmax(-1).gather(1, targets[:, None]).mean()", words="differs from the reference"),
    Answer("clm-loss", "log-softmax-gather", """
def causal_lm_loss(logits, tokens):
    logp = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, T-1, V)
    return -logp.gather(-1, tokens[:, 1:, None]).mean()
"""),
    Answer("clm-loss", "logsumexp", """
def causal_lm_loss(logits, tokens):
    z = logits[:, :-1]
    picked = torch.take_along_dim(z, tokens[:, 1:].unsqueeze(-1), dim=-1).squeeze(-1)
    return (torch.logsumexp(z, dim=-1) - picked).mean()
"""),
    # the block
    tweak("block", "no-causal-mask", "is_causal=True", "is_causal=False", words="a token sees the future"),
    tweak("block", "layer-norm", "return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))",
          "return F.layer_norm(h, h.shape[-1:], weight, None, eps)", words="uses LayerNorm"),
    tweak("block", "no-residual", "x = x + merge_heads(y)", "x = merge_heads(y)", words="residual connection is missing"),
    tweak("block", "post-norm", "h = rms_norm(x, params[\"input_layernorm.weight\"])", "h = x",
          "x = x + merge_heads(y) @ params[\"self_attn.o_proj.weight\"].T",
          "x = rms_norm(x + merge_heads(y) @ params[\"self_attn.o_proj.weight\"].T, params[\"input_layernorm.weight\"])",
          "h = rms_norm(x, params[\"post_attention_layernorm.weight\"])", "h = x",
          "return x + (gate * up) @ params[\"mlp.down_proj.weight\"].T",
          "return rms_norm(x + (gate * up) @ params[\"mlp.down_proj.weight\"].T, params[\"post_attention_layernorm.weight\"])",
          words="post-norm"),
    tweak("block", "silu-without-gate", "(gate * up) @", "gate @", words="up_proj is missing"),
    tweak("block", "gate-on-the-wrong-branch", "gate = F.silu(h @ params[\"mlp.gate_proj.weight\"].T)",
          "gate = h @ params[\"mlp.gate_proj.weight\"].T", "up = h @ params[\"mlp.up_proj.weight\"].T",
          "up = F.silu(h @ params[\"mlp.up_proj.weight\"].T)", words="the wrong branch"),
    tweak("block", "heads-interleaved", "from llmlab.attention import apply_rotary, merge_heads, rope_cache, split_heads",
          "from llmlab.attention import apply_rotary, rope_cache\n\n"
          "    def split_heads(t, n):\n        return t.view(*t.shape[:2], -1, n).permute(0, 3, 1, 2)\n\n"
          "    def merge_heads(t):\n        return t.permute(0, 2, 3, 1).flatten(2)", words="the head split is wrong"),
    tweak("block", "no-scale", ATTENTION, BY_HAND.replace("SCALE", "1.0"), words="missing the 1/sqrt(head_dim) scale"),
    tweak("block", "n-embd-scale", ATTENTION, BY_HAND.replace("SCALE", "C ** -0.5"), words="the scale uses n_embd"),
    tweak("block", "no-rope", "q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)", "pass",
          words="ignores positions"),
    tweak("block", "rope-theta-ignored", "rope_cache(T, C // n_head, rope_theta)", "rope_cache(T, C // n_head)",
          words="rope_theta argument is ignored"),
    tweak("block", "by-hand-attention", ATTENTION, BY_HAND.replace("SCALE", "(C // n_head) ** -0.5")),
    Answer("block", "einsum-and-rms-norm", """
def transformer_block(x, params, n_head, rope_theta=10000.0, eps=1e-5):
    from llmlab.attention import rope_cache

    B, T, C = x.shape
    d = C // n_head
    W = {name.split(".")[-2]: w for name, w in params.items()}

    def heads(t):  # (B, T, C) -> (B, n_head, T, d)
        return t.reshape(B, T, n_head, d).permute(0, 2, 1, 3)

    def rotate(t, cos, sin):
        return t * cos + torch.cat([-t[..., d // 2:], t[..., : d // 2]], dim=-1) * sin

    h = F.rms_norm(x, (C,), params["input_layernorm.weight"], eps)
    q, k, v = (heads(torch.einsum("btc,oc->bto", h, W[n])) for n in ("q_proj", "k_proj", "v_proj"))
    cos, sin = (t.to(x.dtype) for t in rope_cache(T, d, rope_theta))
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
    y = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B, T, C)
    x = x + y @ W["o_proj"].T
    h = F.rms_norm(x, (C,), params["post_attention_layernorm.weight"], eps)
    return x + (F.silu(h @ W["gate_proj"].T) * (h @ W["up_proj"].T)) @ W["down_proj"].T
"""),
    # learning-rate schedule
    tweak("lr-schedule", "no-warmup", "    if step < warmup_steps:\n        return max_lr * (step + 1) / warmup_steps\n", "",
          "(step - warmup_steps) / (decay_steps - warmup_steps)", "step / decay_steps", words="there is no warmup"),
    tweak("lr-schedule", "warmup-off-by-one", "max_lr * (step + 1) / warmup_steps", "max_lr * step / warmup_steps",
          words="off by one"),
    tweak("lr-schedule", "linear-decay", "min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)",
          "max_lr - progress * (max_lr - min_lr)", words="decays linearly"),
    tweak("lr-schedule", "progress-from-step-0", "(step - warmup_steps) / (decay_steps - warmup_steps)",
          "step / decay_steps", words="counts from step 0"),
    tweak("lr-schedule", "progress-over-decay-steps", "(step - warmup_steps) / (decay_steps - warmup_steps)",
          "(step - warmup_steps) / decay_steps", words="divides by decay_steps"),
    tweak("lr-schedule", "float32-tensor", "return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)",
          "return min_lr + 0.5 * (1.0 + torch.cos(torch.tensor(math.pi * progress))) * (max_lr - min_lr)",
          words="return a Python float"),
    Answer("lr-schedule", "clamped-progress", """
def lr_at(step, max_lr, min_lr, warmup_steps, decay_steps):
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    span = max(decay_steps - warmup_steps, 1)
    progress = min(max((step - warmup_steps) / span, 0.0), 1.0)
    return min_lr + (max_lr - min_lr) * (math.cos(math.pi * progress) + 1) / 2
""", words="from decay_steps on, min_lr"),
    Answer("lr-schedule", "piecewise", """
def lr_at(step, max_lr, min_lr, warmup_steps, decay_steps):
    if step >= decay_steps:
        return min_lr
    if step < warmup_steps:
        return (step + 1) * max_lr / warmup_steps
    t = (step - warmup_steps) / (decay_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * math.cos(math.pi * t / 2) ** 2
"""),
    Answer("lr-schedule", "float64-tensor", """
def lr_at(step, max_lr, min_lr, warmup_steps, decay_steps):
    if step < warmup_steps:
        return (step + 1) / warmup_steps * max_lr
    if step >= decay_steps:
        return float(min_lr)
    t = torch.tensor((step - warmup_steps) / (decay_steps - warmup_steps), dtype=torch.float64)
    return float(min_lr + (max_lr - min_lr) * 0.5 * (1 + torch.cos(torch.pi * t)))
"""),
    # gradient accumulation
    tweak("grad-accum", "sum", "g[name] * (n / total)", "g[name]", words="adds the micro-batch gradients"),
    tweak("grad-accum", "plain-mean", "g[name] * (n / total)", "g[name] / len(sizes)", words="a plain mean"),
    tweak("grad-accum", "weighted-sum-not-divided", "g[name] * (n / total)", "g[name] * n", words="not the gradient of the mean loss"),
    Answer("grad-accum", "in-place", """
def accumulate(micro_grads, sizes):
    total = sum(sizes)
    out = micro_grads[0]
    for name in out:
        out[name] *= sizes[0] / total
        for g, n in zip(micro_grads[1:], sizes[1:]):
            out[name] += g[name] * (n / total)
    return out
""", words="modifies micro_grads[0]"),
    Answer("grad-accum", "loop", """
def accumulate(micro_grads, sizes):
    total = sum(sizes)
    out = {}
    for g, n in zip(micro_grads, sizes):
        for name, t in g.items():
            out[name] = out.get(name, 0) + t * n / total
    return out
"""),
    Answer("grad-accum", "stack", """
def accumulate(micro_grads, sizes):
    w = torch.tensor(sizes, dtype=torch.float64)
    w = w / w.sum()
    out = {}
    for name in micro_grads[0]:
        stacked = torch.stack([g[name] for g in micro_grads])  # (k, ...)
        out[name] = torch.tensordot(w.to(stacked.dtype), stacked, dims=1)
    return out
"""),
    # sampling distribution
    tweak("sample", "multiplies-by-temperature", "logits = logits / temperature", "logits = logits * temperature",
          words="multiplies by the temperature"),
    tweak("sample", "top-k-ignored", "    if top_k is not None:\n", "    if False:\n", words="top_k is ignored"),
    tweak("sample", "exactly-k", "kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]  # (..., 1)\n"
          "        logits = logits.masked_fill(logits < kth, float(\"-inf\"))",
          "keep = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).indices\n"
          "        logits = torch.full_like(logits, float(\"-inf\")).scatter(-1, keep, logits.gather(-1, keep))",
          words="keeps exactly k tokens"),
    tweak("sample", "greedy-as-tiny-temperature", "    if temperature == 0:\n        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).to(logits.dtype)\n"
          "    logits = logits / temperature", "    logits = logits / max(temperature, 1e-8)", words="a tiny temperature"),
    tweak("sample", "no-softmax", "return torch.softmax(logits, dim=-1)", "return logits", words="rows do not sum to 1"),
    Answer("sample", "sort-and-where", """
def next_token_probs(logits, temperature, top_k=None):
    if temperature == 0:
        first = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits).scatter(-1, first, 1.0)
    z = logits / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = z.sort(dim=-1, descending=True).values[..., top_k - 1 : top_k]
        z = torch.where(z >= kth, z, torch.full_like(z, -math.inf))
    e = torch.exp(z - z.amax(dim=-1, keepdim=True))
    return e / e.sum(dim=-1, keepdim=True)
"""),
    Answer("sample", "kthvalue", """
def next_token_probs(logits, temperature, top_k=None):
    V = logits.shape[-1]
    if temperature == 0:
        return torch.eye(V, dtype=logits.dtype)[logits.argmax(-1)]
    z = logits / temperature
    if top_k is not None:
        kth = torch.kthvalue(z, V - min(top_k, V) + 1, dim=-1, keepdim=True).values
        z = z.masked_fill(z < kth, float("-inf"))
    return F.softmax(z, dim=-1)
"""),
    # perplexity
    tweak("perplexity", "mean-nll", "math.exp(total_nll / n_tokens)", "total_nll / n_tokens", words="gives the mean NLL"),
    tweak("perplexity", "exp-of-total", "math.exp(total_nll / n_tokens)", "math.exp(total_nll)", words="exponentiate the MEAN"),
    tweak("perplexity", "base-2", "math.exp(total_nll / n_tokens)", "2 ** (total_nll / n_tokens)", words="uses base 2"),
    tweak("perplexity", "float32-tensor", "math.exp(total_nll / n_tokens)", "torch.exp(torch.tensor(total_nll / n_tokens))",
          words="returns a torch.float32 tensor"),
    Answer("perplexity", "e-to-the-power", """
def perplexity(total_nll, n_tokens):
    return math.e ** (total_nll / n_tokens)
"""),
    Answer("perplexity", "float64-tensor", """
def perplexity(total_nll, n_tokens):
    return torch.tensor(total_nll, dtype=torch.float64).div(n_tokens).exp().item()
"""),
]

(test_every_exercise_has_four_mistakes_and_two_right_answers, test_check_names_the_mistake,
 test_composite_check_names_the_earlier_function, graded,
 test_grader_prices_it_and_agrees_with_the_check) = suite("02-pretraining", ANSWERS)
