"""LoRA: fine-tune a frozen pretrained model through small low-rank adapters (peft's names).

A pretrained Linear layer computes y = x W^T + b with W of shape (out, in). LoRA freezes W and
learns a low-rank update instead: W' = W + (lora_alpha / r) * B A, with A (r, in) and B (out, r),
r much smaller than in and out. A starts random and B at zero, so at step 0 the adapted model
is exactly the pretrained one; only r * (in + out) numbers per layer are trained, and after
training B A can be merged into W so inference costs nothing extra.

Read top-down: the math as pure functions (init, forward, merged weight) -> `LoraConfig`, what
an adapter is -> `LoRALinear`, the layer that wraps an nn.Linear -> finding and replacing target
layers by dotted name (`inject`)
-> merge / unmerge -> trainable-parameter accounting -> adapter files -> peft interop ->
instruction-tuning data (chat template, prompt tokens masked out of the loss) -> fine-tuning
an encoder for classification.

Names follow peft: `LoraConfig`, `lora_A`, `lora_B`, `r`, `lora_alpha`, `lora_dropout`, `scaling`,
`base_layer`, `target_modules`, `merge`/`unmerge`, `merge_and_unload`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from llmlab.model import IGNORE_INDEX
from llmlab.train import HFCausalLM

if TYPE_CHECKING:
    import transformers

# ----------------------------------------------------------------------------------------
# The math, as pure functions of tensors


def lora_init(in_features: int, out_features: int, r: int, seed: int | None = None) -> tuple[Tensor, Tensor]:
    """peft's default init: lora_A (r, in) Kaiming-uniform, lora_B (out, r) zeros (float32).

    Kaiming-uniform with a = sqrt(5) (nn.Linear's own default) draws A from
    U(-1/sqrt(in), 1/sqrt(in)). B = 0 makes the update B A zero, so training starts from
    the pretrained model; A random gives B a non-zero gradient from the first step (if both
    were zero, neither would ever move). `seed` None uses torch's global RNG.
    """
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    lora_A = torch.empty(r, in_features)
    nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5), generator=generator)
    return lora_A, torch.zeros(out_features, r)


def lora_forward(x: Tensor, weight: Tensor, bias: Tensor | None, lora_A: Tensor, lora_B: Tensor,
                 scaling: float) -> Tensor:
    """x (..., in) -> (..., out): the frozen layer plus the scaled low-rank path.

    weight (out, in) and bias (out,) or None are the pretrained layer's; lora_A (r, in),
    lora_B (out, r). Going through the rank-r bottleneck (x A^T, then B^T) costs
    r * (in + out) multiply-adds per token instead of in * out for a full update.
    """
    return F.linear(x, weight, bias) + scaling * F.linear(F.linear(x, lora_A), lora_B)


def merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """W + scaling * B A, (out, in): one plain Linear weight equivalent to the adapted layer."""
    return weight + (scaling * (lora_B @ lora_A)).to(weight.dtype)


# ----------------------------------------------------------------------------------------
# The configuration: which layers get an adapter, and its shape


def _check_shape(r: Any, lora_alpha: Any, lora_dropout: Any, owner: str = "") -> None:
    """ValueError naming the field (after `owner`, e.g. "LoraConfig.") unless r, lora_alpha, lora_dropout are valid."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"{owner}r must be a positive int, got {r!r}")
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)) or not 0 < lora_alpha < math.inf:
        raise ValueError(f"{owner}lora_alpha must be a number > 0, got {lora_alpha!r}")
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{owner}lora_dropout must be in [0, 1), got {lora_dropout!r}")


@dataclass
class LoraConfig:
    """An adapter in peft's words: `LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "v_proj"))`."""

    r: int = 8  # rank of the update B A
    lora_alpha: float = 16  # the update is scaled by lora_alpha / r
    lora_dropout: float = 0.0  # dropout on the adapter's input (never on the frozen path)
    # layers to wrap: a name matches when it is a target or ends with "." + a target (peft's rule)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    # only the targets inside these blocks (the N of "layers.N."); None: every block
    layers_to_transform: tuple[int, ...] | None = None

    def __post_init__(self):
        _check_shape(self.r, self.lora_alpha, self.lora_dropout, "LoraConfig.")
        targets = self.target_modules
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"LoraConfig.target_modules must be non-empty names, got {self.target_modules!r}")
        self.target_modules = targets
        layers = self.layers_to_transform
        if layers is not None:
            layers = (layers,) if isinstance(layers, int) else tuple(layers)
            if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise ValueError(f"LoraConfig.layers_to_transform must be block indices >= 0, got "
                                 f"{self.layers_to_transform!r}")
            self.layers_to_transform = layers

    @property
    def scaling(self) -> float:
        """lora_alpha / r: what B A is multiplied by."""
        return self.lora_alpha / self.r


# ----------------------------------------------------------------------------------------
# The layer


def _not_linear(name: str, module: nn.Module) -> str:
    """The error for a target that is not an nn.Linear, explaining GPT-2's Conv1D trap."""
    kind = f"{type(module).__module__}.{type(module).__qualname__}"
    text = f"{name!r} is a {kind}, not a torch.nn.Linear; LoRALinear wraps nn.Linear only."
    if type(module).__name__ == "Conv1D":
        text += (" GPT-2's Conv1D computes x @ weight + bias with weight stored (in_features, "
                 "out_features), the transpose of nn.Linear's (out_features, in_features): an adapter "
                 "built for nn.Linear would get its shapes and its merge wrong. Target nn.Linear layers "
                 "(Llama's q_proj, v_proj, ...), or use peft with fan_in_fan_out=True for Conv1D.")
    return text


class LoRALinear(nn.Module):
    """Wraps a frozen nn.Linear: forward(x) = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling."""

    def __init__(self, base_layer: nn.Linear, r: int = 8, lora_alpha: float = 16, lora_dropout: float = 0.0):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise ValueError(f"base_layer: {_not_linear('base_layer', base_layer)}")
        _check_shape(r, lora_alpha, lora_dropout)
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = lora_alpha / r  # so changing r does not change the update's scale much
        like = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **like)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **like)
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self, seed: int | None = None) -> None:
        """A Kaiming-uniform, B zeros (`lora_init`): the layer computes exactly base_layer again."""
        lora_A, lora_B = lora_init(self.in_features, self.out_features, self.r, seed)
        with torch.no_grad():
            self.lora_A.weight.copy_(lora_A)
            self.lora_B.weight.copy_(lora_B)

    def forward(self, x: Tensor) -> Tensor:
        """(..., in) -> (..., out). Dropout acts on the adapter's input only, never on the base path."""
        result = self.base_layer(x)
        if self.merged:  # B A already lives inside base_layer.weight
            return result
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold scaling * B A into the base weight: same outputs, no extra cost per token."""
        if self.merged:
            raise ValueError("this LoRALinear is already merged; unmerge() first")
        w = self.base_layer.weight
        w.copy_(merged_weight(w, self.lora_A.weight, self.lora_B.weight, self.scaling))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract scaling * B A again, so the adapter can train on (exact up to rounding)."""
        if not self.merged:
            raise ValueError("this LoRALinear is not merged; nothing to unmerge")
        w = self.base_layer.weight
        w.copy_(merged_weight(w, self.lora_A.weight, -self.lora_B.weight, self.scaling))
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, merged={self.merged}"


# ----------------------------------------------------------------------------------------
# Injection: find the target layers by name and replace them in their parent module


def match_targets(names: Iterable[str], target_modules: Sequence[str]) -> list[str]:
    """The names that are a target or end with "." + a target (peft's rule), in the given order.

    "q_proj" matches "model.layers.0.self_attn.q_proj" but neither "q_proj_extra" nor
    "model.layers.0.self_attn.xq_proj": a plain substring test would catch those too.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return [n for n in names if any(n == t or n.endswith("." + t) for t in targets)]


def in_layers(names: Iterable[str], layers: Sequence[int]) -> list[str]:
    """The names inside one of the blocks `layers`: "model.layers.3.mlp.up_proj" is in block 3 (peft's layers_pattern)."""
    found = [(n, re.search(r"(?:^|\.)layers\.(\d+)\.", n)) for n in names]
    return [n for n, m in found if m and int(m.group(1)) in layers]


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the dotted path `name` points; return the module it replaced.

    `setattr(model, "layers.0.self_attn.q_proj", new)` does NOT do this: it registers a new
    child literally called "layers.0.self_attn.q_proj" on `model` (its parameters even count
    as trainable), while forward keeps calling the old layer. The assignment must happen on
    the parent, with the last part of the path only.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)  # "" -> model itself
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def check_injection(model: nn.Module, names: Iterable[str] = ()) -> None:
    """Raise ValueError if `model` shows the dotted-setattr trap or a name is not a LoRALinear."""
    for owner, module in model.named_modules():
        dotted = [key for key in module._modules if "." in key]
        if dotted:
            where = f"{owner}." if owner else ""
            raise ValueError(f"module {where}{dotted[0]!r} is registered under a dotted name: "
                             f"setattr(model, {dotted[0]!r}, ...) adds a new child that forward never "
                             "calls instead of replacing the layer; set the last part of the path on "
                             "the parent module (replace_submodule)")
    for name in names:
        if not isinstance(model.get_submodule(name), LoRALinear):
            raise ValueError(f"{name!r} is a {type(model.get_submodule(name)).__name__}, not a LoRALinear")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in `model`, by dotted name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject(model: nn.Module, config: LoraConfig | Sequence[str], **fields: Any) -> list[str]:
    """Freeze `model` and wrap each nn.Linear named by `config.target_modules` in a LoRALinear, in place.

    `config` is a LoraConfig, or the target_modules themselves with LoraConfig's other fields
    as keywords: `inject(model, ["q_proj", "v_proj"], r=4, lora_alpha=8)`; with
    `layers_to_transform`, only the targets inside those blocks are wrapped. Returns the dotted
    names of the wrapped layers. Raises ValueError if nothing matches, if a match is not an
    nn.Linear (GPT-2's Conv1D, an embedding...) or if adapters are present already.
    """
    if isinstance(config, LoraConfig):
        if fields:
            raise TypeError(f"inject got a LoraConfig and keywords {sorted(fields)}: set them in the config")
    else:
        config = LoraConfig(target_modules=config, **fields)
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; inject once (or merge_and_unload first)")
    names = match_targets((n for n, _ in model.named_modules()), config.target_modules)
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]
        raise ValueError(f"target_modules={list(config.target_modules)!r} matched no module; "
                         f"Linear layers here are named like {linear}")
    if config.layers_to_transform is not None:
        names = in_layers(names, config.layers_to_transform)
        if not names:
            raise ValueError(f"layers_to_transform={list(config.layers_to_transform)!r}: no target_modules "
                             "match inside those blocks (names like 'model.layers.N.self_attn.q_proj')")
    for name in names:
        if not isinstance(model.get_submodule(name), nn.Linear):
            raise ValueError(f"target_modules: {_not_linear(name, model.get_submodule(name))}")
    model.requires_grad_(False)  # everything frozen; the new lora_A / lora_B are the only trainables
    for name in names:
        layer = LoRALinear(model.get_submodule(name), config.r, config.lora_alpha, config.lora_dropout)
        replace_submodule(model, name, layer)
    check_injection(model, names)
    return names


# ----------------------------------------------------------------------------------------
# Merging


def merge(model: nn.Module) -> None:
    """Merge every adapter of `model` into its base weight (see LoRALinear.merge)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo `merge` on every adapter of `model`."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain nn.Linear back in its place; return `model`."""
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            layer.merge()
        replace_submodule(model, name, layer.base_layer)
    return model


# ----------------------------------------------------------------------------------------
# Accounting


@dataclass(frozen=True)
class TrainableParameters:
    """How many parameters an optimizer would update, out of all of them."""

    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:  # peft's print_trainable_parameters line
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || trainable%: {self.percent:.4f}"


def trainable_parameters(model: nn.Module) -> TrainableParameters:
    """Count trainable and all parameters (a weight shared by two modules counts once)."""
    params = list(model.parameters())  # deduplicated: tied embeddings appear once
    return TrainableParameters(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))


# ----------------------------------------------------------------------------------------
# Adapter files: only lora_A / lora_B, in safetensors, with what is needed to re-inject them


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter weights only: every `...lora_A.weight` and `...lora_B.weight` of `model`."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def save_adapter(model: nn.Module, path: str | Path) -> int:
    """Save the adapter weights only (safetensors; r, alpha, dropout, targets as metadata); return the file's bytes."""
    from safetensors.torch import save_file

    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA layers to save")
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    meta = {"r": str(first.r), "lora_alpha": str(first.lora_alpha), "lora_dropout": str(dropout),
            "target_modules": json.dumps(list(layers))}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}, str(path), metadata=meta)
    return path.stat().st_size


def load_adapter(model: nn.Module, path: str | Path) -> list[str]:
    """Load a `save_adapter` file into `model`, injecting the adapters first if it has none; return the names."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = json.loads(meta["target_modules"])
    if not lora_layers(model):
        inject(model, LoraConfig(int(meta["r"]), float(meta["lora_alpha"]), float(meta["lora_dropout"]), names))
    expected = set(lora_state_dict(model))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"adapter file {path} does not fit this model: missing {missing[:3]}, unexpected {extra[:3]}")
    model.load_state_dict(tensors, strict=False)
    return names


# ----------------------------------------------------------------------------------------
# peft interop: the same adapter under peft's parameter names


def to_peft_key(key: str, adapter_name: str = "default") -> str:
    """Our state-dict key -> peft's: "base_model.model." in front, the adapter name before ".weight".

    "model.layers.0.self_attn.q_proj.lora_A.weight" ->
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"; other keys
    (the frozen base weights) keep their name, with base_layer where peft wraps a layer.
    """
    for part in (".lora_A.", ".lora_B."):
        if part in key:
            head, tail = key.split(part)
            return f"base_model.model.{head}{part}{adapter_name}.{tail}"
    return f"base_model.model.{key}"


def to_peft_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """The adapter weights of `model` under peft's names, for peft_model.load_state_dict(..., strict=False)."""
    return {to_peft_key(k, adapter_name): v for k, v in lora_state_dict(model).items()}


# ----------------------------------------------------------------------------------------
# Instruction tuning: chat-formatted examples whose loss covers the response tokens only


def sft_example(prompt_ids: Sequence[int], response_ids: Sequence[int], max_len: int,
                pad_id: int) -> tuple[Tensor, Tensor]:
    """(x, y), each (max_len,) int64, for training on the response only.

    The sequence is prompt + response, cut to max_len + 1 tokens; x is all but its last token,
    y all but its first (y[t] is the token after x[t]). Targets that are prompt tokens or
    padding are IGNORE_INDEX, so the loss counts only predictions of response tokens: the
    model is taught to answer, not to reproduce the question. x is right-padded with pad_id.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    ids = (list(prompt_ids) + list(response_ids))[: max_len + 1]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + list(response_ids))[: max_len + 1]
    x, y = ids[:-1], labels[1:]
    pad = max_len - len(x)
    return torch.tensor(x + [pad_id] * pad), torch.tensor(y + [IGNORE_INDEX] * pad)


def chat_ids(tokenizer: "transformers.PreTrainedTokenizerBase", messages: list[dict]) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of a conversation whose last message is the assistant's answer.

    The prompt is the chat template applied to every earlier message plus the generation
    prompt ("<|im_start|>assistant\\n"), exactly what the model sees when asked to answer; the
    response is the rest of the templated text, end-of-turn token included, so the model
    also learns to stop.
    """
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("messages must end with the assistant's reply")
    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return encode(prompt), encode(full[len(prompt):])


def chat_dataset(tokenizer: "transformers.PreTrainedTokenizerBase", conversations: Iterable[list[dict]],
                 max_len: int) -> list[tuple[Tensor, Tensor]]:
    """`sft_example` pairs for `llmlab.train.train`; conversations with no response token within max_len are dropped."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    for messages in conversations:
        x, y = sft_example(*chat_ids(tokenizer, messages), max_len, pad_id)
        if (y != IGNORE_INDEX).any():
            out.append((x, y))
    return out


@torch.no_grad()
def response_loss(model: HFCausalLM, examples: Sequence[tuple[Tensor, Tensor]], batch_size: int = 16) -> float:
    """Mean cross-entropy per response token over all `examples` (exact: every token counted once)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        x, y = (torch.stack(t).to(device) for t in zip(*examples[start:start + batch_size]))
        logits, _ = model(x)
        total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        count += int((y != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / count


@torch.no_grad()
def reply(model: nn.Module, tokenizer: "transformers.PreTrainedTokenizerBase", instruction: str,
          max_new_tokens: int = 40) -> str:
    """The model's greedy answer to one user message, through the chat template."""
    messages = [{"role": "user", "content": instruction}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").to(next(model.parameters()).device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


# ----------------------------------------------------------------------------------------
# Classification: an encoder (LoRA'd or frozen) + mean pooling + a linear head


def mean_pool(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """(B, T, H), (B, T) 1/0 -> (B, H): the mean of each sequence's real (unpadded) token vectors."""
    mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)  # (B, T, 1)
    return (hidden_states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class EncoderClassifier(nn.Module):
    """Encoder -> mean pooling -> Linear head; forward(x, y) -> (logits, loss), so `train` drives it."""

    def __init__(self, encoder: nn.Module, n_classes: int, pad_id: int):
        super().__init__()
        self.encoder, self.pad_id = encoder, pad_id
        self.head = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, x: Tensor, y: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """x (B, T) right-padded token ids, y (B,) class ids -> logits (B, n_classes), mean cross-entropy."""
        mask = (x != self.pad_id).long()
        hidden = self.encoder(input_ids=x, attention_mask=mask).last_hidden_state  # (B, T, H)
        logits = self.head(mean_pool(hidden, mask))
        return logits, None if y is None else F.cross_entropy(logits.float(), y)

    configure_optimizers = HFCausalLM.configure_optimizers  # AdamW over the trainable parameters only

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 64) -> Tensor:
        """(N, T) token ids -> (N,) predicted class ids."""
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        preds = torch.cat([self(chunk.to(device))[0].argmax(-1).cpu() for chunk in x.split(batch_size)])
        self.train(was_training)
        return preds


def encode_texts(tokenizer: "transformers.PreTrainedTokenizerBase", texts: Sequence[str], max_len: int) -> Tensor:
    """(N, max_len) int64 token ids, truncated and right-padded with the tokenizer's pad id."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_len, padding="max_length", return_tensors="pt")
    return enc["input_ids"]


def confusion_matrix(preds: Sequence[int] | Tensor, labels: Sequence[int] | Tensor, n_classes: int) -> Tensor:
    """(n_classes, n_classes) int64 counts: entry [i, j] = examples of true class i predicted as j."""
    preds, labels = torch.as_tensor(preds).long(), torch.as_tensor(labels).long()
    return torch.bincount(labels * n_classes + preds, minlength=n_classes * n_classes).view(n_classes, n_classes)


def macro_f1(confusion: Tensor) -> float:
    """Mean over classes of F1 = 2 TP / (2 TP + FP + FN), precision's and recall's harmonic mean (0 if undefined)."""
    confusion = confusion.double()
    tp = confusion.diag()
    predicted, actual = confusion.sum(0), confusion.sum(1)
    f1 = torch.where(predicted + actual > 0, 2 * tp / (predicted + actual).clamp(min=1), torch.zeros_like(tp))
    return float(f1.mean())
