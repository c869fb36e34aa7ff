"""Lab 5 (serving): the usual mistakes of each exercise, and right answers written otherwise."""
from __future__ import annotations

from catalogue import Answer, suite, tweak

MASK = "attn_mask=key_pos <= query_pos"

ANSWERS = [
    # top-k / top-p
    tweak("filter", "exactly-k", "kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]  # (..., 1)\n"
          "        logits = logits.masked_fill(logits < kth, float(\"-inf\"))",
          "keep = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).indices\n"
          "        logits = torch.full_like(logits, float(\"-inf\")).scatter(-1, keep, logits.gather(-1, keep))",
          words="keeps exactly k tokens"),
    tweak("filter", "k-smallest", "torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:]",
          "torch.topk(-logits, min(top_k, logits.size(-1)), dim=-1).values[..., -1:].neg()",
          "logits.masked_fill(logits < kth,", "logits.masked_fill(logits > kth,", words="k SMALLEST"),
    tweak("filter", "crossing-token-dropped", "mass_before = probs.cumsum(dim=-1) - probs", "mass_before = probs.cumsum(dim=-1)",
          words="the token that crosses top_p is dropped"),
    tweak("filter", "wrong-end", "logits.sort(dim=-1, descending=True)", "logits.sort(dim=-1, descending=False)",
          words="measured from the wrong end"),
    tweak("filter", "top-p-before-top-k", "    if top_k is not None:\n        kth", "    if False:\n        kth",
          "    return logits\n", "    if top_k is not None:\n        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)"
          ".values[..., -1:]\n        logits = logits.masked_fill(logits < kth, float(\"-inf\"))\n    return logits\n",
          words="top-p came before top-k"),
    tweak("filter", "probabilities-returned", "    return logits\n", "    return logits.softmax(dim=-1)\n",
          words="return logits, not probabilities"),
    Answer("filter", "kthvalue-and-loop", """
def filter_logits(logits, top_k=None, top_p=1.0):
    V = logits.shape[-1]
    out = logits.clone()
    if top_k is not None and top_k < V:
        kth = torch.kthvalue(out, V - top_k + 1, dim=-1, keepdim=True).values
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        probs = out.softmax(-1)
        flat_p, flat_out = probs.reshape(-1, V), out.view(-1, V)
        for row in range(flat_p.shape[0]):
            mass = 0.0
            for j in flat_p[row].argsort(descending=True).tolist():
                if mass >= top_p:
                    flat_out[row, j] = float("-inf")
                mass += float(flat_p[row, j])
    return out
"""),
    Answer("filter", "where-and-gather", """
def filter_logits(logits, top_k=None, top_p=1.0):
    if top_k is not None:
        kth = logits.sort(dim=-1, descending=True).values[..., min(top_k, logits.shape[-1]) - 1, None]
        logits = torch.where(logits >= kth, logits, torch.full_like(logits, float("-inf")))
    if top_p < 1.0:
        order = logits.argsort(dim=-1, descending=True)
        p = logits.gather(-1, order).softmax(-1)
        before = torch.cat([torch.zeros_like(p[..., :1]), p.cumsum(-1)[..., :-1]], dim=-1)
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
"""),
    # repetition penalty
    tweak("penalty", "divide-always", "torch.where(values > 0, values / penalty, values * penalty)", "values / penalty",
          words="a negative logit divided by the penalty moves UP"),
    tweak("penalty", "per-occurrence", "seen = torch.unique(context)", "seen = context",
          "out[seen] = torch.where(values > 0, values / penalty, values * penalty)",
          "for i, t in enumerate(seen.tolist()):\n        out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty",
          words="penalised 3 times"),
    tweak("penalty", "in-place", "out = logits.clone()", "out = logits", words="modifies logits in place"),
    tweak("penalty", "every-token", "    values = out[seen]\n    out[seen] = torch.where(values > 0, values / penalty, values * penalty)",
          "    out = torch.where(out > 0, out / penalty, out * penalty)", words="tokens that are not in the context changed"),
    tweak("penalty", "subtracted", "torch.where(values > 0, values / penalty, values * penalty)", "values - penalty",
          words="differs from the reference"),
    Answer("penalty", "mask-and-where", """
def repetition_penalty(logits, context, penalty):
    seen = torch.zeros_like(logits, dtype=torch.bool)
    seen[context] = True
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)
"""),
    Answer("penalty", "python-loop", """
def repetition_penalty(logits, context, penalty):
    out = logits.detach().clone()
    for t in set(context.tolist()):
        z = float(logits[t])
        out[t] = z / penalty if z > 0 else z * penalty
    return out
"""),
    # the KV-cache step
    tweak("kv-cache", "rotated-from-zero", "cos[position:].to(x.dtype), sin[position:].to(x.dtype)",
          "cos[:T].to(x.dtype), sin[:T].to(x.dtype)", words="as if it started at position 0"),
    tweak("kv-cache", "square-causal-mask", MASK, "is_causal=True", words="lines the queries up with the FIRST keys"),
    tweak("kv-cache", "new-tokens-only", "y = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=key_pos <= query_pos)",
          "y = F.scaled_dot_product_attention(q, k, v, is_causal=True)", words="attend only to each other"),
    tweak("kv-cache", "cat-on-heads", "torch.cat([k_cache, k], dim=-2)", "torch.cat([k_cache, k], dim=1)",
          "torch.cat([v_cache, v], dim=-2)", "torch.cat([v_cache, v], dim=1)", words="concatenate along the time axis"),
    tweak("kv-cache", "cache-not-returned", "return merge_heads(y) @ params[\"o_proj.weight\"].T, k_cache, v_cache",
          "return merge_heads(y) @ params[\"o_proj.weight\"].T, k, v", words="holds only the new tokens"),
    tweak("kv-cache", "no-rope", "q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)", "pass", words="no rotary positions"),
    Answer("kv-cache", "by-hand", """
def attention_step(x, params, k_cache, v_cache, n_head, position):
    from llmlab.attention import rope_cache

    B, T, C = x.shape
    d = C // n_head

    def heads(t):
        return t.view(B, T, n_head, d).transpose(1, 2)

    def rotate(t, cos, sin):
        return t * cos + torch.cat((-t[..., d // 2:], t[..., : d // 2]), dim=-1) * sin

    cos, sin = (c[position:position + T].to(x.dtype) for c in rope_cache(position + T, d))
    q = rotate(heads(x @ params["q_proj.weight"].T), cos, sin)
    k = rotate(heads(x @ params["k_proj.weight"].T), cos, sin)
    v = heads(x @ params["v_proj.weight"].T)
    keys, values = torch.cat((k_cache, k), 2), torch.cat((v_cache, v), 2)
    scores = q @ keys.transpose(-1, -2) / d ** 0.5  # (B, n_head, T, position + T)
    hidden = torch.arange(position + T)[None, :] > torch.arange(position, position + T)[:, None]
    y = scores.masked_fill(hidden, float("-inf")).softmax(-1) @ values
    return y.transpose(1, 2).reshape(B, T, C) @ params["o_proj.weight"].T, keys, values
"""),
    Answer("kv-cache", "one-token-at-a-time", """
def attention_step(x, params, k_cache, v_cache, n_head, position):
    from llmlab.attention import apply_rotary, merge_heads, rope_cache, split_heads

    outputs = []
    for t in range(x.shape[1]):
        h = x[:, t:t + 1]
        q, k, v = (split_heads(h @ params[f"{n}_proj.weight"].T, n_head) for n in "qkv")
        cos, sin = rope_cache(position + t + 1, x.shape[-1] // n_head)
        cos, sin = cos[-1:].to(x.dtype), sin[-1:].to(x.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache, v_cache = torch.cat([k_cache, k], dim=2), torch.cat([v_cache, v], dim=2)
        y = F.scaled_dot_product_attention(q, k_cache, v_cache)  # one query sees the whole past
        outputs.append(merge_heads(y) @ params["o_proj.weight"].T)
    return torch.cat(outputs, dim=1), k_cache, v_cache
"""),
    # batching
    tweak("batching", "right-padding", "input_ids[row, T - len(p):] = torch.tensor(p)", "input_ids[row, :len(p)] = torch.tensor(p)",
          words="pads on the right"),
    tweak("batching", "positions-from-column-0", "position_ids[row, T - len(p):] = torch.arange(len(p))",
          "position_ids[row] = torch.arange(T)", words="position_ids count from column 0"),
    tweak("batching", "only-causal", "allowed = causal & attention_mask.bool()[:, None, :]",
          "allowed = causal.expand(attention_mask.size(0), T, T)", "allowed = allowed | torch.eye(T, dtype=torch.bool)",
          "allowed = allowed.clone()", words="only causal"),
    tweak("batching", "no-diagonal", "    allowed = allowed | torch.eye(T, dtype=torch.bool)\n", "",
          words="a padding query now sees no key at all"),
    tweak("batching", "transposed-mask", "return allowed[:, None]", "return allowed.transpose(-1, -2)[:, None]",
          words="rows are queries, columns are keys"),
    tweak("batching", "mask-inverted", "attention_mask[row, T - len(p):] = 1",
          "attention_mask[row, : T - len(p)] = 1", words="1 on real tokens and 0 on padding"),
    Answer("batching", "flip-and-cumsum", """
def pad_batch(prompts, pad_id):
    T = max(map(len, prompts))
    rows = [[pad_id] * (T - len(p)) + list(p) for p in prompts]
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0) * mask
    return torch.tensor(rows), mask, positions


def batch_mask(attention_mask):
    T = attention_mask.shape[-1]
    i = torch.arange(T)
    allowed = (i[None, :] <= i[:, None]) & (attention_mask[:, None, :] == 1)
    return (allowed | (i[None, :] == i[:, None]))[:, None, :, :]
"""),
    Answer("batching", "loops", """
def pad_batch(prompts, pad_id):
    T = max(len(p) for p in prompts)
    ids, mask, pos = [], [], []
    for p in prompts:
        n = T - len(p)
        ids.append([pad_id] * n + p)
        mask.append([0] * n + [1] * len(p))
        pos.append([0] * n + list(range(len(p))))
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64)


def batch_mask(attention_mask):
    B, T = attention_mask.shape
    out = torch.zeros(B, 1, T, T, dtype=torch.bool)
    for b in range(B):
        for i in range(T):
            for j in range(i + 1):
                out[b, 0, i, j] = bool(attention_mask[b, j]) or i == j
    return out
"""),
    # speculative acceptance
    tweak("speculative", "q-over-p", "if not u[i] < p[i, x] / q[i, x]:", "if not u[i] < q[i, x] / p[i, x]:",
          words="accepts with probability q/p"),
    tweak("speculative", "resample-from-p", "return i, (residual / total if total > 0 else p[i])", "return i, p[i]",
          words="the next token comes from p itself"),
    tweak("speculative", "residual-unnormalised", "return i, (residual / total if total > 0 else p[i])", "return i, residual",
          words="not normalised"),
    tweak("speculative", "residual-q-minus-p", "residual = (p[i] - q[i]).clamp(min=0)", "residual = (q[i] - p[i]).clamp(min=0)",
          words="max(0, q - p)"),
    tweak("speculative", "no-bonus-token", "    return k, p[k]", "    return k, p[k - 1]", words="the extra token is drawn from"),
    Answer("speculative", "vectorised", """
def speculative_accept(p, q, draft_tokens, u):
    k = draft_tokens.shape[0]
    rows = torch.arange(k)
    ratio = p[rows, draft_tokens] / q[rows, draft_tokens]
    rejected = (u >= ratio).nonzero()
    if len(rejected) == 0:
        return k, p[k]
    n = int(rejected[0])
    residual = torch.clamp(p[n] - q[n], min=0.0)
    return n, residual / residual.sum() if residual.sum() > 0 else p[n]
"""),
    Answer("speculative", "min-one", """
def speculative_accept(p, q, draft_tokens, u):
    for i, token in enumerate(draft_tokens.tolist()):
        accept = min(1.0, float(p[i, token]) / float(q[i, token]))
        if float(u[i]) >= accept:
            residual = torch.relu(p[i] - q[i])
            return i, residual / residual.sum()
    return len(draft_tokens), p[-1]
"""),
]

(test_every_exercise_has_four_mistakes_and_two_right_answers, test_check_names_the_mistake,
 test_composite_check_names_the_earlier_function, graded,
 test_grader_prices_it_and_agrees_with_the_check) = suite("05-serving", ANSWERS)
