"""Course layout, release sync, committed notebooks and `llmlab run` failure detection."""
from __future__ import annotations

import json
import subprocess

import nbformat
import pytest
from conftest import ROOT, llmlab, make_course

from llmlab import course


def _tracked_notebooks() -> list:
    out = subprocess.run(["git", "ls-files", "*.ipynb"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / p for p in out] or sorted(ROOT.glob("solutions/**/*.ipynb")) + sorted(ROOT.glob("labs/**/*.ipynb"))


def test_every_lab_has_a_student_copy():
    assert course.labs(), "no labs under solutions/"
    for lab in course.labs():
        assert course.notebooks(lab, "labs"), f"{lab} has no released copy in labs/"


def test_committed_notebooks_carry_no_outputs():
    notebooks = _tracked_notebooks()
    assert notebooks
    for path in notebooks:
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path}: cell {i} has outputs"


def test_labs_are_in_sync_with_solutions():
    assert course.release_drift() == [], "labs/ differs from a fresh release of solutions/: run `llmlab release`"


def test_every_notebook_has_one_parameters_cell():
    for lab in course.labs():
        for path in course.notebooks(lab):
            nb = nbformat.read(path, as_version=4)
            params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
            assert len(params) == 1, f"{path}: expected one cell tagged 'parameters'"
            for name in ("QUICK", "DEVICE", "SEED"):
                assert f"{name} =" in params[0].source, f"{path}: parameters cell lacks {name}"


def test_parse_value_reads_python_literals():
    assert course.parse_value("True") is True
    assert course.parse_value("3") == 3
    assert course.parse_value("0.5") == 0.5
    assert course.parse_value("'cpu'") == "cpu"
    assert course.parse_value("cpu") == "cpu"


def test_unknown_lab_is_a_clear_error():
    with pytest.raises(course.CourseError, match="unknown lab"):
        course.lab_id("99-nope")
    proc = llmlab("run", "99-nope")
    assert proc.returncode == 3 and "unknown lab" in proc.stderr


@pytest.fixture
def bad_course(tmp_path):
    code = nbformat.v4.new_code_cell
    make_course(tmp_path, "01-raises", [code("QUICK = False", metadata={"tags": ["parameters"]}),
                                        code("x = 1"), code("raise ValueError('boom')"), code("y = 2")])
    make_course(tmp_path, "02-exits", [code("QUICK = False", metadata={"tags": ["parameters"]}),
                                       code("import sys\nsys.exit(0)"), code("print('never')")])
    make_course(tmp_path, "03-fine", [code("QUICK = False", metadata={"tags": ["parameters"]}),
                                      code("assert QUICK is True\nprint('ok')")])
    return tmp_path


def test_run_fails_and_names_the_cell_when_a_notebook_raises(bad_course):
    proc = llmlab("run", "01", "--quick", "--no-progress", env={"LLMLAB_ROOT": str(bad_course)})
    assert proc.returncode == 1, proc.stderr
    assert "ValueError: boom" in proc.stderr and "cell" in proc.stderr


def test_run_fails_when_a_notebook_stops_early(bad_course):
    proc = llmlab("run", "02-exits", "--quick", "--no-progress", env={"LLMLAB_ROOT": str(bad_course)})
    assert proc.returncode == 1, proc.stderr
    assert "cell 1" in proc.stderr or "cell 2" in proc.stderr, proc.stderr


def test_run_passes_parameters_and_succeeds(bad_course):
    proc = llmlab("run", "fine", "--quick", "--no-progress", env={"LLMLAB_ROOT": str(bad_course)})
    assert proc.returncode == 0, proc.stderr
    assert "ok in" in proc.stdout


def test_every_command_has_help():
    for cmd in ([], ["doctor"], ["assets"], ["release"], ["run"], ["grade"], ["course"]):
        proc = llmlab(*cmd, "--help")
        assert proc.returncode == 0 and "usage: llmlab" in proc.stdout, cmd


@pytest.fixture
def timed_course(tmp_path, monkeypatch):
    """Two labs that log when they start and end (and the thread count their kernel got), and a third."""
    code = nbformat.v4.new_code_cell
    log = tmp_path / "log"
    for lab in ("01-first", "02-second", "03-third"):
        make_course(tmp_path, lab, [code("QUICK = False", metadata={"tags": ["parameters"]}),
                                    code(f"import os, time\nopen({str(log)!r}, 'a').write(f'{lab} start {{time.time()}} "
                                         f"{{os.environ.get(\"OMP_NUM_THREADS\")}}\\n')\ntime.sleep(2)\n"
                                         f"open({str(log)!r}, 'a').write(f'{lab} end {{time.time()}} -\\n')")])
    monkeypatch.setenv("LLMLAB_ROOT", str(tmp_path))
    monkeypatch.setenv("LLMLAB_WORK", str(tmp_path / "work"))
    return log


def _log(log) -> dict:
    return {(lab, what): (float(t), threads) for lab, what, t, threads in (line.split() for line in log.read_text().splitlines())}


def _lab_tasks(waits: dict | None = None) -> list:
    waits = waits or {}
    return [course.run_task(lab, path, waits.get(lab, ())) for lab in course.labs() for path in course.notebooks(lab)]


def test_run_tasks_runs_two_kernels_at_once_with_one_thread_each(timed_course, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what `llmlab course` sets for two jobs
    seconds = course.run_tasks(_lab_tasks(), jobs=2)
    assert sorted(seconds) == ["run 01-first/first.ipynb", "run 02-second/second.ipynb", "run 03-third/third.ipynb"]
    got = _log(timed_course)
    assert {got[(lab, "start")][1] for lab in ("01-first", "02-second", "03-third")} == {"1"}
    assert got[("02-second", "start")][0] < got[("01-first", "end")][0]  # the second began before the first ended


def test_run_tasks_a_lab_waits_for_the_asset_it_needs_and_a_failed_build_stops_it(timed_course):
    tasks = [course.cli_task("build no-such-asset", ["build", "no-such-asset"]),
             *_lab_tasks({"01-first": ("build no-such-asset",)})]
    with pytest.raises(course.CourseError, match="llmlab build no-such-asset failed: .*unknown asset"):
        course.run_tasks(tasks, jobs=2)
    started = {lab for lab, what in _log(timed_course) if what == "start"} if timed_course.exists() else set()
    assert "01-first" not in started and "02-second" in started  # 01 waited for the build, which failed


def test_run_tasks_starts_the_first_ready_task_and_never_idles_a_slot_while_one_is_ready():
    import threading
    import time

    log, gate = [], threading.Event()

    def step(name, seconds=0.0, wait=None):
        def go():
            log.append((name, "start"))
            if wait:
                assert wait.wait(10)
            time.sleep(seconds)
            log.append((name, "end"))
            return name
        return go

    tasks = [course.Task("long", step("long", wait=gate)),
             course.Task("after-long", step("after-long"), ("long",)),  # listed early, not ready until "long" ends
             course.Task("a", step("a", 0.05)), course.Task("b", step("b", 0.05)),
             course.Task("open-gate", gate.set, ("a", "b"))]
    done = course.run_tasks(tasks, jobs=2)
    assert done["long"] == "long" and set(done) == {t.name for t in tasks}
    starts = [name for name, what in log if what == "start"]
    assert starts == ["long", "a", "b", "after-long"]  # the second slot went on past the task that was not ready
    assert log.index(("after-long", "start")) > log.index(("long", "end"))


def test_run_tasks_refuses_unknown_or_circular_dependencies_and_repeated_names():
    def noop():
        return None

    with pytest.raises(ValueError, match="missing or circular"):
        course.run_tasks([course.Task("a", noop, ("nope",))])
    with pytest.raises(ValueError, match="missing or circular"):
        course.run_tasks([course.Task("a", noop, ("b",)), course.Task("b", noop, ("a",))])
    with pytest.raises(ValueError, match="repeat"):
        course.run_tasks([course.Task("a", noop), course.Task("a", noop)])


def test_run_tasks_raises_the_first_failure_and_starts_nothing_after_it():
    ran = []

    def boom():
        raise RuntimeError("boom")

    tasks = [course.Task("boom", boom), course.Task("later", lambda: ran.append(1), ("boom",))]
    with pytest.raises(RuntimeError, match="boom"):
        course.run_tasks(tasks, jobs=2)
    assert ran == []

