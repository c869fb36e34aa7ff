"""A lab with two notebooks (a main part and a bonus) releases, runs and grades as one lab."""
from __future__ import annotations

import json
import shutil

import nbformat
import pytest
from conftest import ROOT, llmlab

from llmlab import course
from llmlab.grading import pipeline, samples

pytestmark = pytest.mark.slow
LAB = "01-twopart"


def _meta(gid: str, *, solution: bool = False, grade: bool = False, points: int = 0) -> dict:
    meta = {"grade": grade, "grade_id": gid, "locked": not solution, "schema_version": 3,
            "solution": solution, "task": False}
    if grade:
        meta["points"] = points
    return {"nbgrader": meta}


def _notebook(name: str, fn: str, body: str, points: int, manual: bool = False) -> nbformat.NotebookNode:
    cells = [
        nbformat.v4.new_markdown_cell(f"# {name}"),
        nbformat.v4.new_code_cell("QUICK = True\nDEVICE = 'cpu'\nSEED = 0", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(f"def {fn}(x):\n    ### BEGIN SOLUTION\n    {body}\n    ### END SOLUTION",
                                  metadata=_meta(fn, solution=True)),
        nbformat.v4.new_code_cell(f"assert {fn}(3) == {eval(body.replace('return ', ''), {'x': 3})}\n"
                                  f"### BEGIN HIDDEN TESTS\nassert {fn}(-2) == {eval(body.replace('return ', ''), {'x': -2})}\n"
                                  "### END HIDDEN TESTS", metadata=_meta(f"test-{fn}", grade=True, points=points)),
    ]
    if manual:
        cells.append(nbformat.v4.new_markdown_cell("Why?\n\n=== BEGIN MARK SCHEME ===\nany\n=== END MARK SCHEME ===",
                                                   metadata=_meta("why", solution=True, grade=True, points=1)))
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


@pytest.fixture()
def two_notebook_course(tmp_path, monkeypatch):
    """A throwaway course: this course's grading setup, one lab with a main and a bonus notebook."""
    root = tmp_path / "course"
    shutil.copytree(ROOT / "grading", root / "grading", ignore=shutil.ignore_patterns("k8s"))
    (root / "solutions" / LAB).mkdir(parents=True)
    nbformat.write(_notebook("Part 1", "double", "return 2 * x", 1), root / "solutions" / LAB / "1-main.ipynb")
    nbformat.write(_notebook("Part 2 (bonus)", "square", "return x * x", 2, manual=True),
                   root / "solutions" / LAB / "2-bonus.ipynb")
    (root / "tests" / "fixtures" / LAB).mkdir(parents=True)
    (root / "tests" / "fixtures" / LAB / "bonus-only.json").write_text(json.dumps(
        {"answers": {"square": "def square(x):\n    return x ** 2"}, "expected": {"test-double": 0, "test-square": 2}}))
    monkeypatch.setenv("LLMLAB_ROOT", str(root))
    monkeypatch.setenv("LLMLAB_WORK", str(tmp_path / "work"))
    course.release(LAB)
    return root


def test_a_two_notebook_lab_runs_and_grades_as_one(two_notebook_course, tmp_path):
    root = two_notebook_course
    assert [p.name for p in course.notebooks(LAB, "labs")] == ["1-main.ipynb", "2-bonus.ipynb"]
    for path in course.notebooks(LAB):
        course.check_completed(course.run(path, {"QUICK": True}, out_dir=tmp_path / "runs", progress=False).notebook)
    expected = samples.write(LAB, tmp_path / "subs")
    assert sorted(p.name for p in (tmp_path / "subs" / "solution").iterdir()) == ["1-main.ipynb", "2-bonus.ipynb"]
    results = pipeline.grade(LAB, tmp_path / "subs", workers=2, progress=False)
    assert samples.mismatches(results, expected) == []
    by_name = {r.student: r for r in results}
    assert by_name["solution"].score == by_name["solution"].max_score == 3
    assert by_name["solution"].manual_pending == ["why"]
    assert by_name["bonus-only"].tests == {"test-double": 0.0, "test-square": 2.0}
    page = (tmp_path / "work" / "feedback" / "solution" / LAB / "2-bonus.html").read_text()
    assert "pending: graded by hand" in page and "Score: 0.0 / 1.0" not in page
    assert (root / "labs" / LAB / "2-bonus.ipynb").is_file()


def test_llmlab_course_grades_each_sample_in_its_own_task_then_reports_the_lab(two_notebook_course, tmp_path):
    tasks = samples.grade_tasks(LAB, tmp_path / "subs", threads=1)
    assert [t.name for t in tasks] == [f"samples {LAB}", *(f"grade {LAB} {i}/3" for i in (1, 2, 3)), f"report {LAB}"]
    table, problems = course.run_tasks(tasks, jobs=2)[f"report {LAB}"]
    assert problems == []
    assert all(name in table for name in ("solution", "untouched", "bonus-only"))
    assert (tmp_path / "work" / "reports" / f"{LAB}-grades.csv").read_text().count("\n") == 4  # a header, 3 samples


def test_llmlab_course_runs_and_grades_a_two_notebook_lab_and_prints_its_table(two_notebook_course):
    proc = llmlab("course", cwd=two_notebook_course)  # LLMLAB_ROOT and LLMLAB_WORK point at the throwaway course
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in (f"{LAB}/1-main.ipynb: ok in", f"{LAB}/2-bonus.ipynb: ok in",
                 f"{LAB}/solution: graded 3/3", f"{LAB}/bonus-only: graded 2/3", "course done in"):
        assert line in proc.stdout, line
