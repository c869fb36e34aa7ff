"""Rebuild a submission from the released template, keeping only the student's answers.

From a student's notebook we take exactly one thing: the source of each solution cell, found
by its grade_id (and the text of manual-answer cells). Everything else — test cells, tags such
as `skip-execution` or `raises-exception`, metadata, checksums, kernelspecs, added or deleted
cells — comes from the released template, so tampering with it changes nothing.

Two notebooks come out of one submission:
- the *sandbox cells*: parameters (overridden the papermill way), setup and solution code,
  with test and demo cells left out; they run in the student's sandboxed process;
- the *trusted notebook* that nbgrader autogrades: the template with each solution cell
  replaced by a stand-in that binds the student's functions as remote proxies. Test cells
  (hidden ones restored by nbgrader from the gradebook) run here, out of the student's reach.
"""
from __future__ import annotations

import ast
import copy
import importlib.util
import json
import tomllib
from pathlib import Path

import nbformat
from nbformat import NotebookNode

STUB = "# YOUR CODE HERE\nraise NotImplementedError()"


def policy(root: Path, nb: NotebookNode) -> dict:
    """Return grading limits: grading/policy.toml, overridden by the notebook's llmlab.grading metadata."""
    with open(root / "grading" / "policy.toml", "rb") as f:
        base = tomllib.load(f)
    merged = {**base["sandbox"], **base["grading"]}
    for key, value in nb.metadata.get("llmlab", {}).get("grading", {}).items():
        if key not in merged:
            raise ValueError(f"unknown grading setting {key!r} in notebook metadata; known: {', '.join(merged)}")
        merged[key] = type(merged[key])(value)
    return merged


def nbgrader_meta(cell: NotebookNode) -> dict:
    """Return a cell's nbgrader metadata ({} for ordinary cells)."""
    return cell.metadata.get("nbgrader", {}) or {}


def is_solution(cell: NotebookNode) -> bool:
    """True for a cell the student writes (code exercise or manual answer)."""
    return bool(nbgrader_meta(cell).get("solution"))


def is_test(cell: NotebookNode) -> bool:
    """True for an autograded test cell."""
    meta = nbgrader_meta(cell)
    return cell.cell_type == "code" and bool(meta.get("grade")) and not meta.get("solution")


def is_demo(cell: NotebookNode) -> bool:
    """True for a cell that only shows things (plots, widgets, benchmarks); grading skips it."""
    return "demo" in cell.metadata.get("tags", [])


def is_parameters(cell: NotebookNode) -> bool:
    """True for the papermill parameters cell."""
    return "parameters" in cell.metadata.get("tags", [])


def answers(path: Path, template: NotebookNode) -> tuple[dict[str, str], list[str]]:
    """Return ({grade_id: source} of the student's solution cells, notes about what was ignored)."""
    wanted = {nbgrader_meta(c)["grade_id"]: c.cell_type for c in template.cells if is_solution(c)}
    notes: list[str] = []
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        cells = raw["cells"] if isinstance(raw, dict) and isinstance(raw.get("cells"), list) else []
    except (OSError, ValueError) as e:
        return {}, [f"the submission is not a readable notebook ({type(e).__name__}); graded as empty"]
    found: dict[str, str] = {}
    for cell in cells:
        if not isinstance(cell, dict):
            continue
        meta = cell.get("metadata", {}).get("nbgrader", {}) if isinstance(cell.get("metadata"), dict) else {}
        gid = meta.get("grade_id") if isinstance(meta, dict) else None
        if gid in wanted and gid not in found and cell.get("cell_type") == wanted[gid]:
            source = cell.get("source", "")
            found[gid] = "".join(source) if isinstance(source, list) else str(source)
    missing = sorted(set(wanted) - set(found))
    if missing:
        notes.append(f"answer cells not found (deleted or retagged?), graded as empty: {', '.join(missing)}")
    return found, notes


def exports(template_source: str) -> list[str]:
    """Return the top-level function names a template solution cell defines (what tests may call)."""
    try:
        tree = ast.parse(template_source)
    except SyntaxError:
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def violation(source: str, forbidden: list[str]) -> str | None:
    """Return why `source` reaches for a forbidden ready-made answer (static check), or None.

    A second line of defence: the sandbox also trips at run time when a forbidden function
    is called, however it was reached.
    """
    modules = [name for name in forbidden if _is_module(name)]
    leaves = {name.rsplit(".", 1)[-1]: name for name in forbidden if name not in modules}
    in_module = lambda m: any(m == mod or m.startswith(mod + ".") for mod in modules)  # noqa: E731
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None  # the sandbox reports the syntax error itself
    for node in ast.walk(tree):
        hit = None
        if isinstance(node, ast.Attribute):
            dotted = _dotted(node)
            hit = leaves.get(node.attr) or (dotted if in_module(dotted) else None)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                hit = hit or (full if in_module(node.module) or in_module(full) else leaves.get(alias.name))
        elif isinstance(node, ast.Import):
            hit = next((a.name for a in node.names if in_module(a.name)), None)
        if hit:
            return (f"line {node.lineno}: your code uses {hit}; "
                    "this exercise asks you to implement it yourself")
    return None


def build(template: NotebookNode, student: dict[str, str], settings: dict, spec_path: Path,
          parameters: dict) -> tuple[dict, NotebookNode]:
    """Return (sandbox spec, trusted notebook) for one submission of one notebook."""
    forbidden = template.metadata.get("llmlab", {}).get("forbidden", [])
    injected = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cells, violations = [], {}
    trusted = copy.deepcopy(template)
    for index, cell in enumerate(trusted.cells):
        meta = nbgrader_meta(cell)
        label = f"cell {index + 1}"
        if cell.cell_type == "markdown":
            if is_solution(cell):
                cell.source = student.get(meta["grade_id"], cell.source)
            continue
        if cell.cell_type != "code":
            continue
        if is_test(cell):
            continue
        if is_demo(cell):
            cell.metadata.setdefault("tags", []).append("skip-execution")
            continue
        if is_parameters(cell):
            cells.append({"id": f"params-{index}", "label": label, "source": f"{cell.source}\n{injected}", "exports": []})
            cell.source = f"{cell.source}\n\n# Parameters set by the grader\n{injected}"
            continue
        if is_solution(cell):
            gid = meta["grade_id"]
            source = student.get(gid, cell.source)
            names = exports(cell.source)
            cells.append({"id": gid, "label": label, "source": source, "exports": names})
            if v := violation(source, forbidden):
                violations[gid] = f"{label} ({gid}) {v}"
            cell.source = f"_llmlab_sandbox.bind(globals(), {gid!r})  # your code ran in the sandbox"
            continue
        cells.append({"id": f"cell-{index}", "label": label, "source": cell.source, "exports": []})
    start = nbformat.v4.new_code_cell(
        "from llmlab.grading.sandbox import Sandbox as _LlmlabSandbox\n"
        f"_llmlab_sandbox = _LlmlabSandbox.from_file({str(spec_path)!r})")
    start.metadata["llmlab"] = {"role": "sandbox-start"}
    trusted.cells.insert(0, start)
    sources = {nbgrader_meta(c)["grade_id"]: student.get(nbgrader_meta(c)["grade_id"], c.source)
               for c in template.cells if is_solution(c)}
    spec = {"cells": cells, "forbidden": forbidden, "violations": violations, "sources": sources,
            "limits": {k: settings[k] for k in ("memory_mb", "nproc", "fsize_mb", "cpu_s", "output_bytes",
                                                "cell_s", "call_s", "total_s", "threads", "max_restarts")}}
    return spec, trusted


def restore(autograded: NotebookNode, spec: dict, reveal_hidden: bool, hidden: set[str]) -> NotebookNode:
    """Prepare an autograded notebook for feedback: the student's code back in place, hidden tests' tracebacks cut."""
    nb = copy.deepcopy(autograded)
    nb.cells = [c for c in nb.cells if c.metadata.get("llmlab", {}).get("role") != "sandbox-start"]
    for cell in nb.cells:
        gid = nbgrader_meta(cell).get("grade_id")
        if cell.cell_type == "code" and is_solution(cell) and gid in spec["sources"]:
            cell.source = spec["sources"][gid]
        if is_test(cell) and gid in hidden and not reveal_hidden:
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error":
                    out["traceback"] = [f"{out.get('ename')}: {out.get('evalue')}"]
    return nb
