"""The course GPT: a small decoder-only transformer with the Llama architecture.

Read top-down: RMSNorm -> causal self-attention (lab 1's `MultiHeadAttention`, made causal
and rotary) -> MLP (SwiGLU, or GPT-2's GELU for comparison) -> Block -> GPTConfig -> GPT ->
export to a Hugging Face `LlamaForCausalLM`.

One forward serves training and generation. Like a Hugging Face model, `GPT.forward` takes
optional `past_key_values` (an `llmlab.kvcache.KVCache` of the earlier tokens' keys and
values), an `attention_mask` and `position_ids`: then only the new tokens are computed, and
their keys and values join the cache.

Architecture, in one paragraph: token embeddings, then `n_layer` pre-norm residual blocks
`x = x + attn(norm(x)); x = x + mlp(norm(x))`, a final norm, and a linear head that shares
its weight with the token embedding (weight tying). Positions enter through RoPE inside
attention. These are exactly Llama's choices, so a trained GPT exports to a Llama checkpoint
that `transformers` loads with `AutoModelForCausalLM` and runs with the same logits.

Parameter names follow Hugging Face Llama (`embed_tokens`, `layers.0.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, `norm`, `lm_head`), so the export is a rename.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llmlab.attention import MultiHeadAttention, apply_rotary, merge_heads, rope_cache, split_heads

if TYPE_CHECKING:  # types only (transformers is slow to import; only the export needs it)
    import tokenizers
    import transformers

    from llmlab.kvcache import KVCache

IGNORE_INDEX = -100  # targets equal to this are left out of the loss (PyTorch and HF convention)


# ----------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight: LayerNorm without the mean subtraction and the bias (Llama)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """(..., dim) -> (..., dim), normalised in float32 (as Hugging Face does)."""
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class CausalSelfAttention(MultiHeadAttention):
    """Lab 1's multi-head attention with a causal mask and rotary positions.

    The projections (q_proj, k_proj, v_proj, o_proj) and head splitting are lab 1's; the
    softmax(q k^T / sqrt(d)) v itself runs in `F.scaled_dot_product_attention`, a fused
    kernel that never materialises the (T, T) score matrix, with `is_causal=True` standing
    in for `causal_mask(T)`.
    """

    def __init__(self, config: "GPTConfig", layer_idx: int = 0):
        super().__init__(config.n_embd, config.n_head, bias=config.bias, dropout=config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.layer_idx = layer_idx  # which of the cache's layers holds this layer's keys and values

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, attention_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> Tensor:
        """x: (B, T, C) -> (B, T, C).

        rope: (cos, sin), each (T, head_dim) or (B, 1, T, head_dim), at the tokens' positions.
        attention_mask: bool (B or 1, 1, T, L), True = may attend; None = causal.
        past_key_values: the earlier tokens' keys and values; the new ones are appended, and
            the queries attend over past + new (L positions).
        """
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, n_head, T, head_dim)
        k = split_heads(self.k_proj(x), self.n_heads)
        v = split_heads(self.v_proj(x), self.n_heads)
        if rope is not None:
            # Rotate queries and keys (not values) by their position: q.k then depends only
            # on the distance between the two tokens.
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        T = q.size(-2)
        if past_key_values is not None:
            k, v = past_key_values.update(self.layer_idx, k, v)  # (B, n_head, L, head_dim): past and new
        dropout_p = self.attn_dropout.p if self.training else 0.0
        if attention_mask is None and k.size(-2) > T > 1:  # causal, with the past all visible
            attention_mask = torch.ones(T, k.size(-2), dtype=torch.bool, device=x.device).tril(k.size(-2) - T)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, dropout_p=dropout_p,
                                           is_causal=attention_mask is None and T > 1)
        return self.resid_dropout(self.o_proj(merge_heads(y)))  # (B, T, C)


class SwiGLU(nn.Module):
    """Llama's MLP: down_proj(silu(gate_proj(x)) * up_proj(x)); the gate picks what passes."""

    def __init__(self, config: "GPTConfig"):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.up_proj = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.down_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C) through a (B, T, hidden_dim) gated middle."""
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class GELUMLP(nn.Module):
    """GPT-2's MLP: down_proj(gelu(up_proj(x))), hidden width 4 * n_embd by default."""

    def __init__(self, config: "GPTConfig"):
        super().__init__()
        self.up_proj = nn.Linear(config.n_embd, config.hidden_dim, bias=config.bias)
        self.down_proj = nn.Linear(config.hidden_dim, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, C)."""
        return self.dropout(self.down_proj(F.gelu(self.up_proj(x), approximate="tanh")))


class Block(nn.Module):
    """One pre-norm transformer block: communicate (attention), then compute (MLP)."""

    def __init__(self, config: "GPTConfig", layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.self_attn = CausalSelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else GELUMLP(config)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None, attention_mask: Tensor | None = None,
        past_key_values: KVCache | None = None,
    ) -> Tensor:
        """(B, T, C) -> (B, T, C). The residual stream x is only ever added to."""
        x = x + self.self_attn(self.input_layernorm(x), rope, attention_mask, past_key_values)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


# ----------------------------------------------------------------------------------------
# Configuration


@dataclass
class GPTConfig:
    """Shape and regularisation of a GPT; the defaults make a 1.3M-parameter model."""

    vocab_size: int = 4096  # number of token ids (the tokenizer's vocabulary size)
    block_size: int = 128  # longest context, in tokens
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block; n_embd % n_head == 0
    n_embd: int = 128  # width of the residual stream
    hidden_dim: int | None = None  # MLP width; None: 4*n_embd (gelu), ~8/3*n_embd (swiglu)
    dropout: float = 0.0  # on attention weights, residual branches and embeddings
    bias: bool = False  # biases in the Linear layers (Llama: no)
    position: str = "rope"  # "rope" (rotary, Llama) or "learned" (a table, GPT-2)
    mlp: str = "swiglu"  # "swiglu" (Llama) or "gelu" (GPT-2)
    rope_theta: float = 10000.0  # RoPE base: the slowest rotation has wavelength ~2*pi*theta
    norm_eps: float = 1e-5  # RMSNorm epsilon

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"GPTConfig.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.position not in ("rope", "learned"):
            raise ValueError(f"GPTConfig.position must be 'rope' or 'learned', got {self.position!r}")
        if self.position == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"GPTConfig.n_embd / n_head = {self.n_embd // self.n_head} must be even for RoPE")
        if self.mlp not in ("swiglu", "gelu"):
            raise ValueError(f"GPTConfig.mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.rope_theta <= 0:
            raise ValueError(f"GPTConfig.rope_theta must be > 0, got {self.rope_theta}")
        if self.norm_eps <= 0:
            raise ValueError(f"GPTConfig.norm_eps must be > 0, got {self.norm_eps}")
        if self.hidden_dim is None:
            # SwiGLU has three matrices instead of two: 2/3 of GPT-2's 4*n_embd keeps the
            # parameter count the same; round up to a multiple of 32 for tidy matmuls.
            self.hidden_dim = 4 * self.n_embd if self.mlp == "gelu" else 32 * math.ceil(8 * self.n_embd / 3 / 32)
        if not isinstance(self.hidden_dim, int) or self.hidden_dim < 1:
            raise ValueError(f"GPTConfig.hidden_dim must be a positive int or None, got {self.hidden_dim!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.n_embd // self.n_head


# ----------------------------------------------------------------------------------------
# The model


class GPT(nn.Module):
    """Decoder-only transformer language model: ids (B, T) -> next-token logits (B, T, vocab)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.n_embd)
        self.embed_positions = (
            nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        )
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying: the head scores token t by the dot product with t's own embedding.
        # One (vocab, n_embd) matrix instead of two: 40% of the parameters of the default config.
        self.lm_head.weight = self.embed_tokens.weight
        if config.position == "rope":
            cos, sin = rope_cache(config.block_size, config.head_dim, config.rope_theta)
            # Not parameters and not saved: recomputed from the config, moved by .to(device).
            self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, head_dim)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the init of the projections that write into the residual stream by
        # 1/sqrt(2 * n_layer), so its variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(
        self, idx: Tensor, targets: Tensor | None = None, attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None, past_key_values: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Next-token logits, and the mean cross-entropy when targets are given.

        Args:
            idx: (B, T) token ids (with a cache: the new tokens only).
            targets: (B, T) the ids that follow (idx shifted left by one); IGNORE_INDEX
                positions are skipped.
            attention_mask: bool (B or 1, 1, T, L), True = may attend, over the L = past + T
                positions (`llmlab.generate.decoder_mask` makes one from a padding mask);
                None = causal.
            position_ids: (B, T) or (T,) positions of the new tokens; None = past, past + 1, ...
            past_key_values: the earlier tokens' keys and values, extended in place.
        Returns:
            logits (B, T, vocab_size) and loss (a scalar) or None.
        """
        B, T = idx.shape
        past = 0 if past_key_values is None else past_key_values.get_seq_length()
        if past + T > self.config.block_size:
            raise ValueError(f"sequence length {past + T} exceeds block_size={self.config.block_size}")
        x = self.embed_tokens(idx)  # (B, T, C)
        rope = None
        if self.embed_positions is not None:
            if position_ids is None:
                position_ids = torch.arange(past, past + T, device=idx.device)
            x = x + self.embed_positions(position_ids)  # (T, C) or (B, T, C): broadcasts
        elif position_ids is None:
            rope = (self.rope_cos[past:past + T], self.rope_sin[past:past + T])  # each (T, head_dim)
        else:
            # (B, 1, T, head_dim) for per-row positions (left padding): broadcasts over heads
            rope = tuple(t[position_ids].view(-1, 1, T, t.size(-1)) for t in (self.rope_cos, self.rope_sin))
        x = self.dropout(x)
        for block in self.layers:
            x = block(x, rope, attention_mask, past_key_values)
        logits = self.lm_head(self.norm(x))  # (B, T, vocab_size)
        loss = None
        if targets is not None:
            # Cross-entropy over all B*T positions at once; autocast computes it in float32.
            loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T), ignore_index=IGNORE_INDEX)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        """Number of parameters (the tied embedding/head counted once), optionally without embeddings."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed_tokens.weight.numel()
            if self.embed_positions is not None:
                n -= self.embed_positions.weight.numel()
        return n

    def configure_optimizers(
        self, weight_decay: float, lr: float, betas: tuple[float, float] = (0.9, 0.95),
    ) -> torch.optim.AdamW:
        """AdamW with decoupled weight decay on the 2D weights only (matmuls, embeddings).

        Norm gains and biases are not decayed: pulling a gain towards 0 is not regularisation.
        """
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        # The fused kernel updates every tensor in one pass (CPU and CUDA) instead of one
        # small kernel per tensor, the cost that dominates a small model's optimizer step.
        fused = next(self.parameters()).device.type in ("cpu", "cuda")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused or None)


# ----------------------------------------------------------------------------------------
# Export to Hugging Face


def to_hf_llama(
    model: GPT, bos_token_id: int | None = None, eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> "transformers.LlamaForCausalLM":
    """A `LlamaForCausalLM` (float32, eval mode) computing exactly what `model` computes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    if c.position != "rope":
        raise ValueError(f"only GPTConfig.position='rope' exports to Llama, got {c.position!r}")
    if c.mlp != "swiglu":
        raise ValueError(f"only GPTConfig.mlp='swiglu' exports to Llama, got {c.mlp!r}")
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        intermediate_size=c.hidden_dim,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        num_key_value_heads=c.n_head,
        hidden_act="silu",
        max_position_embeddings=c.block_size,
        rms_norm_eps=c.norm_eps,
        rope_theta=c.rope_theta,
        attention_bias=c.bias,
        mlp_bias=c.bias,
        attention_dropout=c.dropout,
        tie_word_embeddings=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    hf = LlamaForCausalLM(hf_config)
    # Our names are Llama's minus the "model." prefix of the decoder stack.
    state = {
        (name if name.startswith("lm_head.") else f"model.{name}"): tensor.detach().float().cpu()
        for name, tensor in model.state_dict().items()
    }
    missing, unexpected = hf.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied: filled by embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: missing={missing} unexpected={unexpected}")
    hf.tie_weights()
    return hf.eval()


def save_hf(
    model: GPT,
    tokenizer: "tokenizers.Tokenizer | transformers.PreTrainedTokenizerBase | None",
    folder: str | Path,
) -> Path:
    """Write `model` (and its tokenizer) as a Llama checkpoint that `from_pretrained` loads."""
    folder = Path(folder)
    ids: dict[str, int | None] = {}
    if tokenizer is not None:
        if not hasattr(tokenizer, "save_pretrained"):  # a raw `tokenizers.Tokenizer`
            from llmlab.tokenizer import to_hf

            tokenizer = to_hf(tokenizer)
        if len(tokenizer) > model.config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but vocab_size={model.config.vocab_size}")
        ids = {name: getattr(tokenizer, name) for name in ("bos_token_id", "eos_token_id", "pad_token_id")}
    hf = to_hf_llama(model, **ids)
    hf.generation_config.bos_token_id = ids.get("bos_token_id")
    hf.generation_config.eos_token_id = ids.get("eos_token_id")
    hf.generation_config.pad_token_id = ids.get("pad_token_id")
    hf.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder
