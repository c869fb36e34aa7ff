"""Mixture of experts: each token goes through k of E expert MLPs, picked by a learned router.

Total parameters grow with E, compute per token only with k: an MoE with E experts of width
h and k = 1 costs what one dense MLP of width h costs ("active parameters").
- routing: router logits (n_tokens, E) -> softmax -> the top-k experts of each token and their
  weights (renormalised over the k, Mixtral; or the raw probability, Switch with k = 1);
- load balancing (Switch eq. 4-6, as Mixtral / Hugging Face compute it):
  E * sum_e f_e * P_e, f_e = top-k assignments to e per token, P_e = mean router probability;
  without it the router collapses onto a few experts, which then learn faster and win more;
- capacity: an expert takes at most ceil(capacity_factor * n_tokens * k / E) tokens, so
  batches have a fixed shape; the rest are dropped (their residual passes them through).
  First choices are served before second choices, each in token order.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llmlab.model import GPT, GPTConfig, SwiGLU


def top_k_routing(router_logits: Tensor, k: int, renormalize: bool = True) -> tuple[Tensor, Tensor]:
    """(n_tokens, E) logits -> (weights (n_tokens, k), experts (n_tokens, k) int64), best expert first."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(router_logits.dtype), experts


def load_balancing_loss(router_logits: Tensor, k: int) -> Tensor:
    """Switch/Mixtral auxiliary loss of (n_tokens, E) logits: 1.0 when routing is uniform (k = 1), up to E*k."""
    n_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)  # (n_tokens, E)
    experts = torch.topk(probs, k, dim=-1).indices
    assigned = F.one_hot(experts, n_experts).sum(dim=1).float()  # (n_tokens, E): 1 where e is one of the k
    return n_experts * (assigned.mean(dim=0) * probs.mean(dim=0)).sum()


def expert_capacity(n_tokens: int, n_experts: int, k: int, capacity_factor: float) -> int:
    """Slots per expert: ceil(capacity_factor * n_tokens * k / n_experts)."""
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


def capacity_mask(experts: Tensor, n_experts: int, capacity: int) -> Tensor:
    """(n_tokens, k) bool: which assignments fit; choice 0 of every token first, each choice in token order."""
    n_tokens, k = experts.shape
    order = experts.t().reshape(-1)  # (k * n_tokens,): all first choices, then all second choices
    onehot = F.one_hot(order, n_experts)  # (k * n_tokens, E)
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1  # 0-based slot of each assignment in its expert
    return (position < capacity).view(k, n_tokens).t()


class MoEMLP(nn.Module):
    """A drop-in for the course GPT's MLP: (B, T, C) -> (B, T, C) through k of n_experts SwiGLU experts.

    After each forward: `router_logits` (B*T, E) for the auxiliary loss, `tokens_per_expert`
    (E,) kept assignments, and `dropped` (the fraction of assignments over capacity).
    """

    def __init__(self, config: GPTConfig, n_experts: int, k: int = 1, capacity_factor: float | None = 1.25,
                 expert_hidden: int | None = None):
        super().__init__()
        if not 1 <= k <= n_experts:
            raise ValueError(f"need 1 <= k <= n_experts, got k={k}, n_experts={n_experts}")
        self.n_experts, self.k, self.capacity_factor = n_experts, k, capacity_factor
        expert_cfg = dataclasses.replace(config, hidden_dim=expert_hidden or config.hidden_dim)
        self.router = nn.Linear(config.n_embd, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(expert_cfg) for _ in range(n_experts))
        self.router_logits: Tensor | None = None
        self.tokens_per_expert = torch.zeros(n_experts)
        self.dropped = 0.0

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        tokens = x.reshape(B * T, C)
        logits = self.router(tokens)  # (B*T, E)
        weights, experts = top_k_routing(logits, self.k, renormalize=self.k > 1)  # (B*T, k) each
        keep = torch.ones_like(experts, dtype=torch.bool)
        if self.capacity_factor is not None:
            cap = expert_capacity(B * T, self.n_experts, self.k, self.capacity_factor)
            keep = capacity_mask(experts, self.n_experts, cap)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token, slot = torch.nonzero((experts == e) & keep, as_tuple=True)
            if token.numel():
                y = expert(tokens[token]) * weights[token, slot, None]  # (n_e, C)
                out = out.index_add(0, token, y)
        self.router_logits = logits
        self.tokens_per_expert = torch.bincount(experts[keep], minlength=self.n_experts).detach().cpu()
        self.dropped = 1.0 - float(keep.float().mean())
        return out.view(B, T, C)


def moe_gpt(config: GPTConfig, n_experts: int, k: int = 1, capacity_factor: float | None = 1.25,
            expert_hidden: int | None = None) -> GPT:
    """A course GPT whose every block's MLP is an MoEMLP (same attention, embeddings, head)."""
    model = GPT(config)
    for block in model.layers:
        block.mlp = MoEMLP(config, n_experts, k, capacity_factor, expert_hidden)
    for name, p in model.named_parameters():  # GPT's init, applied to the new MLPs
        if ".mlp." in name:
            std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("down_proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std)
    return model


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    """The MoEMLP modules of a model, in order."""
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def aux_loss(model: nn.Module) -> Tensor:
    """Mean load-balancing loss of the model's MoE layers over their last forward."""
    layers = moe_layers(model)
    return torch.stack([load_balancing_loss(m.router_logits, m.k) for m in layers]).mean()


def active_params(model: nn.Module) -> int:
    """Parameters one token uses: all, minus the experts it does not visit (E - k of each MoE layer)."""
    total = sum(p.numel() for p in model.parameters())
    for m in moe_layers(model):
        per_expert = sum(p.numel() for p in m.experts[0].parameters())
        total -= (m.n_experts - m.k) * per_expert
    return total
