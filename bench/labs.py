"""Wall-clock (and, on a GPU, peak device memory) of every lab's solution notebook, run headless.

    .venv/bin/python bench/labs.py --quick            # the README's QUICK column, on this machine
    python bench/labs.py --out "$OUT/runs"            # QUICK=False: the real labs, on a GPU machine
    python bench/labs.py 3 5 --quick                  # some labs only

Each lab runs through `llmlab run` (papermill, a fresh kernel, kernel start included), one
after another. Peak GPU memory is what `nvidia-smi` reports in use on the device while the
lab runs (sampled every 0.2 s; the CUDA context included), so run it on an otherwise idle GPU.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from llmlab import course


class GpuMemoryPeak:
    """Samples `nvidia-smi` in a thread; `peak_mib` is the largest device memory in use seen (None without a GPU)."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak_mib = interval_s, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout.split()
                used = max(int(v) for v in out) if out else None
            except (OSError, ValueError, subprocess.SubprocessError):
                return
            if used is not None:
                self.peak_mib = max(self.peak_mib or 0, used)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "GpuMemoryPeak":
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("labs", nargs="*", help="lab ids or numbers (default: every lab)")
    p.add_argument("--quick", action="store_true", help="QUICK=True (default: QUICK=False, the real labs)")
    p.add_argument("--out", type=Path, default=None, help="folder for the executed notebooks (default: work/runs)")
    args = p.parse_args()
    labs = args.labs or course.labs()
    rows, failed = [], 0
    for lab in labs:
        cmd = [sys.executable, "-m", "llmlab.cli", "run", str(lab), "--no-progress"] + (["--quick"] if args.quick else [])
        if args.out:
            cmd += ["--out", str(args.out / str(lab))]
        start = time.perf_counter()
        with GpuMemoryPeak() as gpu:
            proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        failed += proc.returncode != 0
        if proc.returncode:
            print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
        rows.append((str(lab), "ok" if proc.returncode == 0 else f"FAILED ({proc.returncode})", seconds, gpu.peak_mib))
        print(f"{lab}: {rows[-1][1]} in {seconds:.0f} s", flush=True)
    print(f"\n{'lab':<18} {'status':<12} {'wall-clock':>10} {'peak GPU memory':>16}   (QUICK={args.quick})")
    for lab, status, seconds, mib in rows:
        print(f"{lab:<18} {status:<12} {seconds:>8.0f} s {'-' if mib is None else f'{mib:,} MiB':>16}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
