"""The server's forward pass for Llama-architecture models: the same numbers, less work per token.

`llmlab.generate.Decoder` runs a Hugging Face model through its own forward, which is general
(any attention kernel, any cache class) and pays for it at every token: a cache object built
and read back, a 4-D mask built per call, three projections where one matmul would do, and
logits for every position when only the last one is sampled. At batch 1 a decode step of
SmolLM2-135M is a few milliseconds of that overhead on top of reading the weights once.

`LlamaDecoder` keeps the Hugging Face model (its weights, embedding, rotary tables) and runs:
per layer, RMSNorm -> one fused q/k/v matmul -> RoPE -> keys and values written in place into
the `KVCache` -> SDPA (grouped-query heads without repeating keys) -> o_proj -> RMSNorm -> one
fused gate/up matmul -> SiLU gate -> down_proj; then the head on the last position only.
`next_logits_together` runs several batches (the running batch's decode step and a new
prompt's prefill chunk) through one pass: their tokens share the matmuls, each keeps its own
RoPE positions, cache and attention.
The fused float weights share storage with the model's own (q_proj.weight becomes a view of
the fused matrix), so the model still runs its own forward with no extra memory. Quantized
projections (`llmlab.serve_quant`) fuse through their class's `fuse`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llmlab.generate import Decoder, decoder_mask, position_ids
from llmlab.kvcache import KVCache


def fuse_linears(layers: Sequence[nn.Module]) -> nn.Module:
    """One layer computing cat([layer(x) for layer in layers], -1): stacked weights, one matmul.

    nn.Linear (no bias): the stacked weight, and each layer's weight becomes a view of its
    rows. A quantized class with a `fuse` classmethod: that. Anything else: a loop.
    """
    if all(type(m) is nn.Linear and m.bias is None for m in layers):
        fused = nn.Linear(layers[0].in_features, sum(m.out_features for m in layers), bias=False,
                          device=layers[0].weight.device, dtype=layers[0].weight.dtype)
        fused.weight.data = torch.cat([m.weight.data for m in layers])
        start = 0
        for m in layers:
            m.weight.data = fused.weight.data[start:start + m.out_features]  # rows: a contiguous view
            start += m.out_features
        return fused.requires_grad_(False)
    kind = type(layers[0])
    if all(type(m) is kind for m in layers) and hasattr(kind, "fuse"):
        return kind.fuse(layers)
    return _Concat(layers)


class _Concat(nn.Module):
    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.parts = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([m(x) for m in self.parts], dim=-1)


class _Layer:
    """One decoder layer's weights in the order the lean forward uses them."""

    def __init__(self, layer: Any):
        attn, mlp = layer.self_attn, layer.mlp
        self.input_norm = layer.input_layernorm.weight
        self.post_norm = layer.post_attention_layernorm.weight
        self.qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        self.gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj


def is_llama(model: Any) -> bool:
    """True for a Hugging Face causal LM whose layers are Llama's (SmolLM2, the exported course GPT)."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in ("llama",) or not hasattr(model, "model"):
        return False
    return (not getattr(config, "attention_bias", False) and not getattr(config, "mlp_bias", False)
            and getattr(config, "hidden_act", "silu") == "silu" and getattr(config, "pretraining_tp", 1) == 1)


class LlamaDecoder(Decoder):
    """`Decoder` for a Hugging Face Llama model, with the lean forward described above."""

    def __init__(self, model: Any):
        super().__init__(model)
        config = model.config
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.eps = config.rms_norm_eps
        self.embed_tokens = model.model.embed_tokens
        self.rotary = model.model.rotary_emb
        self.norm = model.model.norm.weight
        self.lm_head = model.lm_head
        self.layers = [_Layer(layer) for layer in model.model.layers]
        self.split = [(self.n_heads + self.n_kv_heads) * self.head_dim, self.n_kv_heads * self.head_dim]  # [q k], v

    @torch.no_grad()
    def forward(self, input_ids: Tensor, cache: KVCache | None, attention_mask: Tensor | None = None) -> Tensor:
        """Float32 logits (B, T, V) for input_ids (B, T), as `Decoder.forward`."""
        B, T = input_ids.shape
        return self.lm_head(self._hidden([(input_ids, cache, attention_mask)])).float().view(B, T, -1)

    @torch.no_grad()
    def next_logits(self, input_ids: Tensor, cache: KVCache | None, attention_mask: Tensor | None = None) -> Tensor:
        """Float32 logits (B, V) of the last position only: the head runs once per row, not per token."""
        B, T = input_ids.shape
        return self.lm_head(self._hidden([(input_ids, cache, attention_mask)]).view(B, T, -1)[:, -1]).float()

    @torch.no_grad()
    def next_logits_together(self, parts: Sequence[tuple[Tensor, KVCache | None, Tensor | None]]) -> list[Tensor]:
        """`next_logits` of several batches in one pass: [(input_ids (B_i, T_i), cache_i, mask_i)] -> [(B_i, V)].

        The matmuls (the weights, read once) take every part's tokens together; RoPE, the
        caches and attention stay per part. So a decode step of the running batch and a
        prefill chunk of a new prompt cost about one pass, not two.
        """
        hidden = self._hidden(parts)  # (N, C)
        rows, start = [], 0
        for input_ids, _, _ in parts:
            B, T = input_ids.shape
            rows.append(torch.arange(start + T - 1, start + B * T, T, device=hidden.device))  # each row's last
            start += B * T
        logits = self.lm_head(hidden[torch.cat(rows)]).float()
        return list(logits.split([len(r) for r in rows]))

    def _hidden(self, parts: Sequence[tuple[Tensor, KVCache | None, Tensor | None]]) -> Tensor:
        """The final-norm hidden states (N, C) of all parts' new tokens, flattened row by row (N = sum B_i T_i).

        Each part is (input_ids (B, T), cache, attention_mask (B, T) or None); its keys and values join its cache.
        """
        segments, embeds = [], []
        for input_ids, cache, attention_mask in parts:
            input_ids = input_ids.to(self.device)
            B, T = input_ids.shape
            cache = KVCache() if cache is None else cache
            attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(self.device)
            past = cache.get_seq_length()
            full_mask = cache.extend_mask(attention_mask)  # (B, L)
            padded = not bool(full_mask.all())
            if padded or (past and T > 1):
                mask, causal = decoder_mask(full_mask, T), False  # (B, 1, T, L)
            else:
                mask, causal = None, T > 1  # no padding: one query sees all, or a plain causal prompt
            positions = position_ids(full_mask, T) if padded else \
                torch.arange(past, past + T, device=self.device).expand(B, T)
            x = self.embed_tokens(input_ids)  # (B, T, C)
            cos, sin = self.rotary(x, positions)  # (B, T, head_dim) each
            segments.append((B, T, cache, mask, causal, cos[:, None], sin[:, None]))  # cos, sin: (B, 1, T, d)
            embeds.append(x.reshape(B * T, -1))
        x = embeds[0] if len(embeds) == 1 else torch.cat(embeds)  # (N, C)
        sizes = [B * T for B, T, *_ in segments]
        C = x.size(-1)
        for i, layer in enumerate(self.layers):
            h = F.rms_norm(x, (C,), layer.input_norm, self.eps)
            qkv = layer.qkv(h)  # (N, (H + 2 Hkv) d)
            ys = [self._attend(i, part, segment) for part, segment in
                  zip(qkv.split(sizes) if len(sizes) > 1 else (qkv,), segments)]
            x = x + layer.o_proj(ys[0] if len(ys) == 1 else torch.cat(ys))
            h = F.rms_norm(x, (C,), layer.post_norm, self.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down_proj(F.silu(gate) * up)
        return F.rms_norm(x, (C,), self.norm, self.eps)

    def _attend(self, i: int, qkv: Tensor, segment: tuple) -> Tensor:
        """Layer i's attention for one part: its q/k/v rows (B T, ...) -> outputs (B T, H d); k, v join its cache."""
        B, T, cache, mask, causal, cos, sin = segment
        qk, v = qkv.view(B, T, -1).split(self.split, dim=-1)
        qk = _rotate(qk.view(B, T, self.n_heads + self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        q, k = qk.split([self.n_heads, self.n_kv_heads], dim=1)  # (B, H, T, d), (B, Hkv, T, d): one RoPE for both
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        k, v = cache.update(i, k, v)  # (B, Hkv, L, d): past and new
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, d)
        return y.transpose(1, 2).reshape(B * T, -1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE in Hugging Face's half-split layout: x * cos + rotate_half(x) * sin."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def serving_decoder(model: Any) -> Decoder:
    """The fastest decoder for `model`: `LlamaDecoder` for a Hugging Face Llama, else `Decoder`."""
    return LlamaDecoder(model) if is_llama(model) else Decoder(model)
