"""Generation: from next-token logits to text, correct and fast.

Read top-down:
1. sampling — the logits processors (repetition and length penalties, temperature, top-k,
   top-p), then greedy or a seeded draw;
2. the KV cache — keys and values of the past, so each new token costs one position of
   work instead of the whole context; a cached attention path for the course GPT;
3. `Decoder` — one interface over the course GPT and Hugging Face causal LMs (which take
   the same cache as `past_key_values`);
4. generation loops — one sequence (cached or not), a batch of ragged prompts (left padding
   and an attention mask), speculative decoding with a draft model;
5. text — incremental detokenising with stop strings, for streaming.

Conventions: logits are float32 (..., V); an attention mask is (B, L) with 1 = real token,
0 = padding (Hugging Face's); a 4D attention mask is bool, True = may attend (lab 1's).
"""
from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from llmlab.attention import apply_rotary, merge_heads, split_heads

if TYPE_CHECKING:  # transformers is slow to import; only HF models need it
    import transformers

    from llmlab.model import GPT, CausalSelfAttention

# ----------------------------------------------------------------------------------------
# 1. Sampling


@dataclass
class SamplingParams:
    """How the next token is chosen; the defaults draw from the model's own distribution."""

    temperature: float = 1.0  # 0: greedy (argmax); < 1 sharpens the distribution, > 1 flattens it
    top_k: int | None = None  # keep only the k likeliest tokens (None: all)
    top_p: float = 1.0  # keep the fewest likeliest tokens whose probability adds up to >= top_p
    repetition_penalty: float = 1.0  # > 1 makes tokens already in the context less likely (CTRL)
    length_penalty: float = 0.0  # added to the end-of-sequence logit per generated token: > 0 ends sooner

    def __post_init__(self):
        if not (isinstance(self.temperature, (int, float)) and 0 <= self.temperature < math.inf):
            raise ValueError(f"SamplingParams.temperature must be a number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ValueError(f"SamplingParams.top_k must be None or an int >= 1, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"SamplingParams.repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"SamplingParams.length_penalty must be finite, got {self.length_penalty!r}")

    @property
    def greedy(self) -> bool:
        """True when decoding takes the argmax: temperature 0, or one so small that dividing by it overflows."""
        return self.temperature < 1e-5


GREEDY = SamplingParams(temperature=0.0)


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
# 2. The KV cache


class KVCache:
    """Keys and values of every layer for the tokens seen so far, with their padding mask.

    Per layer: keys and values (B, n_kv_heads, L, head_dim); `mask` (B, L) is 1 for a real
    token and 0 for padding. A decoding step appends one position per row; `crop` forgets
    the last positions (speculative decoding rejects drafts), `select` keeps some rows (a
    finished request leaves the batch) and `cat` stacks caches of different lengths by
    left-padding the shorter ones (a request joins a running batch).
    """

    def __init__(self):
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.mask: Tensor | None = None  # (B, L) long

    def __len__(self) -> int:
        """Number of positions held (padding included)."""
        return 0 if self.mask is None else self.mask.size(1)

    @property
    def batch_size(self) -> int:
        """Number of rows (sequences)."""
        return 0 if self.mask is None else self.mask.size(0)

    def extend_mask(self, attention_mask: Tensor) -> Tensor:
        """Record the (B, T) mask of the tokens about to be added; return the (B, L + T) mask of all."""
        self.mask = attention_mask if self.mask is None else torch.cat([self.mask, attention_mask], dim=1)
        return self.mask

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new keys and values (B, H, T, d) of `layer`; return all of them (B, H, L + T, d)."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=-2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=-2)
        return self.keys[layer], self.values[layer]

    def set_layers(self, keys: list[Tensor], values: list[Tensor]) -> None:
        """Replace every layer's keys and values (B, H, L, d) at once (read back from a model's own cache)."""
        self.keys, self.values = list(keys), list(values)

    def crop(self, length: int) -> None:
        """Keep the first `length` positions."""
        self.keys = [k[..., :length, :] for k in self.keys]
        self.values = [v[..., :length, :] for v in self.values]
        if self.mask is not None:
            self.mask = self.mask[:, :length]

    def select(self, rows: Sequence[int] | Tensor) -> None:
        """Keep only `rows` (in that order), then drop leading positions that are padding in every row."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.mask.device)
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.mask = self.mask[rows]
        if self.mask.size(0):
            leading = int((self.mask.sum(0) > 0).long().argmax())  # first position some row uses
            if leading:
                self.crop_left(leading)

    def crop_left(self, n: int) -> None:
        """Drop the first `n` positions (padding in every row)."""
        self.keys = [k[..., n:, :] for k in self.keys]
        self.values = [v[..., n:, :] for v in self.values]
        self.mask = self.mask[:, n:]

    def pad_left(self, n: int) -> None:
        """Prepend `n` padding positions (zero keys and values, mask 0) to every row."""
        if n == 0:
            return
        self.keys = [F.pad(k, (0, 0, n, 0)) for k in self.keys]
        self.values = [F.pad(v, (0, 0, n, 0)) for v in self.values]
        self.mask = F.pad(self.mask, (n, 0))

    @staticmethod
    def cat(caches: Sequence["KVCache"]) -> "KVCache":
        """One cache holding the rows of all `caches`, left-padded to the longest."""
        caches = [c for c in caches if c.batch_size]
        length = max(len(c) for c in caches)
        padded = []
        for c in caches:
            c = copy.copy(c)
            c.pad_left(length - len(c))
            padded.append(c)
        out = KVCache()
        out.keys = [torch.cat(layer, dim=0) for layer in zip(*(c.keys for c in padded))]
        out.values = [torch.cat(layer, dim=0) for layer in zip(*(c.values for c in padded))]
        out.mask = torch.cat([c.mask for c in padded], dim=0)
        return out


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


def cached_attention(
    attn: "CausalSelfAttention", x: Tensor, rope: tuple[Tensor, Tensor] | None, mask: Tensor,
    cache: KVCache, layer: int,
) -> Tensor:
    """The course GPT's attention for new tokens x (B, T, C), reading the past from `cache` -> (B, T, C).

    Only the new tokens are projected; their keys and values join the cache, and their
    queries attend over past + new. rope: (cos, sin) each (B, 1, T, head_dim) at the new
    tokens' positions. mask: (B, 1, T, L) bool from `decoder_mask`.
    """
    q = split_heads(attn.q_proj(x), attn.n_heads)  # (B, H, T, head_dim)
    k = split_heads(attn.k_proj(x), attn.n_heads)
    v = split_heads(attn.v_proj(x), attn.n_heads)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    k, v = cache.update(layer, k, v)  # (B, H, L, head_dim): the past and the new
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, T, head_dim)
    return attn.o_proj(merge_heads(y))  # (B, T, C)


def gpt_forward(model: "GPT", input_ids: Tensor, cache: KVCache, attention_mask: Tensor | None = None) -> Tensor:
    """Logits (B, T, V) of the new tokens input_ids (B, T) of a course GPT, continuing from `cache`.

    attention_mask: (B, T) of the new tokens (1 = real, 0 = left padding), default all ones.
    The same blocks as `GPT.forward`, with `cached_attention` in place of a full recompute.
    """
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    full_mask = cache.extend_mask(attention_mask.to(input_ids.device))  # (B, L)
    if full_mask.size(1) > model.config.block_size:
        raise ValueError(f"sequence length {full_mask.size(1)} exceeds block_size={model.config.block_size}")
    positions = position_ids(full_mask, T)  # (B, T)
    mask = decoder_mask(full_mask, T)  # (B, 1, T, L)
    x = model.embed_tokens(input_ids)  # (B, T, C)
    rope = None
    if model.embed_positions is not None:
        x = x + model.embed_positions(positions)
    else:
        rope = (model.rope_cos[positions][:, None], model.rope_sin[positions][:, None])  # (B, 1, T, head_dim)
    x = model.dropout(x)
    for layer, block in enumerate(model.layers):
        x = x + cached_attention(block.self_attn, block.input_layernorm(x), rope, mask, cache, layer)
        x = x + block.mlp(block.post_attention_layernorm(x))
    return model.lm_head(model.norm(x))  # (B, T, V)


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
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if self.is_gpt:
            if cache is None and attention_mask is None:
                return self.model(input_ids)[0].float()  # the model's own full forward
            return gpt_forward(self.model, input_ids, KVCache() if cache is None else cache, attention_mask).float()
        return self._hf_forward(input_ids, cache, attention_mask)

    def _hf_forward(self, input_ids: Tensor, cache: KVCache | None, attention_mask: Tensor | None) -> Tensor:
        from transformers import DynamicCache

        T = input_ids.size(1)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if cache is None:
            full_mask = attention_mask
            out = self.model(input_ids, attention_mask=full_mask, position_ids=position_ids(full_mask, T),
                             use_cache=False)
            return out.logits.float()
        past = len(cache)
        full_mask = cache.extend_mask(attention_mask)
        # Hugging Face's own cache object, filled with our tensors (no copy), read back after.
        hf_cache = (DynamicCache(ddp_cache_data=list(zip(cache.keys, cache.values)), config=self.model.config)
                    if past else DynamicCache(config=self.model.config))
        out = self.model(input_ids, attention_mask=full_mask, position_ids=position_ids(full_mask, T),
                         use_cache=True, **{self._cache_arg: hf_cache})
        cache.set_layers([layer.keys for layer in hf_cache.layers], [layer.values for layer in hf_cache.layers])
        return out.logits.float()


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
    generator: torch.Generator | None = None, use_cache: bool = True,
) -> Iterator[int]:
    """Yield up to max_new_tokens new token ids for one prompt, one at a time, ending after an eos id.

    use_cache=False recomputes the whole sequence at every step: same tokens, O(n^2) work.
    """
    decoder = as_decoder(model)
    _check_length(decoder, len(prompt_ids), max_new_tokens)
    eos = eos_ids(eos_token_id)
    ids = torch.tensor([list(prompt_ids)], device=decoder.device)  # (1, T)
    cache = KVCache() if use_cache else None
    logits = decoder.forward(ids, cache)[:, -1]  # (1, V): the prefill
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
    generator: torch.Generator | None = None, use_cache: bool = True,
) -> list[int]:
    """The new token ids for one prompt (see `stream`)."""
    return list(stream(model, prompt_ids, max_new_tokens, sampling, eos_token_id, generator, use_cache))


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


@torch.no_grad()
def generate_batch(
    model: "Decoder | GPT | transformers.PreTrainedModel", prompts: Sequence[Sequence[int]], max_new_tokens: int,
    sampling: SamplingParams = GREEDY, eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None, pad_token_id: int = 0,
) -> list[list[int]]:
    """New token ids for each of several prompts of different lengths, decoded together.

    One left-padded prefill, then one batched step per token; a row that ends (eos) leaves
    the batch. Greedy results equal `generate` on each prompt alone.
    """
    decoder = as_decoder(model)
    _check_length(decoder, max(len(p) for p in prompts), max_new_tokens)
    eos = eos_ids(eos_token_id)
    input_ids, attention_mask = left_pad(prompts, pad_token_id)
    cache = KVCache()
    logits = decoder.forward(input_ids, cache, attention_mask)[:, -1]  # (B, V)
    contexts = [torch.as_tensor(list(p), device=decoder.device) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    live = list(range(len(prompts)))  # prompt index of each cache row
    for step in range(max_new_tokens):
        tokens = torch.stack([sample(logits[r:r + 1], sampling, generator, contexts[i][None], step, eos)[0]
                              for r, i in enumerate(live)])  # (rows,)
        keep = []
        for r, i in enumerate(live):
            token = int(tokens[r])
            outputs[i].append(token)
            contexts[i] = torch.cat([contexts[i], tokens[r:r + 1]])
            if token not in eos:
                keep.append(r)
        if not keep or step + 1 == max_new_tokens:
            break
        if len(keep) < len(live):
            cache.select(keep)
            live = [live[r] for r in keep]
            tokens = tokens[keep]
        logits = decoder.forward(tokens[:, None], cache)[:, -1]
    return outputs


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
    generator: torch.Generator | None = None,
) -> str:
    """Generate a text continuation of `prompt`, ending at the tokenizer's eos or a stop string."""
    text = TextStream(tokenizer, stop)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    for token in stream(model, ids, max_new_tokens, sampling, tokenizer.eos_token_id, generator):
        text.push(token)
        if text.stopped:
            break
    text.finish()
    return text.text
