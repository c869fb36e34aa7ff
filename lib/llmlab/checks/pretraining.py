"""Checks for lab 2 (pretraining). These exercises may build on the library (the block uses
`llmlab.attention`), so calls only turn errors into messages; the grader refuses ready-made answers."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from llmlab.checks._core import (as_float, call, close, expect_tensor, fail, max_err, ok, randn, shape_of, snapshot,
                                 unchanged, wrong_number)
from llmlab.i18n import _, N_

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
            fail("merge", _("returns {type}; expected a list of ints").format(type=type(out).__name__))
        out, want = list(out), tok.merge(ids, pair, new_id)
        if out == want:
            continue
        shown = f"merge({ids[:12]}{'...' if len(ids) > 12 else ''}, {pair}, {new_id})"
        if len(out) == len(ids):
            fail("merge", _("{shown} keeps the length: a merged pair of two ids must become ONE id").format(shown=shown))
        if ids and out == want[:-1] and want[-1] == ids[-1]:
            fail("merge", _("{shown}: the last id is dropped; it has no right neighbour, but it still belongs "
                            "to the output").format(shown=shown))
        if pair[0] == pair[1] and len(out) < len(want):
            fail("merge", _("{shown}: overlapping occurrences — once a pair is merged, its second id is used up").format(shown=shown))
        i = next((i for i, (a, b) in enumerate(zip(out, want)) if a != b), min(len(out), len(want)))
        fail("merge", _("{shown} gives {out}{value}: it goes wrong at index {i}; scan left to right, turn each "
                        "occurrence of the pair into new_id and keep every other id as it is").format(shown=shown, out=out[:12], value='...' if len(out) > 12 else '', i=i))
    for ids in ([1, 2, 3, 1, 2], [3, 4, 1, 2], [9, 9, 9, 1, 9, 9], [7, 1, 7, 1, 0, 2, 0, 2]):
        out = call("most_frequent_pair", pair_fn, list(ids))
        if not isinstance(out, (list, tuple)) or len(out) != 2:
            fail("most_frequent_pair", _("returns {out!r}; expected a pair (left id, right id)").format(out=out))
        out = tuple(int(i) for i in out)
        want = tok.most_frequent_pair(tok.pair_counts(ids))
        if out != want:
            counts = tok.pair_counts(ids)
            if out in counts and counts[out] == counts[want]:
                fail("most_frequent_pair", _("on {ids}: {out} ties with another pair; break ties by the "
                                             "smallest pair").format(ids=ids, out=out))
            fail("most_frequent_pair", _("on {ids}: {out} is not the most frequent adjacent pair").format(ids=ids, out=out))
    ok(_("bpe: merges left to right without overlaps, picks the most frequent pair with the smallest on ties"))


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
        fail(name, _("returns {type}; expected a scalar tensor").format(type=type(out).__name__))
    if out.dim() != 0:
        fail(name, _("returns shape {shape_of}; expected a scalar (the mean over positions)").format(shape_of=shape_of(out)))
    want = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1))
    if close(out, want, 1e-10):
        ok(_("causal LM loss: shifted targets, mean over the B x (T-1) predictions"))
        return
    if close(out, F.cross_entropy(logits.reshape(-1, V), tokens.reshape(-1)), 1e-10):
        fail(name, _("scores each position against its OWN token; position t must predict token t + 1"))
    if close(out, F.cross_entropy(logits[:, 1:].reshape(-1, V), tokens[:, :-1].reshape(-1)), 1e-10):
        fail(name, _("shifted the wrong way: the logits at position t predict tokens[:, t + 1]"))
    if close(out, want * B * (T - 1), 1e-8):
        fail(name, _("returns the sum; the loss is the mean over the predictions"))
    fail(name, _("differs from the reference (max |error| {max_err:.2e})").format(max_err=max_err(out, want)))


# ----------------------------------------------------------------------------------------
# One transformer block as a function


def _block_variant(x: Tensor, p: dict, n_head: int, theta: float = 10000.0, eps: float = 1e-5, *,
                   norm: str = "rms", post_norm: bool = False, no_residual: str = "", causal: bool = True,
                   scale: float | str | None = None, rope: bool = True, interleave: bool = False,
                   mlp: str = "swiglu") -> Tensor:
    """The Llama block written out, or with one deliberate mistake, to recognise it in a student's output."""
    from llmlab.attention import apply_rotary, merge_heads, rope_cache, split_heads

    B, T, C = x.shape
    hd = C // n_head

    def normalize(h: Tensor, w: Tensor) -> Tensor:
        if norm == "layer":
            return F.layer_norm(h, (C,), w, None, eps)
        unit = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return unit if norm == "unweighted" else w * unit

    split = (lambda t: t.view(B, T, hd, n_head).permute(0, 3, 1, 2)) if interleave else (lambda t: split_heads(t, n_head))
    merge = (lambda t: t.permute(0, 2, 3, 1).reshape(B, T, C)) if interleave else merge_heads

    def attn(h: Tensor) -> Tensor:
        q, k, v = (split(h @ p[f"self_attn.{n}_proj.weight"].T) for n in "qkv")  # (B, n_head, T, hd)
        if rope:
            cos, sin = (t.to(x.dtype) for t in rope_cache(T, hd, theta))
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        factor = {None: hd ** -0.5, "n_embd": C ** -0.5}.get(scale, scale)  # type: ignore[arg-type]
        scores = q @ k.transpose(-1, -2) * factor
        if causal:
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        return merge(scores.softmax(-1) @ v) @ p["self_attn.o_proj.weight"].T

    def feed_forward(h: Tensor) -> Tensor:
        gate, up = h @ p["mlp.gate_proj.weight"].T, h @ p["mlp.up_proj.weight"].T
        act = {"swiglu": lambda: F.silu(gate) * up, "gate-only": lambda: F.silu(gate), "up-only": lambda: F.silu(up),
               "gate-on-up": lambda: gate * F.silu(up), "gelu": lambda: F.gelu(gate) * up}[mlp]()
        return act @ p["mlp.down_proj.weight"].T

    for label, branch, w in (("attn", attn, p["input_layernorm.weight"]),
                             ("mlp", feed_forward, p["post_attention_layernorm.weight"])):
        if post_norm:
            x = normalize(x + branch(x), w)
        else:
            x = (0 if no_residual == label else x) + branch(normalize(x, w))
    return x


BOTH_BRANCHES = [  # (variant, what it means): mistakes either branch can make
    (dict(norm="layer"), N_("uses LayerNorm; the Llama block uses RMSNorm: weight * h / sqrt(mean(h^2) + eps), "
                         "no mean subtracted and no bias")),
    (dict(norm="unweighted"), N_("the RMSNorm weight (input_layernorm.weight / post_attention_layernorm.weight) is not applied")),
    (dict(post_norm=True), N_("normalises after the residual add (post-norm); this block is pre-norm: x + branch(norm(x))")),
]
NO_RESIDUAL = N_("the residual connection is missing: the branch's output is ADDED to x")
ATTENTION_BRANCH = [
    (dict(no_residual="attn"), NO_RESIDUAL),
    (dict(scale=1.0), N_("the scores are missing the 1/sqrt(head_dim) scale")),
    (dict(scale="n_embd"), N_("the scale uses n_embd; each head's scores are over head_dim = n_embd / n_head")),
    (dict(interleave=True), N_("the head split is wrong: head h owns the contiguous columns h*head_dim .. (h+1)*head_dim - 1 "
                            "(view as (B, T, n_head, head_dim), then swap T and n_head)")),
    (dict(rope=False), N_("ignores positions: rotate q and k with RoPE before the scores")),
]
MLP_BRANCH = [
    (dict(no_residual="mlp"), NO_RESIDUAL),
    (dict(mlp="gate-only"), N_("the MLP is SwiGLU: down(silu(gate(h)) * up(h)); up_proj is missing")),
    (dict(mlp="up-only"), N_("the MLP is SwiGLU: down(silu(gate(h)) * up(h)); the gate (gate_proj) is missing")),
    (dict(mlp="gate-on-up"), N_("SiLU is applied to the wrong branch: silu(gate(h)) * up(h), the activation on gate_proj")),
    (dict(mlp="gelu"), N_("the activation is SiLU (x * sigmoid(x)), not GELU")),
]


def check_block(fn: Callable) -> None:
    """Check transformer_block(x, params, n_head, rope_theta=10000.0, eps=1e-5), one branch at a time."""
    from llmlab.model import GPT, GPTConfig

    name = "transformer_block"
    torch.manual_seed(23)
    C, H, T = 16, 2, 9
    model = GPT(GPTConfig(vocab_size=16, block_size=12, n_layer=1, n_head=H, n_embd=C)).double().eval()
    block = model.layers[0]
    with torch.no_grad():
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.copy_(1 + 0.5 * torch.randn_like(norm.weight))
    params = {k: v.detach().clone() for k, v in block.state_dict().items()}
    x = torch.randn(2, T, C, dtype=torch.float64) * 2
    with torch.no_grad():
        want = block(x, (model.rope_cos[:T].double(), model.rope_sin[:T].double()))

    def run(p: dict, inp: Tensor = x, *extra: float) -> Tensor:
        return expect_tensor(name, call(name, fn, inp, {k: v.clone() for k, v in p.items()}, H, *extra),
                             shape_of(inp), inp.dtype, f"x {shape_of(inp)}")

    out = run(params)
    later = x.clone()
    later[:, 5:] += torch.randn(2, T - 5, C, dtype=torch.float64)
    if not close(run(params, later)[:, :5], out[:, :5], 1e-8):
        fail(name, _("changing tokens 5.. changes the outputs at positions 0..4: a token sees the future. Mask "
                     "the scores causally (query i sees keys 0..i)"))
    zero = lambda key: {**params, key: torch.zeros_like(params[key])}  # noqa: E731
    for label, p, own in ((_("the attention branch (run with the MLP's down_proj at zero)"), zero("mlp.down_proj.weight"),
                           ATTENTION_BRANCH),
                          (_("the MLP branch (run with the attention's o_proj at zero)"), zero("self_attn.o_proj.weight"),
                           MLP_BRANCH)):
        got = run(p)
        if close(got, _block_variant(x, p, H), 1e-8):
            continue
        for variant, message in BOTH_BRANCHES + own:
            if close(got, _block_variant(x, p, H, **variant), 1e-8):
                fail(name, _("{label}: {message}").format(label=label, message=_(message)))
        fail(name, _("{label} differs from the Llama block's (max |error| {max_err:.2e}); check its norm, "
                     "projections (x @ W.T) and residual").format(label=label, max_err=max_err(got, _block_variant(x, p, H))))
    if not close(out, want, 1e-8):
        fail(name, _("each branch alone is right, but the whole block is not (max |error| {max_err:.2e}): the "
                     "MLP reads the stream AFTER the attention's residual add").format(max_err=max_err(out, want)))
    got = run(params, x, 500.0, 1e-6)
    if not close(got, _block_variant(x, params, H, 500.0, 1e-6), 1e-8):
        if close(got, _block_variant(x, params, H, 10000.0, 1e-6), 1e-8):
            fail(name, _("the rope_theta argument is ignored (tried rope_theta=500.0)"))
        fail(name, _("wrong with rope_theta=500.0 and eps=1e-6: are both arguments used?"))
    ok(_("block: causal pre-norm attention with RoPE and a SwiGLU MLP, matches llmlab.model.Block"))


# ----------------------------------------------------------------------------------------
# Learning-rate schedule


def check_lr_schedule(fn: Callable) -> None:
    """Check lr_at(step, max_lr, min_lr, warmup_steps, decay_steps)."""
    from llmlab import train

    name = "lr_at"
    max_lr, min_lr, warmup, decay = 1e-3, 1e-4, 10, 50
    cfg = train.TrainConfig(max_steps=decay, lr=max_lr, min_lr=min_lr, warmup_steps=warmup)
    raw = [call(name, fn, s, max_lr, min_lr, warmup, decay) for s in range(decay + 5)]
    got = [as_float(name, r) for r in raw]
    want = [train.lr_at(s, cfg) for s in range(decay + 5)]
    bad = [s for s in range(decay + 5) if not math.isclose(got[s], want[s], rel_tol=1e-9, abs_tol=1e-15)]
    if not bad:
        for w, d in ((5, 5), (0, 20), (1, 2)):  # the edges: warmup ends where the decay ends, no warmup
            edge = train.TrainConfig(max_steps=d, lr=max_lr, min_lr=min_lr, warmup_steps=w)
            for t in range(d + 3):
                raw = call(name, fn, t, max_lr, min_lr, w, d)
                if not math.isclose(as_float(name, raw), train.lr_at(t, edge), rel_tol=1e-9, abs_tol=1e-15):
                    wrong_number(name, _("warmup_steps={w}, decay_steps={d}: step {t} (an edge case: ").format(w=w, d=d, t=t)
                                       + (_("no warmup at all)") if w == 0 else _("from decay_steps on, min_lr)")),
                                 raw, as_float(name, raw), train.lr_at(t, edge))
        ok(_("lr schedule: linear warmup to max_lr, half cosine to min_lr, then flat"))
        return
    s = bad[0]
    if s < warmup:
        if math.isclose(got[s], max_lr):
            fail(name, _("step {s} already uses max_lr: there is no warmup").format(s=s))
        if math.isclose(got[s], max_lr * s / warmup, abs_tol=1e-15):
            fail(name, _("step {s}: off by one — step 0 must already take a small step: max_lr * (step + 1) / "
                         "warmup_steps").format(s=s))
        wrong_number(name, _("step {s} (warmup, a linear rise to max_lr)").format(s=s), raw[s], got[s], want[s])
    if s >= decay:
        fail(name, _("step {s} (after decay_steps): {got:.6g}; the schedule stays at min_lr").format(s=s, got=got[s]))
    cosine = lambda progress: min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (max_lr - min_lr)  # noqa: E731
    for progress, why in ((lambda t: t / decay, _("counts from step 0; it starts when the warmup ends: "
                                                  "progress = (step - warmup_steps) / (decay_steps - "
                                                  "warmup_steps)")),
                          (lambda t: (t - warmup) / decay, _("divides by decay_steps; the cosine spans the "
                                                             "decay_steps - warmup_steps steps after the warmup")),
                          (lambda t: (t - warmup + 1) / (decay - warmup), _("is one step ahead: at step "
                                                                            "warmup_steps the progress is 0, so "
                                                                            "the lr is still max_lr"))):
        if all(math.isclose(got[t], cosine(progress(t)), rel_tol=1e-9) for t in range(warmup, decay)):
            fail(name, _("the cosine's progress {why}").format(why=why))
    if all(math.isclose(got[t], max_lr - (t - warmup) / (decay - warmup) * (max_lr - min_lr), rel_tol=1e-9)
           for t in range(warmup, decay)):
        fail(name, _("decays linearly; the decay from max_lr to min_lr is a half cosine"))
    wrong_number(name, _("step {s} (decay)").format(s=s), raw[s], got[s], want[s])


# ----------------------------------------------------------------------------------------
# Gradient accumulation


def check_accumulate(fn: Callable) -> None:
    """Check accumulate(micro_grads, sizes)."""
    name = "accumulate"
    gen = torch.Generator().manual_seed(24)
    grads = [{"w": randn(gen, 3, 2), "b": randn(gen, 3)} for _ in range(3)]
    for sizes in ([4, 4, 4], [8, 8, 2]):
        before = snapshot(grads)
        out = call(name, fn, grads, sizes)
        unchanged(name, before, grads, "micro_grads")
        if not isinstance(out, dict) or set(out) != {"w", "b"}:
            fail(name, _("returns something other than a dict with the same names as each micro-batch's "
                         "gradients"))
        n = sum(sizes)
        want = {k: sum(g[k] * s for g, s in zip(grads, sizes)) / n for k in ("w", "b")}
        if all(close(out[k], want[k], 1e-10) for k in want):
            continue
        total = {k: sum(g[k] for g in grads) for k in want}
        mean = {k: total[k] / len(grads) for k in want}
        if all(close(out[k], total[k], 1e-10) for k in want):
            fail(name, _("adds the micro-batch gradients: each is already a mean, so the sum is k times too big"))
        if all(close(out[k], mean[k], 1e-10) for k in want):
            fail(name, _("sizes {sizes}: a plain mean gives a small last micro-batch as much weight as a full "
                         "one; weight each by its number of examples").format(sizes=sizes))
        fail(name, _("sizes {sizes}: not the gradient of the mean loss over the whole batch").format(sizes=sizes))
    ok(_("accumulate: size-weighted mean of micro-batch gradients = the gradient of the whole batch"))


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
    """Check next_token_probs(logits, temperature, top_k=None), ties included."""
    name = "next_token_probs"
    gen = torch.Generator().manual_seed(25)
    logits = randn(gen, 3, 10) * 2
    logits[2, [1, 4, 7]] = logits[2].max() + 1  # a three-way tie for the top: top_k=2 keeps all three
    fourth = logits[1].topk(4).indices[-1]
    logits[1, fourth] = logits[1].topk(3).values[-1]  # a tie at the 3rd largest: top_k=3 keeps four
    for temperature, top_k in ((1.0, None), (0.5, None), (2.0, 3), (1.0, 1), (0.0, None), (0.7, 10), (1.0, 2)):
        args = f"temperature={temperature}, top_k={top_k}"
        out = expect_tensor(name, call(name, fn, logits, temperature, top_k), (3, 10), logits.dtype,
                             _("logits (3, 10), {args}").format(args=args))
        want = _reference_probs(logits, temperature, top_k)
        if close(out, want, 1e-10):
            continue
        if not torch.allclose(out.sum(-1), torch.ones(3, dtype=out.dtype), atol=1e-8):
            fail(name, _("{args}: rows do not sum to 1; return probabilities (softmax at the end)").format(args=args))
        if top_k is not None and close(out, _reference_probs(logits, temperature, None), 1e-10):
            fail(name, _("{args}: top_k is ignored; every token outside the k likeliest must get probability 0").format(args=args))
        if top_k is not None and temperature and bool(((out > 0).sum(-1) == top_k).all()) \
                and bool(((want > 0).sum(-1) > top_k).any()):
            fail(name, _("{args}: keeps exactly k tokens where several tie at the k-th largest logit; keep "
                         "every token whose logit is >= the k-th largest (ties all stay), e.g. compare with "
                         "topk's last value").format(args=args))
        if temperature == 0 and close(out, _reference_probs(logits / 1e-3, 1.0, None), 1e-6):
            fail(name, _("temperature=0 with a tie for the top: the probability is split between the tied "
                         "tokens (a tiny temperature does that); greedy decoding is one-hot on the first argmax"))
        if temperature and close(out, _reference_probs(logits * temperature * temperature, temperature, top_k), 1e-10):
            fail(name, _("{args}: multiplies by the temperature; divide the logits by it").format(args=args))
        if temperature == 0:
            fail(name, _("temperature=0 is greedy decoding: probability 1 on the argmax, 0 elsewhere"))
        fail(name, _("{args}: differs from the reference (max |error| {max_err:.2e})").format(args=args, max_err=max_err(out, want)))
    ok(_("sampling: temperature, top-k and greedy all give the right distribution"))


# ----------------------------------------------------------------------------------------
# Perplexity


def check_perplexity(fn: Callable) -> None:
    """Check perplexity(total_nll, n_tokens)."""
    name = "perplexity"
    for total, n in ((0.0, 10), (10 * math.log(50), 10), (123.4, 57), (3.0, 1)):
        raw = call(name, fn, total, n)
        out = as_float(name, raw)
        want = math.exp(total / n)
        if math.isclose(out, want, rel_tol=1e-9):
            continue
        if math.isclose(out, total / n, rel_tol=1e-9):
            fail(name, _("({total:.4g}, {n}) gives the mean NLL; perplexity is its exponential").format(total=total, n=n))
        if n > 1 and math.isclose(out, 2 ** (total / n), rel_tol=1e-9):
            fail(name, _("({total:.4g}, {n}) uses base 2; the NLL is in nats (natural log), so perplexity = "
                         "e^(mean NLL)").format(total=total, n=n))
        if math.isclose(out, math.exp(total), rel_tol=1e-9):
            fail(name, _("({total:.4g}, {n}): exponentiate the MEAN negative log-likelihood per token").format(total=total, n=n))
        wrong_number(name, f"({total:.4g}, {n})", raw, out, want)
    ok(_("perplexity: exp of the mean negative log-likelihood per token"))
