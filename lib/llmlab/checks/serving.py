"""Checks for lab 5 (serving). The reference is `llmlab.generate`, which the student may not call;
on a mismatch each check tries the usual mistakes to name what is wrong."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from llmlab import generate as G
from llmlab.checks._core import call, close, expect_tensor, fail, max_err, ok, randn, shape_of, unchanged
from llmlab.i18n import _

__all__ = ['check_filter_logits', 'check_repetition_penalty', 'check_attention_step', 'check_pad_batch',
           'check_speculative_accept']


def _kept(name: str, out: Tensor) -> Tensor:
    """Which tokens survive a filter: finite entries; fail on NaN or +inf."""
    if torch.isnan(out).any() or torch.isposinf(out).any():
        fail(name, _("returns NaN or +inf; removed tokens are -inf, kept ones keep their logit"))
    return torch.isfinite(out)


# ----------------------------------------------------------------------------------------
# Sampling filters


def _nucleus(logits: Tensor, top_p: float, *, descending: bool = True, crossing: bool = True,
             keep_top: bool = True) -> Tensor:
    """Which tokens a top-p filter keeps, right or with a classic change: sorted the wrong way,
    without the token that crosses top_p, or without always keeping the first sorted token."""
    sorted_p, order = logits.softmax(-1).sort(-1, descending=descending)
    mass = sorted_p.cumsum(-1)
    keep = (mass - sorted_p < top_p) if crossing else (mass <= top_p)
    if keep_top:
        keep[..., 0] = True
    return keep.scatter(-1, order, keep)


def check_filter_logits(fn: Callable) -> None:
    """Check filter_logits(logits, top_k, top_p)."""
    name = "filter_logits"
    gen = torch.Generator().manual_seed(51)
    logits = randn(gen, 4, 40) * 2.5
    sixth = logits[3].topk(6).indices[-1]
    logits[3, sixth] = logits[3].topk(5).values[-1]  # a tie at the 5th largest: top_k=5 keeps six
    for top_k, top_p in ((None, 1.0), (5, 1.0), (1, 1.0), (None, 0.5), (None, 0.9), (8, 0.6), (40, 0.3), (3, 1e-9)):
        args = f"top_k={top_k}, top_p={top_p}"
        out = expect_tensor(name, call(name, fn, logits.clone(), top_k, top_p), (4, 40), logits.dtype,
                            _("logits (4, 40), {args}").format(args=args))
        want = logits if top_k is None else G.top_k_filter(logits, top_k)
        want = G.top_p_filter(want, top_p) if top_p < 1 else want
        kept, want_kept = _kept(name, out), torch.isfinite(want)
        if torch.equal(kept, want_kept):
            if not close(out.masked_fill(~kept, 0), logits.masked_fill(~kept, 0), 1e-12):
                fail(name, _("{args}: the kept tokens' logits changed; only set the removed ones to -inf "
                             "(return logits, not probabilities)").format(args=args))
            continue
        n_kept, n_want = kept.sum(-1).tolist(), want_kept.sum(-1).tolist()
        if top_k is not None and top_p == 1.0:
            if torch.equal(kept, torch.isfinite(G.top_k_filter(-logits, top_k))):
                fail(name, _("{args} keeps the k SMALLEST logits; keep the k largest").format(args=args))
            if all(n == top_k for n in n_kept) and any(n > top_k for n in n_want):
                fail(name, _("{args} keeps exactly k tokens in a row where several tie at the k-th largest "
                             "logit; keep every logit >= the k-th largest (ties all stay), e.g. compare with "
                             "topk's last value").format(args=args))
            fail(name, _("{args} keeps {n_kept} tokens per row, expected {n_want}: keep the logits >= the k-th "
                         "largest").format(args=args, n_kept=n_kept, n_want=n_want))
        if top_k is None or top_k >= 40:
            if any(torch.equal(kept, _nucleus(logits, top_p, crossing=False, keep_top=keep_top)) for keep_top in (True, False)):
                fail(name, _("{args}: the token that crosses top_p is dropped; keep tokens until the kept "
                             "probability reaches top_p (a token stays when the mass of the likelier ones is < "
                             "top_p)").format(args=args))
            if any(torch.equal(kept, _nucleus(logits, top_p, descending=False, crossing=crossing))
                   for crossing in (True, False)):
                fail(name, _("{args}: the nucleus is measured from the wrong end (the least likely tokens); "
                             "sort descending and start from the likeliest token").format(args=args))
        if (kept.sum(-1) == 0).any():
            fail(name, _("{args} removes every token of a row; the likeliest token always stays").format(args=args))
        if top_k is not None and top_p < 1:
            swapped = G.top_k_filter(G.top_p_filter(logits, top_p), top_k)
            if torch.equal(kept, torch.isfinite(swapped)):
                fail(name, _("{args}: top-p came before top-k; filter by top-k first, then take the nucleus of "
                             "the renormalised top-k distribution").format(args=args))
            if torch.equal(kept, torch.isfinite(G.top_k_filter(logits, top_k))):
                fail(name, _("{args}: top_p is ignored when top_k is given").format(args=args))
        fail(name, _("{args} keeps {n_kept} tokens per row, expected {n_want}").format(args=args, n_kept=n_kept, n_want=n_want))
    ok(_("filter_logits: top-k, then the nucleus of what is left; removed tokens at -inf"))


def check_repetition_penalty(fn: Callable) -> None:
    """Check repetition_penalty(logits, context, penalty)."""
    name = "repetition_penalty"
    gen = torch.Generator().manual_seed(52)
    logits = randn(gen, 30) * 2
    context = torch.tensor([3, 7, 7, 12, 3, 3, 25, 0])
    for penalty in (1.0, 1.3, 2.0, 0.8):
        given, seen = logits.clone(), context.clone()
        out = expect_tensor(name, call(name, fn, given, seen, penalty), (30,), logits.dtype,
                            _("logits (30,), penalty={penalty}").format(penalty=penalty))
        unchanged(name, logits, given, "logits")
        unchanged(name, context, seen, "context")
        want = G.apply_repetition_penalty(logits, context, penalty)
        if close(out, want, 1e-10):
            continue
        if close(out, torch.where(torch.zeros(30, dtype=torch.bool).index_fill(0, context, True),
                                  logits / penalty, logits), 1e-10):
            fail(name, _("penalty={penalty}: a negative logit divided by the penalty moves UP (-2 / 1.3 > -2); "
                         "multiply negative logits by the penalty").format(penalty=penalty))
        counts = torch.bincount(context, minlength=30).double()
        per_occurrence = torch.where(logits > 0, logits / penalty ** counts, logits * penalty ** counts)
        if penalty != 1.0 and close(out, per_occurrence, 1e-10):
            fail(name, _("penalty={penalty}: a token seen 3 times is penalised 3 times; penalise each seen "
                         "token once").format(penalty=penalty))
        if not close(out.index_fill(0, context, 0), logits.index_fill(0, context, 0), 1e-10):
            fail(name, _("penalty={penalty}: tokens that are not in the context changed").format(penalty=penalty))
        fail(name, _("penalty={penalty}: differs from the reference (max |error| {max_err:.2e})").format(penalty=penalty, max_err=max_err(out, want)))
    ok(_("repetition penalty: seen tokens move down once each, positive or negative"))


# ----------------------------------------------------------------------------------------
# The KV-cache attention step


def _attention_case(seed: int, n_head: int = 2, C: int = 16):
    """A random course-GPT attention layer (float64), its params dict and a reference runner."""
    from llmlab.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=8, block_size=32, n_layer=1, n_head=n_head, n_embd=C)).double().eval()
    attn = model.layers[0].self_attn
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.4)
    params = {k: v.detach().clone() for k, v in attn.state_dict().items()}
    return model, attn, params


def _run_chunks(name: str, fn: Callable, x: Tensor, params: dict, n_head: int, chunks: list[int]) -> list[Tensor]:
    """Feed x (B, T, C) through fn chunk by chunk from empty caches; return each chunk's output."""
    B, T, C = x.shape
    d = C // n_head
    k_cache = torch.zeros(B, n_head, 0, d, dtype=x.dtype)
    v_cache = torch.zeros(B, n_head, 0, d, dtype=x.dtype)
    outs, pos = [], 0
    for n in chunks:
        try:
            got = call(name, fn, x[:, pos:pos + n], params, k_cache, v_cache, n_head, pos)
        except AssertionError as e:
            if not any(s in str(e) for s in ("Sizes of tensors must match", "torch.cat", "Tensors must have same")):
                raise
            fail(name, _("joining the cache and the new tokens failed at position {pos}: the caches are (B, "
                         "n_head, position, head_dim) = {shape_of} and the {n} new keys and values are (B, "
                         "n_head, {n}, head_dim) after the head split; concatenate along the time axis, dim=-2 "
                         "(PyTorch said: {strip})").format(pos=pos, shape_of=shape_of(k_cache), n=n, strip=str(e).splitlines()[0][len(name) + 1:].strip()))
        if not isinstance(got, (tuple, list)) or len(got) != 3:
            fail(name, _("returns {type}; expected a tuple (y, k_cache, v_cache)").format(type=type(got).__name__))
        y, k_cache, v_cache = got
        expect_tensor(name, y, (B, n, C), x.dtype, _("x ({B}, {n}, {C}) at position {pos}").format(B=B, n=n, C=C, pos=pos))
        for label, t in (("k_cache", k_cache), ("v_cache", v_cache)):
            expect_tensor(name, t, (B, n_head, pos + n, d), x.dtype, _("{n} new tokens after {pos} cached").format(n=n, pos=pos),
                          hints={(B, n_head, pos, d): _("the returned {label} did not grow; add the new tokens").format(label=label),
                                 (B, n_head, n, d): _("the returned {label} holds only the new tokens; "
                                                      "concatenate them to the cache (axis -2)").format(label=label)})
        outs.append(y)
        pos += n
    return outs


def _simulate(attn: Any, x: Tensor, n_head: int, chunks: list[int], mode: str) -> Tensor:
    """The attention step done right ("right") or with a classic mistake, over chunks; outputs (B, T, C).

    "pos0": every chunk rotated as if it started at position 0; "topleft": is_causal=True
    with a cache (query i sees keys 0..i of the whole cache); "nocache": new tokens attend
    only to each other.
    """
    from llmlab.attention import apply_rotary, merge_heads, rope_cache, split_heads

    T = x.size(1)
    cos, sin = (t.to(x.dtype) for t in rope_cache(T, x.size(-1) // n_head))
    k_cache = v_cache = None
    outs, pos = [], 0
    with torch.no_grad():
        for n in chunks:
            h = x[:, pos:pos + n]
            q, k, v = (split_heads(proj(h), n_head) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            at = torch.arange(n) + (0 if mode == "pos0" else pos)
            q, k = apply_rotary(q, cos[at], sin[at]), apply_rotary(k, cos[at], sin[at])
            k_cache = k if k_cache is None else torch.cat([k_cache, k], dim=-2)
            v_cache = v if v_cache is None else torch.cat([v_cache, v], dim=-2)
            keys, values = (k, v) if mode == "nocache" else (k_cache, v_cache)
            L = keys.size(-2)
            query_at = torch.arange(n)[:, None] + (0 if mode in ("topleft", "nocache") else pos)
            mask = torch.arange(L)[None, :] <= query_at  # (n, L)
            y = torch.softmax((q @ keys.transpose(-1, -2) / q.size(-1) ** 0.5).masked_fill(~mask, float("-inf")), -1)
            outs.append(attn.o_proj(merge_heads(y @ values)))
            pos += n
    return torch.cat(outs, dim=1)


def check_attention_step(fn: Callable) -> None:
    """Check attention_step(x, params, k_cache, v_cache, n_head, position)."""
    name = "attention_step"
    model, attn, params = _attention_case(53)
    n_head, T = 2, 11
    x = torch.randn(2, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(54))
    with torch.no_grad():
        want = attn(x, (model.rope_cos[:T].double(), model.rope_sin[:T].double()))  # the uncached layer
        no_rope = attn(x, None)
    mistakes = {
        "pos0": _("each chunk is rotated as if it started at position 0; rotate the new q and k at position, "
                  "position + 1, ... (the cached keys keep the rotation they got when cached)"),
        "topleft": _("with a cache, query i must see keys up to position + i; is_causal=True (or a square tril "
                     "mask) lines the queries up with the FIRST keys instead — build the mask with the offset"),
        "nocache": _("the new tokens attend only to each other; concatenate the cache first, then attend over "
                     "cached + new keys and values"),
    }
    for chunks in ([T], [1] * T, [4, 1, 1, 5]):
        got = torch.cat(_run_chunks(name, fn, x, params, n_head, chunks), dim=1)
        if close(got, want, 1e-8):
            continue
        where = _("fed in chunks {chunks}").format(chunks=chunks)
        for mode, message in mistakes.items():
            if close(got, _simulate(attn, x, n_head, chunks, mode), 1e-8):
                fail(name, _("{where}: {message}").format(where=where, message=message))
        if close(got, no_rope, 1e-8):
            fail(name, _("{where}: no rotary positions; rotate q and k with RoPE (base 10000) at their "
                         "positions").format(where=where))
        fail(name, _("{where}: differs from the full (uncached) attention layer (max |error| {max_err:.2e}); "
                     "check the projections, heads, mask and o_proj").format(where=where, max_err=max_err(got, want)))
    ok(_("attention_step: chunk by chunk with a KV cache = the full causal attention layer"))


# ----------------------------------------------------------------------------------------
# Batching ragged prompts


def check_pad_batch(pad_fn: Callable, mask_fn: Callable) -> None:
    """Check pad_batch(prompts, pad_id) and batch_mask(attention_mask)."""
    prompts = [[5, 6, 7, 8], [9], [3, 4]]
    out = call("pad_batch", pad_fn, [list(p) for p in prompts], 0)
    if not isinstance(out, (tuple, list)) or len(out) != 3:
        fail("pad_batch", _("should return a tuple (input_ids, attention_mask, position_ids)"))
    ids, mask, pos = (expect_tensor("pad_batch", t, (3, 4), None, _("3 prompts, the longest 4 tokens")) for t in out)
    want_ids, want_mask = G.left_pad(prompts, 0)
    if ids.tolist() == [[5, 6, 7, 8], [9, 0, 0, 0], [3, 4, 0, 0]]:
        fail("pad_batch", _("pads on the right; generation appends on the right, so pad on the LEFT (every "
                            "row's last real token then sits in the last column)"))
    if ids.tolist() != want_ids.tolist():
        fail("pad_batch", _("input_ids {tolist}, expected the prompts left-padded with pad_id").format(tolist=ids.tolist()))
    if mask.bool().tolist() != want_mask.bool().tolist():
        fail("pad_batch", _("attention_mask must be 1 on real tokens and 0 on padding"))
    want_pos = G.position_ids(want_mask, 4)
    if pos.tolist() == [[0, 1, 2, 3]] * 3:
        fail("pad_batch", _("position_ids count from column 0; count from each row's first real token (padding "
                            "must not shift positions: a prompt is the same text padded or not)"))
    if pos.tolist() != want_pos.tolist():
        fail("pad_batch", _("position_ids {tolist}, expected {tolist2} (0, 1, 2, ... from the first real "
                            "token; 0 on padding)").format(tolist=pos.tolist(), tolist2=want_pos.tolist()))
    for attention_mask in (want_mask, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])):
        B, T = attention_mask.shape
        got = expect_tensor("batch_mask", call("batch_mask", mask_fn, attention_mask.clone()), (B, 1, T, T),
                            torch.bool, f"attention_mask {shape_of(attention_mask)}")
        want = G.decoder_mask(attention_mask, T)
        if torch.equal(got, want):
            continue
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        if torch.equal(got, causal.expand(B, 1, T, T)):
            fail("batch_mask", _("only causal: padding keys must be hidden too"))
        if torch.equal(got, (causal & attention_mask.bool()[:, None, None, :])):
            fail("batch_mask", _("a padding query now sees no key at all, and softmax over nothing is NaN; let "
                                 "every query see itself (the diagonal)"))
        if torch.equal(got, want.transpose(-1, -2)):
            fail("batch_mask", _("transposed: rows are queries, columns are keys"))
        fail("batch_mask", _("differs from causal & real-key (plus the diagonal)"))
    ok(_("batching: left padding, positions from the first real token, causal + padding mask"))


# ----------------------------------------------------------------------------------------
# Speculative decoding


def check_speculative_accept(fn: Callable) -> None:
    """Check speculative_accept(p, q, draft_tokens, u)."""
    name = "speculative_accept"
    gen = torch.Generator().manual_seed(55)
    V, k = 6, 3
    for trial in range(12):
        p = randn(gen, k + 1, V).mul(2).softmax(-1)
        q = randn(gen, k, V).mul(2).softmax(-1)
        draft = torch.stack([torch.multinomial(q[i].float(), 1, generator=gen)[0] for i in range(k)])
        u = torch.rand(k, generator=gen, dtype=torch.float64) * (0.3 if trial < 4 else 1.0)
        out = call(name, fn, p.clone(), q.clone(), draft.clone(), u.clone())
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            fail(name, _("should return a tuple (n_accepted, probs)"))
        n, probs = out
        if isinstance(n, Tensor):
            n = int(n)
        want_n, want_probs = G.speculative_accept(p, q, draft, u)
        if n != want_n:
            ratio = [float(p[i, draft[i]] / q[i, draft[i]]) for i in range(k)]
            inverse = next((i for i in range(k) if not u[i] < 1 / ratio[i]), k)
            if n == inverse:
                fail(name, _("accepts with probability q/p; a draft passes with probability min(1, p(x) / q(x))"))
            fail(name, _("accepted {n} of {k} drafts, expected {want_n} (u = {value}, p/q at the drafts = "
                         "{value2}): accept draft i while u_i < p_i(x_i) / q_i(x_i)").format(n=n, k=k, want_n=want_n, value=[round(float(x), 3) for x in u], value2=[round(r, 3) for r in ratio]))
        probs = expect_tensor(name, probs, (V,), p.dtype, f"p ({k + 1}, {V})")
        if close(probs, want_probs, 1e-10):
            continue
        if n < k:
            if close(probs, p[n], 1e-10):
                fail(name, _("after a rejection the next token comes from p itself; it must come from the "
                             "residual max(0, p - q) normalised, or tokens the draft over-proposes are counted "
                             "twice"))
            residual = (p[n] - q[n]).clamp(min=0)
            if close(probs, residual, 1e-10):
                fail(name, _("the residual max(0, p - q) is not normalised to sum to 1"))
            if close(probs, (q[n] - p[n]).clamp(min=0) / (q[n] - p[n]).clamp(min=0).sum(), 1e-10):
                fail(name, _("the residual is max(0, q - p); it is max(0, p - q): the target's missing mass"))
            fail(name, _("after rejecting draft {n}: the next-token distribution differs (max |error| "
                         "{max_err:.2e})").format(n=n, max_err=max_err(probs, want_probs)))
        fail(name, _("all drafts accepted: the extra token is drawn from the target's last row p[k]"))
    ok(_("speculative acceptance: min(1, p/q), then the normalised residual (or p[k] after a full accept)"))
