"""Lab 1 end to end: the solution notebook runs headless, grading resumes after kill -9, runs in parallel."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from llmlab import course
from llmlab.grading import pipeline, samples

pytestmark = pytest.mark.slow
LAB = "01-attention"


@pytest.mark.parametrize("lab", course.labs())
def test_solution_notebook_runs_in_quick_mode(tmp_path, lab):
    for path in course.notebooks(lab):
        result = course.run(path, {"QUICK": True}, out_dir=tmp_path, progress=False)
        course.check_completed(result.notebook)


@pytest.mark.parametrize("lab", [lab for lab in course.labs() if lab != LAB])  # lab 1: in the attack batch
def test_samples_earn_what_they_deserve(tmp_path, lab):
    expected = samples.write(lab, tmp_path / "subs")
    results = pipeline.grade(lab, tmp_path / "subs", workers=2, progress=False)
    assert samples.mismatches(results, expected) == []


@pytest.fixture(scope="module")
def small_batch(tmp_path_factory):
    subs = tmp_path_factory.mktemp("small")
    expected = samples.write(LAB, subs)
    return subs, expected


def _grade(subs, work, *extra) -> subprocess.Popen:
    env = {**os.environ, "LLMLAB_WORK": str(work)}
    return subprocess.Popen([sys.executable, "-m", "llmlab.cli", "grade", LAB, str(subs), "--no-progress", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _results(work) -> dict:
    return {p.stem: json.loads(p.read_text()) for p in (work / "results" / LAB).glob("*.json")}


def test_kill_9_then_resume_gives_the_same_grades_once(small_batch, tmp_path):
    subs, expected = small_batch
    work = tmp_path / "work"
    first = _grade(subs, work)
    deadline = time.time() + 600
    while not _results(work) and time.time() < deadline:
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)  # the whole run, mid-batch
    first.wait()
    done_before = _results(work)
    assert 1 <= len(done_before) < len(expected), "kill should land mid-batch"
    second = _grade(subs, work)
    out, err = second.communicate(timeout=900)
    assert second.returncode == 0, out + err
    after = _results(work)
    assert set(after) == set(expected)
    for name, r in done_before.items():  # finished work is kept, not redone
        assert after[name]["seconds"] == r["seconds"]
    results = [pipeline.Result(**r) for r in after.values()]
    assert samples.mismatches(results, expected) == []
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{work / 'gradebook.db'}") as gb:
        subs_in_db = [s.student.id for s in gb.assignment_submissions(LAB)]
    assert sorted(subs_in_db) == sorted(expected), "each submission appears exactly once in the gradebook"


def test_parallel_workers_grade_at_once_with_the_same_results(small_batch, tmp_path):
    subs, expected = small_batch
    work = tmp_path / "work"
    proc = _grade(subs, work, "--workers", "2")
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, out + err
    after = _results(work)
    results = [pipeline.Result(**r) for r in after.values()]
    assert samples.mismatches(results, expected) == []
    spans = sorted((r["started"], r["started"] + r["seconds"]) for r in after.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "with 2 workers, submissions overlap in time"


def test_a_gradebook_locked_by_another_writer_is_waited_out(tmp_path):
    """Another process holds the SQLite gradebook's write lock past SQLite's 5 s wait while a submission is
    autograded: that try fails with "database is locked" (kept in its log), and the next one grades it."""
    import sqlite3
    import threading

    subs, work = tmp_path / "subs", tmp_path / "work"
    expected = samples.write(LAB, subs, names=[])  # the solution and the untouched copy
    first = _grade(subs, work)  # the course's gradebook and release exist once the first result is written
    assert first.wait(timeout=900) == 0, first.stderr.read()
    private = work / "grading" / LAB / "solution"
    for name in expected:
        (work / "results" / LAB / f"{name}.json").unlink()
    shutil.rmtree(private)
    locked = threading.Event()

    def hold_the_lock() -> None:  # from the moment grading reaches the first submission's autograde
        deadline = time.time() + 600
        while not any(private.glob("*.sandbox.json")) and time.time() < deadline:
            time.sleep(0.05)
        db = sqlite3.connect(work / "gradebook.db", timeout=60, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(8)
        db.execute("ROLLBACK")
        db.close()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    second = _grade(subs, work)
    out, err = second.communicate(timeout=900)
    holder.join()
    assert locked.is_set() and second.returncode == 0, out + err
    results = [pipeline.Result(**r) for r in _results(work).values()]
    assert samples.mismatches(results, expected) == [] and all(r.error is None for r in results)
    assert pipeline.LOCKED in (private / "autograde.log").read_text(), "the locked try's log is kept"
