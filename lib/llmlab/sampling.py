"""How the next token is chosen: `SamplingParams` (vLLM's name; Hugging Face's `GenerationConfig`).

The settings only, validated; `llmlab.generate` holds the logits processors that apply them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


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
