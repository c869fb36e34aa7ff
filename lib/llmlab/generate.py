"""Generation: from next-token logits to text, correct and fast.

Read top-down:
1. sampling — the logits processors (repetition and length penalties, temperature, top-k,
   top-p) that apply `SamplingParams` (`llmlab.sampling`), then greedy or a seeded draw;
2. the KV cache — keys and values of the past (`llmlab.kvcache.KVCache`), so each new token
   costs one position of work instead of the whole context; the models take it as
   `past_key_values`; the padding mask and positions of a batch of ragged prompts;
3. `Decoder` — one interface over the course GPT and Hugging Face causal LMs: padding mask
   and positions in, logits of the new tokens out, the cache extended;
4. generation loops — one sequence (cached or not), a batch of ragged prompts (left padding
   and an attention mask), speculative decoding with a draft model;
5. text — incremental detokenising with stop strings, for streaming.

Conventions: logits are float32 (..., V); an attention mask is (B, L) with 1 = real token,
0 = padding (Hugging Face's); a 4D attention mask is bool, True = may attend (lab 1's).
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from llmlab.kvcache import KVCache
from llmlab.sampling import GREEDY, SamplingParams

if TYPE_CHECKING:  # transformers is slow to import; only HF models need it
    import transformers

    from llmlab.model import GPT

# ----------------------------------------------------------------------------------------
# 1. Sampling: the processors that apply `SamplingParams` (llmlab.sampling, re-exported here)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """(..., V) -> (..., V): logits below the k-th largest set to -inf (ties with it are kept)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kth = torch.topk(logits, min(k, logits.size(-1)), dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """(..., V) -> (..., V) nucleus filtering: keep the fewest likeliest tokens with total probability >= p.

    A token survives when the tokens strictly likelier than it hold less than p of the
    mass; so the likeliest token always survives, and the rest (set to -inf) is the tail.
    """
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p}")
    if p == 1.0:
        return logits  # everything (a float cumsum can overshoot 1 and cut the tail)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (..., V): probability of the likelier tokens
    remove_sorted = mass_before >= p
    remove_sorted[..., 0] = False  # the likeliest token, always (even when p rounds to 0 in float32)
    remove = remove_sorted.scatter(-1, order, remove_sorted)  # back to vocabulary order
    return logits.masked_fill(remove, float("-inf"))


def apply_repetition_penalty(logits: Tensor, context: Tensor, penalty: float) -> Tensor:
    """(V,) or (B, V) logits, context (L,) or (B, L) ids -> logits with seen tokens made less likely.

    CTRL's rule (as Hugging Face applies it): a seen token's logit is divided by `penalty`
    when positive and multiplied by it when negative, so it always moves down for penalty > 1.
    """
    if penalty == 1.0 or context.numel() == 0:
        return logits
    seen = logits.gather(-1, context)
    seen = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits.scatter(-1, context, seen)


def process_logits(
    logits: Tensor, params: SamplingParams, context: Tensor | None = None, n_generated: int = 0,
    eos_token_ids: Sequence[int] = (),
) -> Tensor:
    """(V,) or (B, V) raw logits -> the float32 logits the next token is drawn from (softmax of them).

    Order: repetition penalty (on `context`, the ids so far), length penalty (on the
    end-of-sequence logits, scaled by `n_generated`), temperature, top-k, top-p. Greedy
    (temperature 0) stops after the penalties: its choice is the argmax.
    """
    logits = logits.float()
    if context is not None:
        logits = apply_repetition_penalty(logits, context.to(logits.device), params.repetition_penalty)
    if params.length_penalty and eos_token_ids:
        eos = torch.tensor(list(eos_token_ids), device=logits.device)
        logits = logits.index_add(-1, eos, torch.full(logits.shape[:-1] + (len(eos),),
                                                      params.length_penalty * n_generated, device=logits.device))
    # A huge penalty (or a tiny one) can overflow: keep every logit finite.
    logits = logits.clamp(min=torch.finfo(logits.dtype).min, max=torch.finfo(logits.dtype).max)
    if params.greedy:
        return logits
    # Shift the maximum to 0 first: the same softmax, and a tiny temperature gives -inf, not inf - inf.
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    return logits


def next_token_probs(
    logits: Tensor, params: SamplingParams, context: Tensor | None = None, n_generated: int = 0,
    eos_token_ids: Sequence[int] = (),
) -> Tensor:
    """(V,) or (B, V) raw logits -> the distribution of the next token; one-hot on the argmax when greedy."""
    logits = process_logits(logits, params, context, n_generated, eos_token_ids)
    if params.greedy:
        return F.one_hot(logits.argmax(dim=-1), logits.size(-1)).float()
    return logits.softmax(dim=-1)


def sample(
    logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
    context: Tensor | None = None, n_generated: int = 0, eos_token_ids: Sequence[int] = (),
) -> Tensor:
    """(B, V) raw logits -> (B,) next token ids: the argmax when greedy, else a draw seeded by `generator`."""
    logits = process_logits(logits, params, context, n_generated, eos_token_ids)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


# ----------------------------------------------------------------------------------------
# 2. The KV cache (`kvcache.KVCache`, re-exported here): padding mask and positions


def decoder_mask(attention_mask: Tensor, T: int) -> Tensor:
    """(B, L) attention mask of all positions -> (B, 1, T, L) bool: what the last T positions may attend to.

    Query i (at position L - T + i) sees key j when j is a real token and j <= L - T + i
    (causal). Padding is hidden as a key; a padding query would see nothing, so it sees
    itself (its output is never used, but must stay finite).
    """
    B, L = attention_mask.shape
    query_pos = torch.arange(L - T, L, device=attention_mask.device)[:, None]  # (T, 1)
    key_pos = torch.arange(L, device=attention_mask.device)[None, :]  # (1, L)
    allowed = (key_pos <= query_pos) & attention_mask.bool()[:, None, :]  # (B, T, L)
    allowed |= key_pos == query_pos  # the diagonal
    return allowed[:, None]  # (B, 1, T, L): broadcasts over heads


def position_ids(attention_mask: Tensor, T: int) -> Tensor:
    """(B, L) attention mask -> (B, T) positions of the last T tokens, counted from each row's first real token."""
    return (attention_mask.long().cumsum(dim=-1)[:, -T:] - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------
# 3. One interface over the course GPT and Hugging Face causal LMs


class Decoder:
    """A causal LM seen as: logits for new tokens, continuing from a `KVCache` (or recomputing all)."""

    def __init__(self, model: "GPT | transformers.PreTrainedModel"):
        from llmlab.model import GPT

        self.model = model.eval()
        self.is_gpt = isinstance(model, GPT)
        if self.is_gpt:
            self.max_length = model.config.block_size
            self.vocab_size = model.config.vocab_size
        else:
            self.max_length = int(getattr(model.config, "max_position_embeddings", 2048))
            self.vocab_size = model.config.vocab_size
            # transformers 5 renamed the forward argument `past_key_values` to `cache`
            params = inspect.signature(model.forward).parameters
            self._cache_arg = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def forward(self, input_ids: Tensor, cache: KVCache | None, attention_mask: Tensor | None = None) -> Tensor:
        """Float32 logits (B, T, V) for input_ids (B, T).

        With a cache: the new tokens continue it (and join it). Without: input_ids is the
        whole sequence, recomputed from scratch (the baseline a KV cache is measured against).
        attention_mask: (B, T) for the new tokens, 1 = real, 0 = left padding.
        """
        input_ids = input_ids.to(self.device)
        if self.is_gpt and cache is None and attention_mask is None:
            return self.model(input_ids)[0].float()  # plain causal: the fused kernel's fast path
        T = input_ids.size(1)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
        full_mask = attention_mask if cache is None else cache.extend_mask(attention_mask)  # (B, L)
        positions = position_ids(full_mask, T)  # (B, T)
        if self.is_gpt:
            return self.model(input_ids, attention_mask=decoder_mask(full_mask, T), position_ids=positions,
                              past_key_values=cache)[0].float()
        if cache is None:
            out = self.model(input_ids, attention_mask=full_mask, position_ids=positions, use_cache=False)
            return out.logits.float()
        out = self.model(input_ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                         **{self._cache_arg: cache.as_hf_cache(self.model.config)})  # extends `cache` in place
        return out.logits.float()


    def next_logits(self, input_ids: Tensor, cache: KVCache | None, attention_mask: Tensor | None = None) -> Tensor:
        """Float32 logits (B, V) of the last position (what sampling needs), as `forward` takes its inputs."""
        return self.forward(input_ids, cache, attention_mask)[:, -1]


def as_decoder(model: "Decoder | GPT | transformers.PreTrainedModel") -> Decoder:
    """`model` itself when it is a Decoder, else a Decoder around it."""
    return model if isinstance(model, Decoder) else Decoder(model)


def eos_ids(eos_token_id: int | Sequence[int] | None) -> tuple[int, ...]:
    """Normalise an end-of-sequence id, a list of them, or None to a tuple."""
    if eos_token_id is None:
        return ()
    return (int(eos_token_id),) if isinstance(eos_token_id, int) else tuple(int(i) for i in eos_token_id)


def _check_length(decoder: Decoder, prompt_len: int, max_new_tokens: int, extra: int = 0) -> None:
    if prompt_len < 1:
        raise ValueError("the prompt must hold at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt_len + max_new_tokens + extra > decoder.max_length:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                         f"model's context of {decoder.max_length} tokens")


# ----------------------------------------------------------------------------------------
# 4. Generation loops


@torch.no_grad()
def stream(
    model: "Decoder | GPT | transformers.PreTrainedModel", prompt_ids: Sequence[int], max_new_tokens: int,
    sampling: SamplingParams = GREEDY, eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None, use_cache: bool = True, past_key_values: KVCache | None = None,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids for one prompt, one at a time, ending after an eos id.

    use_cache=False recomputes the whole sequence at every step: same tokens, O(n^2) work.
    past_key_values: a cache of the prompt's first len(past_key_values) tokens (a system
    prompt shared by many requests, say), read and left as it is: only the rest is prefilled.
    """
    decoder = as_decoder(model)
    _check_length(decoder, len(prompt_ids), max_new_tokens)
    eos = eos_ids(eos_token_id)
    ids = torch.tensor([list(prompt_ids)], device=decoder.device)  # (1, T)
    cache, start = (KVCache() if use_cache else None), 0
    if past_key_values is not None:
        if not use_cache or past_key_values.batch_size != 1 or len(past_key_values) >= ids.size(1):
            raise ValueError(f"past_key_values must hold one row of fewer than the prompt's {ids.size(1)} tokens, "
                             f"with use_cache=True")
        cache, start = past_key_values.copy(), len(past_key_values)
    logits = decoder.forward(ids[:, start:], cache)[:, -1]  # (1, V): the prefill
    for step in range(max_new_tokens):
        token = sample(logits, sampling, generator, ids, step, eos)  # (1,)
        yield int(token)
        if int(token) in eos or step + 1 == max_new_tokens:
            return
        ids = torch.cat([ids, token[:, None]], dim=1)
        logits = decoder.forward(token[:, None] if use_cache else ids, cache)[:, -1]


def generate(
    model: "Decoder | GPT | transformers.PreTrainedModel", prompt_ids: Sequence[int], max_new_tokens: int,
    sampling: SamplingParams = GREEDY, eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None, use_cache: bool = True, past_key_values: KVCache | None = None,
) -> list[int]:
    """The new token ids for one prompt (see `stream`)."""
    return list(stream(model, prompt_ids, max_new_tokens, sampling, eos_token_id, generator, use_cache,
                       past_key_values))


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int = 0) -> tuple[Tensor, Tensor]:
    """Ragged prompts -> input_ids (B, T) padded on the left with pad_token_id, and attention_mask (B, T).

    Left, because generation appends on the right: every row's next token then sits in the
    same last column.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    T = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), T), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for row, p in enumerate(prompts):
        input_ids[row, T - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        attention_mask[row, T - len(p):] = 1
    return input_ids, attention_mask


def generate_batch(
    model: "Decoder | GPT | transformers.PreTrainedModel", prompts: Sequence[Sequence[int]], max_new_tokens: int,
    sampling: SamplingParams = GREEDY, eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None, pad_token_id: int = 0,
) -> list[list[int]]:
    """New token ids for each of several prompts of different lengths, decoded together.

    One left-padded prefill, then one batched step per token; a row that ends (eos) leaves
    the batch. Greedy results equal `generate` on each prompt alone.
    """
    outputs: list[list[int]] = [[] for _ in prompts]
    for row, token in stream_batch(model, prompts, max_new_tokens, sampling, eos_token_id, generator, pad_token_id):
        outputs[row].append(token)
    return outputs


@torch.no_grad()
def stream_batch(
    model: "Decoder | GPT | transformers.PreTrainedModel", prompts: Sequence[Sequence[int]], max_new_tokens: int,
    sampling: SamplingParams = GREEDY, eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None, pad_token_id: int = 0, past_key_values: KVCache | None = None,
    finished: set[int] | None = None,
) -> Iterator[tuple[int, int]]:
    """Yield (prompt index, new token id) for every live row, step by step, the prompts decoded together.

    A row leaves the batch after an eos id, or once the caller puts its index in `finished`
    (a stop string, say). past_key_values: a one-row cache of the first tokens every prompt
    shares, read and left as it is; each row continues it and only the rest is prefilled.
    """
    decoder = as_decoder(model)
    eos, finished = eos_ids(eos_token_id), set() if finished is None else finished
    start = 0 if past_key_values is None else len(past_key_values)
    if past_key_values is not None and (past_key_values.batch_size != 1 or any(len(p) <= start for p in prompts)):
        raise ValueError(f"past_key_values must hold one row of fewer tokens than every prompt ({start} held)")
    _check_length(decoder, max(len(p) for p in prompts), max_new_tokens)
    input_ids, attention_mask = left_pad([list(p)[start:] for p in prompts], pad_token_id)
    cache = KVCache() if past_key_values is None else past_key_values.expand(len(prompts))  # each row from the prefix
    logits = decoder.forward(input_ids, cache, attention_mask)[:, -1]  # (B, V)
    contexts = [torch.as_tensor(list(p), device=decoder.device) for p in prompts]
    live = list(range(len(prompts)))  # prompt index of each cache row
    for step in range(max_new_tokens):
        tokens = torch.stack([sample(logits[r:r + 1], sampling, generator, contexts[i][None], step, eos)[0]
                              for r, i in enumerate(live)])  # (rows,)
        for r, i in enumerate(live):
            contexts[i] = torch.cat([contexts[i], tokens[r:r + 1]])
            yield i, int(tokens[r])
        keep = [r for r, i in enumerate(live) if int(tokens[r]) not in eos and i not in finished]
        if not keep or step + 1 == max_new_tokens:
            return
        if len(keep) < len(live):
            cache.select(keep)
            live = [live[r] for r in keep]
            tokens = tokens[keep]
        logits = decoder.forward(tokens[:, None], cache)[:, -1]


# ----------------------------------------------------------------------------------------
# Speculative decoding


def speculative_accept(p: Tensor, q: Tensor, draft_tokens: Tensor, u: Tensor) -> tuple[int, Tensor]:
    """Accept or reject k drafted tokens; the rule that makes the output follow the target exactly.

    Args:
        p: (k + 1, V) target distributions at the k drafted positions and one past them.
        q: (k, V) draft distributions the drafted tokens were sampled from.
        draft_tokens: (k,) the drafted ids. u: (k,) uniform draws in [0, 1).
    Returns:
        (n, probs): the first n drafts are accepted (draft i passes when u_i < p_i(x_i) / q_i(x_i));
        the next token is drawn from probs (V,): the residual max(0, p_n - q_n), normalised, after
        a rejection; p_k itself when all k pass.
    """
    k = draft_tokens.size(0)
    for i in range(k):
        x = int(draft_tokens[i])
        if not u[i] < p[i, x] / q[i, x]:  # reject
            residual = (p[i] - q[i]).clamp(min=0)
            total = residual.sum()
            # p == q leaves no residual: then the rejection had probability 0; fall back to p.
            return i, residual / total if total > 0 else p[i]
    return k, p[k]


@dataclass
class SpeculativeStats:
    """What a speculative run did: drafts proposed, accepted and rejected, target forward passes."""

    drafted: int = 0
    accepted: int = 0
    rejected: int = 0  # rounds that ended on a rejection (the drafts after it are never checked)
    target_calls: int = 0
    accepted_per_round: list[int] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        """Fraction of the checked drafts the target accepted: the per-token acceptance probability."""
        checked = self.accepted + self.rejected
        return self.accepted / checked if checked else 0.0


@torch.no_grad()
def speculative_generate(
    target: "Decoder | GPT | transformers.PreTrainedModel", draft: "Decoder | GPT | transformers.PreTrainedModel",
    prompt_ids: Sequence[int], max_new_tokens: int, num_draft_tokens: int = 4,
    sampling: SamplingParams = GREEDY, eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[int], SpeculativeStats]:
    """Generate with a cheap draft model proposing tokens and the target checking them in one pass.

    Each round the draft proposes up to num_draft_tokens tokens one by one; the target scores
    them all in one forward pass; `speculative_accept` keeps a prefix and draws one more token.
    The output has exactly the target's distribution (greedy: exactly `generate`'s tokens);
    the draft only decides how many tokens each target pass yields. Both models must share
    the tokenizer. Returns the new ids and the statistics.
    """
    target, draft = as_decoder(target), as_decoder(draft)
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    if target.vocab_size != draft.vocab_size:
        raise ValueError(f"target and draft vocabularies differ ({target.vocab_size} vs {draft.vocab_size})")
    _check_length(target, len(prompt_ids), max_new_tokens, num_draft_tokens)
    _check_length(draft, len(prompt_ids), max_new_tokens, num_draft_tokens)
    eos = eos_ids(eos_token_id)
    device = target.device
    ids = list(prompt_ids)
    stats = SpeculativeStats()
    t_cache, d_cache = KVCache(), KVCache()
    # Each cache holds every token but the last few; `*_todo` are the ids it has not seen yet.
    t_todo, d_todo = list(ids), list(ids)
    out: list[int] = []
    while len(out) < max_new_tokens:
        k = min(num_draft_tokens, max_new_tokens - len(out) - 1)  # the target adds one more token
        drafts, q_rows = [], []
        for i in range(k):
            logits = draft.forward(torch.tensor([d_todo], device=draft.device), d_cache)[0, -1]
            context = torch.tensor(ids + drafts, device=device)
            q = next_token_probs(logits.to(device), sampling, context, len(out) + i, eos)
            token = int(torch.multinomial(q.cpu(), 1, generator=generator)) if not sampling.greedy else int(q.argmax())
            drafts.append(token)
            q_rows.append(q)
            d_todo = [token]
        logits = target.forward(torch.tensor([t_todo + drafts], device=device), t_cache)[0]  # (len, V)
        stats.target_calls += 1
        p = torch.stack([next_token_probs(logits[len(t_todo) - 1 + i], sampling,
                                          torch.tensor(ids + drafts[:i], device=device), len(out) + i, eos)
                         for i in range(k + 1)])  # (k + 1, V)
        u = torch.rand(k, generator=generator).to(device)
        n, probs = speculative_accept(p, torch.stack(q_rows) if k else p[:0], torch.tensor(drafts, device=device), u)
        if sampling.greedy:
            nxt = int(probs.argmax())
        else:
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        stats.drafted += k
        stats.accepted += n
        stats.rejected += n < k
        stats.accepted_per_round.append(n)
        new = drafts[:n] + [nxt]
        for token in new:  # stop at the first end-of-sequence token
            out.append(token)
            ids.append(token)
            if token in eos or len(out) == max_new_tokens:
                return out, stats
        # Forget the rejected drafts: the target saw t_todo + k drafts, keeps t_todo + n.
        t_cache.crop(len(ids) - 1)
        t_todo = [nxt]
        if n == k and k > 0:  # the draft never saw its own last draft
            d_todo = [drafts[-1], nxt]
        else:
            d_cache.crop(len(ids) - 1)
            d_todo = [nxt]
    return out, stats


def early_exit_draft(
    model: "GPT | transformers.PreTrainedModel", n_layers: int,
) -> "GPT | transformers.PreTrainedModel":
    """A draft model made of `model`'s first n_layers blocks, its final norm and head (weights shared).

    The cheapest draft there is: no training, same tokenizer; the fewer layers, the worse its
    guesses (an intermediate layer was never trained to feed the head directly).
    """
    from dataclasses import replace

    from llmlab.model import GPT

    total = model.config.n_layer if isinstance(model, GPT) else model.config.num_hidden_layers
    if not 1 <= n_layers <= total:
        raise ValueError(f"n_layers must be in 1..{total}, got {n_layers}")
    if isinstance(model, GPT):
        small = GPT(replace(model.config, n_layer=n_layers))
        prefix = "layers."
    else:
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = n_layers
        small = type(model)(config)
        prefix = "model.layers."
    state = {name: t for name, t in model.state_dict().items()
             if not name.startswith(prefix) or int(name[len(prefix):].split(".")[0]) < n_layers}
    small.load_state_dict(state, strict=False, assign=True)  # shares the tensors: no copy
    if hasattr(small, "tie_weights"):
        small.tie_weights()
    else:
        small.lm_head.weight = small.embed_tokens.weight
    return small.to(next(model.parameters()).device).eval()


# ----------------------------------------------------------------------------------------
# 5. Text: incremental detokenising with stop strings


class TextStream:
    """Turns generated ids into text increments, safe to show as they come, ending at a stop string.

    Decoding token by token is wrong twice over: one character may span several tokens
    (a half UTF-8 sequence decodes to U+FFFD), and a stop string may span several tokens
    (its beginning must not be shown before we know it is one). So the whole text is decoded
    each time and only the part that can no longer change is released.
    """

    def __init__(self, tokenizer: "transformers.PreTrainedTokenizerBase", stop: Sequence[str] = ()):
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.ids: list[int] = []
        self.text = ""  # released so far
        self.stopped = False  # a stop string was found; `text` ends just before it

    def push(self, token_id: int) -> str:
        """Add one generated id; return the newly released text ('' while undecided)."""
        if self.stopped:
            return ""
        self.ids.append(int(token_id))
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [full.find(s, max(0, len(self.text) - len(s))) for s in self.stop]
        hits = [h for h in hits if h != -1]
        if hits:
            self.stopped = True
            return self._release(full[:min(hits)])
        if full.endswith("\ufffd"):  # an incomplete character: wait for its next bytes
            return ""
        hold = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if full.endswith(s[:n])), default=0)
        return self._release(full[:len(full) - hold])

    def finish(self) -> str:
        """Generation ended: release whatever was held back."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _release(self, upto: str) -> str:
        new = upto[len(self.text):] if upto.startswith(self.text) else ""
        self.text += new
        return new


def complete(
    model: "Decoder | GPT | transformers.PreTrainedModel", tokenizer: "transformers.PreTrainedTokenizerBase",
    prompt: str, max_new_tokens: int, sampling: SamplingParams = GREEDY, stop: Sequence[str] = (),
    generator: torch.Generator | None = None, past_key_values: KVCache | None = None,
) -> str:
    """Generate a text continuation of `prompt`, ending at the tokenizer's eos or a stop string.

    past_key_values: a cache of the first tokens of the prompt (see `stream`).
    """
    text = TextStream(tokenizer, stop)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for token in stream(model, ids, max_new_tokens, sampling, tokenizer.eos_token_id, generator,
                        past_key_values=past_key_values):
        text.push(token)
        if text.stopped:
            break
    text.finish()
    return text.text


def complete_batch(
    model: "Decoder | GPT | transformers.PreTrainedModel", tokenizer: "transformers.PreTrainedTokenizerBase",
    prompts: Sequence[str], max_new_tokens: int, sampling: SamplingParams = GREEDY, stop: Sequence[str] = (),
    generator: torch.Generator | None = None, past_key_values: KVCache | None = None,
) -> list[str]:
    """`complete` for several prompts at once, decoded as one batch; each row ends at eos or a stop string.

    past_key_values: a one-row cache of the first tokens every prompt shares (see `stream_batch`).
    """
    texts, finished = [TextStream(tokenizer, stop) for _ in prompts], set()
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for row, token in stream_batch(model, ids, max_new_tokens, sampling, tokenizer.eos_token_id, generator, pad,
                                   past_key_values, finished):
        texts[row].push(token)
        if texts[row].stopped:
            finished.add(row)
    for text in texts:
        text.finish()
    return [text.text for text in texts]
