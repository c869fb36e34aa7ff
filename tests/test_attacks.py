"""The attack suite: adversarial submissions graded in one batch with honest ones.

Every attack must earn exactly what its honest part deserves (usually 0), the honest
submissions in the same batch must keep their correct scores, and nothing outside the
sandbox may change.
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import shutil
import stat
import threading
from pathlib import Path

import nbformat
import pytest
from attacks import ATTACKS, LAB, build
from conftest import ROOT, llmlab

from llmlab import course
from llmlab.grading import samples, sanitize
from llmlab.grading.sandbox import isolation

pytestmark = pytest.mark.slow
NEEDS_BWRAP = {"detect-grading"}  # the rest are refused by the checked subset before anything runs
# Files that are not the student's own regular file: each fails only its own submission, with a note.
NOT_REGULAR = {"symlink-to-solution": "symbolic link", "hardlink-outside": "hard link", "fifo": "FIFO",
               "device": "device", "oversized": "MiB limit"}
# Ids nbgrader accepts (graded: here, copies of the solution) and one it cannot use (refused alone).
GOOD_IDS, BAD_IDS = ("stüdent", "a.b@uni.example"), ("bad*id", "linked-folder")
PROTECTED = ["lib/llmlab/checks/attention.py", f"labs/{LAB}/attention.ipynb", "grading/policy.toml",
             f"solutions/{LAB}/attention.ipynb"]


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else "absent" for p in paths}


def _points() -> dict[str, float]:
    nb = nbformat.read(ROOT / "solutions" / LAB / "attention.ipynb", as_version=4)
    return {sanitize.nbgrader_meta(c)["grade_id"]: float(sanitize.nbgrader_meta(c)["points"]) for c in nb.cells if sanitize.is_test(c)}


@pytest.fixture(scope="session")
def batch(tmp_path_factory):
    """Grade solution, untouched, the partial fixture and every attack in one run (2 workers)."""
    subs = tmp_path_factory.mktemp("submissions")
    work = course.work_dir()
    solution_nb = nbformat.read(ROOT / "solutions" / LAB / "attention.ipynb", as_version=4)
    sdpa = next(c.source for c in solution_nb.cells if sanitize.nbgrader_meta(c).get("grade_id") == "sdpa")

    class Serve(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 — the "leaked answer" a networked sandbox could fetch
            self.send_response(200)
            self.end_headers()
            self.wfile.write(sdpa.encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Serve)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx = {"root": str(ROOT), "work": str(work), "solution_url": f"http://127.0.0.1:{server.server_port}/answer.py"}
    only = None if isolation() == "bubblewrap" else [a for a in ATTACKS if a not in NEEDS_BWRAP]
    honest = build(subs, ROOT / "labs" / LAB / "attention.ipynb", ROOT / "solutions" / LAB / "attention.ipynb", ctx, only)
    expected = samples.write(LAB, subs)
    _not_regular_files(subs, tmp_path_factory.mktemp("outside"))
    for name in (*GOOD_IDS, "bad*id"):
        shutil.copytree(subs / "solution", subs / name)
    os.symlink(subs / "solution", subs / "linked-folder")
    protected = [ROOT / p for p in PROTECTED] + [Path("/usr/lib/python3/dist-packages/pwned.py"), ROOT / ".venv/lib/pwned.pth"]
    before = _digest(protected)
    proc = llmlab("grade", LAB, str(subs), "--workers", "2", "--no-progress", timeout=3300)
    server.shutdown()
    results = {p.stem: json.loads(p.read_text()) for p in (work / "results" / LAB).glob("*.json")}
    return {"proc": proc, "results": results, "honest": honest, "expected": expected,
            "before": before, "after": _digest(protected), "work": work}


def _not_regular_files(subs: Path, outside: Path) -> None:
    """Submissions that are links, FIFOs, devices or too large (see NOT_REGULAR)."""
    solution = ROOT / "solutions" / LAB / "attention.ipynb"
    for name in NOT_REGULAR:
        (subs / name).mkdir()
    target = lambda name: subs / name / "attention.ipynb"  # noqa: E731
    os.symlink(solution, target("symlink-to-solution"))
    shutil.copy(solution, outside / "attention.ipynb")
    os.link(outside / "attention.ipynb", target("hardlink-outside"))
    os.mkfifo(target("fifo"))
    try:
        os.mknod(target("device"), 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero: never ends
    except PermissionError:
        os.symlink("/dev/zero", target("device"))
    nb = json.loads(solution.read_text())
    nb["cells"][0]["source"] = " " * (40 << 20)
    target("oversized").write_text(json.dumps(nb))


@pytest.mark.timeout(3600)  # the batch (about 50 submissions) is graded in this test's setup
def test_the_batch_finishes_and_prints_the_table(batch):
    proc = batch["proc"]
    # exit 1 says some submissions could not be graded: exactly the refused ids, and nothing else
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert all(r["error"] is None for r in batch["results"].values()), proc.stdout[-3000:]
    assert "student" in proc.stdout and "failing tests" in proc.stdout
    assert set(batch["results"]) >= set(batch["honest"]) | {"solution", "untouched", "partial"}


def test_honest_submissions_keep_their_scores(batch):
    from llmlab.grading.pipeline import Result

    results = [Result(**batch["results"][name]) for name in batch["expected"]]
    assert samples.mismatches(results, batch["expected"]) == []
    solution = batch["results"]["solution"]
    assert solution["score"] == solution["max_score"] == sum(_points().values())


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_earns_only_its_honest_part(batch, name):
    if name not in batch["honest"]:
        pytest.skip("needs bubblewrap's mount/network isolation")
    result = batch["results"][name]
    assert result["error"] is None, result["error"]
    points = _points()
    deserved = {f"test-{gid}": points[f"test-{gid}"] for gid in batch["honest"][name]}
    earned = {t: s for t, s in result["tests"].items() if s > 0}
    assert earned == deserved, f"{name}: earned {earned}, deserves {deserved}; notes: {result['notes']}"


@pytest.mark.parametrize("name", sorted(NOT_REGULAR))
def test_only_regular_files_are_graded(batch, name):
    result = batch["results"][name]
    assert result["error"] is None and result["score"] == 0, result
    notes = " ".join(result["notes"])
    assert NOT_REGULAR[name] in notes or (name == "device" and "symbolic link" in notes), notes
    html = batch["work"] / "feedback" / name / LAB / "attention.html"
    assert not html.exists() or "BEGIN SOLUTION" not in html.read_text() and "math.sqrt(d)" not in html.read_text()


def test_every_usable_student_id_is_graded_and_a_bad_one_fails_alone(batch):
    for name in GOOD_IDS:
        r = batch["results"][name]
        assert r["error"] is None and r["score"] == r["max_score"] == sum(_points().values()), r
    out = batch["proc"].stdout
    assert "bad*id" in out and "not a usable student id" in out, out[-2000:]
    assert "linked-folder" in out and "symbolic link" in out


def test_refusals_name_the_construct_and_its_line(batch):
    for name, words in {"run-library-source": ("exec",), "switch-off-tripwire-gc": ("gc",),
                        "kernel-by-torch-ops": ("ops",), "kernel-by-torch-c": ("_C",),
                        "switch-off-tripwire-frames": ("gi_frame",), "kernel-by-dunder-walk": ("__base__",),
                        "format-string-escape": ("format string",)}.items():
        assert any(n.startswith("refused: cell ") and " line " in n for n in batch["results"][name]["notes"]), name
        page = (batch["work"] / "feedback" / name / LAB / "attention.html").read_text()
        for word in words:
            assert word in page, f"{name}: {word!r} missing from the feedback"


def test_no_student_script_reaches_the_feedback_page(batch):
    page = (batch["work"] / "feedback" / "script-in-answers" / LAB / "attention.html").read_text()
    assert "My answer." in page
    assert "<img src" not in page.split("My answer.")[1][:400] and 'href="javascript:' not in page
    assert "<script>document.title" not in page and "onerror=\"document" not in page


def test_hidden_tests_show_no_student_output(batch):
    page = (batch["work"] / "feedback" / "hidden-output-leak" / LAB / "attention.html").read_text()
    assert "LEAK (2, 4, 7, 16)" in page, "the visible tests' output is the student's to see"
    assert "LEAK (3, 2, 5, 8)" not in page, "the hidden tests' calls printed into the feedback"
    assert batch["results"]["huge-replies"]["score"] > 0
    assert (batch["work"] / "feedback" / "huge-replies" / LAB / "attention.html").stat().st_size < 5 << 20


def test_the_similarity_report_finds_the_copies(batch):
    import csv

    rows = list(csv.DictReader((batch["work"] / "reports" / f"{LAB}-similarity.csv").open()))
    score = {frozenset((r["a"], r["b"])): float(r["similarity"]) for r in rows}
    assert score[frozenset(GOOD_IDS)] > 0.95 and score[frozenset(("solution", "[reference] solution"))] > 0.95
    assert score[frozenset(("untouched", "solution"))] < 0.2
    page = (batch["work"] / "reports" / f"{LAB}-similarity.html").read_text()
    assert "<script>document.title" not in page


def test_nothing_outside_the_sandbox_changed(batch):
    assert batch["before"] == batch["after"]


def test_limits_are_named_in_the_notes(batch):
    notes = {name: " ".join(r["notes"]) for name, r in batch["results"].items()}
    if "sigint-proof-loop" in notes:
        assert "time limit" in notes["sigint-proof-loop"]
    if "memory-bomb" in notes:
        assert "out of memory" in notes["memory-bomb"] or "killed" in notes["memory-bomb"]
    if "not-a-notebook" in notes:
        assert "not found" in notes["not-a-notebook"] or "readable" in notes["not-a-notebook"]


def test_feedback_stays_small_and_hides_hidden_tests(batch):
    feedback = batch["work"] / "feedback"
    html = feedback / "huge-output" / LAB / "attention.html"
    assert html.is_file() and html.stat().st_size < 5 << 20
    text = (feedback / "untouched" / LAB / "attention.html").read_text()
    assert "BEGIN HIDDEN TESTS" not in text
