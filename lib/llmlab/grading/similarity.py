"""A similarity report per lab, as instructors of real courses run MOSS or JPlag: a report, never a grade.

Only the exercise cells count, minus every line the released template already gives (the
signature and docstring everybody starts from, as MOSS's base file). Each submission's code
becomes a set of token shingles: Python tokens with names, numbers and strings normalised, so
renaming variables changes nothing. MinHash signatures of those sets (lab 2's near-duplicate
method) estimate the Jaccard similarity of every pair of submissions, and of each submission
against the reference code: the solution notebook and the library functions the lab forbids.
The CSV lists every pair; the HTML page shows the top pairs with the lines they share.
"""
from __future__ import annotations

import csv
import html
import inspect
import io
import json
import keyword
import tokenize
from pathlib import Path

import nbformat

from llmlab import course
from llmlab.grading import sanitize

SHINGLE = 8  # tokens per shingle
NUM_PERM = 128
TOP = 20  # pairs shown on the HTML page
REFERENCE = ("[reference] solution", "[reference] llmlab")


def normalised_tokens(code: str) -> list[str]:
    """Python tokens of `code` with identifiers, numbers and strings replaced by placeholders."""
    out: list[str] = []
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type in skip:
                continue
            if tok.type == tokenize.NAME:
                out.append(tok.string if keyword.iskeyword(tok.string) else "N")
            elif tok.type == tokenize.NUMBER:
                out.append("0")
            elif tok.type == tokenize.STRING:
                out.append("S")
            else:
                out.append(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        out = code.split()
    return out


def shingle_set(code: str, k: int = SHINGLE) -> set[str]:
    """The set of k-token shingles of `code` (empty when it is shorter than k tokens)."""
    toks = normalised_tokens(code)
    return {" ".join(toks[i:i + k]) for i in range(len(toks) - k + 1)}


def _lines(code: str) -> set[str]:
    return {" ".join(line.split()) for line in code.splitlines() if len(line.strip()) >= 8}


def _without(code: str, base: set[str]) -> str:
    """`code` minus the lines the template already holds."""
    return "\n".join(line for line in code.splitlines() if " ".join(line.split()) not in base)


def exercise_code(lab: str) -> dict[str, str]:
    """{student: their exercise cells, template lines removed} from the specs of the last grading run."""
    base_lines: set[str] = set()
    stubs: dict[str, str] = {}
    for nb_path in course.notebooks(lab, "labs"):
        for cell in nbformat.read(nb_path, as_version=4).cells:
            if cell.cell_type == "code" and sanitize.is_solution(cell):
                stubs[sanitize.nbgrader_meta(cell)["grade_id"]] = cell.source
                base_lines |= _lines(cell.source)
    code: dict[str, str] = {}
    for student_dir in sorted((course.work_dir() / "grading" / lab).glob("*/")):
        parts = []
        for spec_path in sorted(student_dir.glob("*.sandbox.json")):
            spec = json.loads(spec_path.read_text())
            parts += [src for gid, src in spec.get("sources", {}).items() if gid in stubs and src != stubs[gid]]
        code[student_dir.name] = _without("\n\n".join(parts), base_lines)
    solution = []
    for nb_path in course.notebooks(lab, "solutions"):
        solution += [c.source for c in nbformat.read(nb_path, as_version=4).cells
                     if c.cell_type == "code" and sanitize.is_solution(c)]
    code[REFERENCE[0]] = _without("\n\n".join(solution), base_lines)
    code[REFERENCE[1]] = _library_reference(lab)
    return code


def _library_reference(lab: str) -> str:
    """Source of the library code the lab forbids (its reference implementations)."""
    from llmlab.grading import libview

    forbidden = []
    for nb_path in course.notebooks(lab, "labs"):
        forbidden += nbformat.read(nb_path, as_version=4).metadata.get("llmlab", {}).get("forbidden", [])
    parts = []
    for path, names in libview.targets(forbidden, None).items():
        text = path.read_text(encoding="utf-8")
        if libview.ALL in names:
            parts.append(text)
            continue
        for name in names:
            try:
                parts.append(inspect.getsource(libview.resolve(f"{_module_name(path)}.{name}")))
            except (TypeError, OSError):
                pass
    return "\n\n".join(parts)


def _module_name(path: Path) -> str:
    import llmlab

    rel = path.resolve().relative_to(Path(llmlab.__file__).resolve().parent.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


def pairs(code: dict[str, str]) -> list[tuple[str, str, float, list[str]]]:
    """Every pair (a, b, estimated Jaccard, shared lines), most similar first; reference pairs included."""
    from datasketch import MinHash

    sets = {name: shingle_set(text) for name, text in code.items()}
    hashes = {}
    for name, s in sets.items():
        m = MinHash(num_perm=NUM_PERM, seed=1)
        m.update_batch([x.encode() for x in s])
        hashes[name] = m
    names = sorted(code)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if a in REFERENCE and b in REFERENCE:
                continue
            score = hashes[a].jaccard(hashes[b]) if sets[a] and sets[b] else 0.0
            shared = sorted(_lines(code[a]) & _lines(code[b]))
            out.append((a, b, float(score), shared))
    return sorted(out, key=lambda p: (-p[2], p[0], p[1]))


def write(lab: str, out_dir: Path) -> tuple[Path, Path]:
    """Write `<lab>-similarity.csv` and `.html` under `out_dir`; return both paths."""
    lab = course.lab_id(lab)
    found = pairs(exercise_code(lab))
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["a", "b", "similarity", "shared_lines"])
    for a, b, score, shared in found:
        writer.writerow([a, b, f"{score:.3f}", len(shared)])
    csv_path = out_dir / f"{lab}-similarity.csv"
    csv_path.write_text(buf.getvalue(), encoding="utf-8")
    rows = []
    for a, b, score, shared in found[:TOP]:
        lines = "\n".join(html.escape(line) for line in shared[:15]) or "(no whole line in common)"
        rows.append(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{score:.2f}</td>"
                    f"<td><pre>{lines}</pre></td></tr>")
    page = (f"<!doctype html><meta charset='utf-8'><title>{html.escape(lab)}: similarity</title>"
            "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px;vertical-align:top}"
            "pre{margin:0;font-size:12px}</style>"
            f"<h1>{html.escape(lab)}: similarity of exercise cells</h1>"
            f"<p>MinHash estimate of the Jaccard similarity of {SHINGLE}-token shingles (names, numbers and "
            "strings normalised; lines of the released template left out). A report for a person to read: "
            "it changes no grade. High scores against the reference mean code close to the solution.</p>"
            "<table><tr><th>a</th><th>b</th><th>similarity</th><th>shared lines</th></tr>"
            + "".join(rows) + "</table>")
    html_path = out_dir / f"{lab}-similarity.html"
    html_path.write_text(page, encoding="utf-8")
    return csv_path, html_path
