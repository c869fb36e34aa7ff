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
import json
import secrets
import tomllib
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from llmlab.grading import subset
from llmlab.grading.hidden import unmark
from llmlab.i18n import _



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


def answers(raw: bytes, template: NotebookNode) -> tuple[dict[str, str], list[str]]:
    """Return ({grade_id: source} of the student's solution cells, notes about what was ignored)."""
    wanted = {nbgrader_meta(c)["grade_id"]: c.cell_type for c in template.cells if is_solution(c)}
    notes: list[str] = []
    try:
        data = json.loads(raw.decode("utf-8"))
        cells = data["cells"] if isinstance(data, dict) and isinstance(data.get("cells"), list) else []
    except ValueError as e:
        return {}, [f"the submission is not a readable notebook ({type(e).__name__}); graded as empty"]
    found: dict[str, str] = {}
    for cell in cells:
        if not isinstance(cell, dict):
            continue
        meta = cell.get("metadata", {}).get("nbgrader", {}) if isinstance(cell.get("metadata"), dict) else {}
        gid = meta.get("grade_id") if isinstance(meta, dict) else None
        if gid in wanted and gid not in found and cell.get("cell_type") == wanted[gid]:
            source = cell.get("source", "")
            found[gid] = "".join(map(str, source)) if isinstance(source, list) else str(source)
    missing = sorted(set(wanted) - set(found))
    if missing:
        notes.append(f"answer cells not found (deleted or retagged?), graded as empty: {', '.join(missing)}")
    return found, notes


SAFE_TAGS = ["a", "abbr", "b", "blockquote", "br", "code", "del", "div", "em", "h1", "h2", "h3", "h4", "h5",
             "h6", "hr", "i", "img", "li", "ol", "p", "pre", "span", "strong", "sub", "sup", "table", "tbody",
             "td", "th", "thead", "tr", "ul"]


def clean_answer(markdown: str) -> str:
    """A written answer as inert HTML: rendered from markdown, then cleaned (no scripts, handlers or js: links)."""
    import bleach
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    return bleach.clean(markdown2html_mistune(markdown), tags=SAFE_TAGS,
                        attributes={"a": ["href", "title"], "img": ["src", "alt", "title"]},
                        protocols=["http", "https", "mailto"], strip_comments=True)


def clean_outputs(nb: NotebookNode) -> NotebookNode:
    """Drop script outputs and clean HTML outputs of every code cell (nbconvert's sanitizer)."""
    from nbconvert.preprocessors.sanitize import SanitizeHTML

    sanitizer = SanitizeHTML(tags=SAFE_TAGS)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = sanitizer.sanitize_code_outputs(cell.get("outputs", []))
    return nb


def exports(template_source: str) -> list[str]:
    """Return the top-level function names a template solution cell defines (what tests may call)."""
    try:
        tree = ast.parse(template_source)
    except SyntaxError:
        return []
    return [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def build(template: NotebookNode, student: dict[str, str], settings: dict, spec_path: Path,
          parameters: dict, libview: str | None = None) -> tuple[dict, NotebookNode]:
    """Return (sandbox spec, trusted notebook) for one submission of one notebook."""
    forbidden = template.metadata.get("llmlab", {}).get("forbidden", [])
    injected = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cells, violations = [], {}
    trusted = copy.deepcopy(template)
    for index, cell in enumerate(trusted.cells):
        meta = nbgrader_meta(cell)
        label = _("cell {n}").format(n=index + 1)
        if cell.cell_type == "markdown":
            answer = student.get(meta.get("grade_id"), cell.source) if is_solution(cell) else cell.source
            if is_solution(cell) and answer != cell.source:  # unchanged stubs stay as they are (nbgrader scores them 0)
                cell.source = clean_answer(answer)
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
            if v := subset.refusal(source, forbidden):  # refused code never runs
                violations[gid] = f"{label} ({gid}) {v}"
                source = "pass  # refused by the checked subset; see the feedback"
            cells.append({"id": gid, "label": label, "source": source, "exports": names})
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
            "libview": libview, "secret": secrets.token_hex(16),
            "limits": {k: settings[k] for k in ("memory_mb", "nproc", "fsize_mb", "tmp_mb", "cpu_s", "output_bytes", "reply_mb",
                                                "cell_s", "call_s", "total_s", "threads", "max_restarts")}}
    return spec, trusted


def restore(autograded: NotebookNode, spec: dict, reveal_hidden: bool, hidden: set[str]) -> NotebookNode:
    """Prepare an autograded notebook for feedback and the formgrader.

    The student's code goes back in place, the grader's marker lines come out of the tests, every
    output is cleaned of scripts, and hidden tests show only their error line.
    """
    nb = copy.deepcopy(autograded)
    nb.cells = [c for c in nb.cells if c.metadata.get("llmlab", {}).get("role") != "sandbox-start"]
    for cell in nb.cells:
        gid = nbgrader_meta(cell).get("grade_id")
        if cell.cell_type == "code" and is_solution(cell) and gid in spec["sources"]:
            cell.source = spec["sources"][gid]
        if is_test(cell):
            cell.source = unmark(cell.source)
            if gid in hidden and not reveal_hidden:
                for out in cell.get("outputs", []):
                    if out.get("output_type") == "error":
                        out["traceback"] = [f"{out.get('ename')}: {out.get('evalue')}"]
    return clean_outputs(nb)
