"""Shared fixtures: the course root, a throwaway course for CLI behaviour, and the graded lab-1 batch."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True, scope="session")
def _course_env(tmp_path_factory):
    """Tests grade into a private work folder, never the developer's work/."""
    os.environ["LLMLAB_ROOT"] = str(ROOT)
    os.environ["LLMLAB_WORK"] = str(tmp_path_factory.mktemp("work"))
    yield


@pytest.fixture
def seeded_one_thread():
    """Seed torch and run on one thread: tiny models are fastest so, and a second thread
    waiting for a busy core makes them several times slower on a shared 2-core machine."""
    import torch

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_course(root: Path, lab: str, cells: list) -> Path:
    """Create a minimal course at `root` with one lab made of `cells`; return the notebook path."""
    (root / "grading").mkdir(parents=True, exist_ok=True)
    for name in ("nbgrader_config.py", "policy.toml"):
        shutil.copy(ROOT / "grading" / name, root / "grading" / name)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = root / "solutions" / lab / f"{lab.split('-', 1)[-1]}.ipynb"
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def llmlab(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the `llmlab` CLI as a user would; return the finished process."""
    return subprocess.run([sys.executable, "-m", "llmlab.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd or ROOT, timeout=timeout)
