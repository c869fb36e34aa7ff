"""The library as the sandbox sees it: the course's code without the answers to this lab.

`llmlab` holds a reference implementation of every exercise (labs build on each other through
it). A student whose code runs next to those files could read and run them. So each lab is
graded against a *view* of the library: a copy in which the lab's forbidden `llmlab` modules,
functions and classes, and the lab's own checks module, keep their names and signatures but
lose their bodies (every call raises). In a module stripped whole, the dunder methods of its
classes stay (constructors, `__post_init__` validation, `__repr__`), so module-level objects such
as default configs still build and other modules import from it as before; the methods and
functions that compute something are gone. The view is mounted read-only where the library lives.
"""
from __future__ import annotations

import ast
import compileall
import hashlib
import importlib
import inspect
import os
import shutil
from pathlib import Path

import llmlab

ALL = "*"


def _stub_body(qualname: str) -> list[ast.stmt]:
    message = f"{qualname} is not available while this lab is graded; write your own"
    return [ast.Raise(exc=ast.Call(func=ast.Name("NotImplementedError", ast.Load()),
                                   args=[ast.Constant(message)], keywords=[]), cause=None)]


class _Strip(ast.NodeTransformer):
    """Replace the bodies of the chosen definitions (or of all of them) with a raise."""

    def __init__(self, names: set[str]):
        self.names, self.prefix, self.classes = names, [], []

    def _visit_def(self, node):
        qualname = ".".join([*self.prefix, node.name])
        hit = ALL in self.names or qualname in self.names or any(qualname.startswith(n + ".") for n in self.names)
        self.prefix.append(node.name)
        self.classes.append(isinstance(node, ast.ClassDef))
        self.generic_visit(node)
        self.prefix.pop()
        self.classes.pop()
        in_class = len(self.prefix) > 0 and self.classes[-1]
        keep = in_class and ALL in self.names and node.name.startswith("__") and node.name.endswith("__")
        if hit and not isinstance(node, ast.ClassDef) and not keep:
            node.body = _stub_body(qualname)
        elif hit:  # a class: keep its shape (bases, fields), drop docstrings and code
            node.body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))] or [ast.Pass()]
        return node

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _visit_def

    def visit_Lambda(self, node):
        return ast.Lambda(args=node.args, body=ast.Call(func=ast.Name("_llmlab_unavailable", ast.Load()), args=[], keywords=[])) \
            if ALL in self.names and not self.prefix else node


def targets(forbidden: list[str], checks_module: str | None) -> dict[Path, set[str]]:
    """Map each library file that must lose code to the qualified names to strip (ALL for the whole file)."""
    package = Path(llmlab.__file__).resolve().parent
    out: dict[Path, set[str]] = {}
    names = [n for n in forbidden if n == "llmlab" or n.startswith("llmlab.")]
    if checks_module:
        names.append(f"llmlab.checks.{checks_module}")
    for name in names:
        obj = resolve(name)
        if obj is None:
            continue
        if inspect.ismodule(obj):
            path = Path(obj.__file__).resolve()
            files = sorted(path.parent.rglob("*.py")) if path.name == "__init__.py" else [path]
            for f in files:
                out.setdefault(f, set()).add(ALL)
            continue
        try:
            path = Path(inspect.getsourcefile(obj)).resolve()
        except TypeError:
            continue
        if package in path.parents:
            out.setdefault(path, set()).add(obj.__qualname__)
    return out


def resolve(dotted: str):
    """Import the longest module prefix of `dotted` and walk the rest as attributes (None if absent)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def build(forbidden: list[str], checks_module: str | None, into: Path) -> Path:
    """Write the view under `into` (a folder holding `llmlab/`), reusing an identical one; return it."""
    package = Path(llmlab.__file__).resolve().parent
    sources = sorted(p for p in package.rglob("*") if p.is_file() and "__pycache__" not in p.parts)  # .po too
    # What is stripped follows from the names and the library's source alone, so an existing view is
    # found without importing the modules it names (transformers, fastapi: seconds per grading process).
    h = hashlib.sha256(repr((sorted(forbidden), checks_module)).encode())
    for p in sources:
        h.update(str(p.relative_to(package)).encode() + p.read_bytes())
    dest = Path(into) / f"libview-{h.hexdigest()[:16]}"
    if (dest / "llmlab").is_dir():
        return dest
    strip = targets(forbidden, checks_module)
    tmp = Path(into) / f".{dest.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(package, tmp / "llmlab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for path, names in strip.items():
        tree = _Strip(names).visit(ast.parse(path.read_text(encoding="utf-8")))
        if ALL in names:
            tree.body.append(ast.parse("def _llmlab_unavailable(*args, **kwargs):\n"
                                       "    raise NotImplementedError('not available while this lab is graded')").body[0])
        ast.fix_missing_locations(tree)
        (tmp / "llmlab" / path.relative_to(package)).write_text(ast.unparse(tree), encoding="utf-8")
    # bytecode now, once: the sandbox mounts the view read-only, so each worker would compile it again
    compileall.compile_dir(tmp / "llmlab", quiet=1)
    for d, _, files in os.walk(tmp):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(os.path.join(d, f), 0o644)
    try:
        os.rename(tmp, dest)
    except OSError:  # another grading process built the same view first
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
