"""llmlab: the shared helper library of the LLM engineering course."""

__version__ = "0.1.0"
