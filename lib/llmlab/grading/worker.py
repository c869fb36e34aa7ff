"""The student's side of grading: runs inside the sandbox, never in the grader's process.

Started as `python -m llmlab.grading.worker`, it reads one spec (the sanitized code cells)
on stdin, runs the cells in an IPython shell and reports each one on fd 3; then it answers
calls — "run function NAME on these arguments" — until stdin closes. Whatever student code
does in here (hooks, monkeypatches, exits, lying objects) stays in here: the grader only
ever receives plain values through `protocol`.
"""
from __future__ import annotations

import io
import os
import sys
import traceback
from typing import Any, Callable

from llmlab.grading import protocol
from llmlab.grading.libview import resolve
from llmlab.i18n import N_, _

CALLS = N_("your code calls {name}; this exercise asks you to implement it yourself")


class CappedWriter(io.TextIOBase):
    """A text sink that keeps the first `cap` characters and counts the rest."""

    def __init__(self, cap: int):
        self.cap, self.parts, self.size, self.dropped = cap, [], 0, 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        s = str(s)
        room = self.cap - self.size
        if room > 0:
            self.parts.append(s[:room])
            self.size += min(room, len(s))
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def text(self) -> str:
        note = f"\n[output truncated: {self.dropped:,} more characters]" if self.dropped else ""
        return "".join(self.parts) + note


class ForbiddenCall(AssertionError):
    """Raised when graded code calls something the exercise asks students to write themselves."""


class Guard:
    """Trips when student code, while being graded, calls one of the forbidden functions."""

    def __init__(self, names: list[str]):
        self.active = False
        self.torch_funcs: dict[Any, str] = {}
        for name in names:
            obj = resolve(name)
            if obj is None:
                continue
            if isinstance(obj, type(sys)):  # a module: wrap everything it defines
                for attr, val in list(vars(obj).items()):
                    if not attr.startswith("_") and getattr(val, "__module__", None) == obj.__name__:
                        self._wrap(obj, attr, f"{name}.{attr}")
            elif isinstance(obj, type):
                self._wrap(obj, "forward", name)
                self._wrap(obj, "__init__", name)
            else:
                self.torch_funcs[obj] = name
                owner, attr = name.rpartition(".")[::2]
                self._wrap(resolve(owner), attr, name)

    def _wrap(self, owner: Any, attr: str, label: str) -> None:
        original = getattr(owner, attr, None)
        if original is None or not callable(original):
            return
        if isinstance(original, type):
            self._wrap(original, "forward", label)
            self._wrap(original, "__init__", label)
            return
        guard = self

        def tripwire(*args, **kwargs):
            if guard.active:
                raise ForbiddenCall(_(CALLS).format(name=label))
            return original(*args, **kwargs)

        try:
            setattr(owner, attr, tripwire)
        except (AttributeError, TypeError):
            pass

    def call(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """Run fn(*args, **kwargs) with the tripwires armed."""
        from torch.overrides import TorchFunctionMode

        funcs = self.torch_funcs

        class Tripwire(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in funcs:
                    raise ForbiddenCall(_(CALLS).format(name=funcs[func]))
                return func(*args, **(kwargs or {}))

        self.active = True
        try:
            with Tripwire():  # autograd as in the notebook: arguments keep requires_grad
                return fn(*args, **kwargs)
        finally:
            self.active = False


def _error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def main() -> None:
    """Run the spec's cells, then serve calls until the grader closes stdin."""
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(3, "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)  # student code sees an empty stdin, not the request channel
    spec = protocol.recv(requests)[0]
    cap = int(spec.get("output_bytes", 1 << 20))

    import torch
    from IPython.core.interactiveshell import InteractiveShell

    torch.set_num_threads(int(spec.get("threads", 1)))
    shell = InteractiveShell.instance(colors="NoColor")
    guard = Guard(spec.get("forbidden", []))
    real_out, real_err = sys.stdout, sys.stderr

    for cell in spec["cells"]:
        protocol.send(replies, {"event": "cell-start", "id": cell["id"]})
        out = CappedWriter(cap)
        sys.stdout = sys.stderr = out
        try:
            result = shell.run_cell(cell["source"], store_history=False, silent=False)
            err = result.error_before_exec or result.error_in_exec
        except BaseException as e:  # noqa: BLE001 — report, never die on student code
            err = e
        finally:
            sys.stdout, sys.stderr = real_out, real_err
        protocol.send(replies, {"event": "cell-done", "id": cell["id"], "output": out.text(),
                                "error": _error_text(err) if err else None})
    protocol.send(replies, {"event": "ready"})

    while True:
        try:
            header, value = protocol.recv(requests, grads=True)
        except EOFError:
            return
        name = header["call"]
        out = CappedWriter(cap)
        sys.stdout = sys.stderr = out
        try:
            fn = shell.user_ns.get(name)
            if not callable(fn):
                raise NameError(f"name {name!r} is not defined")
            args, kwargs = value
            inputs = protocol.arrays_in((args, kwargs))
            before = [t.detach().clone() for t in inputs]
            result = guard.call(fn, args, kwargs)
            # tensors changed in place go back, so the caller sees what the call did, as in a notebook
            changed = [[i, t] for i, (t, b) in enumerate(zip(inputs, before))
                       if t.shape != b.shape or t.dtype != b.dtype or not torch.equal(t.detach(), b)]
            reply = ({"ok": True, "output": out.text()}, (result, changed))
            protocol.encode(reply[1])  # fail here, not half-way through sending
        except BaseException as e:  # noqa: BLE001
            kind = next(c for c in type(e).__mro__ if c.__module__ == "builtins").__name__
            reply = ({"ok": False, "error": str(e) or type(e).__name__, "type": kind,
                      "output": out.text()}, None)
        finally:
            sys.stdout, sys.stderr = real_out, real_err
        header, result = reply
        if header["ok"]:
            protocol.send(replies, {**header, "value": None}, result)
        else:
            protocol.send(replies, header)


if __name__ == "__main__":
    main()
