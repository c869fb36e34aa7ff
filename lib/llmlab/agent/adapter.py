"""The tool-use LoRA adapter: trained on the synthetic episodes, cached under `assets.home() / "adapters"`."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from llmlab.agent.loop import episode_messages
from llmlab.agent.parse import OPEN, system_prompt
from llmlab.agent.tools import default_tools

if TYPE_CHECKING:  # llmlab.lora imports torch: only training needs it
    from llmlab.lora import LoraConfig


def _tool_use_lora() -> "LoraConfig":
    """The adapter's shape: rank 8 on every linear layer (with q_proj and v_proj alone the model
    learned the format but not *when* to look up)."""
    from llmlab.lora import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"))


@dataclass
class AdapterRecipe:
    """How the tool-use LoRA adapter is trained; its hash names the cached file."""

    base: str = "smollm2-135m-instruct"  # asset name of the model adapted
    n_episodes: int = 120  # distinct training episodes (data.tool_episodes, split "train")
    max_steps: int = 50  # optimizer steps (the training loss is below 0.1 by step 35)
    batch_size: int = 4  # examples (assistant turns) per step
    lr: float = 2e-3
    lora: "LoraConfig" = field(default_factory=_tool_use_lora)  # r, lora_alpha, lora_dropout, target_modules
    max_len: int = 480  # tokens per training example (the longest turn with its prompt is ~470)
    seed: int = 0

    def __post_init__(self):
        for name in ("n_episodes", "max_steps", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"AdapterRecipe.{name} must be >= 1, got {getattr(self, name)}")

    def key(self) -> str:
        """A short hash of the recipe, its training episodes and the prompt format the adapter learns."""
        from llmlab import data

        episodes = data.tool_episodes(self.n_episodes, "train", seed=self.seed)
        text = (json.dumps(dataclasses.asdict(self), sort_keys=True) + json.dumps(episodes)
                + system_prompt(default_tools()) + OPEN)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def tool_use_adapter(recipe: AdapterRecipe | None = None, device: str = "auto", progress: bool = False) -> Path:
    """Path of a LoRA adapter (llmlab.lora file) that teaches `recipe.base` the ReAct format.

    Trained once on `data.tool_episodes(recipe.n_episodes, "train")` — one example per
    assistant turn, loss on that turn only — and cached under assets.home()/"adapters";
    later calls return the cached file at once. The episodes hold far more distinct
    arithmetic questions than facts or tool-free questions, so the smaller kinds are
    repeated until each kind (calculator, lookup, no tool) weighs the same: otherwise the
    model learns to call the calculator and to answer everything else from "memory".
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmlab import assets, data, lora, train

    recipe = recipe or AdapterRecipe()
    path = assets.home() / "adapters" / f"{recipe.base}-tool-use-{recipe.key()}.safetensors"
    if path.is_file():
        return path
    source = assets.resolve(recipe.base)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype="float32")
    tools = default_tools()
    by_tool: dict[str | None, list[list[dict]]] = {}
    for episode in data.tool_episodes(recipe.n_episodes, "train", seed=recipe.seed):
        messages = episode_messages(episode, tools)
        by_tool.setdefault(episode["tool"], []).extend(
            messages[: i + 1] for i, m in enumerate(messages) if m["role"] == "assistant")
    largest = max(len(group) for group in by_tool.values())
    conversations = [group[i % len(group)] for group in by_tool.values() for i in range(largest)]
    examples = lora.chat_dataset(tokenizer, conversations, recipe.max_len)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(recipe.seed)  # lora_A's init: the same recipe gives the same adapter
    lora.inject(model, recipe.lora)
    cfg = train.TrainConfig(max_steps=recipe.max_steps, batch_size=recipe.batch_size, lr=recipe.lr,
                            min_lr=recipe.lr / 10, warmup_steps=max(1, recipe.max_steps // 10), weight_decay=0.0,
                            eval_interval=0, device=device, seed=recipe.seed, progress=progress)
    train.train(train.HFCausalLM(model, pad_id), examples, None, cfg)
    tmp = path.with_suffix(".tmp")
    lora.save_adapter(model, tmp)
    tmp.replace(path)  # atomic: a half-written adapter is never found
    return path
