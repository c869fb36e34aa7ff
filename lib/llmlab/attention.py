"""Attention, from one query to a whole multi-head layer, plus the ways to tell it about order.

Read top-down: scaled dot-product attention -> masks -> heads -> multi-head attention
(a function, then the `nn.Module` later labs build on) -> positional information
(sinusoidal, RoPE, ALiBi).

Conventions used everywhere in the course:
- a mask is a bool tensor, True = "this query may attend to this key", broadcastable to
  the score shape (..., T_q, T_k);
- weights follow `nn.Linear`: y = x @ W.T + b, with W of shape (out_features, in_features);
- heads live on axis -3: (B, H, T, head_dim).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# ----------------------------------------------------------------------------------------
# Scaled dot-product attention


def attention_weights(
    q: Tensor, k: Tensor, mask: Tensor | None = None, bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Softmax attention probabilities of each query over the keys.

    Args:
        q: (..., T_q, d) queries.  k: (..., T_k, d) keys.
        mask: bool, True = may attend, broadcastable to (..., T_q, T_k).
        bias: float, added to the scores before masking (ALiBi, relative positions).
        scale: multiplies the scores; default 1/sqrt(d).
    Returns:
        (..., T_q, T_k) weights; each row sums to 1, or is all zeros when its mask row is empty.
    """
    if scale is None:
        # q.k is a sum of d products: its variance grows like d, and a softmax over large
        # scores saturates to one-hot (tiny gradients). Dividing by sqrt(d) keeps it ~1.
        scale = 1.0 / math.sqrt(q.size(-1))
    scores = (q @ k.transpose(-2, -1)) * scale  # (..., T_q, T_k)
    if bias is not None:
        scores = scores + bias
    if mask is None:
        return torch.softmax(scores, dim=-1)
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = may attend), got {mask.dtype}")
    scores = torch.where(mask, scores, float("-inf"))
    # A query with no key to attend to would get softmax(-inf, ..., -inf) = NaN. Give such
    # rows zero weight instead (as F.scaled_dot_product_attention does) and keep the
    # gradient finite by feeding the softmax zeros there.
    empty = ~mask.any(dim=-1, keepdim=True)  # (..., T_q or 1, 1)
    weights = torch.softmax(torch.where(empty, 0.0, scores), dim=-1)
    return torch.where(empty, 0.0, weights)


def scaled_dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, bias: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T / sqrt(d) [masked]) v.

    Args:
        q: (..., T_q, d)  k: (..., T_k, d)  v: (..., T_k, d_v).
        mask: bool, True = may attend, broadcastable to (..., T_q, T_k).
        bias, scale: see `attention_weights`.
    Returns:
        (..., T_q, d_v); a fully masked query row returns zeros.
    """
    return attention_weights(q, k, mask, bias, scale) @ v


# ----------------------------------------------------------------------------------------
# Masks (bool, True = may attend)


def causal_mask(T: int, device: torch.device | str | None = None) -> Tensor:
    """(T, T) bool: query i may attend to keys 0..i (itself and the past)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def padding_mask(lengths: Tensor, T: int) -> Tensor:
    """(B, 1, 1, T) bool: key t of sequence b is real when t < lengths[b].

    The two singleton axes broadcast over heads and queries: padding hides keys, while a
    padded query still produces an output (which later layers ignore).
    """
    positions = torch.arange(T, device=lengths.device)  # (T,)
    return (positions < lengths[:, None]).view(-1, 1, 1, T)


# ----------------------------------------------------------------------------------------
# Heads


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(..., T, D) -> (..., H, T, D/H): head h owns the columns h*D/H : (h+1)*D/H."""
    *lead, T, D = x.shape
    if D % n_heads:
        raise ValueError(f"model width {D} is not divisible by n_heads={n_heads}")
    return x.view(*lead, T, n_heads, D // n_heads).transpose(-3, -2)


def merge_heads(x: Tensor) -> Tensor:
    """(..., H, T, d) -> (..., T, H*d), the inverse of `split_heads`."""
    *lead, H, T, d = x.shape
    return x.transpose(-3, -2).reshape(*lead, T, H * d)


def multi_head_attention(
    x: Tensor,
    w_q: Tensor, b_q: Tensor | None,
    w_k: Tensor, b_k: Tensor | None,
    w_v: Tensor, b_v: Tensor | None,
    w_o: Tensor, b_o: Tensor | None,
    n_heads: int,
    mask: Tensor | None = None,
) -> Tensor:
    """Multi-head self-attention of x with explicit weights (nn.Linear convention).

    Args:
        x: (B, T, D).  w_*: (D, D).  b_*: (D,) or None.
        mask: bool, True = may attend, broadcastable to (B, H, T, T).
    Returns:
        (B, T, D).
    """
    q = split_heads(F.linear(x, w_q, b_q), n_heads)  # (B, H, T, d)
    k = split_heads(F.linear(x, w_k, b_k), n_heads)
    v = split_heads(F.linear(x, w_v, b_v), n_heads)
    y = scaled_dot_product_attention(q, k, v, mask)  # (B, H, T, d)
    return F.linear(merge_heads(y), w_o, b_o)  # (B, T, D)


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention with Hugging Face's q_proj/k_proj/v_proj/o_proj names."""

    def __init__(self, d_model: int, n_heads: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)
        self.attn_dropout = nn.Dropout(dropout)  # on the weights, as in the original Transformer

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x: (B, T, D), mask: bool broadcastable to (B, H, T, T) -> (B, T, D)."""
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, head_dim)
        k = split_heads(self.k_proj(x), self.n_heads)
        v = split_heads(self.v_proj(x), self.n_heads)
        weights = self.attn_dropout(attention_weights(q, k, mask))  # (B, H, T, T)
        return self.o_proj(merge_heads(weights @ v))  # (B, T, D)


# ----------------------------------------------------------------------------------------
# Positions: attention itself is permutation-equivariant, so order must be injected.


def sinusoidal_positions(T: int, d: int, base: float = 10000.0) -> Tensor:
    """(T, d) float32 table of "Attention Is All You Need": even columns sin, odd columns cos.

    PE[p, 2i] = sin(p / base^(2i/d)),  PE[p, 2i+1] = cos(p / base^(2i/d)).
    """
    position = torch.arange(T, dtype=torch.float32)[:, None]  # (T, 1)
    inv_freq = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)  # (ceil(d/2),)
    angles = position * inv_freq  # (T, ceil(d/2))
    pe = torch.zeros(T, d)
    pe[:, 0::2] = torch.sin(angles)
    pe[:, 1::2] = torch.cos(angles[:, : d // 2])
    return pe


def _rope_angles(positions: Tensor, head_dim: int, base: float, dtype: torch.dtype) -> Tensor:
    """(..., head_dim) rotation angles, the half-width frequencies repeated twice."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=dtype, device=positions.device) / head_dim)
    angles = positions.to(dtype)[..., None] * inv_freq  # (..., head_dim/2)
    return torch.cat([angles, angles], dim=-1)  # (..., head_dim)


def rope_cache(
    T: int, head_dim: int, base: float = 10000.0, device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """(cos, sin), each (T, head_dim) float32, for positions 0..T-1 (Llama/HF layout)."""
    angles = _rope_angles(torch.arange(T, device=device), head_dim, base, torch.float32)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last axis."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x: (..., T, head_dim) with a precomputed `rope_cache` (broadcastable)."""
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def apply_rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding, rotate-half convention (Llama, Hugging Face).

    Dimension i pairs with i + head_dim/2; the pair at frequency base^(-2i/head_dim) turns
    by angle position * frequency. Then <rope(q, m), rope(k, n)> depends only on m - n.

    Args:
        x: (..., T, head_dim) queries or keys.
        positions: integer positions broadcastable to x.shape[:-1], e.g. (T,).
    Returns:
        tensor like x.
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    angles = _rope_angles(positions, x.size(-1), base, dtype)  # (..., T, head_dim)
    return apply_rotary(x, angles.cos(), angles.sin())


def alibi_slopes(n_heads: int) -> Tensor:
    """(H,) ALiBi slopes: the geometric series 2^(-8/H), 2^(-16/H), ... (Press et al.)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        return torch.tensor(power_of_two(n_heads))
    # Otherwise: the slopes of the nearest lower power of two, then every other slope of
    # the next one up (the reference implementation's rule).
    lower = 2 ** math.floor(math.log2(n_heads))
    return torch.tensor(power_of_two(lower) + power_of_two(2 * lower)[0::2][: n_heads - lower])


def alibi_bias(n_heads: int, T: int) -> Tensor:
    """(H, T, T) additive score bias -slope_h * |i - j|: farther keys cost more, per head.

    Pass it as `bias=` to `attention_weights` (with `causal_mask` for a decoder).
    """
    pos = torch.arange(T)
    distance = (pos[:, None] - pos[None, :]).abs().float()  # (T, T)
    return -alibi_slopes(n_heads)[:, None, None] * distance
