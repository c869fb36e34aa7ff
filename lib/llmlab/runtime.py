"""Runtime choices shared by every lab: device and dtype, seeding, threads, timing and peak memory."""
from __future__ import annotations

import os
import random
import time
import weakref
from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode


def pick_device(prefer: str = "auto") -> torch.device:
    """Return the best available device: cuda > mps > cpu, or the one named by `prefer`."""
    if prefer and prefer != "auto":
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"DEVICE={prefer!r} but no CUDA GPU is visible; use 'auto' or 'cpu'")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"DEVICE={prefer!r} but MPS is not available; use 'auto' or 'cpu'")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """Return the fastest safe compute dtype for `device` (bf16 on recent GPUs, else fp32)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run is repeatable."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(n: int | None = None) -> int:
    """Use `n` CPU threads for torch (default: all cores the process may use); return the count."""
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


def setup(seed: int = 0, device: str = "auto") -> torch.device:
    """Seed everything and pick the device; the first call of every lab notebook."""
    seed_everything(seed)
    dev = pick_device(device)
    print(f"llmlab: device={dev.type} torch={torch.__version__} seed={seed}")
    return dev


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work so a timer measures it."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextmanager
def timer(device: torch.device | str = "cpu") -> Iterator[dict]:
    """Time the block (GPU-synchronised); the yielded dict holds `seconds` afterwards."""
    result: dict = {}
    sync(device)
    start = time.perf_counter()
    try:
        yield result
    finally:
        sync(device)
        result["seconds"] = time.perf_counter() - start


@contextmanager
def peak_memory(device: torch.device | str = "cpu") -> Iterator[dict]:
    """Measure the block's peak tensor memory; the yielded dict holds `bytes` afterwards.

    On CUDA this is the allocator's peak above what was allocated on entry. Elsewhere a
    dispatch mode counts every storage the block's torch ops allocate, minus those freed,
    so CPU runs report the same quantity (workspace inside kernels is not seen).
    """
    device = torch.device(device)
    result: dict = {}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        try:
            yield result
        finally:
            sync(device)
            result["bytes"] = torch.cuda.max_memory_allocated(device) - base
        return
    tracker = _LiveBytes()
    try:
        with tracker:
            yield result
    finally:
        result["bytes"] = tracker.peak


class _LiveBytes(TorchDispatchMode):
    """Tracks the bytes of storages created under it that are still alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.owned: set[int] = set()  # ids of storages counted and not yet freed

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self.owned or storage.nbytes() == 0:
            return  # a view or an in-place result of a storage we already count
        self.owned.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key: int, nbytes: int) -> None:
        self.owned.discard(key)
        self.live -= nbytes
