"""The checked subset of Python that exercise cells are written in, decided before anything runs.

The student's process cannot be trusted to police itself: a tripwire that lives there can be
found and switched off, and the library's own source can be read and run. So the rule is
decided here, on the grader's side, from the source text alone. An exercise cell may use plain
Python, `math`, `torch` and the course library; it may not reach into the interpreter, load or
run code, read files, or name a ready-made answer the lab forbids. `refusal(source, forbidden)`
returns the first construct that breaks the rule, with its line, or None.

The run-time tripwire in the worker stays as a second line; with this rule in front of it the
student has no way to reach it (no `gc`, no frames, no dunder attributes, no computed names).
"""
from __future__ import annotations

import ast
import importlib.machinery
import importlib.util
import re
import sys

from llmlab.i18n import N_, _

# Calls that run, compile or import code, or hand out namespaces by name.
REFUSED_NAMES = {
    "exec", "eval", "compile", "__import__", "globals", "locals", "vars", "open", "breakpoint",
    "input", "get_ipython", "exit", "quit", "memoryview", "help",
}
# getattr and friends are allowed only with a constant, checkable name.
NAME_BY_STRING = {"getattr", "setattr", "delattr", "hasattr"}
# Modules an exercise may import (and their submodules), minus the refusals below.
ALLOWED_MODULES = {
    "math", "cmath", "torch", "numpy", "collections", "itertools", "functools", "dataclasses",
    "typing", "re", "json", "random", "statistics", "string", "heapq", "bisect", "copy", "enum",
    "ast", "operator", "unicodedata", "textwrap", "difflib", "fractions", "decimal", "numbers",
    "abc", "contextlib", "time", "warnings", "llmlab", "transformers", "tokenizers", "peft",
    "einops", "tqdm",
}
# Parts of allowed modules that load code or files, or reach the dispatcher underneath torch.
REFUSED_DOTTED = {
    "torch.load", "torch.save", "torch.ops", "torch.library", "torch.hub", "torch.package",
    "torch.jit", "torch.serialization", "torch.from_file", "torch.utils.cpp_extension",
    "torch.overrides", "torch.classes", "torch.utils.hooks", "torch.multiprocessing",
    "numpy.load", "numpy.save", "numpy.fromfile", "numpy.loadtxt", "numpy.genfromtxt",
    "numpy.memmap", "numpy.ctypeslib", "numpy.lib", "operator.attrgetter", "operator.methodcaller",
    "llmlab.grading", "llmlab.checks", "llmlab.assets", "llmlab.course", "llmlab.cli",
}
# Attribute names that lead from an object to frames, code or the interpreter's globals.
REFUSED_ATTRS = {
    "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
    "tb_frame", "tb_next", "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "co_code",
    "co_consts", "func_globals", "load", "from_file", "fromfile", "loadtxt", "genfromtxt", "memmap",
    "ops", "library", "hub", "jit", "serialization", "overrides", "cpp_extension", "ctypeslib",
    "attrgetter", "methodcaller",
}
# Dunder attributes that only read a name or call a parent constructor.
SAFE_DUNDERS = {"__init__", "__name__"}
LOADS = N_("{name} (loads code or files, or reaches underneath torch)")
YOURSELF = N_("{name}: this exercise asks you to implement it yourself")
FORMAT_FIELD = re.compile(r"\{[^{}]*[.\[]\s*_")  # "{0.__class__}", "{x[_y]}": attribute access in a format string


def _module_of(name: str) -> bool:
    """True when `name` is a module: imported already, or found on disk without running any package's code."""
    if name in sys.modules:  # includes aliases such as os.path
        return True
    parts = name.split(".")
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name imports nothing
    except (ImportError, ValueError):
        return False
    for i in range(1, len(parts)):  # a submodule: look in the parent's folders instead of importing it
        if spec is None or spec.submodule_search_locations is None:
            return False
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), list(spec.submodule_search_locations))
    return spec is not None


def _dotted(node: ast.AST) -> str:
    """'a.b.c' for a chain of attributes on a name, '?' where the chain starts elsewhere."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


class _Rule:
    """One pass over a cell's syntax tree; `first` holds the earliest refusal."""

    def __init__(self, forbidden: list[str]):
        self.modules = [n for n in forbidden if _module_of(n)]
        self.leaves = {n.rsplit(".", 1)[-1]: n for n in forbidden if n not in self.modules}
        self.aliases: dict[str, str] = {}  # local name -> module it was imported as
        self.found: list[tuple[int, int, str]] = []

    def refuse(self, node: ast.AST, why: str) -> None:
        self.found.append((getattr(node, "lineno", 0), getattr(node, "col_offset", 0), why))

    def _forbidden_module(self, dotted: str) -> str | None:
        return next((m for m in self.modules if dotted == m or dotted.startswith(m + ".")), None)

    def check_module(self, node: ast.AST, dotted: str) -> None:
        """An imported or named module path: allowed, refused by the subset, or a forbidden answer."""
        top = dotted.split(".")[0]
        if top not in ALLOWED_MODULES:
            self.refuse(node, _("import of {module!r} (exercise cells may import math, torch, numpy, the course "
                                "library and similar; not modules that reach the interpreter, files or code)").format(module=top))
        elif hit := next((r for r in REFUSED_DOTTED if dotted == r or dotted.startswith(r + ".")), None):
            self.refuse(node, _(LOADS).format(name=hit))
        elif hit := self._forbidden_module(dotted):
            self.refuse(node, _(YOURSELF).format(name=hit))
        elif any(part.startswith("_") for part in dotted.split(".")):
            self.refuse(node, _("private module {name}").format(name=dotted))

    def check_attribute(self, node: ast.AST, attr: str, dotted: str) -> None:
        if attr.startswith("_") and attr not in SAFE_DUNDERS:
            self.refuse(node, _("attribute {name!r} (private and dunder attributes are refused)").format(name=attr))
        elif attr in REFUSED_ATTRS:
            self.refuse(node, _("attribute {name!r} (reaches frames, code, files or the dispatcher underneath torch)")
                        .format(name=attr))
        elif attr in self.leaves:
            self.refuse(node, _(YOURSELF).format(name=self.leaves[attr]))
        else:
            head = dotted.partition(".")[0]
            full = dotted.replace(head, self.aliases[head], 1) if head in self.aliases else dotted
            if "?" not in full and full.split(".")[0] in ALLOWED_MODULES | set(self.aliases.values()):
                if hit := next((r for r in REFUSED_DOTTED if full == r or full.startswith(r + ".")), None):
                    self.refuse(node, _(LOADS).format(name=hit))
                elif hit := self._forbidden_module(full):
                    self.refuse(node, _(YOURSELF).format(name=hit))

    def visit(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self.check_module(node, alias.name)
                    self.aliases[(alias.asname or alias.name).split(".")[0]] = (
                        alias.name if alias.asname else alias.name.split(".")[0])
            elif isinstance(node, ast.ImportFrom):
                if node.level or not node.module:
                    self.refuse(node, _("relative import"))
                    continue
                self.check_module(node, node.module)
                for alias in node.names:
                    if alias.name == "*":
                        self.refuse(node, _("from {module} import * (name what you use)").format(module=node.module))
                        continue
                    full = f"{node.module}.{alias.name}"
                    if alias.name.startswith("_"):
                        self.refuse(node, _("private name {name!r}").format(name=alias.name))
                    elif alias.name in self.leaves:
                        self.refuse(node, _(YOURSELF).format(name=self.leaves[alias.name]))
                    elif _module_of_safe(full):
                        self.check_module(node, full)
                    elif alias.name in REFUSED_ATTRS or full in REFUSED_DOTTED:
                        self.refuse(node, _(LOADS).format(name=full))
                    self.aliases[alias.asname or alias.name] = full
            elif isinstance(node, ast.Name):
                if node.id in REFUSED_NAMES:
                    self.refuse(node, _("{name}() (runs code, reads files or hands out namespaces)").format(name=node.id))
                elif node.id.startswith("__") and node.id.endswith("__"):
                    self.refuse(node, _("dunder name {name!r}").format(name=node.id))
            elif isinstance(node, ast.Attribute):
                self.check_attribute(node, node.attr, _dotted(node))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in NAME_BY_STRING:
                if len(node.args) < 2 or not (isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)):
                    self.refuse(node, _("{name}() with a computed attribute name").format(name=node.func.id))
                else:
                    self.check_attribute(node, node.args[1].value, f"?.{node.args[1].value}")
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if FORMAT_FIELD.search(node.value):
                    self.refuse(node, _("a format string that reads a private attribute"))


def _module_of_safe(name: str) -> bool:
    """True when `name` is an importable module; never imports anything outside the allowed roots."""
    return name.split(".")[0] in ALLOWED_MODULES and _module_of(name)


def refusal(source: str, forbidden: list[str]) -> str | None:
    """Return 'line N: <construct>' for the first construct of `source` outside the subset, or None."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None  # the sandbox reports the syntax error itself
    rule = _Rule(forbidden)
    rule.visit(tree)
    if not rule.found:
        return None
    line, _col, why = min(rule.found)
    return _("line {line}: {why}").format(line=line, why=why)
