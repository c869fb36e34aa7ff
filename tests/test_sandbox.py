"""The wire format and the sandbox on their own: values cross as plain data, limits hold."""
from __future__ import annotations

import importlib.util
import io
import json
import math
import subprocess
import sys

import nbformat
import pytest
import torch

from llmlab.course import root
from llmlab.grading import libview, protocol, sanitize, subset
from llmlab.grading.sandbox import Sandbox, SandboxError, isolation


def roundtrip(value):
    buf = io.BytesIO()
    protocol.send(buf, {"value": None}, value)
    buf.seek(0)
    return protocol.recv(buf)[1]


def test_values_cross_as_plain_data():
    value = {"t": torch.arange(6.0).reshape(2, 3), "n": (1, 2.5, None, True, "s"), "big": 2**80,
             "inf": math.inf, "arr": [torch.zeros(1, dtype=torch.bool)]}
    back = roundtrip(value)
    assert torch.equal(back["t"], value["t"]) and back["n"] == value["n"] and back["big"] == 2**80
    assert back["inf"] == math.inf and back["arr"][0].dtype == torch.bool


def test_tensor_subclasses_arrive_as_plain_tensors():
    class Liar(torch.Tensor):
        def __eq__(self, other):
            return True

    back = roundtrip(torch.ones(2).as_subclass(Liar))
    assert type(back) is torch.Tensor


def test_objects_that_are_not_plain_data_are_refused():
    class Sneaky:
        def __eq__(self, other):
            return True

    with pytest.raises(protocol.ProtocolError, match="cannot be graded"):
        roundtrip(Sneaky())


def test_answers_come_only_from_solution_cells_by_grade_id(tmp_path):
    meta = {"nbgrader": {"grade": False, "grade_id": "ex", "locked": False, "schema_version": 3, "solution": True, "task": False}}
    test_meta = {"nbgrader": {"grade": True, "grade_id": "test-ex", "locked": True, "points": 1, "schema_version": 3,
                              "solution": False, "task": False}}
    template = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("def f():\n    raise NotImplementedError()", metadata=meta),
                                               nbformat.v4.new_code_cell("assert f() == 1", metadata=test_meta)])
    student = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("def f():\n    return 1", metadata={**meta, "tags": ["raises-exception"]}),
        nbformat.v4.new_code_cell("pass", metadata={**test_meta, "tags": ["skip-execution"]}),
        nbformat.v4.new_code_cell("import builtins  # added cell")])
    path = tmp_path / "s.ipynb"
    nbformat.write(student, path)
    answers, notes = sanitize.answers(path.read_bytes(), template)
    assert answers == {"ex": "def f():\n    return 1"} and not notes
    spec, trusted = sanitize.build(template, answers, sanitize.policy(root(), template), tmp_path / "spec.json", {"QUICK": True})
    assert [c["source"] for c in spec["cells"]] == ["def f():\n    return 1"]  # no test, no added cell
    assert trusted.cells[2].source == "assert f() == 1" and "tags" not in trusted.cells[2].metadata


def test_static_check_names_forbidden_calls():
    forbidden = ["torch.nn.functional.scaled_dot_product_attention", "torch.nn.MultiheadAttention", "llmlab.attention"]
    assert "scaled_dot_product_attention" in subset.refusal("def f(q, k, v):\n    return F.scaled_dot_product_attention(q, k, v)", forbidden)
    assert "llmlab.attention" in subset.refusal("from llmlab.attention import causal_mask", forbidden)
    assert "MultiheadAttention" in subset.refusal("m = torch.nn.MultiheadAttention(8, 2)", forbidden)
    assert subset.refusal("def scaled_dot_product_attention(q, k, v):\n    return q @ k.T @ v", forbidden) is None


def test_the_subset_finds_modules_without_importing_them():
    """Whether a forbidden name is a module is read off the disk: the grading process imports none of the
    labs' libraries to decide it, and the answer agrees with importlib's for every lab's forbidden names."""
    names = sorted({n for nb in root().glob("solutions/*/*.ipynb")
                    for n in nbformat.read(nb, as_version=4).metadata["llmlab"]["forbidden"]})
    assert len(names) > 40
    probe = ("import json, sys\nfrom llmlab.grading import subset\n"
             f"names = {names + ['os.path', 'torch.nn.functional', 'torch.nosuch', 'nosuch.x']!r}\n"
             "found = {n: subset._module_of(n) for n in names}\n"
             "heavy = sorted(m for m in ('torch', 'transformers', 'trl', 'faiss', 'llmlab.serve') if m in sys.modules)\n"
             "print(json.dumps([found, heavy]))")
    found, heavy = json.loads(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert heavy == []
    for name, is_module in found.items():
        try:
            want = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            want = False
        assert is_module == want, name
    assert found["llmlab.attention"] and found["torch.nn.functional"] and found["os.path"]
    assert not found["torch.nn.MultiheadAttention"] and not found["torch.nosuch"] and not found["nosuch.x"]


LIMITS = dict(memory_mb=2048, fsize_mb=8, tmp_mb=64, reply_mb=16, cpu_s=300, nproc=128, output_bytes=4096, cell_s=8, call_s=8,
              total_s=120, threads=1, max_restarts=4)


@pytest.fixture(scope="module")
def sandbox():
    cells = [
        {"id": "setup", "label": "cell 1", "source": "import os, socket, torch\nimport torch.nn.functional as F", "exports": []},
        {"id": "ok", "label": "cell 2", "source": "def double(x):\n    print('x' * 100000)\n    return 2 * x", "exports": ["double"]},
        {"id": "hang", "label": "cell 3", "source": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass", "exports": []},
        {"id": "bad", "label": "cell 4", "source": (
            "def cheat(q, k, v):\n    return F.scaled_dot_product_attention(q, k, v)\n"
            "def die():\n    os._exit(0)\n"
            "def hog():\n    return bytearray(10**11)\n"
            "def net():\n    try:\n        socket.create_connection(('1.1.1.1', 80), timeout=2)\n        return 'connected'\n"
            "    except OSError as e:\n        return 'blocked'\n"
            "def look(path):\n    return os.path.exists(path)\n"
            "def write():\n    open('/tmp/x', 'w').write('hi')\n    return open('/tmp/x').read()\n"), "exports": ["cheat", "die", "hog", "net", "look", "write"]},
    ]
    sb = Sandbox({"cells": cells, "limits": LIMITS, "forbidden": ["torch.nn.functional.scaled_dot_product_attention"]})
    sb.start()
    ns: dict = {}
    for c in cells:
        sb.bind(ns, c["id"])
    yield sb, ns
    sb.close()


def test_a_cell_past_its_deadline_is_blamed_and_the_rest_still_runs(sandbox):
    sb, ns = sandbox
    assert sb.failures == {"hang": f"time limit ({LIMITS['cell_s']} s) exceeded"}
    assert torch.equal(ns["double"](torch.ones(2)), torch.full((2,), 2.0))


def test_output_is_capped(sandbox, capsys):
    sb, ns = sandbox
    ns["double"](1)
    assert len(capsys.readouterr().out) < LIMITS["output_bytes"] + 200


def test_forbidden_function_trips_at_run_time(sandbox):
    _, ns = sandbox
    with pytest.raises(AssertionError, match="implement it yourself"):
        ns["cheat"](torch.ones(1, 2, 4), torch.ones(1, 2, 4), torch.ones(1, 2, 4))


def test_memory_limit_is_reported_as_such(sandbox):
    _, ns = sandbox
    with pytest.raises(MemoryError, match="out of memory"):
        ns["hog"]()


def test_early_exit_costs_the_call_not_the_sandbox(sandbox):
    _, ns = sandbox
    with pytest.raises(SandboxError, match="exited early"):
        ns["die"]()
    assert ns["double"](3) == 6  # restarted, the rest still works


@pytest.mark.skipif(isolation() != "bubblewrap", reason="network and filesystem isolation need bubblewrap")
def test_no_network_and_no_view_of_the_course(sandbox):
    _, ns = sandbox
    assert ns["net"]() == "blocked"
    assert ns["look"](str(root() / "grading")) is False
    assert ns["look"](str(root() / "solutions")) is False
    assert ns["write"]() == "hi"


def test_process_fallback_keeps_limits_and_verdicts(monkeypatch):
    monkeypatch.setenv("LLMLAB_SANDBOX", "process")
    assert isolation() == "process"
    cells = [{"id": "a", "label": "cell 1", "exports": ["f", "hog", "bye"], "source":
              "import os\ndef f(x):\n    return x + 1\ndef hog():\n    return bytearray(10**11)\ndef bye():\n    os._exit(3)"}]
    sb = Sandbox({"cells": cells, "limits": LIMITS, "forbidden": []})
    sb.start()
    ns: dict = {}
    sb.bind(ns, "a")
    try:
        assert ns["f"](torch.ones(1)).item() == 2.0
        with pytest.raises(MemoryError):
            ns["hog"]()
        with pytest.raises(SandboxError, match="exit code 3"):
            ns["bye"]()
        assert ns["f"](1) == 2
    finally:
        sb.close()


def _sandbox(source: str, exports: list[str], limits: dict | None = None, secret: str = "s") -> tuple[Sandbox, dict]:
    cells = [{"id": "a", "label": "cell 1", "exports": exports, "source": source}]
    sb = Sandbox({"cells": cells, "limits": {**LIMITS, **(limits or {})}, "forbidden": [], "secret": secret})
    sb.start()
    ns: dict = {}
    sb.bind(ns, "a")
    return sb, ns


def test_in_place_changes_reach_the_caller_as_in_a_notebook():
    sb, ns = _sandbox("import torch\n"
                      "def scale_(x, ys):\n    x.mul_(2)\n    ys[1].zero_()\n    return None\n"
                      "def grow(x):\n    x.resize_(4)\n    x.fill_(7)\n    return x.sum()\n"
                      "def pure(x):\n    return x * 2", ["scale_", "grow", "pure"])
    try:
        x, ys = torch.ones(3), [torch.ones(2), torch.ones(2)]
        assert ns["scale_"](x, ys) is None
        assert x.tolist() == [2.0, 2.0, 2.0] and ys[0].tolist() == [1.0, 1.0] and ys[1].tolist() == [0.0, 0.0]
        z = torch.ones(2)
        assert ns["grow"](z).item() == 28.0 and z.tolist() == [7.0] * 4
        w = torch.ones(2)
        ns["pure"](w)
        assert w.tolist() == [1.0, 1.0]
    finally:
        sb.close()


def test_subclasses_of_tuple_list_and_dict_cross_as_their_base_type():
    sb, ns = _sandbox("import torch, collections\n"
                      "P = collections.namedtuple('P', 'a b')\n"
                      "def topk(x):\n    return torch.topk(x, 2)\n"
                      "def named():\n    return P(1, torch.ones(1))\n"
                      "def dicts():\n    d = collections.defaultdict(int, {'x': 1})\n"
                      "    return d, collections.OrderedDict(y=2)\n"
                      "def size():\n    return torch.ones(2, 3).shape\n", ["topk", "named", "dicts", "size"])
    try:
        values, indices = ns["topk"](torch.tensor([1.0, 5.0, 3.0]))
        assert values.tolist() == [5.0, 3.0] and indices.tolist() == [1, 2]
        a, b = ns["named"]()
        assert a == 1 and type(b) is torch.Tensor
        d, o = ns["dicts"]()
        assert type(d) is dict and d == {"x": 1} and o == {"y": 2}
        assert ns["size"]() == (2, 3)
    finally:
        sb.close()


def test_a_worker_that_stops_reading_is_a_call_timeout():
    sb, ns = _sandbox("import time, llmlab.grading.protocol as p\n"
                      "def f(x):\n    return x\n"
                      "def stop():\n    p.recv = lambda *a, **k: time.sleep(10**6)\n    return 0", ["f", "stop"],
                      {"call_s": 3})
    try:
        assert ns["stop"]() == 0
        with pytest.raises(SandboxError, match="time limit"):
            ns["f"](torch.zeros(4 << 20))  # 16 MB: far more than a pipe holds
    finally:
        sb.close()


def test_replies_are_capped_on_the_grader_side():
    sb, ns = _sandbox("import torch\ndef big():\n    return torch.zeros(8 << 20)\n"
                      "def wordy():\n    return 'x' * (20 << 20)\n"
                      "def chatty():\n    print('y' * 3000)\n    return 1", ["big", "wordy", "chatty"], {"reply_mb": 16})
    try:
        with pytest.raises(SandboxError, match="reply too large"):
            ns["big"]()
        with pytest.raises(SandboxError, match="reply too large"):
            ns["wordy"]()
    finally:
        sb.close()


def test_a_test_cell_has_one_output_budget_over_all_its_calls(capsys):
    sb, ns = _sandbox("def chatty():\n    print('y' * 3000)\n    return 1", ["chatty"])
    try:
        sb.test("test-a")
        for _ in range(5):
            ns["chatty"]()
        out = capsys.readouterr().out
        assert LIMITS["output_bytes"] - 5 <= out.count("y") <= LIMITS["output_bytes"]
        assert out.count("output truncated") == 1
        sb.test("test-b")
        ns["chatty"]()
        assert capsys.readouterr().out.count("y") == 3000
    finally:
        sb.close()


def test_hidden_tests_show_no_student_output_and_draw_secret_inputs(capsys):
    real_seed, real_generator = torch.manual_seed, torch.Generator
    torch.manual_seed(3)
    plain = (torch.randn(3).tolist(), torch.randn(2, generator=torch.Generator().manual_seed(3)).tolist())
    draws = []
    for secret in ("one", "two"):
        sb, ns = _sandbox("def leak(x):\n    print('INPUT', x.tolist())\n    raise ValueError(str(x.tolist()))",
                          ["leak"], secret=secret)
        try:
            sb.test("test-a")
            sb.hidden(True)
            torch.manual_seed(3)
            x = torch.randn(3)
            y = torch.randn(2, generator=torch.Generator().manual_seed(3))
            with pytest.raises(ValueError) as err:
                ns["leak"](x)
            sb.hidden(False)
            draws.append((x.tolist(), y.tolist()))
            assert "INPUT" not in capsys.readouterr().out and str(x.tolist()) not in str(err.value)
            assert "not shown for hidden tests" in str(err.value)
            assert torch.manual_seed is real_seed and torch.Generator is real_generator
        finally:
            sb.close()
    assert draws[0] != draws[1], "the same hidden inputs under two secrets"
    assert plain not in draws, "hidden inputs equal the plain seeded ones"


@pytest.mark.skipif(isolation() != "bubblewrap", reason="the sized /tmp is a bubblewrap tmpfs")
def test_a_1_gb_write_to_tmp_is_a_limit_hit():
    sb, ns = _sandbox("def fill():\n    chunk = b'x' * (8 << 20)\n"
                      "    for i in range(128):\n        with open(f'/tmp/f{i // 4}', 'ab') as f:\n"
                      "            f.write(chunk)\n    return 'wrote 1 GiB'", ["fill"], {"fsize_mb": 64, "tmp_mb": 64})
    try:
        with pytest.raises(OSError, match="scratch space limit"):
            ns["fill"]()
    finally:
        sb.close()


def test_arguments_keep_requires_grad_as_in_a_notebook():
    sb, ns = _sandbox("import torch\ndef grad_of_square(x):\n    (g,) = torch.autograd.grad((x ** 2).sum(), x)\n    return g",
                      ["grad_of_square"])
    try:
        x = torch.tensor([1.0, -2.0], requires_grad=True)
        g = ns["grad_of_square"](x)
        assert g.tolist() == [2.0, -4.0] and not g.requires_grad
        with pytest.raises(RuntimeError, match="does not require grad"):
            ns["grad_of_square"](torch.tensor([1.0]))
    finally:
        sb.close()


def test_a_library_view_carries_its_bytecode_so_no_sandboxed_worker_compiles_it(tmp_path):
    """The sandbox mounts the view read-only: without bytecode in it, every worker compiles llmlab from source."""
    view = libview.build(["llmlab.attention.apply_rope"], "attention", tmp_path)
    code = f"import sys; sys.path.insert(0, {str(view)!r}); import llmlab.grading.worker, llmlab.attention, llmlab.checks"
    log = subprocess.run([sys.executable, "-v", "-c", code], capture_output=True, text=True, check=True).stderr
    loaded = [line for line in log.splitlines() if line.startswith("# code object from") and str(view) in line]
    assert len(loaded) > 5 and all(line.endswith(".pyc'") for line in loaded), [l for l in loaded if ".pyc" not in l]
