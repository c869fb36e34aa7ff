"""Lab 1 (attention): the usual mistakes of each exercise, and right answers written otherwise."""
from __future__ import annotations

from catalogue import Answer, suite, tweak

ANSWERS = [
    # scaled dot-product attention
    tweak("sdpa", "no-scale", " / math.sqrt(d)  #", "  #", words="missing the 1/sqrt(d) scale"),
    tweak("sdpa", "divided-by-d", "/ math.sqrt(d)", "/ d", words="divided by d"),
    tweak("sdpa", "softmax-over-queries", "torch.softmax(scores, dim=-1)", "torch.softmax(scores, dim=-2)",
          words="softmax over the wrong axis"),
    tweak("sdpa", "mask-inverted", "masked_fill(~mask,", "masked_fill(mask,", words="wrong way round"),
    tweak("sdpa", "mask-filled-with-zero", 'float("-inf")', "0.0", words="still get weight"),
    tweak("sdpa", "nan-rows", "    weights = torch.nan_to_num(weights)", "", words="NaN"),
    tweak("sdpa", "mask-after-softmax", "scores = scores.masked_fill(~mask, float(\"-inf\"))", "pass",
          "    weights = torch.nan_to_num(weights)", "    weights = weights if mask is None else weights * mask",
          words="no longer sum to 1"),
    Answer("sdpa", "einsum-and-where", """
def scaled_dot_product_attention(q, k, v, mask=None):
    scores = torch.einsum("...id,...jd->...ij", q, k) / q.shape[-1] ** 0.5
    if mask is None:
        return torch.einsum("...ij,...jd->...id", scores.softmax(-1), v)
    scores = torch.where(mask, scores, torch.finfo(scores.dtype).min)
    weights = scores.softmax(-1) * mask  # a fully hidden row becomes zeros
    return torch.einsum("...ij,...jd->...id", weights, v)
"""),
    Answer("sdpa", "softmax-by-hand", """
def scaled_dot_product_attention(q, k, v, mask=None):
    scores = torch.matmul(q, k.transpose(-1, -2)) * (1.0 / math.sqrt(q.size(-1)))
    if mask is not None:
        scores = scores.masked_fill(mask.logical_not(), -math.inf)
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    e = torch.exp(scores - top)
    total = e.sum(dim=-1, keepdim=True)
    return torch.matmul(e / torch.where(total > 0, total, torch.ones_like(total)), v)
"""),
    # masks
    tweak("masks", "float-causal", "torch.ones(T, T, dtype=torch.bool)", "torch.ones(T, T)", words="bool tensors"),
    tweak("masks", "future", "torch.tril(", "torch.triu(", words="not to the future"),
    tweak("masks", "no-diagonal", "torch.tril(torch.ones(T, T, dtype=torch.bool))",
          "torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal=-1)", words="attend to itself"),
    tweak("masks", "padding-2d", "return real[:, None, None, :]", "return real", words="two singleton axes"),
    tweak("masks", "padding-one-too-many", "< lengths[:, None]", "<= lengths[:, None]", words="one position too many"),
    tweak("masks", "padding-inverted", "return real[:, None, None, :]", "return ~real[:, None, None, :]",
          words="inverted"),
    Answer("masks", "comparisons", """
def causal_mask(T):
    i = torch.arange(T)
    return i[None, :] <= i[:, None]
"""),
    Answer("masks", "loops", """
def causal_mask(T):
    m = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        m[i, : i + 1] = True
    return m


def padding_mask(lengths, T):
    m = torch.zeros(len(lengths), 1, 1, T, dtype=torch.bool)
    for b, n in enumerate(lengths.tolist()):
        m[b, 0, 0, :n] = True
    return m
"""),
    # heads
    tweak("heads", "no-transpose", "x.view(B, T, n_heads, D // n_heads).transpose(1, 2)",
          "x.view(B, T, n_heads, D // n_heads)", words="before time"),
    tweak("heads", "interleaved", "x.view(B, T, n_heads, D // n_heads).transpose(1, 2)",
          "x.view(B, T, D // n_heads, n_heads).permute(0, 3, 1, 2)", words="wrong order"),
    tweak("heads", "straight-reshape", "x.view(B, T, n_heads, D // n_heads).transpose(1, 2)",
          "x.reshape(B, n_heads, T, D // n_heads)", words="mixes different tokens"),
    tweak("heads", "merge-view", "x.transpose(1, 2).reshape(B, T, H * d)", "x.transpose(1, 2).view(B, T, H * d)",
          words="no longer contiguous"),
    tweak("heads", "merge-straight", "x.transpose(1, 2).reshape(B, T, H * d)", "x.reshape(B, T, H * d)",
          words="move the heads axis back"),
    Answer("heads", "reshape-permute", """
def split_heads(x, n_heads):
    return x.reshape(x.shape[0], x.shape[1], n_heads, -1).permute(0, 2, 1, 3)


def merge_heads(x):
    return x.permute(0, 2, 1, 3).flatten(2)
"""),
    Answer("heads", "chunks-and-cat", """
def split_heads(x, n_heads):
    return torch.stack(x.chunk(n_heads, dim=-1), dim=1)


def merge_heads(x):
    return torch.cat(x.unbind(dim=1), dim=-1)
"""),
    # multi-head attention
    tweak("mha", "x-at-W", "F.linear(x, w_q, b_q)", "x @ w_q + b_q", "F.linear(x, w_k, b_k)", "x @ w_k + b_k",
          "F.linear(x, w_v, b_v)", "x @ w_v + b_v", "F.linear(merge_heads(y), w_o, b_o)", "merge_heads(y) @ w_o + b_o",
          words="y = x @ W.T + b"),
    tweak("mha", "no-out-proj", "F.linear(merge_heads(y), w_o, b_o)", "merge_heads(y)", words="output projection"),
    tweak("mha", "no-biases", "F.linear(x, w_q, b_q)", "F.linear(x, w_q)", "F.linear(x, w_k, b_k)", "F.linear(x, w_k)",
          "F.linear(x, w_v, b_v)", "F.linear(x, w_v)", "F.linear(merge_heads(y), w_o, b_o)", "F.linear(merge_heads(y), w_o)",
          words="biases are ignored"),
    tweak("mha", "one-head", "scaled_dot_product_attention(q, k, v, mask)",
          "split_heads(scaled_dot_product_attention(merge_heads(q)[:, None], merge_heads(k)[:, None], "
          "merge_heads(v)[:, None], mask)[:, 0], n_heads)", words="single-head"),
    tweak("mha", "mask-dropped", "scaled_dot_product_attention(q, k, v, mask)", "scaled_dot_product_attention(q, k, v)",
          words="the mask is ignored"),
    Answer("mha", "fused-qkv", """
def multi_head_attention(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, n_heads, mask=None):
    zero = torch.zeros(x.shape[-1], dtype=x.dtype)
    w = torch.cat([w_q, w_k, w_v])
    b = torch.cat([zero if t is None else t for t in (b_q, b_k, b_v)])
    q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
    y = scaled_dot_product_attention(*(split_heads(t, n_heads) for t in (q, k, v)), mask)
    return F.linear(merge_heads(y), w_o, b_o)
"""),
    Answer("mha", "one-head-at-a-time", """
def multi_head_attention(x, w_q, b_q, w_k, b_k, w_v, b_v, w_o, b_o, n_heads, mask=None):
    def project(t, w, b):
        return t @ w.T if b is None else t @ w.T + b

    d = x.shape[-1] // n_heads
    q, k, v = project(x, w_q, b_q), project(x, w_k, b_k), project(x, w_v, b_v)
    heads = []
    for h in range(n_heads):
        cols = slice(h * d, (h + 1) * d)
        m = None if mask is None else (mask if mask.dim() < 3 else mask[:, min(h, mask.shape[1] - 1)] if mask.dim() == 4 else mask)
        heads.append(scaled_dot_product_attention(q[..., cols], k[..., cols], v[..., cols], m))
    return project(torch.cat(heads, dim=-1), w_o, b_o)
"""),
    # sinusoidal positions
    tweak("sinusoidal", "concatenated", "pe = torch.zeros(T, d)\n    pe[:, 0::2] = torch.sin(angle)\n    pe[:, 1::2] = torch.cos(angle)",
          "pe = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)", words="interleave"),
    tweak("sinusoidal", "swapped", "pe[:, 0::2] = torch.sin(angle)\n    pe[:, 1::2] = torch.cos(angle)",
          "pe[:, 0::2] = torch.cos(angle)\n    pe[:, 1::2] = torch.sin(angle)", words="swapped"),
    tweak("sinusoidal", "frequencies-without-2", "torch.arange(0, d, 2, dtype=torch.float32) / d",
          "torch.arange(0, d // 2, dtype=torch.float32) / d", words="wrong frequencies"),
    tweak("sinusoidal", "transposed", "    return pe", "    return pe.T", words="one row per position"),
    tweak("sinusoidal", "positions-from-one", "torch.arange(T, dtype=torch.float32)", "torch.arange(1, T + 1, dtype=torch.float32)",
          words="row 0 (position 0)"),
    Answer("sinusoidal", "math-loops", """
def sinusoidal_positions(T, d):
    table = [[0.0] * d for _ in range(T)]
    for p in range(T):
        for i in range(d // 2):
            angle = p / 10000 ** (2 * i / d)
            table[p][2 * i], table[p][2 * i + 1] = math.sin(angle), math.cos(angle)
    return torch.tensor(table)
"""),
    Answer("sinusoidal", "stack-exp-log", """
def sinusoidal_positions(T, d):
    inv_freq = torch.exp(-math.log(10000.0) * torch.arange(0, d, 2).float() / d)
    angle = torch.outer(torch.arange(T).float(), inv_freq)
    return torch.stack([angle.sin(), angle.cos()], dim=-1).reshape(T, d)
"""),
    # RoPE
    tweak("rope", "adjacent-pairs", "x1, x2 = x[..., :h], x[..., h:]\n    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)",
          "x1, x2 = x[..., 0::2], x[..., 1::2]\n    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)",
          words="adjacent pairs"),
    tweak("rope", "wrong-way", "x1 * cos - x2 * sin, x2 * cos + x1 * sin", "x1 * cos + x2 * sin, x2 * cos - x1 * sin",
          words="rotates the wrong way"),
    tweak("rope", "positions-ignored", "positions.to(torch.float64)[:, None]",
          "torch.arange(x.shape[-2], dtype=torch.float64)[:, None]", words="`positions` is ignored"),
    tweak("rope", "frequencies", "torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim",
          "torch.arange(0, h, dtype=torch.float64) / head_dim", words="wrong frequencies"),
    tweak("rope", "mirrored-pairs", "x1, x2 = x[..., :h], x[..., h:]\n    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)",
          "x1, x2 = x[..., :h], x[..., h:].flip(-1)\n    return torch.cat([x1 * cos - x2 * sin, (x2 * cos + x1 * sin).flip(-1)], dim=-1)",
          words="pairs dimension"),
    tweak("rope", "base-ignored", "theta = base **", "theta = 10000.0 **", words="`base` argument"),
    Answer("rope", "rotate-half-helper", """
def apply_rope(x, positions, base=10000.0):
    d = x.shape[-1]
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.cat([positions.double()[:, None] * inv_freq] * 2, dim=-1)  # (T, d)
    rotated = torch.cat([-x[..., d // 2:], x[..., : d // 2]], dim=-1)
    return x * angle.cos().to(x.dtype) + rotated * angle.sin().to(x.dtype)
"""),
    Answer("rope", "complex-numbers", """
def apply_rope(x, positions, base=10000.0):
    h = x.shape[-1] // 2
    theta = base ** (-2 * torch.arange(h, dtype=torch.float64) / (2 * h))
    turn = torch.polar(torch.ones(len(positions), h, dtype=torch.float64), positions.double()[:, None] * theta)
    z = torch.complex(x[..., :h].double(), x[..., h:].double()) * turn
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)
"""),
    # memory
    tweak("memory", "counted-twice", "return batch *", "return 2 * batch *", words="counts the scores twice"),
    tweak("memory", "bits", "return batch *", "return 8 * batch *", words="counts bits"),
    tweak("memory", "no-heads", "batch * n_heads * T", "batch * T", words="forgets the heads"),
    tweak("memory", "linear-in-T", "T * T *", "T *", words="grows linearly with T"),
    tweak("memory", "a-string", "return batch * n_heads * T * T * bytes_per_element",
          "return f'{batch * n_heads * T * T * bytes_per_element} bytes'", words="expected an int"),
    Answer("memory", "math-prod", """
def attention_memory_bytes(batch, n_heads, T, bytes_per_element=4):
    return math.prod([batch, n_heads, T, T, bytes_per_element])
"""),
    Answer("memory", "from-a-tensor", """
def attention_memory_bytes(batch, n_heads, T, bytes_per_element=4):
    return int(torch.tensor([batch, n_heads, T, T, bytes_per_element], dtype=torch.int64).prod())
"""),
    # a real model's head
    tweak("bert-probs", "no-padding-mask", "    scores = scores.masked_fill(~real_keys, float(\"-inf\"))\n", "",
          words="padding tokens"),
    tweak("bert-probs", "no-scale", " / math.sqrt(q.shape[-1])", "", words="missing the 1/sqrt(d_head) scale"),
    tweak("bert-probs", "hidden-size-scale", "math.sqrt(q.shape[-1])", "math.sqrt(hidden_states.shape[-1])",
          words="uses the hidden size"),
    tweak("bert-probs", "x-at-W", "F.linear(hidden_states, w_q, b_q)", "hidden_states @ w_q + b_q",
          "F.linear(hidden_states, w_k, b_k)", "hidden_states @ w_k + b_k", words="y = x @ W.T + b"),
    tweak("bert-probs", "wrong-head", "n_heads)[:, head]  # (B", "n_heads)[:, head - 1]  # (B",
          "k = split_heads(F.linear(hidden_states, w_k, b_k), n_heads)[:, head]",
          "k = split_heads(F.linear(hidden_states, w_k, b_k), n_heads)[:, head - 1]", words="asked for head"),
    Answer("bert-probs", "columns-of-the-head", """
def bert_attention_probs(hidden_states, w_q, b_q, w_k, b_k, n_heads, head, attention_mask):
    d = hidden_states.shape[-1] // n_heads
    rows = slice(head * d, (head + 1) * d)
    q = hidden_states @ w_q[rows].T + b_q[rows]  # only this head's projection
    k = hidden_states @ w_k[rows].T + b_k[rows]
    scores = torch.einsum("bid,bjd->bij", q, k) / d ** 0.5
    scores = scores + (1.0 - attention_mask[:, None, :].to(scores.dtype)) * torch.finfo(scores.dtype).min
    return scores.softmax(dim=-1)
"""),
    Answer("bert-probs", "via-own-sdpa", """
def bert_attention_probs(hidden_states, w_q, b_q, w_k, b_k, n_heads, head, attention_mask):
    q = split_heads(F.linear(hidden_states, w_q, b_q), n_heads)[:, head]
    k = split_heads(F.linear(hidden_states, w_k, b_k), n_heads)[:, head]
    eye = torch.eye(q.shape[-2], dtype=q.dtype).expand(q.shape[0], -1, -1)
    return scaled_dot_product_attention(q, k, eye, attention_mask.bool()[:, None, :])  # attending over I gives the weights
"""),
]

BLAMES = [("sdpa/no-scale", "mha", "uses your scaled_dot_product_attention"),
     ("heads/interleaved", "mha", "uses your split_heads / merge_heads"),
     ("heads/no-transpose", "bert-probs", "uses your split_heads / merge_heads")]

(test_every_exercise_has_four_mistakes_and_two_right_answers, test_check_names_the_mistake,
 test_composite_check_names_the_earlier_function, graded,
 test_grader_prices_it_and_agrees_with_the_check) = suite("01-attention", ANSWERS, BLAMES)
