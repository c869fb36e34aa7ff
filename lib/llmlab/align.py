"""Post-training: sequence log-probabilities, a Bradley-Terry reward model, DPO and GRPO.

Everything is written against plain tensors first (log-probs, rewards, masks), then small
loops put those pieces around a Hugging Face causal LM with LoRA adapters from `llmlab.lora`.
The reference model is the frozen base: the policy is the same model plus adapters, so the
reference's numbers come from the same model with its adapters switched off (`adapters_off`),
and several policies (DPO, SFT, GRPO) are adapter states on one base (`using_adapters`).

    batch = encode(tokenizer, prompts, responses)               # right-padded chat sequences
    logps = sequence_logprobs(model(**batch.inputs).logits, batch.input_ids, batch.response_mask)
    losses, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=0.1)

The loops take the loss pieces as arguments, so lab 7 trains with the student's own functions.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llmlab import lora

if TYPE_CHECKING:
    import transformers

# ----------------------------------------------------------------------------------------
# Log-probabilities of responses


def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """log p(input_ids[:, t] | input_ids[:, :t]) for every t, 0 at t = 0 (nothing predicts it).

    Args:
        logits: (B, T, V), the model's output on input_ids (position t predicts token t + 1).
        input_ids: (B, T) int64.
    Returns:
        (B, T) float32 (float64 for float64 logits): aligned with input_ids, so a mask over the
        tokens is a mask over their log-probs.
    """
    logp = torch.log_softmax(logits[:, :-1].float() if logits.dtype != torch.float64 else logits[:, :-1], dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)  # (B, T-1): token t+1 under position t
    return F.pad(picked, (1, 0))


def sequence_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean) over response tokens of log p(token | everything before it).

    Args:
        logits: (B, T, V). input_ids: (B, T). response_mask: (B, T), 1 on response tokens,
            0 on the prompt and the padding (position 0 is never a response token).
        average: False: the sum (DPO's log pi(y|x)); True: the mean per response token.
    Returns:
        (B,) in the dtype of token_logprobs.
    """
    mask = response_mask.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    total = (token_logprobs(logits, input_ids) * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


@dataclass
class Batch:
    """Prompts and responses as one right-padded batch of chat sequences."""

    input_ids: Tensor  # (B, T) int64
    attention_mask: Tensor  # (B, T) 1 on real tokens
    response_mask: Tensor  # (B, T) 1 on response tokens (the answer and its end-of-turn token)

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on `device`."""
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device))


def encode(tokenizer: "transformers.PreTrainedTokenizerBase", prompts: Sequence[str], responses: Sequence[str],
           system: str | None = None, max_len: int = 256) -> Batch:
    """Chat-template each (prompt, response) and pad on the right; the response mask covers the reply."""
    rows = []
    for prompt, response in zip(prompts, responses, strict=True):
        messages = ([{"role": "system", "content": system}] if system else []) + \
                   [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        p, r = lora.chat_ids(tokenizer, messages)
        if len(p) >= max_len:
            raise ValueError(f"a prompt of {len(p)} tokens leaves no room for a response in max_len={max_len}")
        rows.append(((p + r)[:max_len], len(p)))
    T = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), T), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), T, dtype=torch.long)
    response_mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention_mask[i, :len(ids)] = 1
        response_mask[i, n_prompt:len(ids)] = 1
    return Batch(input_ids, attention_mask, response_mask)


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes without its LoRA updates: the frozen reference."""
    layers = list(lora.lora_layers(model).values())
    saved = [layer.scaling for layer in layers]
    for layer in layers:
        layer.scaling = 0.0
    try:
        yield model
    finally:
        for layer, s in zip(layers, saved):
            layer.scaling = s


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """A copy of the model's adapter weights (lora_A, lora_B): one policy, kept while the same base trains another."""
    return {k: v.detach().clone() for k, v in lora.lora_state_dict(model).items()}


def load_adapter_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy adapter weights from `adapter_state` back into the model's LoRA parameters, in place."""
    if set(state) != set(lora.lora_state_dict(model)):
        raise ValueError("the adapter state does not fit this model's LoRA layers")
    with torch.no_grad():
        for k, v in lora.lora_state_dict(model).items():
            v.copy_(state[k])


@contextlib.contextmanager
def using_adapters(model: nn.Module, state: dict[str, Tensor]) -> Iterator[nn.Module]:
    """Inside the block the model computes with the adapters `state` (one policy of several on one base)."""
    saved = adapter_state(model)
    load_adapter_state(model, state)
    try:
        yield model
    finally:
        load_adapter_state(model, saved)


def model_logprobs(model: nn.Module, batch: Batch, average: bool = False,
                   logprob_fn: Callable = sequence_logprobs) -> Tensor:
    """(B,) response log-probs of `batch` under `model` (gradients flow when enabled)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return logprob_fn(logits, batch.input_ids, batch.response_mask, average)


# ----------------------------------------------------------------------------------------
# Reward model: Bradley-Terry


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected): P(chosen preferred) = sigmoid of the reward gap."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards).mean()


def preference_accuracy(chosen_rewards: Tensor, rejected_rewards: Tensor) -> float:
    """Share of pairs whose chosen response scores strictly higher."""
    return float((chosen_rewards > rejected_rewards).double().mean())


@torch.no_grad()
def response_features(model: nn.Module, batch: Batch, batch_size: int = 16) -> Tensor:
    """(B, H) float32: the last layer's hidden states averaged over each response's tokens."""
    out = []
    for i in range(0, len(batch.input_ids), batch_size):
        part = Batch(*(t[i:i + batch_size] for t in (batch.input_ids, batch.attention_mask, batch.response_mask)))
        # the transformer without its LM head (a fifth of the compute at this size, and not needed)
        hidden = model.base_model(input_ids=part.input_ids,
                                  attention_mask=part.attention_mask).last_hidden_state.float()  # (b, T, H)
        out.append(lora.mean_pool(hidden, part.response_mask))
    return torch.cat(out)


def train_reward_head(chosen: Tensor, rejected: Tensor, steps: int = 300, lr: float = 1e-2,
                      weight_decay: float = 1e-2, seed: int = 0,
                      loss_fn: Callable[[Tensor, Tensor], Tensor] = bradley_terry_loss) -> nn.Linear:
    """A linear reward r(x) = w . features + b trained full-batch on (N, H) chosen/rejected features."""
    torch.manual_seed(seed)
    head = nn.Linear(chosen.shape[1], 1)
    mean, std = torch.cat([chosen, rejected]).mean(0), torch.cat([chosen, rejected]).std(0) + 1e-6
    with torch.no_grad():  # standardise the features inside the layer, so lr need not follow their scale
        head.weight.zero_()
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = loss_fn(head((chosen - mean) / std).squeeze(-1), head((rejected - mean) / std).squeeze(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # fold the standardisation into the weights: head(features) directly
        w = head.weight / std
        head.bias -= (w * mean).sum()
        head.weight.copy_(w)
    return head.requires_grad_(False)


# ----------------------------------------------------------------------------------------
# DPO


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float = 0.1) -> tuple[Tensor, Tensor, Tensor]:
    """DPO (Rafailov et al. 2023), TRL's "sigmoid" loss.

    Args: four (B,) sequence log-probs (sums over response tokens); beta: strength of the
        implicit KL constraint.
    Returns:
        (losses (B,), chosen_rewards (B,), rejected_rewards (B,)): losses = -log sigmoid(beta *
        (chosen log-ratio - rejected log-ratio)); the implicit rewards beta * log(pi / pi_ref),
        detached (metrics, not part of the loss).
    """
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def dpo_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> dict[str, float]:
    """TRL's logged DPO metrics: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins."""
    return {"rewards/chosen": float(chosen_rewards.mean()), "rewards/rejected": float(rejected_rewards.mean()),
            "rewards/accuracies": float((chosen_rewards > rejected_rewards).float().mean()),
            "rewards/margins": float((chosen_rewards - rejected_rewards).mean())}


@dataclass
class DPOConfig:
    """What a DPO run does; validated."""

    beta: float = 0.1  # strength of the pull toward the reference
    lr: float = 5e-4  # AdamW on the adapters
    steps: int = 20  # optimizer steps
    batch_size: int = 4  # pairs per step
    seed: int = 0  # order of the pairs
    system: str | None = "Answer briefly."  # system prompt of every chat

    def __post_init__(self):
        for name in ("beta", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DPOConfig.{name} must be > 0, got {getattr(self, name)}")
        for name in ("steps", "batch_size"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"DPOConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")


def pair_batch(tokenizer: "transformers.PreTrainedTokenizerBase", pairs: Sequence[dict],
               system: str | None = None) -> Batch:
    """Chosen responses first, then rejected (TRL's order), as one batch of 2 * len(pairs)."""
    prompts = [p["prompt"] for p in pairs]
    return encode(tokenizer, prompts * 2, [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], system)


def pair_logprobs(model: nn.Module, batch: Batch, logprob_fn: Callable = sequence_logprobs
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(policy chosen, policy rejected, reference chosen, reference rejected) log-probs of a pair batch."""
    policy = model_logprobs(model, batch, logprob_fn=logprob_fn)
    with torch.no_grad(), adapters_off(model):
        ref = model_logprobs(model, batch, logprob_fn=logprob_fn)
    return (*policy.chunk(2), *ref.chunk(2))


def train_dpo(model: nn.Module, tokenizer: "transformers.PreTrainedTokenizerBase", pairs: Sequence[dict],
              cfg: DPOConfig, loss_fn: Callable = dpo_loss, logprob_fn: Callable = sequence_logprobs
              ) -> dict[str, list[float]]:
    """DPO on `pairs` with the model's LoRA adapters (the only trainable weights); the reference is
    the same model with adapters off. Returns the per-step history: loss and TRL's reward metrics."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: inject LoRA adapters first")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: dict[str, list[float]] = {"step": [], "loss": [], "rewards/accuracies": [], "rewards/margins": []}
    model.train()
    order: list[int] = []
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            order += torch.randperm(len(pairs), generator=gen).tolist()
        chosen, order = [pairs[i] for i in order[:cfg.batch_size]], order[cfg.batch_size:]
        batch = pair_batch(tokenizer, chosen, cfg.system).to(device)
        losses, chosen_r, rejected_r = loss_fn(*pair_logprobs(model, batch, logprob_fn), cfg.beta)
        loss = torch.as_tensor(losses).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        metrics = dpo_metrics(torch.as_tensor(chosen_r), torch.as_tensor(rejected_r))
        history["step"].append(step)
        history["loss"].append(loss.item())
        for key in ("rewards/accuracies", "rewards/margins"):
            history[key].append(metrics[key])
    model.eval()
    return history


@torch.no_grad()
def evaluate_dpo(model: nn.Module, tokenizer: "transformers.PreTrainedTokenizerBase", pairs: Sequence[dict],
                 beta: float = 0.1, system: str | None = "Answer briefly.", batch_size: int = 8) -> dict[str, float]:
    """Held-out DPO numbers: reward accuracy and margin, and the policy's KL to the reference: at each
    position of a chosen response, the exact KL between the two next-token distributions, averaged
    over the response, then over pairs (a k3 estimate would need tokens sampled from the policy)."""
    model.eval()
    device = next(model.parameters()).device
    chosen_r, rejected_r, kls = [], [], []
    for i in range(0, len(pairs), batch_size):
        batch = pair_batch(tokenizer, pairs[i:i + batch_size], system).to(device)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with adapters_off(model):
            ref_logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        policy, ref = token_logprobs(logits, batch.input_ids), token_logprobs(ref_logits, batch.input_ids)
        seq = (policy * batch.response_mask).sum(-1), (ref * batch.response_mask).sum(-1)
        _, c, r = dpo_loss(*seq[0].chunk(2), *seq[1].chunk(2), beta)
        chosen_r.append(c)
        rejected_r.append(r)
        p, q = torch.log_softmax(logits[:, :-1].float(), -1), torch.log_softmax(ref_logits[:, :-1].float(), -1)
        kl = (p.exp() * (p - q)).sum(-1)  # (B, T-1): KL of the distributions predicting token t + 1
        mask = batch.response_mask[:, 1:].float()
        kls.append(((kl * mask).sum(-1) / mask.sum(-1).clamp(min=1)).chunk(2)[0])
    c, r = torch.cat(chosen_r), torch.cat(rejected_r)
    return {"accuracy": preference_accuracy(c, r), "margin": float((c - r).mean()), "kl": float(torch.cat(kls).mean())}


# ----------------------------------------------------------------------------------------
# GRPO


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """(B * G,) rewards, G consecutive samples per prompt -> (r - group mean) / (group std + eps).

    The std is torch's default (unbiased), as in TRL's GRPOTrainer; a group whose samples all
    score the same gets advantage 0: it teaches nothing.
    """
    grouped = rewards.view(-1, group_size)
    mean, std = grouped.mean(1, keepdim=True), grouped.std(1, keepdim=True)
    return ((grouped - mean) / (std + eps)).reshape(-1)


def per_token_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """The k3 estimate of KL(pi || pi_ref) per sampled token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def sequence_kl(logps: Tensor, ref_logps: Tensor, mask: Tensor) -> Tensor:
    """(B,) mean over each sequence's masked tokens of the k3 estimate."""
    mask = mask.to(logps.dtype)
    return (per_token_kl(logps, ref_logps) * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def grpo_loss(logps: Tensor, old_logps: Tensor, ref_logps: Tensor, advantages: Tensor, mask: Tensor,
              epsilon: float = 0.2, beta: float = 0.04) -> Tensor:
    """GRPO's loss (Shao et al. 2024): a clipped ratio objective with a KL penalty to the reference.

    Args:
        logps, old_logps, ref_logps: (B, T) per-token log-probs of the sampled completions under the
            policy being trained, the policy that sampled them (no gradient), and the reference.
        advantages: (B,), one per completion. mask: (B, T), 1 on completion tokens.
        epsilon: the ratio is clipped to [1 - epsilon, 1 + epsilon]. beta: weight of the KL term.
    Returns:
        a scalar: -(min(ratio * A, clip(ratio) * A) - beta * KL) averaged over each completion's
        tokens, then over completions.
    """
    ratio = torch.exp(logps - old_logps)
    A = advantages[:, None]
    objective = torch.minimum(ratio * A, ratio.clamp(1 - epsilon, 1 + epsilon) * A)
    per_token = -(objective - beta * per_token_kl(logps, ref_logps))
    mask = mask.to(per_token.dtype)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


@dataclass
class GRPOConfig:
    """What a GRPO run does; validated."""

    group_size: int = 4  # G completions sampled per prompt
    prompts_per_step: int = 4  # prompts per optimizer step
    steps: int = 10  # optimizer steps, one per sampled batch (ratio = 1: the clip matters when a batch is reused)
    lr: float = 1e-4  # AdamW on the adapters
    epsilon: float = 0.2  # ratio clip
    beta: float = 0.04  # KL penalty weight
    max_new_tokens: int = 24
    temperature: float = 1.0
    seed: int = 0
    system: str | None = "Answer briefly."
    prefix: str = ""  # the start of every reply, written for the model ("The answer is"); not sampled, not scored

    def __post_init__(self):
        for name in ("group_size", "prompts_per_step", "steps", "max_new_tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise ValueError(f"GRPOConfig.{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise ValueError("GRPOConfig.group_size must be >= 2: advantages compare samples of one prompt")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"GRPOConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.epsilon < 1 or self.beta < 0:
            raise ValueError(f"GRPOConfig: need 0 <= epsilon < 1 and beta >= 0, got {self.epsilon}, {self.beta}")


def chat_prompts(tokenizer: "transformers.PreTrainedTokenizerBase", questions: Sequence[str],
                 system: str | None = None, prefix: str = "") -> tuple[Tensor, Tensor]:
    """Left-padded prompt ids and attention mask (what generation needs) ending with the assistant header
    and, when given, the first words of the reply (`prefix`), so the model continues from them."""
    start = tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []
    rows = []
    for q in questions:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": q}]
        rows.append(list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                       return_dict=True)["input_ids"]) + start)
    T = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return ids, mask


@torch.no_grad()
def sample(model: nn.Module, tokenizer: "transformers.PreTrainedTokenizerBase", questions: Sequence[str],
           n: int, max_new_tokens: int, temperature: float = 1.0, system: str | None = None,
           greedy: bool = False, prefix: str = "") -> tuple[Batch, list[str]]:
    """n completions per question (consecutive), as a Batch over prompt + completion and their texts.

    The completion mask covers the sampled tokens up to and including the first end-of-turn token;
    a `prefix` (the reply's given first words) is part of the prompt, not of the texts.
    """
    device = next(model.parameters()).device
    ids, mask = chat_prompts(tokenizer, questions, system, prefix)
    ids, mask = ids.repeat_interleave(n, 0).to(device), mask.repeat_interleave(n, 0).to(device)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tokenizer.get_vocab() else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=not greedy,
                         temperature=temperature if not greedy else None, top_k=0 if not greedy else None,
                         top_p=1.0 if not greedy else None, eos_token_id=eos,
                         pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
    completion = out[:, ids.shape[1]:]
    ended = (completion == eos).long()
    keep = (ended.cumsum(-1) - ended) == 0  # up to and including the first end-of-turn
    texts = [tokenizer.decode(c[k], skip_special_tokens=True) for c, k in zip(completion, keep)]
    full_mask = torch.cat([mask, keep.long()], 1)
    response_mask = torch.cat([torch.zeros_like(mask), keep.long()], 1)
    return Batch(out, full_mask, response_mask), texts


def train_grpo(model: nn.Module, tokenizer: "transformers.PreTrainedTokenizerBase", problems: Sequence[dict],
               reward_fn: Callable[[str, dict], float], cfg: GRPOConfig, advantage_fn: Callable = group_advantages,
               loss_fn: Callable = grpo_loss, logprob_fn: Callable = token_logprobs) -> dict[str, list[float]]:
    """GRPO on `problems` ({"question", ...}): sample G completions per prompt, score each with
    reward_fn(text, problem), normalise within the group, one clipped update with a KL penalty
    to the reference (the model with adapters off). Returns per-step mean reward, loss and KL."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters: inject LoRA adapters first")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)  # sampling
    history: dict[str, list[float]] = {"step": [], "reward": [], "loss": [], "kl": []}
    for step in range(cfg.steps):
        chosen = [problems[int(i)] for i in torch.randperm(len(problems), generator=gen)[:cfg.prompts_per_step]]
        model.eval()
        batch, texts = sample(model, tokenizer, [p["question"] for p in chosen], cfg.group_size,
                              cfg.max_new_tokens, cfg.temperature, cfg.system, prefix=cfg.prefix)
        rewards = torch.tensor([float(reward_fn(t, chosen[i // cfg.group_size])) for i, t in enumerate(texts)])
        advantages = torch.as_tensor(advantage_fn(rewards, cfg.group_size)).float().to(batch.input_ids.device)
        # every completion starts at the same column (left-padded prompts), so only the last k positions
        # need logits: the last prompt token (predicting the first completion token) and the completion
        k = batch.input_ids.shape[1] - int(batch.response_mask.any(0).long().argmax()) + 1
        ids, mask = batch.input_ids[:, -k:], batch.response_mask[:, -k:]  # (B, k)
        with torch.no_grad(), adapters_off(model):
            ref = logprob_fn(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                   logits_to_keep=k).logits, ids)
        model.train()
        logps = logprob_fn(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 logits_to_keep=k).logits, ids)
        # one update per sampled batch: the sampling policy is this one, so old = logps without gradient
        loss = loss_fn(logps, logps.detach(), ref, advantages, mask, cfg.epsilon, cfg.beta)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        history["step"].append(step)
        history["reward"].append(float(rewards.mean()))
        history["loss"].append(loss.item())
        history["kl"].append(float(sequence_kl(logps.detach(), ref, mask).mean()))
    model.eval()
    return history


def add_adapters(model: nn.Module, r: int = 8, lora_alpha: float = 16, seed: int = 0,
                 target_modules: Sequence[str] = ("q_proj", "v_proj")) -> list[str]:
    """Freeze the model and give it fresh LoRA adapters (B = 0: it starts as the reference)."""
    model.requires_grad_(False)
    torch.manual_seed(seed)
    return lora.inject(model, lora.LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=list(target_modules)))
