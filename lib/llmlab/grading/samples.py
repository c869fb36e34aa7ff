"""Sample submissions of a lab: the reference solution, the untouched student copy, and fixtures.

A fixture is `tests/fixtures/<lab>/<name>.json`: {"answers": {grade_id: cell source}, "expected":
{test grade_id: points}} applied to the released template (or "raw": text written as the
notebook file), so it stays valid when the lab's text changes. `make course` and the tests grade these and
compare the scores with what each sample deserves.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat

from llmlab import course
from llmlab.course import Task
from llmlab.grading import sanitize


def fixtures(lab: str) -> dict[str, dict]:
    """Return {name: fixture} for every fixture of `lab`."""
    folder = course.root() / "tests" / "fixtures" / course.lab_id(lab)
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def apply(template: nbformat.NotebookNode, answers: dict[str, str]) -> nbformat.NotebookNode:
    """Return a copy of the released notebook with the given solution cells filled in."""
    nb = nbformat.from_dict(json.loads(nbformat.writes(template)))
    for cell in nb.cells:
        gid = sanitize.nbgrader_meta(cell).get("grade_id")
        if sanitize.is_solution(cell) and gid in answers:
            cell.source = answers[gid]
    return nb


def write(lab: str, dest: Path, names: list[str] | None = None) -> dict[str, dict | None]:
    """Write sample submissions to dest/<sample>/<notebook>; return {sample: expected points or None}.

    `solution` and `untouched` are always written; fixtures by name (all when `names` is None).
    """
    lab = course.lab_id(lab)
    expected: dict[str, dict | None] = {"solution": None, "untouched": None}
    for nb_path in course.notebooks(lab, "labs"):
        for sample, src in (("solution", course.root() / "solutions" / lab / nb_path.name), ("untouched", nb_path)):
            (dest / sample).mkdir(parents=True, exist_ok=True)
            (dest / sample / nb_path.name).write_bytes(src.read_bytes())
        template = nbformat.read(nb_path, as_version=4)
        for name, fx in fixtures(lab).items():
            if names is not None and name not in names:
                continue
            (dest / name).mkdir(parents=True, exist_ok=True)
            if "raw" in fx:  # a deliberately broken file, written as is
                (dest / name / nb_path.name).write_text(fx["raw"])
            else:
                nbformat.write(apply(template, fx.get("answers", {})), dest / name / nb_path.name)
            expected[name] = fx.get("expected", {})
    return expected


def mismatches(results: list, expected: dict[str, dict | None]) -> list[str]:
    """Compare graded samples with what they deserve; return one line per disagreement."""
    problems = []
    for r in results:
        if r.student not in expected:
            continue
        if r.error:
            problems.append(f"{r.student}: grading error: {r.error}")
        elif r.student == "solution" and (r.max_score == 0 or r.score != r.max_score):
            problems.append(f"solution: {r.score:g}/{r.max_score:g}, expected full marks (failing: {', '.join(r.failing)})")
        elif r.student == "untouched" and r.score != 0:
            problems.append(f"untouched: {r.score:g}, expected 0")
        elif expected[r.student]:
            wrong = {t: (r.tests.get(t), pts) for t, pts in expected[r.student].items() if r.tests.get(t) != pts}
            if wrong:
                problems.append(f"{r.student}: " + ", ".join(f"{t} got {got} expected {want}" for t, (got, want) in wrong.items()))
    return problems


def grade_tasks(lab: str, dest: Path, after: tuple[str, ...] = (), threads: int = 1) -> list[Task]:
    """Tasks for `course.run_tasks`: write `lab`'s samples under `dest`, grade each in its own task
    (`threads` torch threads), then report; the last task returns (summary table, mismatches)."""
    from llmlab.grading import pipeline

    lab = course.lab_id(lab)
    n = 2 + len(fixtures(lab))  # solution, untouched and the fixtures: one shard each
    expected: dict[str, dict | None] = {}
    graded: list = []

    def write_samples() -> None:
        shutil.rmtree(dest, ignore_errors=True)
        expected.update(write(lab, dest))

    def grade_shard(i: int) -> None:
        for r in pipeline.grade(lab, dest, progress=False, shard=(i, n), threads=threads):
            print(f"{lab}/{r.student}: graded {r.score:g}/{r.max_score:g} in {r.seconds:.0f} s"
                  + (f" ({r.error})" if r.error else ""), flush=True)
            graded.append(r)

    def report() -> tuple[str, list[str]]:
        results = sorted(graded, key=lambda r: r.student)
        pipeline.write_reports(lab, results)
        return pipeline.summary(lab, results), mismatches(results, expected)

    shards = [Task(f"grade {lab} {i + 1}/{n}", lambda i=i: grade_shard(i), (f"samples {lab}",)) for i in range(n)]
    return [Task(f"samples {lab}", write_samples, after), *shards,
            Task(f"report {lab}", report, tuple(t.name for t in shards))]
