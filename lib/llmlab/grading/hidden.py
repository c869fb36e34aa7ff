"""Hidden tests that stay hidden: no student output in them, and inputs no resubmission can replay.

nbgrader restores a lab's hidden tests into each test cell at autograde time. `MarkTests`, a
preprocessor that runs right after that, wraps the hidden part of every test cell in two calls
to the trusted kernel's sandbox handle:

    _llmlab_sandbox.test('test-sdpa')       # a new test cell: its output budget starts again
    ... visible tests ...
    ### BEGIN HIDDEN TESTS
    _llmlab_sandbox.hidden(True)            # from here: quiet, and seeds mixed with a secret
    ... hidden tests ...
    _llmlab_sandbox.hidden(False)
    ### END HIDDEN TESTS

While hidden, what the student's function prints is dropped and its exception messages are
withheld, and every seed the tests set (`torch.manual_seed(n)`, `torch.Generator().manual_seed(n)`,
and the global generator at the start) is mixed with a secret drawn per submission. So the
hidden inputs differ at every grading run; a table of inputs seen in one run is worth nothing in
the next. The lines are removed again before feedback is written.
"""
from __future__ import annotations

import hashlib
import random
import re

from nbconvert.preprocessors import Preprocessor
from traitlets import Bool

BEGIN, END = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"
HANDLE = "_llmlab_sandbox"


def mark(source: str, grade_id: str) -> str:
    """Return a test cell's source with the sandbox's test/hidden calls added around hidden parts."""
    lines = [f"{HANDLE}.test({grade_id!r})"]
    for line in source.splitlines():
        indent = re.match(r"\s*", line).group(0)
        if line.strip() == BEGIN:
            lines += [line, f"{indent}{HANDLE}.hidden(True)"]
        elif line.strip() == END:
            lines += [f"{indent}{HANDLE}.hidden(False)", line]
        else:
            lines.append(line)
    return "\n".join(lines)


def unmark(source: str) -> str:
    """Remove the lines `mark` added."""
    return "\n".join(line for line in source.splitlines() if not line.strip().startswith(f"{HANDLE}."))


class MarkTests(Preprocessor):
    """nbgrader autograde step: mark every test cell (see the module docstring)."""

    enabled = Bool(True)  # nbconvert's preprocessors start disabled; nbgrader registers this one as is

    def preprocess_cell(self, cell, resources, index):
        meta = cell.metadata.get("nbgrader", {})
        if cell.cell_type == "code" and meta.get("grade") and not meta.get("solution"):
            cell.source = mark(cell.source, meta.get("grade_id", ""))
        return cell, resources


class SecretSeeds:
    """Mixes every seed set while active with a secret, so hidden inputs change per grading run."""

    def __init__(self, secret: str):
        self.secret, self.saved = secret, None

    def mix(self, seed: int, where: str = "") -> int:
        """A 56-bit seed from `seed`, the place it is set and the secret."""
        digest = hashlib.sha256(f"{self.secret}:{where}:{int(seed)}".encode()).digest()
        return int.from_bytes(digest[:7], "little")

    def enter(self, where: str) -> None:
        """Reseed the global generators and wrap torch's seeding functions."""
        import numpy as np
        import torch

        if self.saved is not None:
            return
        self.saved = (torch.manual_seed, torch.Generator, torch.random.get_rng_state(), random.getstate())
        real_seed, mix = torch.manual_seed, self.mix

        class Generator(torch.Generator):
            def manual_seed(self, seed):  # noqa: D102 — the same call, a secret seed
                return super().manual_seed(mix(seed, where))

        torch.manual_seed = lambda seed: real_seed(mix(seed, where))
        torch.Generator = Generator
        real_seed(mix(0, where + ":start"))
        random.seed(mix(1, where))
        np.random.seed(mix(2, where) % 2**32)

    def exit(self) -> None:
        """Put torch's seeding functions and the generators' states back."""
        import torch

        if self.saved is None:
            return
        torch.manual_seed, torch.Generator, state, py_state = self.saved
        torch.random.set_rng_state(state)
        random.setstate(py_state)
        self.saved = None
