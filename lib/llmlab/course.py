"""The course on disk: where it lives, its labs, releasing them, and running them headless.

A lab is a folder `solutions/NN-topic/` of nbgrader source notebooks; `release` turns it into
the student copy `labs/NN-topic/` with nbgrader's generate_assignment, and `run` executes a
notebook with papermill, then checks that *every* code cell really ran — papermill itself
reports success when a notebook stops early (e.g. `sys.exit(0)` in a cell).
"""
from __future__ import annotations

import ast
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import nbformat

CONFIG = Path("grading") / "nbgrader_config.py"


class CourseError(RuntimeError):
    """Something about the course layout, a lab name or a run is wrong; the message says what."""


def root() -> Path:
    """Return the course root: $LLMLAB_ROOT, else the nearest folder up from here holding grading/ and solutions/."""
    if os.environ.get("LLMLAB_ROOT"):
        return Path(os.environ["LLMLAB_ROOT"]).resolve()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            if (folder / CONFIG).is_file() and (folder / "solutions").is_dir():
                return folder
    raise CourseError("not inside an llmlab course (no grading/nbgrader_config.py + solutions/ above here); "
                      "cd into the course or set LLMLAB_ROOT")


def work_dir() -> Path:
    """Return the git-ignored work folder (runs, submissions, gradebook): $LLMLAB_WORK or ROOT/work."""
    return Path(os.environ.get("LLMLAB_WORK", root() / "work")).resolve()


def labs() -> list[str]:
    """Return the lab ids (folder names under solutions/), in course order."""
    return sorted(p.name for p in (root() / "solutions").iterdir() if p.is_dir() and any(p.glob("*.ipynb")))


def lab_id(name: str) -> str:
    """Resolve a lab given as '01-attention', '01', '1' or 'attention' to its folder name."""
    all_labs = labs()
    if name in all_labs:
        return name
    matches = [lab for lab in all_labs if lab.split("-", 1)[0].lstrip("0") == name.lstrip("0")
               or lab.split("-", 1)[-1] == name]
    if len(matches) == 1:
        return matches[0]
    raise CourseError(f"unknown lab {name!r}; labs: {', '.join(all_labs) or '(none)'}")


def notebooks(lab: str, where: str = "solutions") -> list[Path]:
    """Return the notebooks of `lab` under solutions/ or labs/."""
    return sorted((root() / where / lab_id(lab)).glob("*.ipynb"))


def nbgrader_config(**overrides: str):
    """Load grading/nbgrader_config.py as a traitlets Config (CourseDirectory overrides allowed)."""
    from traitlets.config.loader import PyFileConfigLoader

    bin_dir = str(Path(sys.executable).parent)  # nbgrader's gradebook runs `alembic` from PATH
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")

    config = PyFileConfigLoader(CONFIG.name, path=str(root() / CONFIG.parent)).load_config()
    for key, value in overrides.items():
        setattr(config.CourseDirectory, key, value)
    return config


def nbgrader_api(reveal_hidden_tests: bool = False, **overrides: str):
    """Return an nbgrader API object for this course (quiet logs); feedback hides hidden tests unless told."""
    from nbgrader.apps import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory

    config = nbgrader_config(**overrides)
    if reveal_hidden_tests:
        config.GenerateFeedback.preprocessors = [
            p for p in config.GenerateFeedback.preprocessors if not p.endswith("ClearHiddenTests")]
    config.NbGraderAPI.log_level = "WARN"
    coursedir = CourseDirectory(config=config)
    return NbGraderAPI(coursedir=coursedir, config=config)


def release(lab: str | None = None, into: Path | None = None, lang: str = "en") -> list[Path]:
    """nbgrader generate_assignment: solutions/LAB -> labs/LAB (or `into`/LAB); return the notebooks written.

    Also records the lab's cells (hidden tests included) in the gradebook, which grading needs.
    A translation (`lang` other than English) goes to labs/<lang>/LAB, see `release_translation`.
    """
    if lang != "en":
        return release_translation(lang, lab, into)
    work_dir().mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in [lab_id(lab)] if lab else labs():
        dest = (into or root() / "labs") / name
        overrides = {"release_directory": os.path.relpath(into or root() / "labs", root())}
        result = nbgrader_api(**overrides).generate_assignment(name, force=True)
        if not result["success"]:
            raise CourseError(f"release of {name} failed:\n{result.get('error') or result.get('log')}")
        written += sorted(dest.glob("*.ipynb"))
    return written


def release_translation(lang: str, lab: str | None = None, into: Path | None = None) -> list[Path]:
    """Release the `lang` copies (labs/<lang>/LAB, or `into`/LAB) of every lab with a translation (or of `lab`).

    The solution notebooks are translated in a scratch source folder (llmlab.i18n.localize) and
    released by the same generate_assignment, with a scratch gradebook: the course gradebook
    keeps the English cells, against which every language is graded.
    """
    import shutil

    from llmlab import i18n

    if lang not in i18n.LANGUAGES:
        raise CourseError(f"unknown language {lang!r}; languages: {', '.join(i18n.LANGUAGES)}")
    todo = [lab_id(lab)] if lab else i18n.translated_labs(lang)
    work_dir().mkdir(parents=True, exist_ok=True)
    dest_root = Path(into or root() / "labs" / lang).resolve()
    written: list[Path] = []
    for name in todo:
        translation = i18n.load(name, lang)
        if translation is None:
            raise CourseError(f"{name} has no translation into {lang} ({i18n.path(name, lang).relative_to(root())})")
        with tempfile.TemporaryDirectory(dir=work_dir()) as tmp:
            source = Path(tmp) / "source" / name
            shutil.copytree(root() / "solutions" / name, source,
                            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
            for path in notebooks(name):
                nb = i18n.localize(nbformat.read(path, as_version=4), path.name, translation, lang)
                nbformat.write(nb, source / path.name)
            overrides = {"source_directory": os.path.relpath(source.parent, root()),
                         "release_directory": os.path.relpath(dest_root, root()),
                         "db_url": f"sqlite:///{Path(tmp) / 'gradebook.db'}"}
            result = nbgrader_api(**overrides).generate_assignment(name, force=True)
        if not result["success"]:
            raise CourseError(f"release of {name} ({lang}) failed:\n{result.get('error') or result.get('log')}")
        written += sorted((dest_root / name).glob("*.ipynb"))
    return written


def release_drift() -> list[str]:
    """Return the labs/ notebooks (translations in labs/<lang>/ included) that differ from a fresh release (empty = in sync)."""
    from llmlab import i18n

    with tempfile.TemporaryDirectory(dir=work_dir().parent if work_dir().parent.exists() else None) as tmp:
        fresh = Path(tmp) / "labs"
        release(into=fresh)
        for lang in i18n.LANGUAGES[1:]:
            release(into=fresh / lang, lang=lang)
        drift = []
        for nb in sorted(fresh.rglob("*.ipynb")):
            rel = nb.relative_to(fresh)
            committed = root() / "labs" / rel
            if not committed.is_file() or _cells(committed) != _cells(nb):
                drift.append(str(Path("labs") / rel))
        for nb in sorted((root() / "labs").rglob("*.ipynb")):
            if not (fresh / nb.relative_to(root() / "labs")).is_file() and ".ipynb_checkpoints" not in nb.parts:
                drift.append(f"{Path('labs') / nb.relative_to(root() / 'labs')} (no source in solutions/ or i18n/)")
        return drift


def _cells(path: Path) -> list[tuple]:
    nb = nbformat.read(path, as_version=4)
    return [nb.metadata.get("language")] + [
        (c.get("id"), c.cell_type, c.source, c.metadata.get("nbgrader"), c.metadata.get("tags")) for c in nb.cells]


@dataclass
class RunResult:
    """What `run` produced: the executed notebook and how long it took."""

    notebook: Path
    seconds: float


class NotebookFailed(CourseError):
    """A notebook raised, or stopped before running all its cells; the message names the cell."""


def parse_value(text: str):
    """Read a -p value as a Python literal (True, 3, 0.5, 'x'); anything else stays a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def run(path: Path, parameters: dict | None = None, out_dir: Path | None = None,
        timeout: int = 1800, progress: bool = True) -> RunResult:
    """Execute the notebook at `path` headless with papermill; raise NotebookFailed unless every code cell completed."""
    import papermill as pm

    path = Path(path).resolve()
    if not path.is_file():
        raise CourseError(f"no notebook at {path}")
    out_dir = Path(out_dir or work_dir() / "runs" / path.parent.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / path.name
    start = time.perf_counter()
    try:
        pm.execute_notebook(str(path), str(out), parameters=parameters or {}, kernel_name="python3",
                            cwd=str(path.parent), progress_bar=progress, execution_timeout=timeout,
                            report_mode=False)
    except pm.PapermillExecutionError as e:
        check_completed(out)  # names the cell by its place in the source notebook
        raise NotebookFailed(f"{path.name}: failed: {e.ename}: {e.evalue}") from None
    seconds = time.perf_counter() - start
    check_completed(out)
    return RunResult(out, seconds)


def check_completed(executed: Path) -> None:
    """Raise NotebookFailed when an executed notebook has a code cell that errored or never ran."""
    nb = nbformat.read(executed, as_version=4)
    cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for index, cell in enumerate(cells, start=1):  # numbered as in the source notebook
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        status = cell.metadata.get("papermill", {}).get("status")
        errors = [o for o in cell.get("outputs", []) if o.get("output_type") == "error"]
        if errors:
            e = errors[0]
            raise NotebookFailed(f"{executed.name}: cell {index} failed: {e.get('ename')}: {e.get('evalue')}")
        if status != "completed":
            raise NotebookFailed(f"{executed.name}: cell {index} never ran (status {status!r}); "
                                 "the notebook stopped early (sys.exit? os._exit? a dead kernel?)")


@dataclass
class Task:
    """One piece of work for `run_tasks`: `run()`, started once every task named in `after` is done."""

    name: str
    run: Callable[[], object]
    after: tuple[str, ...] = ()


def run_tasks(tasks: list[Task], jobs: int = 2) -> dict[str, object]:
    """Run `tasks`, `jobs` at once, each as soon as what it comes after is done; return {name: result}.

    A free slot takes the first task, in list order, whose dependencies are done, so no slot
    waits while some task is ready; list the longest chain first. No task runs beside the
    slots at a higher priority: Linux's autogroups give every session (each kernel and grading
    child starts one) an equal share whatever its nice value, so an extra job only slows the
    others. The first failure stops further starts and is raised once the running tasks end.
    """
    import threading

    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    known, pending = set(), list(tasks)
    while pending:  # dependencies must exist and form no cycle
        ready = [t for t in pending if set(t.after) <= known]
        if not ready:
            raise ValueError(f"tasks that wait for a missing or circular dependency: {[t.name for t in pending]}")
        known |= {t.name for t in ready}
        pending = [t for t in pending if t not in ready]
    pending, done, failed = list(tasks), {}, []
    cond = threading.Condition()

    def execute(task: Task) -> bool:
        """Run one task and record its result or its failure; False when it failed."""
        try:
            result = task.run()
        except BaseException as e:  # noqa: BLE001 (re-raised by run_tasks)
            print(f"{task.name}: failed; the tasks running now finish, no new one starts", flush=True)
            with cond:
                failed.append(e)
                cond.notify_all()
            return False
        with cond:
            done[task.name] = result
            cond.notify_all()
        return True

    def slot() -> None:
        while True:
            with cond:
                while True:
                    task = next((t for t in pending if all(d in done for d in t.after)), None)
                    if failed or not pending or task:
                        break
                    cond.wait()
                if failed or task is None:
                    return
                pending.remove(task)
            if not execute(task):
                return

    threads = [threading.Thread(target=slot, daemon=True) for _ in range(max(1, min(jobs, len(tasks))))]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():  # a timeout, so that Ctrl-C reaches this thread
            thread.join(0.5)
    if failed:
        raise failed[0]
    return done


def cli_task(name: str, argv: list[str], after: tuple[str, ...] = ()) -> Task:
    """A task that runs `llmlab ARGV...` in a child process, prints its output and how long it took, and fails with it."""
    import subprocess

    def run_cli() -> None:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "llmlab.cli", *argv], capture_output=True, text=True)
        if done.returncode:
            raise CourseError(f"llmlab {' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")
        print(f"{done.stdout.rstrip()}\n{name}: done in {time.perf_counter() - start:.0f} s".lstrip(), flush=True)

    return Task(name, run_cli, after)


def run_task(lab: str, path: Path, after: tuple[str, ...] = ()) -> Task:
    """A task that runs notebook `path` of `lab` in QUICK mode (after `after`); its result is the seconds taken."""

    def run_quick() -> float:
        result = run(path, {"QUICK": True}, progress=False)
        print(f"{lab}/{path.name}: ok in {result.seconds:.1f} s", flush=True)
        return result.seconds

    return Task(f"run {lab}/{path.name}", run_quick, after)
