"""Run a function on N processes of one machine, joined in a gloo process group.

`run(fn, world_size, *args)` forks `world_size` children. Each joins the group (a FileStore
in a fresh temporary folder by default, or TCP on 127.0.0.1), calls `fn(*args)` and sends its
return value back; `run` returns the list of values in rank order. Forking (not spawning)
is what lets `fn` be a function defined in a notebook: the children inherit it, nothing is
imported or pickled on the way in. Values come back through a pipe as `torch.save` bytes
read with `weights_only=True`: tensors, numbers, strings, lists, tuples and dicts.

A rank that raises stops the run: the others are killed (they would wait forever in their
next collective) and `run` raises the same builtin exception type, naming the rank. A run
past `timeout_s` is killed and raises TimeoutError: a hang is an error, never a stuck process.
"""
from __future__ import annotations

import builtins
import io
import multiprocessing as mp
import os
import shutil
import socket
import tempfile
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any, Callable

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _encode(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _child(fn: Callable, args: tuple, rank: int, world_size: int, init: dict, timeout_s: float, conn) -> None:
    """One rank: join the group, run fn, send ("ok", value) or ("error", type, message)."""
    try:
        torch.set_num_threads(1)  # N processes share the cores; one thread each does not oversubscribe
        torch.set_grad_enabled(True)  # a rank starts like a fresh process, whatever the parent's mode
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **init)
        try:
            reply = ("ok", _encode(fn(*args)))
        finally:
            dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 — whatever fn raised goes back to the parent
        kind = next(c for c in type(e).__mro__ if c.__module__ == "builtins").__name__
        frame = traceback.extract_tb(e.__traceback__)[-1]
        reply = ("error", kind, f"{e}" or kind, f"(in {frame.name}, line {frame.lineno}: {frame.line})")
    conn.send(reply)
    conn.close()


def _peer_lost(message: str) -> bool:
    """True for the error a rank gets when another rank has already failed (gloo's broken connection)."""
    return any(w in message for w in ("Connection reset by peer", "Connection closed by peer", "died without a reply",
                                      "Broken pipe", "gloo/transport"))


def run(fn: Callable, world_size: int, *args: Any, timeout_s: float = 60.0, store: str = "file") -> list:
    """Call fn(*args) on `world_size` gloo processes; return their return values, rank 0 first.

    Inside fn, torch.distributed is initialised: dist.get_rank(), dist.all_reduce(...), etc.
    store: "file" (a FileStore in a temporary folder) or "tcp" (127.0.0.1, a free port).
    Raises the rank's exception type (RuntimeError for non-builtin ones) if a rank fails, and
    TimeoutError if the ranks have not all finished after timeout_s seconds.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if dist.is_initialized():
        raise RuntimeError("run() starts its own process group; call it from outside one")
    folder = tempfile.mkdtemp(prefix="llmlab-gloo-")
    if store == "file":
        init = {"init_method": f"file://{os.path.join(folder, 'store')}"}
    elif store == "tcp":
        init = {"init_method": f"tcp://127.0.0.1:{_free_port()}"}
    else:
        raise ValueError(f"store must be 'file' or 'tcp', got {store!r}")
    ctx = mp.get_context("fork")
    procs, conns = [], {}
    try:
        for rank in range(world_size):
            parent, child = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(fn, args, rank, world_size, init, timeout_s, child), daemon=True)
            p.start()
            child.close()
            procs.append(p)
            conns[parent] = rank
        results: dict[int, Any] = {}
        errors: dict[int, Exception] = {}
        deadline = time.monotonic() + timeout_s
        while conns:
            ready = wait(list(conns), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                if errors:
                    break
                late = sorted(conns.values())
                raise TimeoutError(f"rank(s) {late} did not finish within {timeout_s:g} s "
                                   "(a collective that not every rank calls waits forever)")
            for conn in ready:
                rank = conns.pop(conn)
                try:
                    reply = conn.recv()
                except EOFError:
                    code = procs[rank].join(5) or procs[rank].exitcode
                    errors[rank] = RuntimeError(f"rank {rank} died without a reply (exit code {code})")
                    deadline = min(deadline, time.monotonic() + 5)
                    continue
                if reply[0] == "error":
                    _, kind, message, where = reply
                    error = getattr(builtins, kind, RuntimeError)
                    if not (isinstance(error, type) and issubclass(error, Exception)):
                        error = RuntimeError
                    errors[rank] = error(f"rank {rank}: {message} {where}")
                    deadline = min(deadline, time.monotonic() + 5)  # the other ranks fail soon after it
                    continue
                results[rank] = torch.load(io.BytesIO(reply[1]), weights_only=True)
        if errors:  # the cause, not the ranks that lost their peer because of it
            raise next((e for e in errors.values() if not _peer_lost(str(e))), next(iter(errors.values())))
        return [results[r] for r in range(world_size)]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
        shutil.rmtree(folder, ignore_errors=True)
