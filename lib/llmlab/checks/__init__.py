"""Instant feedback for the lab exercises: call the student's function, explain what is off.

Each `check_xxx(fn)` calls `fn` on fresh, seeded inputs, compares the result with a reference
and, when they differ, tries the usual mistakes one by one (missing scale, softmax over the
wrong axis, inverted mask, ...) so the message names the mistake without printing the answer.
On success it prints one line starting with a tick. One module per lab; all checks are
importable from here: `from llmlab import checks; checks.check_sdpa(fn)`.
"""
from llmlab.checks.attention import *  # noqa: F403
from llmlab.checks.pretraining import *  # noqa: F403
from llmlab.checks.finetuning import *  # noqa: F403
from llmlab.checks.quantization import *  # noqa: F403
from llmlab.checks.agents import *  # noqa: F403
from llmlab.checks.serving import *  # noqa: F403
from llmlab.checks.scaling import *  # noqa: F403
from llmlab.checks.posttraining import *  # noqa: F403
