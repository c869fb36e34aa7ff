"""Grading cost for lab 1: plain `nbgrader autograde` vs `llmlab grade` (sandboxed), and --workers 2.

    .venv/bin/python bench/grading.py [--submissions 4]

Prints seconds per submission for each; figures, not pass/fail. Uses a private work folder.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

LAB = "01-attention"


def main() -> None:
    warnings.filterwarnings("ignore")  # nbgrader's SQLAlchemy chatter
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--submissions", type=int, default=4, help="submissions per run (default 4)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmlab-bench-"))
    os.environ["LLMLAB_WORK"] = str(tmp / "work")
    from llmlab import course
    from llmlab.grading import samples

    subs = tmp / "subs"
    samples.write(LAB, subs)
    names = sorted(p.name for p in subs.iterdir())
    i = 0
    while len(names) < args.submissions:  # more copies of the samples
        src = subs / names[i % len(names)]
        shutil.copytree(src, subs / f"copy{i}-{src.name}")
        names.append(f"copy{i}-{src.name}")
        i += 1
    for extra in names[args.submissions:]:
        shutil.rmtree(subs / extra)
    names = names[: args.submissions]

    # plain nbgrader: the student's notebook as is, in the grader's own kernel
    course.release(LAB, into=tmp / "work" / "release")
    api = course.nbgrader_api()
    for name in names:
        dest = tmp / "work" / "submitted" / name / LAB
        dest.mkdir(parents=True, exist_ok=True)
        for nb in (subs / name).glob("*.ipynb"):
            shutil.copy(nb, dest / nb.name)
    start = time.perf_counter()
    for name in names:
        api.autograde(LAB, name, force=True)
    plain = (time.perf_counter() - start) / len(names)

    def llmlab_grade(workers: int) -> float:
        cmd = [sys.executable, "-m", "llmlab.cli", "grade", LAB, str(subs), "--force", "--no-progress", "--workers", str(workers)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        return (time.perf_counter() - start) / len(names)

    one = llmlab_grade(1)
    two = llmlab_grade(2)
    from llmlab.grading.sandbox import isolation

    print(f"lab {LAB}, {len(names)} submissions, {os.cpu_count()} CPUs, sandbox: {isolation()}")
    print(f"{'grader':<36} {'s / submission':>15}")
    print(f"{'nbgrader autograde (no sandbox)':<36} {plain:>15.1f}")
    print(f"{'llmlab grade --workers 1':<36} {one:>15.1f}   ({one / plain:.2f}x plain; includes feedback)")
    print(f"{'llmlab grade --workers 2':<36} {two:>15.1f}   (speedup {one / two:.2f}x over 1 worker)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
