"""`llmlab grade`: sanitize, sandbox and autograde a folder of submissions with nbgrader.

One submission at a time is one child process (`python -m llmlab.grading.pipeline`), so a
submission that breaks anything breaks only itself; `--workers N` runs N of them at once.
For each submission: rebuild it from the template (`sanitize`), autograde the trusted
notebook with nbgrader (student code runs only in the sandbox it starts), put the student's
code back for feedback, generate feedback, and write one result file atomically. A result
file whose key matches the submission is not graded again, so a killed run resumes where it
stopped and counts nothing twice. At the end: a grades CSV, nbgrader's gradebook export, and
a one-screen summary.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
from tqdm.auto import tqdm

from llmlab import course
from llmlab.grading import sanitize

STUDENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class Result:
    """The outcome of grading one submission."""

    student: str
    score: float = 0.0  # autograded points earned
    max_score: float = 0.0  # autograded points available (written answers are graded by hand)
    failing: list[str] = field(default_factory=list)  # test cells that lost points
    tests: dict[str, float] = field(default_factory=dict)  # autograded cell -> points earned
    manual_pending: list[str] = field(default_factory=list)  # written answers waiting for the instructor
    notes: list[str] = field(default_factory=list)  # what the student should know (limits hit, ignored cells)
    error: str | None = None  # grading itself could not finish
    started: float = 0.0  # wall-clock time grading began (time.time())
    seconds: float = 0.0
    key: str = ""


def discover(lab: str, submissions: Path) -> dict[str, dict[str, Path]]:
    """Find submissions as SUBMISSIONS/<student>/[<lab>/]<notebook>.ipynb; return {student: {notebook: path}}."""
    submissions = Path(submissions)
    if not submissions.is_dir():
        raise course.CourseError(f"no submissions folder at {submissions}")
    names = [p.name for p in course.notebooks(lab, "labs")]
    found: dict[str, dict[str, Path]] = {}
    for folder in sorted(p for p in submissions.iterdir() if p.is_dir()):
        if not STUDENT_ID.match(folder.name):
            raise course.CourseError(f"{folder.name!r} is not a usable student id (letters, digits, _ . -)")
        base = folder / lab if (folder / lab).is_dir() else folder
        found[folder.name] = {n: base / n for n in names}
    return found


def _key(files: dict[str, Path], lab: str) -> str:
    h = hashlib.sha256()
    for name, path in sorted(files.items()):
        h.update(name.encode())
        h.update(path.read_bytes() if path.is_file() else b"<missing>")
    for nb in course.notebooks(lab, "labs") + course.notebooks(lab, "solutions"):
        h.update(nb.read_bytes())
    h.update((course.root() / "grading" / "policy.toml").read_bytes())
    return h.hexdigest()


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def results_dir(lab: str) -> Path:
    """Where the per-submission result files of `lab` live."""
    return course.work_dir() / "results" / lab


def _gradebook():
    """Open the course gradebook (SQLite by default, any SQLAlchemy URL via LLMLAB_GRADEBOOK)."""
    from nbgrader.api import Gradebook

    cd = course.nbgrader_config().CourseDirectory
    return Gradebook(cd.db_url, cd.course_id)


def grade_one(lab: str, student: str, files: dict[str, Path], workers: int = 1) -> Result:
    """Grade one student's submission of `lab` (runs in its own process; see `grade`)."""
    start = time.perf_counter()
    root, work = course.root(), course.work_dir()
    result = Result(student, key=_key(files, lab), started=time.time())
    api = course.nbgrader_api()
    submitted = work / "submitted" / student / lab
    private = work / "grading" / lab / student
    submitted.mkdir(parents=True, exist_ok=True)
    private.mkdir(parents=True, exist_ok=True)
    specs: dict[str, dict] = {}
    hidden: set[str] = set()
    settings: dict = {}
    for template_path in course.notebooks(lab, "labs"):
        name = template_path.name
        template = nbformat.read(template_path, as_version=4)
        source_nb = nbformat.read(root / "solutions" / lab / name, as_version=4)
        hidden |= {sanitize.nbgrader_meta(c)["grade_id"] for c in source_nb.cells
                   if sanitize.is_test(c) and "BEGIN HIDDEN TESTS" in c.source}
        settings = sanitize.policy(root, source_nb)
        if not settings["threads"]:
            settings["threads"] = max(1, (os.cpu_count() or 1) // max(1, workers))
        path = files.get(name)
        student_answers, notes = sanitize.answers(path, template) if path and path.is_file() else (
            {}, [f"{name} was not submitted; graded as empty"])
        result.notes += notes
        parameters = {"QUICK": True, "DEVICE": settings["device"], "SEED": settings["seed"]}
        spec_path = private / f"{Path(name).stem}.sandbox.json"
        spec, trusted = sanitize.build(template, student_answers, settings, spec_path, parameters)
        _write_atomic(spec_path, json.dumps(spec))
        nbformat.write(trusted, submitted / name)
        specs[name] = spec
    outcome = api.autograde(lab, student, force=True, create=True)
    if not outcome["success"]:
        result.error = "autograde failed: " + _last_line(outcome.get("error") or outcome.get("log") or "")
        result.seconds = time.perf_counter() - start
        return result
    autograded = work / "autograded" / student / lab
    for name, spec in specs.items():
        nb = nbformat.read(autograded / name, as_version=4)
        result.notes += _sandbox_notes(nb)
        fixed = sanitize.restore(nb, spec, settings["reveal_hidden_tests"], hidden)
        _write_atomic(autograded / name, nbformat.writes(fixed))
    feedback_api = course.nbgrader_api(reveal_hidden_tests=settings["reveal_hidden_tests"])
    outcome = feedback_api.generate_feedback(lab, student, force=True)
    if not outcome["success"]:
        result.notes.append("feedback could not be generated: " + _last_line(outcome.get("error") or ""))
    _read_grades(lab, student, result)
    result.seconds = time.perf_counter() - start
    return result


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def _sandbox_notes(nb) -> list[str]:
    """Collect the limit/crash lines the sandbox stand-ins printed (e.g. 'cell 7: out of memory')."""
    notes = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                notes += [line for line in out.get("text", "").splitlines() if re.match(r"^(cell \d+|sandbox): ", line)]
            if out.get("output_type") == "error" and out.get("ename") in ("SandboxError",):
                notes.append(out.get("evalue", ""))
    return notes


def _read_grades(lab: str, student: str, result: Result) -> None:

    with _gradebook() as gb:
        submission = gb.find_submission(lab, student)
        for notebook in submission.notebooks:
            for grade in notebook.grades:
                if grade.cell.cell_type == "markdown":  # written answers: the instructor grades these
                    if grade.needs_manual_grade:
                        result.manual_pending.append(grade.name)
                    continue
                result.tests[grade.name] = float(grade.score)
                result.score += float(grade.score)
                result.max_score += float(grade.max_score)
                if grade.score < grade.max_score:
                    result.failing.append(grade.name)


def grade(lab: str, submissions: Path, workers: int = 1, force: bool = False, progress: bool = True,
          shard: tuple[int, int] = (0, 1)) -> list[Result]:
    """Grade every submission of `lab` under `submissions` (or shard i of n); resume unless `force`."""
    lab = course.lab_id(lab)
    found = discover(lab, submissions)
    if not found:
        raise course.CourseError(f"no submissions in {submissions} (expected SUBMISSIONS/<student>/<notebook>.ipynb)")
    index, count = shard
    found = {s: f for i, (s, f) in enumerate(sorted(found.items())) if i % count == index}
    _ensure_gradebook(lab)
    out = results_dir(lab)
    todo, results = [], {}
    for student, files in found.items():
        done = out / f"{student}.json"
        if done.is_file() and not force:
            old = Result(**json.loads(done.read_text()))
            if old.key == _key(files, lab) and old.error is None:
                results[student] = old
                continue
        todo.append(student)
    limit = sanitize.policy(course.root(), nbformat.read(course.notebooks(lab)[0], as_version=4))["submission_timeout_s"]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = {pool.submit(_grade_in_child, lab, s, Path(submissions), workers, limit): s for s in todo}
        bar = tqdm(as_completed(jobs), total=len(jobs), desc=f"grading {lab}", unit="submission", disable=not progress)
        for job in bar:
            results[jobs[job]] = job.result()
    return [results[s] for s in found]


def _ensure_gradebook(lab: str) -> None:
    """Make sure the gradebook knows the lab's cells (hidden tests included): release it to a scratch folder if not."""
    from nbgrader.api import MissingEntry

    work = course.work_dir()
    work.mkdir(parents=True, exist_ok=True)
    try:
        with _gradebook() as gb:
            gb.find_assignment(lab)
        return
    except MissingEntry:
        pass
    course.release(lab, into=work / "release")


def _grade_in_child(lab: str, student: str, submissions: Path, workers: int, limit: int) -> Result:
    """Run `grade_one` in a fresh process with a hard deadline; its result file is the only output trusted."""
    done = results_dir(lab) / f"{student}.json"
    cmd = [sys.executable, "-m", "llmlab.grading.pipeline", lab, student, str(submissions), str(workers)]
    env = {**os.environ, "LLMLAB_ROOT": str(course.root()), "LLMLAB_WORK": str(course.work_dir())}
    for attempt in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
        try:
            log, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            files = discover(lab, submissions)[student]
            result = Result(student, key=_key(files, lab), error=f"grading took longer than {limit} s and was stopped")
            _write_atomic(done, json.dumps(asdict(result)))
            return result
        text = log.decode(errors="replace")
        if proc.returncode == 0 and done.is_file():
            return Result(**json.loads(done.read_text()))
        if "database is locked" not in text:  # a busy SQLite gradebook is worth a retry; nothing else is
            break
        time.sleep(1 + attempt)
    return Result(student, error=f"grading crashed: {_last_line(text)}")


def _die_with_parent() -> None:
    """Ask Linux to kill this child when the grading run that started it dies (kill -9 included)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def write_reports(lab: str, results: list[Result]) -> tuple[Path, Path]:
    """Write the lab's grades CSV and nbgrader's whole-gradebook export; return both paths."""
    from nbgrader.plugins import CsvExportPlugin

    reports = course.work_dir() / "reports"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["student", "score", "max_score", "failing_tests", "notes", "error"])
    for r in results:
        writer.writerow([r.student, f"{r.score:g}", f"{r.max_score:g}", " ".join(r.failing), " | ".join(r.notes), r.error or ""])
    grades = reports / f"{lab}-grades.csv"
    _write_atomic(grades, buf.getvalue())
    export = reports / "gradebook.csv"
    with _gradebook() as gb:
        CsvExportPlugin(to=str(export.with_suffix(".tmp"))).export(gb)
    os.replace(export.with_suffix(".tmp"), export)
    return grades, export


def summary(lab: str, results: list[Result]) -> str:
    """Return the one-screen grade table: student, score, max, failing tests."""
    width = max([7] + [len(r.student) for r in results])
    lines = [f"{lab}: {len(results)} submission(s)",
             f"{'student':<{width}}  {'score':>6}  {'max':>5}  failing tests / notes",
             f"{'-' * width}  {'-' * 6}  {'-' * 5}  {'-' * 40}"]
    for r in results:
        detail = f"ERROR: {r.error}" if r.error else (", ".join(r.failing) or "-")
        if r.manual_pending and not r.error:
            detail += f"  [to grade by hand: {', '.join(r.manual_pending)}]"
        if r.notes and not r.error:
            detail += f"  ({r.notes[0]}{' …' if len(r.notes) > 1 else ''})"
        lines.append(f"{r.student:<{width}}  {r.score:>6g}  {r.max_score:>5g}  {detail[:100]}")
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(description="grade one submission (internal; use `llmlab grade`)")
    parser.add_argument("lab")
    parser.add_argument("student")
    parser.add_argument("submissions", type=Path)
    parser.add_argument("workers", type=int)
    args = parser.parse_args()
    files = discover(args.lab, args.submissions)[args.student]
    result = grade_one(args.lab, args.student, files, args.workers)
    if result.error and "database is locked" in result.error:
        print(result.error)
        sys.exit(1)
    _write_atomic(results_dir(args.lab) / f"{args.student}.json", json.dumps(asdict(result)))


if __name__ == "__main__":
    _main()
