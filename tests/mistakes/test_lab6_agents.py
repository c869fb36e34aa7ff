"""Lab 6 (agents): the usual mistakes of each exercise, and right answers written otherwise."""
from __future__ import annotations

from catalogue import Answer, suite, tweak

PARSE_BY_LINES = '''
def parse_action(text):
    out = {"kind": "malformed", "tool": None, "arguments": None, "answer": None, "error": None}
    cut = re.split(r"observation\\s*:", text, maxsplit=1, flags=re.IGNORECASE)[0]
    lower = cut.lower()
    final_at = re.search(r"final\\s+answer\\s*:", lower)
    action_at = re.search(r"(?m)^[ \\t]*action\\s*:", lower)
    if final_at and (not action_at or final_at.start() < action_at.start()):
        rest = [line.strip() for line in cut[final_at.end():].splitlines()]
        rest = [line for line in rest if line]
        if rest:
            return dict(out, kind="final", answer=rest[0])
        return dict(out, error="empty Final Answer")
    decoder = json.JSONDecoder()

    def first_object(s, start):
        i = s.find("{", start)
        while i != -1:
            try:
                return decoder.raw_decode(s, i)[0]
            except ValueError:
                if start is not None:
                    return None
            i = s.find("{", i + 1)
        return None

    if action_at:
        line_end = cut.find("\\n", action_at.end())
        line_end = len(cut) if line_end == -1 else line_end
        tool = cut[action_at.end():line_end].strip().strip("`'\\"").strip().lower()
        if not tool:
            return dict(out, error="no tool name after Action:")
        given = re.search(r"action\\s+input\\s*:", lower[line_end:])
        if not given:
            return dict(out, error="no Action Input")
        args = first_object(cut, line_end + given.end())
        if not isinstance(args, dict):
            return dict(out, error="Action Input must be a JSON object")
        return dict(out, kind="action", tool=tool, arguments=args)
    i = cut.find("{")
    while i != -1:
        try:
            obj = decoder.raw_decode(cut, i)[0]
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("tool"), str) and isinstance(obj.get("arguments"), dict):
            return dict(out, kind="action", tool=obj["tool"].strip().lower(), arguments=obj["arguments"])
        i = cut.find("{", i + 1)
    return dict(out, error="write Action: + Action Input:, or Final Answer:")
'''

ANSWERS = [
    # the action parser
    tweak("parse-action", "observation-kept", "    if observation:\n        text = text[: observation.start()]\n",
          "    if False:\n        pass\n", words="was never checked by a tool"),
    tweak("parse-action", "case-sensitive", 'final = re.search(r"Final\\s+Answer\\s*:", text, re.I)',
          'final = re.search(r"Final\\s+Answer\\s*:", text)', words="case-insensitively"),
    tweak("parse-action", "action-first", "if final and (action is None or final.start() < action.start()):",
          "if final and action is None:", words="a 'Final Answer:' that comes before any 'Action:' wins"),
    tweak("parse-action", "tool-not-lowered", '.strip("`\'\\"").strip().lower()', '.strip("`\'\\"").strip()',
          words="tool names are lowercased"),
    tweak("parse-action", "no-json-tool-calls", '    start = text.find("{")\n    while start != -1:',
          '    start = -1\n    while start != -1:', words="JSON tool call"),
    tweak("parse-action", "json-loads-the-rest", "arguments = decoder.raw_decode(text, start)[0] if start != -1 else None",
          "arguments = json.loads(text[start:]) if start != -1 else None", words="the JSON object ends where it closes"),
    tweak("parse-action", "input-kept-as-text", "arguments = decoder.raw_decode(text, start)[0] if start != -1 else None",
          "arguments = {\"expression\": text[start:].strip()} if start != -1 else None", words="holds the arguments"),
    Answer("parse-action", "split-lines", PARSE_BY_LINES),
    Answer("parse-action", "reference-reordered", '''
def parse_action(text):
    empty = dict(kind="malformed", tool=None, arguments=None, answer=None, error=None)
    m = re.search(r"(?i)observation\\s*:", text)
    text = text if m is None else text[: m.start()]
    final = re.search(r"(?i)final\\s+answer\\s*:", text)
    action = re.search(r"(?im)^[ \\t]*action\\s*:[ \\t]*(.*)$", text)
    if final is not None and (action is None or final.start() < action.start()):
        answer = next((line.strip() for line in text[final.end():].splitlines() if line.strip()), None)
        return {**empty, "kind": "final", "answer": answer} if answer else {**empty, "error": "empty answer"}
    decoder = json.JSONDecoder()
    if action is not None:
        tool = action.group(1).strip().strip("`'\\"").strip().lower()
        given = re.search(r"(?i)action\\s+input\\s*:", text[action.end():])
        if not tool or given is None:
            return {**empty, "error": "an Action needs a tool name and an Action Input"}
        brace = text.find("{", action.end() + given.end())
        try:
            arguments = decoder.raw_decode(text, brace)[0] if brace >= 0 else None
        except json.JSONDecodeError:
            arguments = None
        if isinstance(arguments, dict):
            return {**empty, "kind": "action", "tool": tool, "arguments": arguments}
        return {**empty, "error": "the Action Input is not a JSON object"}
    for brace in [i for i, c in enumerate(text) if c == "{"]:
        try:
            call = decoder.raw_decode(text, brace)[0]
        except json.JSONDecodeError:
            continue
        if isinstance(call, dict) and isinstance(call.get("tool"), str) and isinstance(call.get("arguments"), dict):
            return {**empty, "kind": "action", "tool": call["tool"].strip().lower(), "arguments": call["arguments"]}
    return {**empty, "error": "no Action and no Final Answer"}
'''),
    # the safe calculator
    Answer("safe-calculator", "eval", """
def safe_calculate(expression):
    return eval(expression, {"__builtins__": {}})
""", words="is this eval?"),
    tweak("safe-calculator", "pow-checked-after", "            if isinstance(node.op, ast.Pow) and abs(right) > 100:\n"
          "                raise ValueError(\"exponent too large\")\n", "", words="an exponent over 100"),
    tweak("safe-calculator", "bools-allowed", "type(node.value) in (int, float)", "isinstance(node.value, (int, float))",
          words="a bool"),
    tweak("safe-calculator", "zero-division-leaks", "            except (ZeroDivisionError, OverflowError) as e:",
          "            except OverflowError as e:", words="raises ZeroDivisionError"),
    tweak("safe-calculator", "no-unary-minus", "unary = {ast.UAdd: operator.pos, ast.USub: operator.neg}",
          "unary = {ast.UAdd: operator.pos}", words="raised ValueError"),
    tweak("safe-calculator", "no-range-check", "        if isinstance(result, complex) or abs(result) > 1e100:",
          "        if isinstance(result, complex):", words="a float overflow"),
    tweak("safe-calculator", "no-multiplication", "ast.Mult: operator.mul, ", "", words="raised ValueError"),
    Answer("safe-calculator", "node-visitor", """
def safe_calculate(expression):
    ops = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.UAdd: operator.pos, ast.USub: operator.neg}

    def checked(x):
        if isinstance(x, complex) or abs(x) > 1e100:
            raise ValueError("out of range")
        return x

    def ev(node):
        match node:
            case ast.Constant(value=v) if type(v) in (int, float):
                return checked(v)
            case ast.UnaryOp(op=op, operand=a) if type(op) in ops:
                return checked(ops[type(op)](ev(a)))
            case ast.BinOp(left=a, op=op, right=b) if type(op) in ops:
                x, y = ev(a), ev(b)
                if type(op) is ast.Pow and abs(y) > 100:
                    raise ValueError("exponent too large")
                try:
                    return checked(ops[type(op)](x, y))
                except (ArithmeticError, ValueError) as e:
                    raise ValueError(str(e)) from None
        raise ValueError("not allowed")

    if not isinstance(expression, str) or len(expression) > 200:
        raise ValueError("too long")
    try:
        return ev(ast.parse(expression.strip(), mode="eval").body)
    except SyntaxError:
        raise ValueError("syntax") from None
"""),
    Answer("safe-calculator", "whitelist-walk", """
def safe_calculate(expression):
    if not isinstance(expression, str) or len(expression) > 200:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not arithmetic") from None
    allowed = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div,
               ast.FloorDiv, ast.Mod, ast.Pow, ast.UAdd, ast.USub)
    for node in ast.walk(tree):
        if not isinstance(node, allowed) or (isinstance(node, ast.Constant) and type(node.value) not in (int, float)):
            raise ValueError(f"{type(node).__name__} is not allowed")

    def value(node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp):
            v = value(node.operand)
            r = -v if isinstance(node.op, ast.USub) else +v
        else:
            a, b = value(node.left), value(node.right)
            if isinstance(node.op, ast.Pow) and abs(b) > 100:
                raise ValueError("exponent too large")
            fns = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
                   ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
            try:
                r = fns[type(node.op)](a, b)
            except (ZeroDivisionError, OverflowError) as e:
                raise ValueError(str(e)) from None
        if isinstance(r, complex) or abs(r) > 1e100:
            raise ValueError("result out of range")
        return r

    return value(tree.body)
"""),
    # the loop
    tweak("run-agent", "steps-counted-late", "        if len(steps) >= max_steps:", "        if len(steps) > max_steps:",
          words="status 'max_steps'"),
    tweak("run-agent", "no-time-budget", "        if time.perf_counter() - start >= time_budget_s:", "        if False:",
          words="timeout"),
    tweak("run-agent", "model-failure-crashes", "        try:\n            reply = model.complete(messages, stop=agent.STOP)\n"
          "        except Exception:\n            return {\"status\": \"error\", \"answer\": None, \"steps\": steps}",
          "        reply = model.complete(messages, stop=agent.STOP)", words="run_agent raised"),
    tweak("run-agent", "malformed-ends-the-run", "            observation = \"Observation: Error: \" + parsed[\"error\"]",
          "            return {\"status\": \"error\", \"answer\": None, \"steps\": steps}", words="status 'error'"),
    tweak("run-agent", "tool-errors-crash", "            try:\n                observation = agent.format_observation(TOOLS.call(parsed[\"tool\"], parsed[\"arguments\"]))\n"
          "            except Exception as e:\n                observation = f\"Observation: Error: {e}\"",
          "            observation = agent.format_observation(TOOLS.call(parsed[\"tool\"], parsed[\"arguments\"]))",
          words="run_agent raised"),
    Answer("run-agent", "for-loop", """
def run_agent(replies, max_steps, time_budget_s, delay_s=0.0):
    model = agent.ScriptedBackend(replies, delay_s)
    history = [{"role": "system", "content": agent.system_prompt(TOOLS)},
               {"role": "user", "content": "What is 12 times 7?"}]
    steps, deadline = [], time.monotonic() + time_budget_s
    for _ in range(max_steps):
        if time.monotonic() >= deadline:
            return {"status": "timeout", "answer": None, "steps": steps}
        try:
            reply = model.complete(history, stop=agent.STOP)
        except Exception:
            return {"status": "error", "answer": None, "steps": steps}
        step = parse_action(reply)
        if step["kind"] == "final":
            steps.append({"kind": "final", "tool": None, "observation": None})
            return {"status": "answered", "answer": step["answer"], "steps": steps}
        if step["kind"] == "action":
            try:
                seen = agent.format_observation(TOOLS.call(step["tool"], step["arguments"]))
            except Exception as error:
                seen = f"Observation: Error: {error}"
        else:
            seen = f"Observation: Error: {step['error']}"
        steps.append({"kind": step["kind"], "tool": step["tool"], "observation": seen})
        history.append({"role": "assistant", "content": reply})
        history.append({"role": "user", "content": seen})
    return {"status": "max_steps", "answer": None, "steps": steps}
"""),
    Answer("run-agent", "helper-functions", """
def run_agent(replies, max_steps, time_budget_s, delay_s=0.0):
    def observe(parsed):
        if parsed["kind"] == "malformed":
            return "Observation: Error: " + parsed["error"]
        try:
            return agent.format_observation(TOOLS.call(parsed["tool"], parsed["arguments"]))
        except Exception as e:
            return "Observation: Error: " + str(e)

    def finish(status, answer=None):
        return {"status": status, "answer": answer, "steps": steps}

    backend = agent.ScriptedBackend(replies, delay_s)
    messages = [{"role": "system", "content": agent.system_prompt(TOOLS)}, {"role": "user", "content": "Question?"}]
    steps, t0 = [], time.perf_counter()
    while len(steps) < max_steps:
        if time.perf_counter() - t0 >= time_budget_s:
            return finish("timeout")
        try:
            reply = backend.complete(messages, stop=agent.STOP)
        except Exception:
            return finish("error")
        parsed = parse_action(reply)
        if parsed["kind"] == "final":
            steps.append({"kind": "final", "tool": None, "observation": None})
            return finish("answered", parsed["answer"])
        obs = observe(parsed)
        steps.append({"kind": parsed["kind"], "tool": parsed["tool"], "observation": obs})
        messages.extend([{"role": "assistant", "content": reply}, {"role": "user", "content": obs}])
    return finish("max_steps")
"""),
    # retrieval
    tweak("retrieval", "dot-product", "q = F.normalize(queries.float(), dim=-1)", "q = queries.float()",
          "x = F.normalize(keys.float(), dim=-1)", "x = keys.float()", words="ranks by the raw dot product"),
    tweak("retrieval", "least-similar", "(q @ x.T).topk(k, dim=-1)", "(q @ x.T).topk(k, dim=-1, largest=False)",
          words="LEAST similar"),
    tweak("retrieval", "worst-first", "    return scores, indices\n", "    return scores.flip(-1), indices.flip(-1)\n",
          words="best first"),
    tweak("retrieval", "recall-over-k", "/ len(set(rel))", "/ len(r)", words="divides the hits by k"),
    tweak("retrieval", "hit-rate", "len(set(r) & set(rel)) / len(set(rel))", "float(bool(set(r) & set(rel)))",
          words="counts a query as a hit if ANY"),
    Answer("retrieval", "cosine-similarity", """
def cosine_top_k(queries, keys, k):
    sims = F.cosine_similarity(queries.float()[:, None, :], keys.float()[None, :, :], dim=-1)  # (Q, N)
    order = sims.argsort(dim=-1, descending=True)[:, :k]
    return sims.gather(1, order), order


def recall_at_k(retrieved, relevant):
    total = 0.0
    for got, want in zip(retrieved, relevant):
        want = set(want)
        total += sum(1 for i in set(got) if i in want) / len(want)
    return total / len(retrieved)
"""),
    Answer("retrieval", "norms-by-hand", """
def cosine_top_k(queries, keys, k):
    q = queries.float() / queries.float().norm(dim=-1, keepdim=True)
    x = keys.float() / keys.float().norm(dim=-1, keepdim=True)
    result = torch.topk(torch.einsum("qd,nd->qn", q, x), k, dim=-1)
    return result.values, result.indices
"""),
]

BLAMES = [("parse-action/input-kept-as-text", "run-agent", "uses your parse_action"),
     ("safe-calculator/no-multiplication", "run-agent", "uses your safe_calculate")]

(test_every_exercise_has_four_mistakes_and_two_right_answers, test_check_names_the_mistake,
 test_composite_check_names_the_earlier_function, graded,
 test_grader_prices_it_and_agrees_with_the_check) = suite("06-agents", ANSWERS, BLAMES)
