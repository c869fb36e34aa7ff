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
import errno
import hashlib
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat
from tqdm.auto import tqdm

from nbgrader.converters import Autograde

from llmlab import course, i18n
from llmlab.grading import feedback, libview, sanitize, similarity
from llmlab.grading.hidden import MarkTests
from llmlab.i18n import _

LOCKED = "database is locked"  # SQLite's answer to a write while another process writes the gradebook
BAD_ID = re.compile(r"[\x00-\x1f\x7f/\\*?\[\]]")  # control characters, paths and nbgrader's glob characters


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


class Refused(Exception):
    """A submitted file that is not graded: a link, a FIFO, a device, too large."""


def id_problem(name: str) -> str | None:
    """Why `name` cannot be a student id (None when nbgrader can use it): any letters, no globs or paths."""
    if name != name.strip() or not name:
        return "starts or ends with whitespace"
    if name.startswith("."):
        return "starts with a dot"
    if BAD_ID.search(name):
        return "contains a control character, a slash or one of * ? [ ]"
    if len(name.encode("utf-8")) > 128:
        return "is longer than 128 bytes"
    return None


def discover(lab: str, submissions: Path) -> tuple[dict[str, dict[str, Path]], dict[str, str]]:
    """Find SUBMISSIONS/<student>/[<lab>/]<notebook>.ipynb; return ({student: {notebook: path}}, {refused: why})."""
    submissions = Path(submissions)
    if not submissions.is_dir():
        raise course.CourseError(f"no submissions folder at {submissions}")
    names = [p.name for p in course.notebooks(lab, "labs")]
    found: dict[str, dict[str, Path]] = {}
    refused: dict[str, str] = {}
    for entry in sorted(os.scandir(submissions), key=lambda e: e.name):
        if entry.name.startswith(".") and entry.is_dir(follow_symlinks=False):
            continue  # .ipynb_checkpoints and the like
        if entry.is_symlink():
            refused[entry.name] = _("the student folder is a symbolic link; only real folders are graded")
            continue
        if not entry.is_dir(follow_symlinks=False):
            continue
        if why := id_problem(entry.name):
            refused[entry.name] = f"{entry.name!r} is not a usable student id: it {why}"
            continue
        folder = Path(entry.path)
        base = folder / lab if (folder / lab).is_dir() and not (folder / lab).is_symlink() else folder
        found[entry.name] = {n: base / n for n in names}
    return found, refused


def read_submitted(path: Path, submissions: Path, max_bytes: int) -> bytes:
    """Read one submitted file without following links; Refused unless it is a regular file we may read."""
    parts = Path(path).relative_to(submissions).parts
    fd = os.open(submissions, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | (0 if last else os.O_DIRECTORY)
            try:
                nxt = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR) or os.path.islink(os.path.join(submissions, *parts[: i + 1])):
                    raise Refused(_("{file} is a symbolic link (or sits under one); only regular files are graded")
                                  .format(file=parts[-1])) from None
                if e.errno == errno.ENOENT:
                    raise FileNotFoundError(path) from None
                raise Refused(_("{file} could not be opened ({reason})").format(file=parts[-1], reason=e.strerror)) from None
            os.close(fd)
            fd = nxt
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = _("a FIFO") if stat.S_ISFIFO(st.st_mode) else _("a device") if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else _("not a regular file")
            raise Refused(_("{file} is {kind}; only regular files are graded").format(file=parts[-1], kind=kind))
        if st.st_nlink > 1 and _links_inside(submissions, st) < st.st_nlink:
            raise Refused(_("{file} is a hard link to a file outside the submissions folder; only the student's own "
                            "files are graded").format(file=parts[-1]))
        if st.st_size > max_bytes:
            raise Refused(_("{file} is {size:.1f} MiB, over the {limit} MiB limit")
                          .format(file=parts[-1], size=st.st_size / 2**20, limit=max_bytes >> 20))
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise Refused(_("{file} grew past the {limit} MiB limit while being read").format(file=parts[-1], limit=max_bytes >> 20))
        return b"".join(chunks)
    finally:
        os.close(fd)


def _links_inside(folder: Path, st: os.stat_result) -> int:
    """How many names under `folder` are hard links to the file `st` describes."""
    count = 0
    for dirpath, _, files in os.walk(folder):
        for f in files:
            try:
                other = os.lstat(os.path.join(dirpath, f))
            except OSError:
                continue
            count += (other.st_ino, other.st_dev) == (st.st_ino, st.st_dev)
    return count


def _submitted(files: dict[str, Path], submissions: Path, max_bytes: int) -> dict[str, bytes | str]:
    """{notebook: its bytes, or why it is not graded} for one student's files."""
    out: dict[str, bytes | str] = {}
    for name, path in sorted(files.items()):
        try:
            out[name] = read_submitted(path, submissions, max_bytes)
        except FileNotFoundError:
            out[name] = _("{file} was not submitted; graded as empty").format(file=name)
        except Refused as e:
            out[name] = _("{why}; graded as empty").format(why=e)
    return out


def _key(contents: dict[str, bytes | str], lab: str) -> str:
    h = hashlib.sha256()
    for name, data in sorted(contents.items()):
        h.update(name.encode())
        h.update(data if isinstance(data, bytes) else b"<not graded>" + data.encode())
    for nb in course.notebooks(lab, "labs") + course.notebooks(lab, "solutions") + _translated_templates(lab):
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


def grade_one(lab: str, student: str, files: dict[str, Path], submissions: Path, threads: int = 1) -> Result:
    """Grade one student's submission of `lab` (runs in its own process; see `grade`); `threads`: torch threads unless the policy sets them."""
    start = time.perf_counter()
    root, work = course.root(), course.work_dir()
    policy = sanitize.policy(root, nbformat.read(course.notebooks(lab)[0], as_version=4))
    contents = _submitted(files, Path(submissions), policy["submission_mb"] << 20)
    key = _key(contents, lab)
    lang = submission_language(contents)
    os.environ["LLMLAB_LANG"] = lang  # this process, its trusted kernel and the sandbox speak the submission's language
    if any(isinstance(data, str) for data in contents.values()):  # why a file is not graded, in that language
        contents = _submitted(files, Path(submissions), policy["submission_mb"] << 20)
    result = Result(student, key=key, started=time.time())
    api = course.nbgrader_api()
    sanitizers = list(api.config.Autograde.get("sanitize_preprocessors", Autograde.class_traits()["sanitize_preprocessors"].default()))
    at = next(i for i, p in enumerate(sanitizers) if getattr(p, "__name__", str(p)).endswith("OverwriteCells"))
    api.config.Autograde.sanitize_preprocessors = sanitizers[: at + 1] + [MarkTests] + sanitizers[at + 1:]
    submitted = work / "submitted" / student / lab
    private = work / "grading" / lab / student
    submitted.mkdir(parents=True, exist_ok=True)
    private.mkdir(parents=True, exist_ok=True)
    specs: dict[str, dict] = {}
    hidden: set[str] = set()
    settings: dict = {}
    for template_path in course.notebooks(lab, "labs"):
        name = template_path.name
        translated = course.root() / "labs" / lang / lab / name
        template = nbformat.read(translated if lang != i18n.ENGLISH and translated.is_file() else template_path, as_version=4)
        source_nb = nbformat.read(root / "solutions" / lab / name, as_version=4)
        hidden |= {sanitize.nbgrader_meta(c)["grade_id"] for c in source_nb.cells
                   if sanitize.is_test(c) and "BEGIN HIDDEN TESTS" in c.source}
        settings = sanitize.policy(root, source_nb)
        if not settings["threads"]:
            settings["threads"] = threads
        data = contents.get(name, _("{file} was not submitted; graded as empty").format(file=name))
        student_answers, notes = sanitize.answers(data, template) if isinstance(data, bytes) else ({}, [data])
        result.notes += notes
        parameters = {"QUICK": True, "DEVICE": settings["device"], "SEED": settings["seed"]}
        spec_path = private / f"{Path(name).stem}.sandbox.json"
        view = libview.build(template.metadata.get("llmlab", {}).get("forbidden", []), lab.split("-", 1)[-1],
                             work / "grading" / "libviews")
        spec, trusted = sanitize.build(template, student_answers, settings, spec_path, parameters, str(view))
        result.notes += [_("refused: {why}").format(why=why) for why in spec["violations"].values()]
        _write_atomic(spec_path, json.dumps(spec))
        nbformat.write(trusted, submitted / name)
        specs[name] = spec
    outcome = api.autograde(lab, student, force=True, create=True)
    if not outcome["success"]:  # nbgrader's whole log is kept; the error names a busy gradebook, which is retried
        text = "\n".join(filter(None, (outcome.get("log"), outcome.get("error"))))
        _write_atomic(private / "autograde.log", text)
        cause = LOCKED if LOCKED in text else _last_line(text)
        result.error = f"autograde failed: {cause} (nbgrader's log: {(private / 'autograde.log').relative_to(work)})"
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
        result.notes.append(_("feedback could not be generated: {why}").format(why=_last_line(outcome.get("error") or "")))
    pending = _read_grades(lab, student, result)
    if result.manual_pending:
        result.notes.append(_("{score:g}/{max_score:g} autograded, {n} written answer(s) to grade by hand: {answers}")
                            .format(score=result.score, max_score=result.max_score, n=len(result.manual_pending),
                                    answers=", ".join(result.manual_pending)))
    for notebook, answers in pending.items():
        page = work / "feedback" / student / lab / f"{notebook}.html"
        if page.is_file():
            feedback.mark_pending(page, answers)
    result.seconds = time.perf_counter() - start
    return result


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"


def submission_language(contents: dict[str, bytes | str]) -> str:
    """The language a submission is graded in: its notebooks' metadata.language (English when none names another)."""
    for data in contents.values():
        try:
            meta = json.loads(data).get("metadata", {}) if isinstance(data, bytes) else {}
            lang = i18n.known(str(meta.get("language", ""))) if isinstance(meta, dict) else None
        except (ValueError, AttributeError):
            lang = None
        if lang:
            return lang
    return i18n.ENGLISH


def _translated_templates(lab: str) -> list[Path]:
    """The released templates of `lab` in every other language (labs/<lang>/LAB/*.ipynb)."""
    return [p for lang in i18n.LANGUAGES[1:] for p in sorted((course.root() / "labs" / lang / lab).glob("*.ipynb"))]


def _sandbox_notes(nb) -> list[str]:
    """Collect the limit/crash lines the sandbox stand-ins printed (e.g. 'cell 7: out of memory')."""
    cell, box = re.escape(_("cell {n}")).replace(re.escape("{n}"), r"\d+"), re.escape(_("sandbox"))
    note = re.compile(rf"^(cell \d+|sandbox|{cell}|{box}): ")
    notes = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                notes += [line for line in out.get("text", "").splitlines() if note.match(line)]
            if out.get("output_type") == "error" and out.get("ename") in ("SandboxError",):
                notes.append(out.get("evalue", ""))
    return notes


def _read_grades(lab: str, student: str, result: Result) -> dict[str, dict[str, float]]:
    """Fill `result` from the gradebook; return {notebook: {written answer: points}} still to grade by hand."""
    pending: dict[str, dict[str, float]] = {}
    with _gradebook() as gb:
        submission = gb.find_submission(lab, student)
        for notebook in submission.notebooks:
            for grade in notebook.grades:
                if grade.cell.cell_type == "markdown":  # written answers: the instructor grades these
                    if grade.needs_manual_grade:
                        result.manual_pending.append(grade.name)
                        pending.setdefault(notebook.name, {})[grade.name] = float(grade.max_score)
                    continue
                result.tests[grade.name] = float(grade.score)
                result.score += float(grade.score)
                result.max_score += float(grade.max_score)
                if grade.score < grade.max_score:
                    result.failing.append(grade.name)
    return pending


def grade(lab: str, submissions: Path, workers: int = 1, force: bool = False, progress: bool = True,
          shard: tuple[int, int] = (0, 1), threads: int | None = None) -> list[Result]:
    """Grade every submission of `lab` under `submissions` (or shard i of n), `workers` at once; resume unless `force`.

    Each submission gets `threads` torch threads (default: CPU cores / workers) unless the
    policy sets them.
    """
    lab = course.lab_id(lab)
    found, refused = discover(lab, submissions)
    if not found and not refused:
        raise course.CourseError(f"no submissions in {submissions} (expected SUBMISSIONS/<student>/<notebook>.ipynb)")
    index, count = shard
    everyone = sorted([*found, *refused])
    mine = {s for i, s in enumerate(everyone) if i % count == index}
    found = {s: f for s, f in found.items() if s in mine}
    _ensure_gradebook(lab)
    out = results_dir(lab)
    policy = sanitize.policy(course.root(), nbformat.read(course.notebooks(lab)[0], as_version=4))
    todo, results = [], {s: Result(s, error=why) for s, why in refused.items() if s in mine}
    for student, files in found.items():
        done = out / f"{student}.json"
        if done.is_file() and not force:
            old = Result(**json.loads(done.read_text()))
            if old.key == _key(_submitted(files, Path(submissions), policy["submission_mb"] << 20), lab) and old.error is None:
                results[student] = old
                continue
        todo.append(student)
    threads = threads or max(1, (os.cpu_count() or 1) // max(1, workers))
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        jobs = {pool.submit(_grade_in_child, lab, s, Path(submissions), threads, policy["submission_timeout_s"]): s
                for s in todo}
        bar = tqdm(as_completed(jobs), total=len(jobs), desc=f"grading {lab}", unit="submission", disable=not progress)
        for job in bar:
            results[jobs[job]] = job.result()
    return [results[s] for s in everyone if s in results]


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


def _grade_in_child(lab: str, student: str, submissions: Path, threads: int, limit: int) -> Result:
    """Run `grade_one` in a fresh process with a hard deadline; its result file is the only output trusted."""
    done = results_dir(lab) / f"{student}.json"
    cmd = [sys.executable, "-m", "llmlab.grading.pipeline", lab, student, str(submissions), str(threads)]
    env = {**os.environ, "LLMLAB_ROOT": str(course.root()), "LLMLAB_WORK": str(course.work_dir())}
    for attempt in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True, preexec_fn=_die_with_parent)
        try:
            log, _ = proc.communicate(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            files = discover(lab, submissions)[0][student]
            policy = sanitize.policy(course.root(), nbformat.read(course.notebooks(lab)[0], as_version=4))
            key = _key(_submitted(files, submissions, policy["submission_mb"] << 20), lab)
            result = Result(student, key=key, error=f"grading took longer than {limit} s and was stopped")
            _write_atomic(done, json.dumps(asdict(result)))
            return result
        text = log.decode(errors="replace")
        if proc.returncode == 0 and done.is_file():
            return Result(**json.loads(done.read_text()))
        if LOCKED not in text:  # a busy SQLite gradebook is worth a retry; nothing else is
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
    """Write the lab's grades CSV, its similarity report and nbgrader's gradebook export; return the first and last."""
    from nbgrader.plugins import CsvExportPlugin

    reports = course.work_dir() / "reports"
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["student", "score", "max_score", "failing_tests", "notes", "error"])
    for r in results:
        writer.writerow([r.student, f"{r.score:g}", f"{r.max_score:g}", " ".join(r.failing), " | ".join(r.notes), r.error or ""])
    grades = reports / f"{lab}-grades.csv"
    _write_atomic(grades, buf.getvalue())
    similarity.write(lab, reports)
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
        notes = [n for n in r.notes if not (r.manual_pending and n.endswith(", ".join(r.manual_pending)))]
        if notes and not r.error:
            detail += f"  ({notes[0]}{' …' if len(notes) > 1 else ''})"
        lines.append(f"{r.student:<{width}}  {r.score:>6g}  {r.max_score:>5g}  {detail[:100]}")
    return "\n".join(lines)


def _main() -> None:
    parser = argparse.ArgumentParser(description="grade one submission (internal; use `llmlab grade`)")
    parser.add_argument("lab")
    parser.add_argument("student")
    parser.add_argument("submissions", type=Path)
    parser.add_argument("threads", type=int)
    args = parser.parse_args()
    files = discover(args.lab, args.submissions)[0][args.student]
    result = grade_one(args.lab, args.student, files, args.submissions, args.threads)
    if result.error and LOCKED in result.error:
        print(result.error)
        sys.exit(1)
    _write_atomic(results_dir(args.lab) / f"{args.student}.json", json.dumps(asdict(result)))


if __name__ == "__main__":
    _main()
