"""Backends: who writes the replies. A local Hugging Face model (optionally with a LoRA adapter),
any OpenAI-compatible server over HTTP, and a scripted backend for tests of the loop."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    import transformers

    from llmlab.kvcache import KVCache


class Backend(Protocol):
    """Anything that continues a chat: messages in, the assistant's next reply out."""

    def complete(self, messages: list[dict], stop: Sequence[str] = ()) -> str: ...


class ScriptedBackend:
    """Replays a fixed list of replies, one per call (optionally after `delay_s`): for tests of the loop only.

    `calls` records the messages of every call, so a test can see what the model was shown.
    Running out of replies raises RuntimeError, which the loop reports as status "error".
    """

    def __init__(self, replies: Sequence[str], delay_s: float = 0.0):
        if delay_s < 0:
            raise ValueError(f"delay_s must be >= 0, got {delay_s}")
        self.replies, self.delay_s = list(replies), delay_s
        self.calls: list[list[dict]] = []

    def complete(self, messages: list[dict], stop: Sequence[str] = ()) -> str:
        """The next scripted reply."""
        if len(self.calls) >= len(self.replies):
            raise RuntimeError(f"ScriptedBackend has no reply left (all {len(self.replies)} used)")
        self.calls.append([dict(m) for m in messages])
        if self.delay_s:
            time.sleep(self.delay_s)
        return self.replies[len(self.calls) - 1]


class HFBackend:
    """A local Hugging Face causal LM through its chat template, greedy, decoded by `llmlab.generate`.

    The system message's keys and values are computed once and reused (prefix caching):
    every call of a run, and every run with the same tools, starts with that message.
    """

    def __init__(self, model: "transformers.PreTrainedModel", tokenizer: "transformers.PreTrainedTokenizerBase",
                 max_new_tokens: int = 64):
        from llmlab import generate

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.tokenizer, self.max_new_tokens = model.eval(), tokenizer, max_new_tokens
        self.decoder = generate.Decoder(self.model)
        self._prefix_text: str | None = None  # the system message whose keys and values are cached
        self._prefix: tuple[list[int], KVCache] | None = None  # (its token ids, its keys and values)

    @classmethod
    def from_pretrained(cls, name: str = "smollm2-135m-instruct", adapter: str | Path | None = None,
                        device: str = "auto", max_new_tokens: int = 64) -> "HFBackend":
        """Load a model by asset name (or path / hub id), optionally with a LoRA adapter merged in.

        `adapter`: an `llmlab.lora.save_adapter` .safetensors file, or a peft adapter folder.
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from llmlab import assets, runtime

        path = assets.resolve(name)
        dev = runtime.pick_device(device)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=runtime.pick_dtype(dev))
        if adapter is not None:
            model = merge_adapter(model, adapter)
        return cls(model.to(dev), tokenizer, max_new_tokens)

    def complete(self, messages: list[dict], stop: Sequence[str] = ()) -> str:
        """Greedy continuation of the chat, at most max_new_tokens, cut before the first stop string."""
        return self.complete_batch([messages], stop)[0]

    def complete_batch(self, conversations: Sequence[list[dict]], stop: Sequence[str] = ()) -> list[str]:
        """Greedy continuations of several chats, decoded together (one batched step per token), each as `complete`.

        Chats that start with the cached system message continue its keys and values (read,
        never changed: generation extends views of them).
        """
        from llmlab import generate

        prompts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in conversations]
        replies: list[str] = [""] * len(prompts)
        groups: dict[str, list[int]] = {}  # rows by system message: each group continues its own cached prefix
        for row, messages in enumerate(conversations):
            groups.setdefault(messages[0]["content"] if messages and messages[0]["role"] == "system" else "", []).append(row)
        for rows in groups.values():
            prefix = self._system_cache(conversations[rows[0]])
            ids = [self.tokenizer(prompts[r], add_special_tokens=False)["input_ids"] for r in rows]
            shared = prefix is not None and all(len(i) > len(prefix[0]) and i[:len(prefix[0])] == prefix[0] for i in ids)
            texts = generate.complete_batch(self.decoder, self.tokenizer, [prompts[r] for r in rows], self.max_new_tokens,
                                            generate.GREEDY, stop, past_key_values=prefix[1] if shared else None)
            for r, text in zip(rows, texts):
                replies[r] = text
        return replies

    def _system_cache(self, messages: list[dict]) -> tuple[list[int], KVCache] | None:
        """(token ids, KVCache) of the system message, computed once per system prompt; None without one."""
        import torch

        from llmlab import generate

        if not messages or messages[0]["role"] != "system":
            return None
        text = self.tokenizer.apply_chat_template(messages[:1], tokenize=False)
        if text != self._prefix_text:
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            cache = generate.KVCache()
            self.decoder.forward(torch.tensor([ids]), cache)
            self._prefix_text, self._prefix = text, (ids, cache)
        return self._prefix


def merge_adapter(model: "transformers.PreTrainedModel", adapter: str | Path) -> "transformers.PreTrainedModel":
    """`model` with a LoRA adapter merged into its weights (llmlab .safetensors file or peft folder)."""
    adapter = Path(adapter)
    if adapter.is_dir():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    from llmlab import lora

    lora.load_adapter(model, adapter)
    return lora.merge_and_unload(model)


class OpenAIBackend:
    """Any OpenAI-compatible server (the lab-5 server, vLLM, a hosted model): POST /v1/chat/completions.

    `base_url` like "http://127.0.0.1:8000" or ".../v1". A reply that comes back as a tool
    call (message.tool_calls) is turned into the JSON tool-call text the parser reads.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, max_tokens: int = 64,
                 timeout_s: float = 60.0):
        import httpx

        base = base_url.rstrip("/")
        self.url = (base if base.endswith("/v1") else base + "/v1") + "/chat/completions"
        self.model, self.max_tokens = model, max_tokens
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout_s)

    def complete(self, messages: list[dict], stop: Sequence[str] = ()) -> str:
        """The server's greedy reply (temperature 0); RuntimeError with the server's message on failure."""
        body = {"model": self.model, "messages": messages, "max_tokens": self.max_tokens, "temperature": 0}
        if stop:
            body["stop"] = list(stop)[:4]  # the API accepts at most four
        response = self.client.post(self.url, json=body)
        if response.status_code != 200:
            raise RuntimeError(f"{self.url} answered {response.status_code}: {response.text[:300]}")
        message = response.json()["choices"][0]["message"]
        if message.get("tool_calls"):
            function = message["tool_calls"][0]["function"]
            return json.dumps({"tool": function["name"], "arguments": json.loads(function["arguments"] or "{}")})
        return message.get("content") or ""
