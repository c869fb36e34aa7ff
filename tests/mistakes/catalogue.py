"""The mistake catalogue: wrong and right answers to every graded exercise, checked and graded.

An `Answer` replaces functions of one solution cell (found by grade_id) with new definitions.
`suite(lab, answers)` turns a lab's catalogue into its tests:
- the check of the exercise (the first `checks.check_*` call of its test cell, run here on
  the solution notebook's cells with only that function replaced) names each wrong answer
  with its own words, and says ✓ to each right one;
- one `llmlab grade` batch of the answers (two mistakes and one right answer per exercise;
  LLMLAB_MISTAKES=all: every answer): a wrong one costs its exercise's points and nothing
  else, a right one costs nothing, and check and grader agree.
To keep the batch small, answers to independent exercises share a submission (grading is
per test cell, so they cannot disturb each other); an answer never shares one with an
answer to an exercise that calls its functions, or that it calls.
"""
from __future__ import annotations

import ast
import contextlib
import io
import os
import re
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKERS = re.compile(r"^\s*### (BEGIN|END) SOLUTION\s*$\n?", re.M)


@dataclass(frozen=True)
class Answer:
    """A student's answer to one exercise: `code` defines the functions it replaces."""

    exercise: str  # grade_id of the solution cell
    name: str
    code: str  # top-level defs (and imports) replacing the cell's functions of the same names
    words: str | None = None  # what the check must say about this mistake; None: a right answer
    edit: tuple[str, ...] = ()  # instead of code: (old, new, old, new, ...) replacements in the reference cell

    @property
    def id(self) -> str:
        return f"{self.exercise}/{self.name}"


@dataclass
class Cell:
    kind: str  # "params", "plain", "solution", "test"
    gid: str | None
    source: str
    points: int = 0


class Lab:
    """A lab's solution notebook, cut into what the sandbox runs and what the grader tests."""

    def __init__(self, lab: str):
        from llmlab import course

        self.id = course.lab_id(lab)
        path = course.notebooks(self.id, "solutions")[0]
        nb = nbformat.read(path, as_version=4)
        self.cells: list[Cell] = []
        for cell in nb.cells:
            meta, tags = cell.metadata.get("nbgrader", {}), cell.metadata.get("tags", [])
            if cell.cell_type != "code" or "demo" in tags:
                continue
            if "parameters" in tags:
                self.cells.append(Cell("params", None, cell.source + "\nQUICK = True\nDEVICE = 'cpu'"))
            elif meta.get("solution"):
                self.cells.append(Cell("solution", meta["grade_id"], MARKERS.sub("", cell.source)))
            elif meta.get("grade"):
                self.cells.append(Cell("test", meta["grade_id"], cell.source, meta["points"]))
            else:
                self.cells.append(Cell("plain", None, cell.source))
        self.solutions = {c.gid: c.source for c in self.cells if c.kind == "solution"}
        self.points = {c.gid: c.points for c in self.cells if c.kind == "test"}
        self.test_of: dict[str, str] = {}
        pending = None
        for c in self.cells:
            if c.kind == "solution":
                pending = c.gid
            elif c.kind == "test" and pending:
                self.test_of[pending], pending = c.gid, None
        defined = {name: gid for gid, src in self.solutions.items() for name in _defs(src)}
        self.uses = {gid: {defined[n] for n in _names(src) | _names(self._test(gid))
                           if n in defined and defined[n] != gid} for gid, src in self.solutions.items()}

    def _test(self, gid: str) -> str:
        return next(c.source for c in self.cells if c.gid == self.test_of[gid])

    def depends(self, a: str, b: str) -> bool:
        """True when exercise a calls exercise b's functions, directly or through others."""
        seen, todo = set(), [a]
        while todo:
            for used in self.uses[todo.pop()] - seen:
                seen.add(used)
                todo.append(used)
        return b in seen

    def source(self, answer: Answer) -> str:
        """The solution cell of `answer.exercise` with the answer's functions put in place of the reference's."""
        cell = self.solutions[answer.exercise]
        for old, new in zip(answer.edit[::2], answer.edit[1::2]):
            assert cell.count(old) == 1, f"{answer.id}: {old!r} is not once in the cell"
            cell = cell.replace(old, new)
        return replace_defs(cell, textwrap.dedent(answer.code)) if answer.code else cell

    def namespace(self, answers: list[Answer] = ()) -> dict:
        """Run the lab's parameters, setup and solution cells (answers substituted) here; return the globals."""
        replaced = {a.exercise: self.source(a) for a in answers}
        ns: dict = {}
        with contextlib.redirect_stdout(io.StringIO()):
            for c in self.cells:
                if c.kind != "test":
                    exec(compile(replaced.get(c.gid, c.source), f"<{self.id} {c.gid or c.kind}>", "exec"), ns)
        return ns

    def check(self, answer: Answer) -> tuple[bool, str]:
        """Run the exercise's check on the answer as the test cell calls it; return (passed, what it printed or raised)."""
        ns = self.namespace([answer])
        return run_check(self._test(answer.exercise), ns)


def tweak(exercise: str, name: str, *edit: str, words: str | None = None) -> Answer:
    """An answer that is the reference cell with a few replacements (old, new, ...)."""
    return Answer(exercise, name, "", words, tuple(edit))


def run_check(test_source: str, ns: dict) -> tuple[bool, str]:
    """Execute a test cell's statements up to its first `checks.check_*` call in `ns`; (passed, message)."""
    tree = ast.parse(test_source)
    upto = next(i for i, node in enumerate(tree.body) if "checks.check_" in ast.unparse(node))
    code = compile(ast.Module(body=tree.body[: upto + 1], type_ignores=[]), "<check>", "exec")
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(code, ns)
    except AssertionError as e:
        return False, str(e)
    return out.getvalue().startswith("✓"), out.getvalue()


def _defs(source: str) -> list[str]:
    return [n.name for n in ast.parse(source).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]


def _names(source: str) -> set[str]:
    return {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}


def replace_defs(cell: str, code: str) -> str:
    """`cell` with each top-level def that `code` also defines replaced; code's imports go on top."""
    new = ast.parse(code).body
    by_name = {n.name: ast.get_source_segment(code, n) for n in new if isinstance(n, ast.FunctionDef)}
    imports = [ast.get_source_segment(code, n) for n in new if isinstance(n, (ast.Import, ast.ImportFrom))]
    lines = cell.splitlines()
    missing = set(by_name)
    for node in reversed(ast.parse(cell).body):
        if isinstance(node, ast.FunctionDef) and node.name in by_name:
            lines[node.lineno - 1: node.end_lineno] = by_name[node.name].splitlines()
            missing.discard(node.name)
    assert not missing, f"the cell defines no {sorted(missing)}"
    return "\n".join(imports + lines) + "\n"


def pack(lab: Lab, answers: list[Answer]) -> list[list[Answer]]:
    """Group answers into submissions: one per exercise at most, and a wrong answer never with an
    answer to an exercise that calls it."""
    def clash(a: Answer, b: Answer) -> bool:  # a wrong answer would spoil the exercises that call it
        return a.exercise == b.exercise or (a.words is not None and lab.depends(b.exercise, a.exercise)) \
            or (b.words is not None and lab.depends(a.exercise, b.exercise))

    groups: list[list[Answer]] = []
    for answer in answers:
        for group in groups:
            if not any(clash(a, answer) for a in group):
                group.append(answer)
                break
        else:
            groups.append([answer])
    return groups


def grade(lab: Lab, answers: list[Answer], folder: Path) -> tuple[dict[str, tuple[dict, list]], float, int]:
    """Grade every answer in one `llmlab grade` batch (the reference solution wherever a submission
    has no answer); ({answer id: ({test: points}, the other answers in its submission)}, seconds, submissions)."""
    from llmlab import course
    from llmlab.grading import pipeline, samples

    groups = pack(lab, answers)
    template_path = course.notebooks(lab.id, "labs")[0]
    template = nbformat.read(template_path, as_version=4)
    for i, group in enumerate(groups):
        nb = samples.apply(template, {**lab.solutions, **{a.exercise: lab.source(a) for a in group}})
        (folder / f"catalogue-{i:02d}").mkdir(parents=True)
        nbformat.write(nb, folder / f"catalogue-{i:02d}" / template_path.name)
    start = time.perf_counter()
    results = {r.student: r for r in pipeline.grade(lab.id, folder, workers=2, progress=False)}
    seconds = time.perf_counter() - start
    graded = {}
    for i, group in enumerate(groups):
        r = results[f"catalogue-{i:02d}"]
        assert r.error is None, f"catalogue-{i:02d}: {r.error}"
        for a in group:
            graded[a.id] = (dict(r.tests), [b for b in group if b is not a])
    return graded, seconds, len(groups)


def graded_share(answers: list[Answer], wrong: int = 2, right: int = 1) -> list[Answer]:
    """The answers `make test` grades: the first `wrong` mistakes and `right` right answers of each
    exercise, and every in-place mistake (LLMLAB_MISTAKES=all grades every answer); the checks see all of them."""
    if os.environ.get("LLMLAB_MISTAKES") == "all":
        return list(answers)
    taken: dict[tuple[str, bool], int] = {}
    share = []
    for a in answers:
        key = (a.exercise, a.words is None)
        if a.name == "in-place":  # always graded: the grader must see in-place changes as the notebook does
            share.append(a)
        elif taken.get(key, 0) < (right if a.words is None else wrong):
            taken[key] = taken.get(key, 0) + 1
            share.append(a)
    return share


def suite(lab_id: str, answers: list[Answer], blames: list[tuple[str, str, str]] = ()):
    """The tests of one lab's catalogue: (coverage test, check test, blame test, graded fixture, graded test).

    blames: (id of a wrong answer, an exercise that calls it, what that exercise's check must say)."""
    lab = Lab(lab_id)
    ids = [a.id for a in answers]
    assert len(set(ids)) == len(ids), "answer names repeat"
    to_grade = graded_share(answers)

    def test_every_exercise_has_four_mistakes_and_two_right_answers():
        for gid in lab.solutions:
            ours = [a for a in answers if a.exercise == gid]
            wrong = sum(a.words is not None for a in ours)
            assert wrong >= 4 and len(ours) - wrong >= 2, f"{gid}: {wrong} wrong, {len(ours) - wrong} right"

    @pytest.mark.parametrize("answer", answers, ids=ids)
    def test_check_names_the_mistake(answer):
        passed, message = lab.check(answer)
        if answer.words is None:
            assert passed, f"a right answer is refused: {message}"
        else:
            assert not passed, "the check says ✓ to a wrong answer"
            assert answer.words in message, f"expected {answer.words!r} in: {message}"
            assert "### BEGIN SOLUTION" not in message and "def " not in message

    by_id = {a.id: a for a in answers}

    @pytest.mark.parametrize("wrong, composite, words", blames, ids=[f"{b[1]}<-{b[0]}" for b in blames])
    def test_composite_check_names_the_earlier_function(wrong, composite, words):
        passed, message = run_check(lab._test(composite), lab.namespace([by_id[wrong]]))
        assert not passed and words in message, message

    @pytest.fixture(scope="module")
    def graded(tmp_path_factory):
        result, seconds, n = grade(lab, to_grade, tmp_path_factory.mktemp(f"catalogue-{lab.id}"))
        print(f"\n{lab.id}: {len(to_grade)} answers in {n} submissions graded in {seconds:.0f} s")
        return result

    @pytest.mark.grading
    @pytest.mark.parametrize("answer", to_grade, ids=[a.id for a in to_grade])
    def test_grader_prices_it_and_agrees_with_the_check(graded, answer):
        tests, others = graded[answer.id]
        wrong = [a.exercise for a in others + [answer] if a.words]
        answered = {a.exercise for a in others}
        exercise_of = {t: g for g, t in lab.test_of.items()}
        for test, points in lab.points.items():
            ex = exercise_of.get(test)
            if ex == answer.exercise:
                want = 0 if answer.words else points
                assert tests[test] == want, f"{test}: {tests[test]} points, expected {want}"
            elif ex not in answered and not any(lab.depends(ex, w) for w in wrong):
                assert tests[test] == points, f"{test} lost points: {tests[test]} of {points}"
        passed, _ = lab.check(answer)
        own = lab.test_of[answer.exercise]
        assert passed == (tests[own] == lab.points[own]), "the check and the grader disagree"

    return (test_every_exercise_has_four_mistakes_and_two_right_answers, test_check_names_the_mistake,
            test_composite_check_names_the_earlier_function, graded, test_grader_prices_it_and_agrees_with_the_check)
