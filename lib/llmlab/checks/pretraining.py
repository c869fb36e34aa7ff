"""Checks for lab 2 (pretraining). These exercises may build on the library (the block uses
`llmlab.attention`), so calls only turn errors into messages; the grader refuses ready-made answers."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from llmlab.checks._core import as_float, call, close, expect_tensor, fail, max_err, ok, randn, shape_of

__all__ = ['check_bpe', 'check_clm_loss', 'check_block', 'check_lr_schedule', 'check_accumulate', 'check_next_token_probs', 'check_perplexity']


# ----------------------------------------------------------------------------------------
# Byte-pair encoding


def check_bpe(merge_fn: Callable, pair_fn: Callable) -> None:
    """Check merge(ids, pair, new_id) and most_frequent_pair(ids)."""
    from llmlab import tokenizer as tok

    gen = torch.Generator().manual_seed(21)
    cases = [([1, 2, 3, 1, 2], (1, 2), 9), ([5, 5, 5, 5, 5], (5, 5), 7), ([4], (4, 4), 8), ([], (1, 2), 3)]
    cases += [(torch.randint(0, 4, (40,), generator=gen).tolist(), (1, 2), 256) for _ in range(3)]
    for ids, pair, new_id in cases:
        out = call("merge", merge_fn, list(ids), pair, new_id)
        if isinstance(out, Tensor):
            out = out.tolist()
        if not isinstance(out, (list, tuple)):
            fail("merge", f"returns {type(out).__name__}; expected a list of ints")
        out, want = list(out), tok.merge(ids, pair, new_id)
        if out == want:
            continue
        shown = f"merge({ids[:12]}{'...' if len(ids) > 12 else ''}, {pair}, {new_id})"
        if len(out) == len(ids):
            fail("merge", f"{shown} keeps the length: a merged pair of two ids must become ONE id")
        if pair[0] == pair[1] and len(out) < len(want):
            fail("merge", f"{shown}: overlapping occurrences — once a pair is merged, its second id is used up")
        fail("merge", f"{shown} gives {out[:12]}{'...' if len(out) > 12 else ''}, expected another list")
    for ids in ([1, 2, 3, 1, 2], [3, 4, 1, 2], [9, 9, 9, 1, 9, 9], [7, 1, 7, 1, 0, 2, 0, 2]):
        out = call("most_frequent_pair", pair_fn, list(ids))
        if not isinstance(out, (list, tuple)) or len(out) != 2:
            fail("most_frequent_pair", f"returns {out!r}; expected a pair (left id, right id)")
        out = tuple(int(i) for i in out)
        want = tok.most_frequent_pair(tok.pair_counts(ids))
        if out != want:
            counts = tok.pair_counts(ids)
            if out in counts and counts[out] == counts[want]:
                fail("most_frequent_pair", f"on {ids}: {out} ties with another pair; break ties by the smallest pair")
            fail("most_frequent_pair", f"on {ids}: {out} is not the most frequent adjacent pair")
    ok("bpe: merges left to right without overlaps, picks the most frequent pair with the smallest on ties")


# ----------------------------------------------------------------------------------------
# The causal language-modelling loss


def check_clm_loss(fn: Callable) -> None:
    """Check causal_lm_loss(logits, tokens)."""
    name = "causal_lm_loss"
    gen = torch.Generator().manual_seed(22)
    B, T, V = 3, 7, 11
    logits = randn(gen, B, T, V)
    tokens = torch.randint(0, V, (B, T), generator=gen)
    out = call(name, fn, logits, tokens)
    if not isinstance(out, Tensor):
        fail(name, f"returns {type(out).__name__}; expected a scalar tensor")
    if out.dim() != 0:
        fail(name, f"returns shape {shape_of(out)}; expected a scalar (the mean over positions)")
    want = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
    if close(out, want, 1e-10):
        ok("causal LM loss: shifted targets, mean over the B x (T-1) predictions")
        return
    if close(out, F.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1)), 1e-10):
        fail(name, "scores each position against its OWN token; position t must predict token t + 1")
    if close(out, F.cross_entropy(logits[:, 1:].reshape(-1, V), tokens[:, :-1].reshape(-1)), 1e-10):
        fail(name, "shifted the wrong way: the logits at position t predict tokens[:, t + 1]")
    if close(out, want * B * (T - 1), 1e-8):
        fail(name, "returns the sum; the loss is the mean over the predictions")
    fail(name, f"differs from the reference (max |error| {max_err(out, want):.2e})")


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
    out = expect_tensor(name, call(name, fn, x, params, 2), shape_of(x), x.dtype, f"x {shape_of(x)}")
    if close(out, want, 1e-8):
        ok("block: pre-norm attention with RoPE and a SwiGLU MLP, matches llmlab.model.Block")
        return
    if close(out, no_rope, 1e-8):
        fail(name, "the output ignores positions: rotate q and k with RoPE before the scores")
    if close(out[:, 0], want[:, 0], 1e-8):
        fail(name, "the first token is right but later ones are not: check the causal mask, "
                    "the head split, or the rotation of positions > 0")
    if close(out, want - x, 1e-8):
        fail(name, "the residual connections are missing: x = x + attn(...), then x = x + mlp(...)")
    fail(name, f"differs from llmlab.model.Block (max |error| {max_err(out, want):.2e})")


# ----------------------------------------------------------------------------------------
# Learning-rate schedule


def check_lr_schedule(fn: Callable) -> None:
    """Check lr_at(step, max_lr, min_lr, warmup_steps, decay_steps)."""
    from llmlab import train

    name = "lr_at"
    max_lr, min_lr, warmup, decay = 1e-3, 1e-4, 10, 50
    cfg = train.TrainConfig(max_steps=decay, lr=max_lr, min_lr=min_lr, warmup_steps=warmup)
    got = [as_float(name, call(name, fn, s, max_lr, min_lr, warmup, decay)) for s in range(decay + 5)]
    want = [train.lr_at(s, cfg) for s in range(decay + 5)]
    bad = [s for s in range(decay + 5) if not math.isclose(got[s], want[s], rel_tol=1e-9, abs_tol=1e-15)]
    if not bad:
        ok("lr schedule: linear warmup to max_lr, half cosine to min_lr, then flat")
        return
    s = bad[0]
    if s < warmup:
        if math.isclose(got[s], max_lr):
            fail(name, f"step {s} already uses max_lr: there is no warmup")
        if math.isclose(got[s], max_lr * s / warmup, abs_tol=1e-15):
            fail(name, f"step {s}: off by one — step 0 must already take a small step: max_lr * (step + 1) / warmup_steps")
        fail(name, f"step {s} (warmup): {got[s]:.3g}, expected a linear rise to max_lr")
    if s >= decay:
        fail(name, f"step {s} (after decay_steps): {got[s]:.3g}; the schedule stays at min_lr")
    if math.isclose(got[warmup], max_lr) and got[decay - 1] < min_lr + 0.01 * (max_lr - min_lr) and got[s] < want[s]:
        fail(name, f"step {s}: {got[s]:.3g}; a linear decay? The decay is a half cosine")
    fail(name, f"step {s} (decay): {got[s]:.3g}, expected {want[s]:.3g}")


# ----------------------------------------------------------------------------------------
# Gradient accumulation


def check_accumulate(fn: Callable) -> None:
    """Check accumulate(micro_grads, sizes)."""
    name = "accumulate"
    gen = torch.Generator().manual_seed(24)
    grads = [{"w": randn(gen, 3, 2), "b": randn(gen, 3)} for _ in range(3)]
    for sizes in ([4, 4, 4], [8, 8, 2]):
        out = call(name, fn, grads, sizes)
        if not isinstance(out, dict) or set(out) != {"w", "b"}:
            fail(name, "returns something other than a dict with the same names as each micro-batch's gradients")
        n = sum(sizes)
        want = {k: sum(g[k] * s for g, s in zip(grads, sizes)) / n for k in ("w", "b")}
        if all(close(out[k], want[k], 1e-10) for k in want):
            continue
        total = {k: sum(g[k] for g in grads) for k in want}
        mean = {k: total[k] / len(grads) for k in want}
        if all(close(out[k], total[k], 1e-10) for k in want):
            fail(name, "adds the micro-batch gradients: each is already a mean, so the sum is k times too big")
        if all(close(out[k], mean[k], 1e-10) for k in want):
            fail(name, f"sizes {sizes}: a plain mean gives a small last micro-batch as much weight as a "
                        "full one; weight each by its number of examples")
        fail(name, f"sizes {sizes}: not the gradient of the mean loss over the whole batch")
    ok("accumulate: size-weighted mean of micro-batch gradients = the gradient of the whole batch")


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
    logits = randn(gen, 3, 10) * 2
    for temperature, top_k in ((1.0, None), (0.5, None), (2.0, 3), (1.0, 1), (0.0, None), (0.7, 10)):
        args = f"temperature={temperature}, top_k={top_k}"
        out = expect_tensor(name, call(name, fn, logits, temperature, top_k), (3, 10), logits.dtype,
                             f"logits (3, 10), {args}")
        want = _reference_probs(logits, temperature, top_k)
        if close(out, want, 1e-10):
            continue
        if not torch.allclose(out.sum(-1), torch.ones(3, dtype=out.dtype), atol=1e-8):
            fail(name, f"{args}: rows do not sum to 1; return probabilities (softmax at the end)")
        if top_k is not None and close(out, _reference_probs(logits, temperature, None), 1e-10):
            fail(name, f"{args}: top_k is ignored; every token outside the k likeliest must get probability 0")
        if temperature and close(out, _reference_probs(logits * temperature * temperature, temperature, top_k), 1e-10):
            fail(name, f"{args}: multiplies by the temperature; divide the logits by it")
        if temperature == 0:
            fail(name, "temperature=0 is greedy decoding: probability 1 on the argmax, 0 elsewhere")
        fail(name, f"{args}: differs from the reference (max |error| {max_err(out, want):.2e})")
    ok("sampling: temperature, top-k and greedy all give the right distribution")


# ----------------------------------------------------------------------------------------
# Perplexity


def check_perplexity(fn: Callable) -> None:
    """Check perplexity(total_nll, n_tokens)."""
    name = "perplexity"
    for total, n in ((0.0, 10), (10 * math.log(50), 10), (123.4, 57), (3.0, 1)):
        out = as_float(name, call(name, fn, total, n))
        want = math.exp(total / n)
        if math.isclose(out, want, rel_tol=1e-9):
            continue
        if math.isclose(out, total / n, rel_tol=1e-9):
            fail(name, f"({total:.4g}, {n}) gives the mean NLL; perplexity is its exponential")
        if math.isclose(out, math.exp(total), rel_tol=1e-9):
            fail(name, f"({total:.4g}, {n}): exponentiate the MEAN negative log-likelihood per token")
        fail(name, f"({total:.4g}, {n}) gives {out:.6g}, expected another value")
    ok("perplexity: exp of the mean negative log-likelihood per token")
