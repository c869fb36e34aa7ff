"""Agents: a language model that calls tools in a loop, with limits and a defence against injection.

One module per concern, read in this order, as the agent is built:

1. `tools` — a name, a description, a JSON schema for the arguments and a Python function;
   a registry validates every call against the schema before anything runs; the course's
   tools: the calculator and a lexical lookup over the fictional document store.
2. `calculator` — parses with `ast` and evaluates numbers and arithmetic only (never
   `eval`), with caps on input length, exponents, magnitudes and time.
3. `memory` — MiniLM sentence embeddings in a faiss inner-product index: add, search top-k,
   forget by age or importance, compress old records with a summariser.
4. `parse` — the ReAct format: the system prompt, a tolerant reply parser (an action, a
   final answer, or what is malformed, which goes back to the model as its next
   Observation), and tool output wrapped as data between delimiters it cannot forge.
5. `policy` — the injection defence in code: which tools a question may use, and a refusal
   for side-effecting calls whose arguments the user never gave.
6. `backends` — a local Hugging Face model decoded by `llmlab.generate` (optionally with a
   LoRA adapter), any OpenAI-compatible server over HTTP, and a scripted backend for tests.
7. `loop` — `Agent.run(question) -> Trace`: step limit, wall-clock budget, a status and a
   readable transcript; success rate on an episode suite with normalised answer matching.
8. `adapter` — a LoRA adapter trained on the synthetic episodes: the registry asset
   `tool-use-adapter` (`llmlab build --missing`).

Every public name is importable from `llmlab.agent` itself.
"""
from llmlab.agent.adapter import AdapterRecipe, tool_use_adapter
from llmlab.agent.backends import Backend, HFBackend, OpenAIBackend, ScriptedBackend, merge_adapter
from llmlab.agent.calculator import (CALCULATOR_TIME_S, MAX_EXPONENT, MAX_EXPRESSION_CHARS, MAX_MAGNITUDE,
                                     safe_calculate)
from llmlab.agent.loop import (STATUSES, Agent, EvalResult, Step, Trace, answers_match, episode_messages, evaluate,
                               normalize_answer)
from llmlab.agent.memory import Memory, MemoryRecord, TextEncoder
from llmlab.agent.parse import (CLOSE, DATA_RULE, FORMAT_HELP, OPEN, STOP, Parsed, cut_reply, format_observation,
                                parse_reply, system_prompt)
from llmlab.agent.policy import Policy
from llmlab.agent.tools import Tool, ToolError, ToolRegistry, default_tools, lookup, validate_arguments

__all__ = [
    "AdapterRecipe", "tool_use_adapter",
    "Backend", "HFBackend", "OpenAIBackend", "ScriptedBackend", "merge_adapter",
    "CALCULATOR_TIME_S", "MAX_EXPONENT", "MAX_EXPRESSION_CHARS", "MAX_MAGNITUDE", "safe_calculate",
    "STATUSES", "Agent", "EvalResult", "Step", "Trace", "answers_match", "episode_messages", "evaluate",
    "normalize_answer",
    "Memory", "MemoryRecord", "TextEncoder",
    "CLOSE", "DATA_RULE", "FORMAT_HELP", "OPEN", "STOP", "Parsed", "cut_reply", "format_observation", "parse_reply",
    "system_prompt",
    "Policy",
    "Tool", "ToolError", "ToolRegistry", "default_tools", "lookup", "validate_arguments",
]
