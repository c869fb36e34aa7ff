"""The tool-use LoRA adapter: its recipe, its training set, a trainer that runs the shared prompt
once per batch, and the builder of the registry asset `tool-use-adapter` (see `llmlab.assets`).

Every training example is one assistant turn of an episode, with the loss on that turn only;
all of them start with the same system prompt, which is most of their tokens. Training runs
that prefix once per batch and broadcasts its keys and values to every example, which gives
the loss and gradients of the full forward at a fraction of its cost (`shared_prefix_lm`).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmlab.agent.loop import episode_messages
from llmlab.agent.parse import OPEN, system_prompt
from llmlab.agent.tools import default_tools

if TYPE_CHECKING:  # llmlab.lora imports torch: only training needs it
    import torch

    from llmlab.lora import LoraConfig

ASSET = "tool-use-adapter"  # its name in the asset registry
ADAPTER_FILE = "adapter.safetensors"  # the llmlab.lora file inside the asset's folder


def _tool_use_lora() -> "LoraConfig":
    """The adapter's shape: rank 8 on every linear layer of the top 15 of SmolLM2-135M's 30 blocks.

    With q_proj and v_proj alone the model learned the format but not *when* to look up. The
    bottom blocks stay frozen, so backward stops at block 15 and keeps no activations below it, and
    the trainer runs each example through them once (`shared_prefix_lm`):
    a step costs much less than adapting all 30, at the same held-out success (README, lab 6).
    """
    from llmlab.lora import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"), layers_to_transform=tuple(range(15, 30)))


@dataclass
class AdapterRecipe:
    """How the tool-use LoRA adapter is trained; with its training set, it is the asset's cache key."""

    base: str = "smollm2-135m-instruct"  # asset name of the model adapted
    n_episodes: int = 240  # distinct training episodes (data.tool_episodes, split "train")
    n_chat: int = 40  # extra tool-free questions (data.instruction_pairs, split "train"), answered directly
    max_steps: int = 50  # optimizer steps: 50 x 8 = 400 examples (24 x 8 left it undertrained: 2/30 held out)
    batch_size: int = 8  # examples (assistant turns) per step; the shared prompt runs once per step
    lr: float = 2e-3
    lora: "LoraConfig" = field(default_factory=_tool_use_lora)  # r, lora_alpha, lora_dropout, target_modules
    max_len: int = 480  # tokens per training example (the longest turn with its prompt is ~470)
    seed: int = 0  # which episodes, lora_A's init, the batch order

    def __post_init__(self):
        from llmlab.lora import LoraConfig

        if isinstance(self.lora, dict):  # the registry's recipe is JSON
            self.lora = LoraConfig(**self.lora)
        for name in ("n_episodes", "max_steps", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"AdapterRecipe.{name} must be >= 1, got {getattr(self, name)}")
        if self.n_chat < 0:
            raise ValueError(f"AdapterRecipe.n_chat must be >= 0, got {self.n_chat}")


def training_conversations(recipe: AdapterRecipe) -> list[list[dict]]:
    """The training set: one conversation per assistant turn, ending with that turn.

    The episodes hold far more distinct arithmetic questions than facts or tool-free
    questions, so the smaller kinds are repeated until each kind (calculator, lookup, no
    tool) weighs the same: otherwise the model learns to call the calculator and to answer
    everything else from "memory". Tool-free questions are the episodes' own plus
    `recipe.n_chat` plain instructions (no arithmetic: that is the calculator's), so that
    answering directly is learnt as a habit rather than as a list of memorised answers.
    """
    from llmlab import data

    tools = default_tools()
    episodes = data.tool_episodes(recipe.n_episodes, "train", seed=recipe.seed)
    pairs = data.instruction_pairs(2 * recipe.n_chat + 20, "train", seed=recipe.seed)
    # no arithmetic: "What is 12 plus 7?" wants the calculator
    chat = [p for p in pairs if not p["instruction"].startswith("What is")][: recipe.n_chat]
    episodes += [{"question": p["instruction"], "tool": None,
                  "transcript": f"Thought: No tool is needed for this.\nFinal Answer: {p['response']}"} for p in chat]
    by_tool: dict[str | None, list[list[dict]]] = {}
    for episode in episodes:
        messages = episode_messages(episode, tools)
        by_tool.setdefault(episode["tool"], []).extend(
            messages[: i + 1] for i, m in enumerate(messages) if m["role"] == "assistant")
    largest = max(len(group) for group in by_tool.values())
    return [group[i % len(group)] for group in by_tool.values() for i in range(largest)]


def recipe_inputs(**recipe: Any) -> dict:
    """What the adapter depends on besides its registry recipe (`Asset.inputs`): the recipe with
    its defaults filled in, a hash of the training conversations, and the prompt format."""
    full = AdapterRecipe(**recipe)
    conversations = json.dumps(training_conversations(full), sort_keys=True)
    return {"recipe": dataclasses.asdict(full), "prompt": system_prompt(default_tools()) + OPEN,
            "conversations": hashlib.sha256(conversations.encode()).hexdigest()}


def shared_prefix_lm(model: "torch.nn.Module", prefix: "torch.Tensor") -> "torch.nn.Module":
    """`model` (a Hugging Face causal LM) for `llmlab.train.train`, when every example starts with `prefix` (P,).

    forward(x, y) runs the prefix once (batch 1), broadcasts its keys and values over the
    batch, and runs only each example's own tokens after it; logits are computed only where
    a target is. Autograd carries the gradients of every example back through the one
    prefix, so loss and gradients equal the full forward's (up to float rounding) while a
    batch of B costs about P + B x suffix tokens instead of B x (P + suffix).
    The blocks below the first one with a trainable parameter never change (and have no
    dropout), so the prefix goes through them once for the whole training, and each example
    once however often it is drawn.
    The attention mask comes from the targets: tokens after an example's last target are
    padding (the pad token may be a real token elsewhere, e.g. <|im_end|>).
    """
    return _shared_prefix_class()(model, prefix)


def _blocks_view(body: "torch.nn.Module", blocks: list, norm: "torch.nn.Module") -> "torch.nn.Module":
    """A shallow copy of a Hugging Face decoder body that runs only `blocks` and ends with `norm`; it shares every module."""
    import copy

    import torch

    view = copy.copy(body)
    view._modules = dict(body._modules)  # its own table of children, the same children
    view.layers, view.norm = torch.nn.ModuleList(blocks), norm
    return view


@functools.cache
def _shared_prefix_class() -> type:
    """The module class behind `shared_prefix_lm`, made on first use (this package imports no torch)."""
    import inspect

    import torch
    from transformers import DynamicCache

    from llmlab.model import IGNORE_INDEX
    from llmlab.train import HFCausalLM

    def trains(module: torch.nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    class SharedPrefixLM(HFCausalLM):
        def __init__(self, model: torch.nn.Module, prefix: torch.Tensor):
            super().__init__(model)
            self.register_buffer("prefix", prefix.detach().clone().long(), persistent=False)  # (P,)
            # transformers 5 renamed the cache argument `past_key_values` to `cache`
            body = model.model
            names = inspect.signature(body.forward).parameters
            self.cache_arg = "cache" if "cache" in names else "past_key_values"
            if trains(body.embed_tokens):
                raise ValueError("shared_prefix_lm: the embeddings must be frozen (LoRA trains adapters only)")
            blocks = list(body.layers)
            n = next((i for i, block in enumerate(blocks) if trains(block)), len(blocks))
            # a tuple, so that the views are not submodules: parameters and state_dict stay the model's
            self.halves = (_blocks_view(body, blocks[:n], torch.nn.Identity()), _blocks_view(body, blocks[n:], body.norm))
            self.frozen: tuple | None = None  # the prefix after the frozen blocks, and their keys and values
            self.seen: dict[bytes, torch.Tensor] = {}  # an example's tokens -> its hidden states after the frozen blocks

        def frozen_prefix(self) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
            """The prefix's hidden state after the frozen blocks (1, P, H) and those blocks' keys and values; computed once."""
            if self.frozen is None or self.frozen[0].device != self.prefix.device:
                cache = DynamicCache(config=self.model.config)
                with torch.no_grad():
                    hidden = self.halves[0](input_ids=self.prefix[None], use_cache=True,
                                            **{self.cache_arg: cache}).last_hidden_state
                n = len(self.halves[0].layers)
                self.seen.clear()  # kept on the device before
                self.frozen = hidden, [(cache.layers[i].keys, cache.layers[i].values) for i in range(n)]
            return self.frozen

        def prefix_cache(self, kv: list[tuple[torch.Tensor, torch.Tensor]], batch: int) -> DynamicCache:
            """A cache whose layer i holds kv[i], (1, kv_heads, P, head_dim) broadcast to `batch` rows without a copy."""
            cache = DynamicCache(config=self.model.config)
            for i, (k, v) in enumerate(kv):
                cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
            return cache

        def below(self, x: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
            """Each example's own tokens after the frozen blocks (B, max(length) - P, H), zeros past its length.

            An example drawn again (batches are drawn with replacement) is not run again: its
            hidden states are kept, keyed by its tokens.
            """
            P, (hidden, frozen) = self.prefix.numel(), self.frozen_prefix()
            keys = [x[b, P:n].cpu().numpy().tobytes() for b, n in enumerate(length.tolist())]
            new = [b for b, key in enumerate(keys) if key not in self.seen]
            if new:
                rows, end = torch.tensor(new, device=x.device), int(length[new].max())
                cache = self.prefix_cache(frozen, len(new))
                position = torch.arange(end, device=x.device)
                with torch.no_grad():
                    hidden = self.halves[0](input_ids=x[rows, P:end], attention_mask=(position < length[rows, None]).long(),
                                            position_ids=position[P:].expand(len(new), -1), use_cache=True,
                                            **{self.cache_arg: cache}).last_hidden_state
                for j, b in enumerate(new):
                    self.seen[keys[b]] = hidden[j, :length[b] - P].clone()
            out = x.new_zeros((len(keys), int(length.max()) - P, self.model.config.hidden_size), dtype=hidden.dtype)
            for b, key in enumerate(keys):
                out[b, :len(self.seen[key])] = self.seen[key]
            return out

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[None, torch.Tensor]:
            P, (B, T) = self.prefix.numel(), x.shape
            targets = y != IGNORE_INDEX  # (B, T)
            if not bool((x[:, :P] == self.prefix).all()) or bool(targets[:, :P].any()):
                raise ValueError("every example must start with the shared prefix and have no target inside it")
            position = torch.arange(T, device=x.device)
            length = torch.where(targets, position, -1).amax(1) + 1  # (B,) tokens up to the last target
            end = int(length.max())
            top = self.halves[1]
            hidden, frozen = self.frozen_prefix()
            top_cache = DynamicCache(config=self.model.config)
            top(inputs_embeds=hidden, position_ids=position[None, :P], use_cache=True, **{self.cache_arg: top_cache})
            prefix_kv = frozen + [(layer.keys, layer.values) for layer in top_cache.layers[len(frozen):]]

            # every layer holds the prefix, the frozen ones too: the mask is sized by the cache's first layer
            hidden = top(inputs_embeds=self.below(x, length), attention_mask=(position[:end] < length[:, None]).long(),
                         position_ids=position[P:end].expand(B, -1), use_cache=True,
                         **{self.cache_arg: self.prefix_cache(prefix_kv, B)}).last_hidden_state
            scored = targets[:, P:end]
            logits = self.model.lm_head(hidden[scored])  # (n_targets, V)
            return None, torch.nn.functional.cross_entropy(logits.float(), y[:, P:end][scored])

    return SharedPrefixLM


class LengthBuckets:
    """Training examples for `llmlab.train.train`, each batch drawn from one of `n` length buckets.

    A batch costs as much as its longest example: drawing it among examples of similar length
    (first replies are short, replies after an observation long) wastes little on padding.
    A bucket is chosen with probability proportional to its size, so every example is as
    likely to be drawn as with uniform sampling.
    """

    def __init__(self, examples: "list[tuple[torch.Tensor, torch.Tensor]]", n: int = 4):
        from llmlab.model import IGNORE_INDEX

        ends = [int((y != IGNORE_INDEX).nonzero().max()) for _, y in examples]  # last target of each
        order = sorted(range(len(examples)), key=ends.__getitem__)
        size = -(-len(order) // n)
        self.examples = examples
        self.buckets = [order[i:i + size] for i in range(0, len(order), size)]

    def get_batch(self, split: str, batch_size: int, generator: "torch.Generator") -> "tuple[torch.Tensor, torch.Tensor]":
        """(x, y), each (batch_size, T): `batch_size` examples of one bucket, drawn with replacement."""
        import torch

        sizes = torch.tensor([len(b) for b in self.buckets], dtype=torch.float)
        bucket = self.buckets[int(torch.multinomial(sizes, 1, generator=generator))]
        rows = torch.randint(len(bucket), (batch_size,), generator=generator).tolist()
        xs, ys = zip(*(self.examples[bucket[i]] for i in rows))
        return torch.stack(xs), torch.stack(ys)


def train_adapter(recipe: AdapterRecipe, path: str | Path, device: str = "auto", progress: bool = True) -> dict:
    """Train the adapter of `recipe` and save it (llmlab.lora file) at `path`; return the loss history."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab import assets, lora, train

    source = assets.resolve(recipe.base)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="float32")
    examples = lora.chat_dataset(tokenizer, training_conversations(recipe), recipe.max_len)
    system = tokenizer.apply_chat_template([{"role": "system", "content": system_prompt(default_tools())}],
                                           tokenize=False)
    prefix = torch.tensor(tokenizer(system, add_special_tokens=False)["input_ids"])
    torch.manual_seed(recipe.seed)  # lora_A's init: the same recipe gives the same adapter
    lora.inject(model, recipe.lora)
    cfg = train.TrainConfig(max_steps=recipe.max_steps, batch_size=recipe.batch_size, lr=recipe.lr,
                            min_lr=recipe.lr / 10, warmup_steps=max(1, recipe.max_steps // 10), weight_decay=0.0,
                            eval_interval=0, device=device, seed=recipe.seed, progress=progress)
    history = train.train(shared_prefix_lm(model, prefix), LengthBuckets(examples), None, cfg)
    lora.save_adapter(model.cpu(), path)
    return history


def build(folder: str | Path, device: str = "auto", **recipe: Any) -> None:
    """The registry's builder of `tool-use-adapter`: train `AdapterRecipe(**recipe)` into `folder`."""
    history = train_adapter(AdapterRecipe(**recipe), Path(folder) / ADAPTER_FILE, device)
    summary = {"steps": history["step"][-1], "first_loss": history["loss"][0], "last_loss": history["loss"][-1]}
    (Path(folder) / "llmlab-train.json").write_text(json.dumps(summary, indent=1))


def tool_use_adapter(device: str = "auto") -> Path:
    """The adapter file of the registry asset `tool-use-adapter`, trained on `device` if it is not cached yet."""
    from llmlab import assets

    folder = assets.cache_dir(ASSET) if assets.is_cached(ASSET) else assets.build(ASSET, device=device)
    return folder / ADAPTER_FILE
