"""The gradebook on a real PostgreSQL server (started here; skipped where none can be)."""
from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from llmlab.grading import samples

pytestmark = pytest.mark.slow
LAB = "01-attention"


def _pg_bin(name: str) -> str | None:
    return shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)


@pytest.fixture(scope="module")
def postgres_url():
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg (PostgreSQL driver) is not installed")
    data = Path(tempfile.mkdtemp(prefix="llmlab-pg-"))  # outside pytest's private (0700) temp tree
    as_user: list[str] = []
    if os.getuid() == 0:  # PostgreSQL refuses to run as root: use an unprivileged uid
        shutil.chown(data, "nobody", "nogroup")
        as_user = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    db = data / "db"
    init = subprocess.run([*as_user, initdb, "-D", str(db), "-U", "grader", "--auth=trust"], capture_output=True, text=True)
    if init.returncode != 0:
        pytest.skip(f"initdb failed: {init.stderr.strip()[-200:]}")
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={data}"
    start = subprocess.run([*as_user, pg_ctl, "-D", str(db), "-o", opts, "-l", str(data / "log"), "-w", "start"],
                           capture_output=True, text=True)
    if start.returncode != 0:
        pytest.skip(f"PostgreSQL did not start: {start.stderr.strip()[-200:]}")
    yield f"postgresql://grader@127.0.0.1:{port}/postgres"
    subprocess.run([*as_user, pg_ctl, "-D", str(db), "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(data, ignore_errors=True)


def test_grading_with_a_postgresql_gradebook(postgres_url, tmp_path):
    subs = tmp_path / "subs"
    expected = samples.write(LAB, subs, names=[])
    env = {**os.environ, "LLMLAB_GRADEBOOK": postgres_url, "LLMLAB_WORK": str(tmp_path / "work")}
    proc = subprocess.run([sys.executable, "-m", "llmlab.cli", "grade", LAB, str(subs), "--workers", "2", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not (tmp_path / "work" / "gradebook.db").exists(), "grades went to SQLite, not PostgreSQL"
    import psycopg

    with psycopg.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute("select s.student_id, sum(coalesce(g.manual_score, g.auto_score)) from grade g "
                    "join submitted_notebook n on g.notebook_id = n.id join submitted_assignment s on n.assignment_id = s.id "
                    "group by s.student_id")
        scores = dict(cur.fetchall())
    results = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "work" / "results" / LAB).glob("*.json")}
    assert set(scores) == set(expected) == set(results)
    assert results["solution"]["score"] == results["solution"]["max_score"] > 0
    assert results["untouched"]["score"] == 0
