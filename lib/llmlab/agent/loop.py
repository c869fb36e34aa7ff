"""The ReAct loop with its limits, its traces, and evaluation on an episode suite.

`Agent.run(question) -> Trace`: step limit, wall-clock budget, a status ("answered",
"max_steps", "timeout", "error") and a readable transcript; `evaluate` scores a suite with
normalised answer matching.
"""
from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Sequence

from llmlab.agent.backends import Backend
from llmlab.agent.parse import STOP, Parsed, cut_reply, format_observation, parse_reply, system_prompt
from llmlab.agent.policy import Policy
from llmlab.agent.tools import ToolRegistry
from llmlab.evaluate import exact_match, wilson_interval
from llmlab.evaluate import normalize_text as normalize_answer  # noqa: F401  (re-exported by llmlab.agent)

STATUSES = ("answered", "max_steps", "timeout", "error")


@dataclass
class Step:
    """One model call and what came of it."""

    reply: str  # what the model wrote, cut at any "Observation:"
    parsed: Parsed
    observation: str | None = None  # what the model was shown next (None after a final answer)
    seconds: float = 0.0  # model call + tool call


@dataclass
class Trace:
    """Everything one run did: the steps, how it ended, the answer."""

    question: str
    steps: list[Step] = field(default_factory=list)
    status: str = ""  # one of STATUSES once the run is over
    answer: str | None = None
    error: str | None = None  # for status "error": what failed
    seconds: float = 0.0

    def render(self) -> str:
        """The run as a plain-text transcript."""
        lines = [f"Question: {self.question}"]
        for i, step in enumerate(self.steps, 1):
            lines.append(f"--- step {i} ({step.parsed.kind}, {step.seconds:.2f} s)")
            lines.append(step.reply)
            if step.observation is not None:
                lines.append(step.observation)
        lines.append(f"=== {self.status}" + (f": {self.answer}" if self.answer is not None else "")
                     + (f" ({self.error})" if self.error else "") + f" in {self.seconds:.2f} s")
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        colours = {"action": "#e8f0fe", "final": "#e6f4ea", "malformed": "#fce8e6"}
        parts = [f"<div><b>Question:</b> {html.escape(self.question)}</div>"]
        for i, step in enumerate(self.steps, 1):
            body = html.escape(step.reply) + ("\n" + html.escape(step.observation) if step.observation else "")
            parts.append(f'<pre style="background:{colours[step.parsed.kind]};padding:4px;margin:2px 0;'
                         f'white-space:pre-wrap">[{i}: {step.parsed.kind}, {step.seconds:.2f} s]\n{body}</pre>')
        end = f"{self.status}" + (f": {html.escape(self.answer)}" if self.answer is not None else "")
        parts.append(f"<div><b>{end}</b> ({self.seconds:.2f} s){' — ' + html.escape(self.error) if self.error else ''}</div>")
        return "\n".join(parts)


class Agent:
    """ReAct: the model thinks, calls a tool, reads the observation, repeats, answers.

    Limits: at most `max_steps` model calls, and no new call once `time_budget_s` of wall
    clock has passed. A reply the parser cannot read, an unknown tool, bad arguments, a
    tool's error and a refused call all come back to the model as the next Observation,
    so it can correct itself; only a failing backend ends the run with status "error".
    """

    def __init__(self, backend: Backend, tools: ToolRegistry, max_steps: int = 6, time_budget_s: float = 60.0,
                 policy: Policy | None = None):
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if time_budget_s <= 0:
            raise ValueError(f"time_budget_s must be > 0, got {time_budget_s}")
        self.backend, self.tools, self.max_steps, self.time_budget_s = backend, tools, max_steps, time_budget_s
        self.policy = policy or Policy()

    def messages(self, question: str) -> list[dict]:
        """The conversation a run starts from: the system prompt (allowed tools only) and the question."""
        allowed = self.tools.subset(self.policy.allowed(question, self.tools))
        return [{"role": "system", "content": system_prompt(allowed)}, {"role": "user", "content": question}]

    def run(self, question: str) -> Trace:
        """Answer `question`; the trace says how the run ended and holds every step."""
        return self.run_batch([question])[0]

    def run_batch(self, questions: Sequence[str]) -> list[Trace]:
        """Answer several questions in lockstep: each round asks the backend for every live run's next reply at once.

        A backend with `complete_batch` (HFBackend) decodes a round as one batch; any other
        is called once per run. Every run's clock starts together, so a run's seconds and its
        time budget include the rest of its round's decoding.
        """
        traces = [Trace(q) for q in questions]
        chats = [self.messages(q) for q in questions]
        allowed = [self.policy.allowed(q, self.tools) for q in questions]
        start, live = time.perf_counter(), list(range(len(questions)))
        while live:
            for i in live:
                if len(traces[i].steps) >= self.max_steps:
                    traces[i].status = "max_steps"
                elif time.perf_counter() - start >= self.time_budget_s:
                    traces[i].status = "timeout"
            asking = [i for i in live if not traces[i].status]
            step_start = time.perf_counter()
            for i, reply in zip(asking, self._replies([chats[i] for i in asking])):
                if isinstance(reply, Exception):  # a network error, a crashed model: end the run, keep the trace
                    traces[i].status, traces[i].error = "error", f"{type(reply).__name__}: {reply}"
                    continue
                step = Step(reply, parse_reply(reply))
                traces[i].steps.append(step)
                if step.parsed.kind == "final":
                    traces[i].status, traces[i].answer = "answered", step.parsed.answer
                else:
                    step.observation = self._observe(questions[i], step.parsed, allowed[i])
                    chats[i] += [{"role": "assistant", "content": reply}, {"role": "user", "content": step.observation}]
                step.seconds = time.perf_counter() - step_start
            for i in live:
                if traces[i].status:
                    traces[i].seconds = time.perf_counter() - start
            live = [i for i in live if not traces[i].status]
        return traces

    def _replies(self, chats: list[list[dict]]) -> list[str | Exception]:
        """The backend's next reply to each chat (cut at any Observation:), or the exception that stopped it."""
        batch = getattr(self.backend, "complete_batch", None)
        if batch is not None and len(chats) > 1:
            try:
                return [cut_reply(r) for r in batch(chats, stop=STOP)]
            except Exception as e:  # noqa: BLE001 — the whole round failed
                return [e] * len(chats)
        replies: list[str | Exception] = []
        for messages in chats:
            try:
                replies.append(cut_reply(self.backend.complete(messages, stop=STOP)))
            except Exception as e:  # noqa: BLE001
                replies.append(e)
        return replies

    def _observe(self, question: str, parsed: Parsed, allowed: list[str]) -> str:
        """What the model sees after a non-final reply: the tool's output, or what went wrong."""
        if parsed.kind == "malformed":
            return f"Observation: Error: could not read your reply: {parsed.error}"
        if parsed.tool not in allowed:
            return f"Observation: Error: unknown tool {parsed.tool!r}; tools: {', '.join(allowed) or '(none)'}"
        tool = self.tools[parsed.tool]
        refusal = self.policy.refusal(question, tool, parsed.arguments)
        if refusal:
            return f"Observation: Refused by policy: {refusal}"
        try:
            return format_observation(self.tools.call(parsed.tool, parsed.arguments))
        except Exception as e:  # noqa: BLE001 — a tool's failure is information for the model
            return f"Observation: Error: {parsed.tool}: {e}"


# ----------------------------------------------------------------------------------------
# Evaluation on an episode suite


def answers_match(predicted: str | None, expected: str) -> bool:
    """Normalised exact match (`llmlab.evaluate.exact_match`); numbers compare by value (84.0 == 84), and a
    bare expected number also accepts a unit after it ("41000 people" for 41000), while an expected unit must be there."""
    return exact_match(predicted, expected)


@dataclass
class EvalResult:
    """An agent's record on an episode suite."""

    success_rate: float  # fraction of episodes answered correctly
    mean_steps: float  # model calls per episode
    seconds_per_episode: float  # the suite's wall clock / its episodes (runs may share a batch)
    statuses: dict[str, int]  # how the runs ended
    traces: list[Trace]
    correct: list[bool]

    @property
    def interval(self) -> tuple[float, float]:
        """Wilson 95% interval of the success rate (`llmlab.evaluate`): a suite of 20 episodes is small."""
        return wilson_interval(sum(self.correct), len(self.correct))


def evaluate(agent: Agent, episodes: Sequence[dict]) -> EvalResult:
    """Run `agent` on every episode ({"question", "answer", ...}); score by `answers_match`."""
    if not episodes:
        raise ValueError("episodes is empty")
    start = time.perf_counter()
    if hasattr(agent.backend, "complete_batch"):
        traces = agent.run_batch([e["question"] for e in episodes])
    else:  # one run after another: a scripted backend's replies come in the order of a single run
        traces = [agent.run(e["question"]) for e in episodes]
    seconds = time.perf_counter() - start
    correct = [t.status == "answered" and answers_match(t.answer, e["answer"]) for t, e in zip(traces, episodes)]
    statuses = {s: sum(t.status == s for t in traces) for s in STATUSES}
    return EvalResult(sum(correct) / len(episodes), sum(len(t.steps) for t in traces) / len(traces),
                      seconds / len(traces), statuses, traces, correct)


def episode_messages(episode: dict, tools: ToolRegistry) -> list[dict]:
    """A `data.tool_episodes` transcript as the chat the agent has: system, question, then
    one assistant turn per model call and one user turn per observation (wrapped as in the loop)."""
    messages = [{"role": "system", "content": system_prompt(tools)}, {"role": "user", "content": episode["question"]}]
    turn: list[str] = []
    for line in episode["transcript"].split("\n"):
        if line.startswith("Observation:"):
            messages.append({"role": "assistant", "content": "\n".join(turn)})
            messages.append({"role": "user", "content": format_observation(line[len("Observation:"):].strip())})
            turn = []
        else:
            turn.append(line)
    messages.append({"role": "assistant", "content": "\n".join(turn)})
    return messages
