"""The attack suite: adversarial submissions graded in one batch with honest ones.

Every attack must earn exactly what its honest part deserves (usually 0), the honest
submissions in the same batch must keep their correct scores, and nothing outside the
sandbox may change.
"""
from __future__ import annotations

import hashlib
import http.server
import json
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
NEEDS_BWRAP = {"read-solutions", "read-hidden-tests-and-gradebook", "write-gradebook-and-results",
               "write-outside-scratch", "network-exfiltration", "fork-bomb", "kill-the-grader", "detect-grading"}
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
    protected = [ROOT / p for p in PROTECTED] + [Path("/usr/lib/python3/dist-packages/pwned.py"), ROOT / ".venv/lib/pwned.pth"]
    before = _digest(protected)
    proc = llmlab("grade", LAB, str(subs), "--workers", "2", "--no-progress")
    server.shutdown()
    results = {p.stem: json.loads(p.read_text()) for p in (work / "results" / LAB).glob("*.json")}
    return {"proc": proc, "results": results, "honest": honest, "expected": expected,
            "before": before, "after": _digest(protected), "work": work}


def test_the_batch_finishes_and_prints_the_table(batch):
    proc = batch["proc"]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
