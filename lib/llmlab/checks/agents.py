"""Checks for lab 6 (agents): the action parser, the safe calculator, the loop's stop
conditions, and cosine top-k retrieval with recall@k. References come from `llmlab.agent`."""
from __future__ import annotations

import json
from typing import Callable

import torch
from torch import Tensor

from llmlab.checks._core import as_float, blame, call, close, expect_tensor, fail, ok
from llmlab.i18n import _, N_

__all__ = ["check_parse_action", "check_safe_calculate", "check_run_agent", "check_retrieval"]

CALC = 'Thought: I compute it.\nAction: calculator\nAction Input: {"expression": "%s"}'
FINAL = "Thought: I know the answer.\nFinal Answer: %s"


# ----------------------------------------------------------------------------------------
# The action parser

# (reply, what a wrong result suggests when this case fails)
PARSE_CASES = [
    (CALC % "12 * 7", N_("an Action line names the tool; the JSON after 'Action Input:' holds the arguments")),
    ("Thought: no tool needed.\nFinal Answer: Paris", N_("'Final Answer:' ends the run with the answer")),
    ('Thought: t\nAction: lookup\nAction Input: {"query": "Lake Quenby"}', N_("read the tool name from the Action line")),
    ("final answer:  87 metres \n", N_("keywords are matched case-insensitively and the answer is stripped")),
    ("Final Answer:\n\n 84 \nBecause 12 * 7 = 84.", N_("the answer is the first non-empty line after 'Final Answer:'")),
    ('ACTION: `Calculator`\naction input: {"expression": "1 + 1"} thanks',
     N_("tool names are lowercased with quotes and backticks stripped; the JSON object ends where it closes")),
    (CALC % "2 + 2" + "\nObservation: 5\nThought: done\nFinal Answer: 5",
     N_("everything from the first 'Observation:' on was invented by the model: cut it off before parsing")),
    ("Thought: I remember this one.\nObservation: the bridge is 412 metres long.\nFinal Answer: 412 metres",
     N_("an answer after an invented 'Observation:' was never checked by a tool: cut the text there first")),
    ('Thought: t\nFinal Answer: 4\nAction: calculator\nAction Input: {"expression": "1"}',
     N_("a 'Final Answer:' that comes before any 'Action:' wins")),
    ('{"tool": "lookup", "arguments": {"query": "Mount Arlo"}}',
     N_('a reply may be a JSON tool call {"tool": ..., "arguments": {...}} (the chat-model style)')),
    ('Sure! {"tool": "Calculator", "arguments": {"expression": "2 ** 8"}}',
     N_("a JSON tool call may come after some text; lowercase its tool name too")),
    ("The answer is 84.", N_("a reply with neither an action nor a final answer is malformed")),
    ("Action: calculator", N_("an Action without an Action Input is malformed")),
    ("Action: calculator\nAction Input: 12 * 7", N_("an Action Input that is not a JSON object is malformed")),
    ('Action: calculator\nAction Input: ["12 * 7"]', N_("an Action Input must be a JSON *object* (a dict)")),
    ('Action:\nAction Input: {"expression": "1"}', N_("an Action line without a tool name is malformed")),
    ("Thought: done\nFinal Answer:   ", N_("an empty Final Answer is malformed")),
    ('{"tool": "calculator"}', N_("a JSON tool call needs both \"tool\" (a string) and \"arguments\" (an object)")),
]
KEYS = ("kind", "tool", "arguments", "answer")


def _reference_parse(text: str) -> dict:
    from llmlab import agent

    p = agent.parse_reply(text)
    return {"kind": p.kind, "tool": p.tool if p.kind == "action" else None,
            "arguments": p.arguments, "answer": p.answer}


def check_parse_action(fn: Callable) -> None:
    """Check parse_action(text) -> {"kind", "tool", "arguments", "answer", "error"}."""
    name = "parse_action"
    for text, hint in PARSE_CASES:
        out = call(name, fn, text)
        if not isinstance(out, dict) or "kind" not in out:
            fail(name, _("returns {type}; expected a dict with keys kind, tool, arguments, answer, error").format(type=type(out).__name__))
        want = _reference_parse(text)
        shown = json.dumps(text) if len(json.dumps(text)) <= 90 else json.dumps(text)[:85] + '..."'
        if out["kind"] != want["kind"]:
            fail(name, _("on {shown}: kind {out!r}, expected {want!r} — {hint}").format(shown=shown, out=out['kind'], want=want['kind'], hint=_(hint)))
        if want["kind"] == "malformed":
            if not isinstance(out.get("error"), str) or not out["error"].strip():
                fail(name, _("on {shown}: a malformed reply needs an 'error' text the model can read and act on").format(shown=shown))
            continue
        for key in KEYS[1:]:
            if out.get(key) != want[key]:
                fail(name, _("on {shown}: {key} = {get!r} is not right — {hint}").format(shown=shown, key=key, get=out.get(key), hint=_(hint)))
    ok(_("parse_action: ReAct and JSON tool calls, final answers, invented observations cut, malformed replies "
         "explained"))


# ----------------------------------------------------------------------------------------
# The safe calculator

VALID = ["1 + 2 * 3", "(1 + 2) * 3", "7 / 2", "7 // 2", "-7 // 2", "7 % 3", "2 ** 10", "2 ** -2", "-3 ** 2",
         "+5", "--5", "1.5e3 + 0.25", "((4))", " 12*7 ", "10 ** 100"]
# (expression, what it is); the costly ones last, so a hang shows which case caused it
REFUSE = [
    ("__import__('os').system('echo hacked')", N_("a call of __import__")), ("__import__('os')", N_("a call")),
    ("open('secrets.txt')", N_("a call")), ("x", N_("a name")), ("pi * 2", N_("a name")), ("(1).real", N_("attribute access")),
    ("().__class__.__bases__[0].__subclasses__()", N_("attribute access")), ("[1, 2][0]", N_("a subscript")),
    ("lambda: 1", N_("a lambda")), ("[i for i in range(3)]", N_("a comprehension")), ("'a' * 3", N_("a string")),
    ("True + 1", N_("a bool (only int and float literals)")), ("1j * 1j", N_("a complex number")), ("1 < 2", N_("a comparison")),
    ("1 if 1 else 2", N_("a conditional")), ("1 +", N_("a syntax error")), ("", N_("an empty expression")),
    ("1 / 0", N_("a division by zero")), ("5 % 0", N_("a modulo by zero")), ("(-8) ** 0.5", N_("a complex result")),
    ("1" * 201, N_("an input over 200 characters")), ("10 ** 101", N_("a result over 1e100")),
    ("1e308 * 10", N_("a float overflow")), ("(10 ** 60) * (10 ** 60)", N_("an intermediate result over 1e100")),
    ("2 ** 101", N_("an exponent over 100")), ("(2 ** 100) ** 100", N_("an exponent over 100 of a huge base")),
    ("9 ** 9 ** 9", N_("a tower of powers (it would take hours: refuse the exponent BEFORE computing)")),
]


def check_safe_calculate(fn: Callable) -> None:
    """Check safe_calculate(expression): numbers and + - * / // % ** ( ) only; ValueError for the rest."""
    from llmlab import agent

    name = "safe_calculate"
    for expression in VALID:
        out = call(name, fn, expression)
        want = agent.safe_calculate(expression)
        if isinstance(out, bool) or not isinstance(out, (int, float)):
            fail(name, _("{expression!r} returns {type}; return the number (int or float)").format(expression=expression, type=type(out).__name__))
        if out != want or type(out) is not type(want):
            fail(name, _("{expression!r} gives {out!r}; evaluate with Python's arithmetic on the parsed "
                         "numbers (int stays int, / gives a float)").format(expression=expression, out=out))
    for expression, what in REFUSE:
        shown = repr(expression if len(expression) < 50 else expression[:20] + "...")
        try:
            out = fn(expression)
        except ValueError:
            continue
        except Exception as e:  # noqa: BLE001 — the student's code raised something else
            fail(name, _("{shown} ({what}) raises {type}; refuse with ValueError (catch and re-raise)").format(shown=shown, what=_(what), type=type(e).__name__)
                        + (_(" — is this eval? never run the text as code") if what.startswith(("a call", "attribute")) else ""))
        fail(name, _("{shown} ({what}) returned {out!r}; it must raise ValueError").format(shown=shown, what=_(what), out=str(out)[:40])
                    + (_(" — is this eval? never run the text as code") if what.startswith(("a call", "attribute")) else ""))
    ok(_("safe_calculate: arithmetic evaluated from the syntax tree; code, names, huge numbers and long inputs "
         "refused"))


# ----------------------------------------------------------------------------------------
# The loop's stop conditions

LOOP_CASES = [  # (replies, max_steps, time_budget_s, delay_s, what the case tests)
    ([CALC % "12 * 7", FINAL % "84"], 5, 30.0, 0.0, N_("a tool call, then the final answer")),
    (["It is 84, I think.", FINAL % "84"], 5, 30.0, 0.0, N_("a malformed reply is reported back and the loop goes on")),
    (['Action: python\nAction Input: {"code": "1"}', FINAL % "1"], 5, 30.0, 0.0,
     N_("an unknown tool is reported back as an observation")),
    ([CALC % "2 ** 1000", FINAL % "none"], 5, 30.0, 0.0, N_("a tool's error is reported back as an observation")),
    ([FINAL % "Paris"], 1, 30.0, 0.0, N_("a final answer on the last allowed step is still an answer")),
    ([CALC % "1 + 1"] * 10, 3, 30.0, 0.0, N_("after max_steps model calls without an answer: status 'max_steps'")),
    ([CALC % "1 + 1"], 5, 30.0, 0.0, N_("the model fails (the script runs out): status 'error'")),
    ([CALC % "1 + 1"] * 30, 30, 0.5, 0.2, N_("no new model call once time_budget_s has passed: status 'timeout'")),
]


def _reference_loop(replies: list[str], max_steps: int, time_budget_s: float, delay_s: float):
    from llmlab import agent

    backend = agent.ScriptedBackend(replies, delay_s)
    return agent.Agent(backend, agent.default_tools(), max_steps, time_budget_s).run("The question.")


def check_run_agent(fn: Callable, uses: tuple = ()) -> None:
    """Check run_agent(replies, max_steps, time_budget_s, delay_s) -> {"status", "answer", "steps"}.

    uses: the student's (parse_action, safe_calculate), blamed when they fail too."""
    earlier = {"parse_action": lambda: check_parse_action(uses[0]),
               "safe_calculate": lambda: check_safe_calculate(uses[1])} if uses else {}
    blame("run_agent", lambda: _check_run_agent(fn), earlier)


def _check_run_agent(fn: Callable) -> None:
    name = "run_agent"
    for replies, max_steps, budget, delay, what in LOOP_CASES:
        out = call(name, fn, list(replies), max_steps, budget, delay)
        if not isinstance(out, dict) or not {"status", "answer", "steps"} <= set(out):
            fail(name, _("returns something other than a dict with keys status, answer, steps"))
        want = _reference_loop(replies, max_steps, budget, delay)
        steps = out["steps"]
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            fail(name, _("steps must be a list of dicts, one per model call"))
        if out["status"] != want.status:
            fail(name, _("case '{what}': status {out!r}, expected {status!r}").format(what=_(what), out=out['status'], status=want.status))
        if want.status == "timeout":
            if not 1 <= len(steps) <= 4:
                fail(name, _("case '{what}': {n_steps} steps in a 0.5 s budget with 0.2 s per model call; "
                             "check the clock before each call").format(what=_(what), n_steps=len(steps)))
            continue
        if len(steps) != len(want.steps):
            fail(name, _("case '{what}': {n_steps} steps, expected {n_steps2} (one per model call)").format(what=_(what), n_steps=len(steps), n_steps2=len(want.steps)))
        if out["answer"] != want.answer:
            fail(name, _("case '{what}': answer {out!r}, expected {answer!r}").format(what=_(what), out=out['answer'], answer=want.answer))
        for i, (got, ref) in enumerate(zip(steps, want.steps)):
            if got.get("kind") != ref.parsed.kind:
                fail(name, _("case '{what}': step {value} kind {get!r}, expected {kind!r}").format(what=_(what), value=i + 1, get=got.get('kind'), kind=ref.parsed.kind))
            observation = got.get("observation")
            if ref.observation is None:
                if observation is not None:
                    fail(name, _("case '{what}': step {value} is the final answer; its observation is None").format(what=_(what), value=i + 1))
            elif not isinstance(observation, str) or not observation.strip():
                fail(name, _("case '{what}': step {value} needs an observation for the model (what happened)").format(what=_(what), value=i + 1))
        if replies[0] == CALC % "12 * 7" and "84" not in steps[0]["observation"]:
            fail(name, _("case '{what}': the first observation should hold the calculator's result 84").format(what=_(what)))
    ok(_("run_agent: answers, reports mistakes back, and stops on max_steps, the time budget and a failing "
         "model"))


# ----------------------------------------------------------------------------------------
# Retrieval: cosine top-k and recall@k


def _reference_top_k(queries: Tensor, keys: Tensor, k: int) -> tuple[Tensor, Tensor]:
    import faiss

    q = torch.nn.functional.normalize(queries.float(), dim=-1).numpy()
    x = torch.nn.functional.normalize(keys.float(), dim=-1).numpy()
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    scores, rows = index.search(q, k)
    return torch.from_numpy(scores), torch.from_numpy(rows).long()


def check_retrieval(top_k_fn: Callable, recall_fn: Callable) -> None:
    """Check cosine_top_k(queries, keys, k) -> (scores, indices) and recall_at_k(retrieved, relevant)."""
    name = "cosine_top_k"
    gen = torch.Generator().manual_seed(61)
    queries = torch.randn(6, 16, generator=gen) * torch.rand(6, 1, generator=gen) * 5
    keys = torch.randn(40, 16, generator=gen) * (0.1 + torch.rand(40, 1, generator=gen) * 10)  # norms 0.1 to 10
    k = 4
    out = call(name, top_k_fn, queries, keys, k)
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        fail(name, _("returns something other than a pair (scores, indices)"))
    inputs = _("queries (6, 16), keys (40, 16), k=4")
    scores = expect_tensor(name, out[0], (6, k), None, inputs)
    indices = expect_tensor(name, out[1], (6, k), None, inputs, hints={(k, 6): _("transposed? one row per query")}).long()
    want_scores, want_rows = _reference_top_k(queries, keys, k)
    if not torch.equal(indices, want_rows):
        unit = torch.nn.functional.normalize
        similarity = unit(queries, dim=-1) @ unit(keys, dim=-1).T  # (6, 40)
        if torch.equal(indices, (queries @ keys.T).topk(k, dim=-1).indices):
            fail(name, _("ranks by the raw dot product: normalise queries and keys to unit length first (long "
                         "vectors would win whatever their direction)"))
        if torch.equal(indices, (-similarity).topk(k, dim=-1).indices):
            fail(name, _("returns the LEAST similar keys; take the largest similarities"))
        if torch.equal(indices, want_rows.flip(-1)):
            fail(name, _("the right keys, in the wrong order: best first"))
        fail(name, _("indices differ from the k most cosine-similar keys per query, best first"))
    if not close(scores, want_scores, 1e-4):
        fail(name, _("the scores should be the cosine similarities of the returned keys (between -1 and 1)"))

    name = "recall_at_k"
    cases = [([[1, 2, 3], [4, 5, 6]], [[1], [9]], 0.5), ([[1, 2], [3, 4], [5, 6]], [[2], [3], [6]], 1.0),
             ([[7, 8, 9]], [[8, 10]], 0.5), ([[0, 1]], [[2, 3]], 0.0),
             ([[1, 2, 3, 4], [5, 6, 7, 8]], [[1, 2], [5]], 1.0), ([[3, 1], [2, 0]], [[1, 3, 5, 7], [0]], 0.75)]
    for retrieved, relevant, want in cases:
        got = as_float(name, call(name, recall_fn, [list(r) for r in retrieved], [list(r) for r in relevant]))
        if abs(got - want) > 1e-9:
            per_query = sum(any(i in rel for i in ret) for ret, rel in zip(retrieved, relevant)) / len(retrieved)
            over_k = sum(len(set(ret) & set(rel)) / len(ret) for ret, rel in zip(retrieved, relevant)) / len(retrieved)
            if abs(got - over_k) < 1e-9:
                fail(name, _("{retrieved}, relevant {relevant}: {got:.3g} divides the hits by k (that is "
                             "precision@k); recall divides them by the number of RELEVANT items of the query").format(retrieved=retrieved, relevant=relevant, got=got))
            if abs(got - per_query) < 1e-9:
                fail(name, _("{retrieved}, relevant {relevant}: {got:.3g} counts a query as a hit if ANY "
                             "relevant item is found; recall is the FRACTION of the relevant items found, "
                             "averaged over queries").format(retrieved=retrieved, relevant=relevant, got=got))
            fail(name, _("{retrieved}, relevant {relevant}: {got:.3g}, expected {want:.3g}").format(retrieved=retrieved, relevant=relevant, got=got, want=want))
    ok(_("retrieval: cosine top-k matches faiss' exact inner-product search on unit vectors; recall@k is right"))

