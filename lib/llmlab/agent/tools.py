"""Tools: a name, a description, a JSON schema for the arguments and a Python function.

A registry validates every call against the schema before anything runs. The course's two
tools: the safe calculator (`calculator.py`) and a lexical lookup over the fictional document
store (`data.DOC_STORE`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from llmlab.agent.calculator import safe_calculate


class ToolError(ValueError):
    """A tool call names an unknown tool, or its arguments do not fit the tool's schema."""


@dataclass
class Tool:
    """A function the model may call, described by a JSON schema (OpenAI's "function" shape)."""

    name: str  # what the model writes after "Action:"
    description: str  # one line the model reads in the system prompt
    parameters: dict  # JSON schema of the arguments object
    function: Callable[..., Any]  # called with the arguments as keyword arguments
    side_effects: bool = False  # True for tools that act on the world (send, write, pay, delete)
    triggers: tuple[str, ...] = ()  # words in a question that make a side-effecting tool relevant

    def __post_init__(self):
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name):
            raise ValueError(f"Tool.name must be lowercase letters, digits and '_', got {self.name!r}")
        if self.parameters.get("type") != "object":
            raise ValueError(f"Tool.parameters of {self.name!r} must be a JSON schema with type 'object'")

    def spec(self) -> dict:
        """The tool as an OpenAI-style function spec."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


_JSON_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
               "integer": int, "number": (int, float)}


def validate_arguments(schema: dict, arguments: Any, where: str = "arguments") -> None:
    """Raise ToolError unless `arguments` satisfies the JSON `schema`.

    The subset of JSON Schema that tool specs use: type, properties, required,
    additionalProperties (false), items, enum. (The `jsonschema` package covers all of it,
    but importing it takes seconds: too slow for an agent that starts per question.)
    """
    kind = schema.get("type")
    if kind is not None:
        expected = _JSON_TYPES[kind]
        is_bool = isinstance(arguments, bool)
        if not isinstance(arguments, expected) or (is_bool and kind in ("integer", "number")):
            raise ToolError(f"{where} must be of type {kind}, got {type(arguments).__name__}")
    if "enum" in schema and arguments not in schema["enum"]:
        raise ToolError(f"{where} must be one of {schema['enum']}, got {arguments!r}")
    if isinstance(arguments, dict):
        properties = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in arguments:
                raise ToolError(f"{where} is missing the required property {key!r}")
        for key, value in arguments.items():
            if key in properties:
                validate_arguments(properties[key], value, f"{where}.{key}")
            elif schema.get("additionalProperties") is False:
                raise ToolError(f"{where} has an unexpected property {key!r}; expected {sorted(properties)}")
    if isinstance(arguments, list) and "items" in schema:
        for i, item in enumerate(arguments):
            validate_arguments(schema["items"], item, f"{where}[{i}]")


class ToolRegistry:
    """Tools by name; `call` validates the arguments against the schema, then runs the tool."""

    def __init__(self, tools: Sequence[Tool] = ()):
        self.tools: dict[str, Tool] = {}
        for tool in tools:
            self.register(tool)

    def register(self, tool: Tool) -> None:
        """Add `tool`; a second tool of the same name is an error."""
        if tool.name in self.tools:
            raise ValueError(f"a tool named {tool.name!r} is already registered")
        self.tools[tool.name] = tool

    @property
    def names(self) -> list[str]:
        """The registered tool names, in registration order."""
        return list(self.tools)

    def __contains__(self, name: str) -> bool:
        return name in self.tools

    def __getitem__(self, name: str) -> Tool:
        if name not in self.tools:
            raise ToolError(f"unknown tool {name!r}; tools: {', '.join(self.tools) or '(none)'}")
        return self.tools[name]

    def subset(self, names: Sequence[str]) -> "ToolRegistry":
        """A registry holding only the tools named (in this registry's order)."""
        return ToolRegistry([t for n, t in self.tools.items() if n in names])

    def call(self, name: str, arguments: Any) -> str:
        """Validate, run and return the tool's result as text; ToolError for a bad call."""
        tool = self[name]
        validate_arguments(tool.parameters, arguments)
        return str(tool.function(**arguments))


def _words(text: str) -> list[str]:
    """Lowercase words of `text`, punctuation removed."""
    return re.findall(r"[a-z0-9]+", text.lower())


_STOPWORDS = {"the", "a", "an", "of", "in", "on", "is", "was", "and", "to", "how", "what", "who", "which",
              "does", "did", "many", "much", "when", "where", "its", "it", "by", "for", "with", "at"}


def lookup(query: str, store: dict[str, str] | None = None) -> str:
    """The best-matching document of `store` (default `data.DOC_STORE`) as "title: text".

    Lexical scoring: each query word (stopwords aside) found in a document's title counts 2,
    found in its text 1; ties go to the earlier document. No match: a sentence saying so.
    """
    if store is None:
        from llmlab.data import DOC_STORE as store
    terms = [w for w in _words(query) if w not in _STOPWORDS]
    best, best_score = None, 0
    for title, text in store.items():
        in_title, in_text = set(_words(title)), set(_words(text))
        score = sum(2 * (w in in_title) + (w in in_text) for w in terms)
        if score > best_score:
            best, best_score = title, score
    if best is None:
        return f"No document matches {query!r}."
    return f"{best}: {store[best]}"


def default_tools() -> ToolRegistry:
    """The course's two tools, with the schemas of `data.TOOL_SPECS`: calculator and lookup."""
    from llmlab.data import TOOL_SPECS

    functions = {"calculator": lambda expression: _number_text(safe_calculate(expression)),
                 "lookup": lambda query: lookup(query)}
    return ToolRegistry([Tool(s["name"], s["description"], s["parameters"], functions[s["name"]]) for s in TOOL_SPECS])


def _number_text(value: int | float) -> str:
    """A calculator result as the episodes write it: 84, 2.5, 0.3333."""
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"
