"""The injection defence that does not depend on the model: a policy decided in code."""
from __future__ import annotations

import re

from llmlab.agent.tools import Tool, ToolRegistry


def _mentions(text: str, phrase: str) -> bool:
    """Whether `phrase` occurs in `text`, ignoring case and surrounding whitespace."""
    return phrase.strip().lower() in text.lower()


class Policy:
    """Rules enforced in code, outside the model: what a question may make the agent do.

    Read-only tools (side_effects=False) are always available. A side-effecting tool is
    offered only when the user's question mentions one of its trigger words (least
    privilege), and a call to it is refused unless every string argument appears in the
    user's question: a recipient, an amount or a message the user never gave can only have
    come from a tool's output — that is, from whoever wrote the document.
    """

    def allowed(self, question: str, tools: ToolRegistry) -> list[str]:
        """The names of the tools this question may use."""
        return [t.name for t in tools.tools.values()
                if not t.side_effects or any(re.search(rf"\b{re.escape(w)}\b", question, re.I) for w in t.triggers)]

    def refusal(self, question: str, tool: Tool, arguments: dict) -> str | None:
        """Why this call must not run (None: it may run)."""
        if not tool.side_effects:
            return None
        for key, value in arguments.items():
            if isinstance(value, str) and not _mentions(question, value):
                return (f"argument {key}={value!r} does not come from the user's question; "
                        f"{tool.name} acts on the world, so its arguments must")
        return None
