"""The grader's verdict equals the student's own notebook run: in-place changes and subclass returns.

In a notebook, a function that changes its input tensors in place changes them for the test
that called it, and a namedtuple or `torch.return_types.topk` is just a tuple to the test. The
grader must behave the same, though the student's function runs in another process: wrong
in-place answers lose their points (the notebook's own test cell fails on them), and right
answers returning subclasses of tuple/list/dict keep them. One grading batch per lab.
"""
from __future__ import annotations

import nbformat
import pytest
from conftest import ROOT

from llmlab.grading import pipeline, samples, sanitize

pytestmark = pytest.mark.slow


def _solution(lab: str, gid: str) -> str:
    for path in sorted((ROOT / "solutions" / lab).glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if sanitize.nbgrader_meta(cell).get("grade_id") == gid:
                return cell.source
    raise KeyError(gid)


def _edit(lab: str, gid: str, old: str, new: str) -> dict[str, str]:
    source = _solution(lab, gid)
    assert old in source, f"{lab}/{gid}: the solution changed; update this variant"
    return {gid: source.replace(old, new)}


def _with_import(answers: dict[str, str]) -> dict[str, str]:
    return {gid: "import collections\n\n" + src for gid, src in answers.items()}


# lab -> {variant: (answers, {test: points it must earn})}
VARIANTS = {
    "02-pretraining": {
        "inplace-temperature-wrong": (_edit("02-pretraining", "sample", "    logits = logits / temperature\n",
                                            "    logits = logits.div_(temperature)\n"), {"test-sample": 0}),
        "subclass-merge-right": (_with_import(_edit(
            "02-pretraining", "bpe-merge", "    return min(counts, key=lambda pair: (-counts[pair], pair))",
            "    best = min(counts, key=lambda pair: (-counts[pair], pair))\n"
            "    return collections.namedtuple('Pair', 'left right')(*best)")), {"test-bpe-merge": 3}),
    },
    "03-finetuning": {
        "inplace-merge-wrong": (_edit("03-finetuning", "merge", "return weight + (scaling * (lora_B @ lora_A)).to(weight.dtype)",
                                      "return weight.add_((scaling * (lora_B @ lora_A)).to(weight.dtype))"),
                                {"test-merge": 0}),
        "namedtuple-sft-right": (_with_import(_edit(
            "03-finetuning", "sft-example", "    return torch.tensor(x + [pad_id] * pad), torch.tensor(y + [IGNORE_INDEX] * pad)",
            "    return collections.namedtuple('Example', 'x y')(torch.tensor(x + [pad_id] * pad), "
            "torch.tensor(y + [IGNORE_INDEX] * pad))")), {"test-sft-example": 3}),
    },
    "04-quantization": {
        "inplace-absmax-wrong": (_edit("04-quantization", "absmax", "q = torch.round(x / scale)",
                                       "q = torch.round(x.div_(scale))"), {"test-absmax": 0}),
        "namedtuple-absmax-right": (_with_import(_edit(
            "04-quantization", "absmax", "return q.to(torch.int8), scale",
            "return collections.namedtuple('Q', 'q scale')(q.to(torch.int8), scale)")), {"test-absmax": 3}),
    },
    "05-serving": {
        "inplace-penalty-wrong": (_edit("05-serving", "penalty", "out = logits.clone()", "out = logits"),
                                  {"test-penalty": 0}),
        "namedtuple-speculative-right": (_with_import(_edit(
            "05-serving", "speculative", "def speculative_accept(p, q, draft_tokens, u):",
            "Verdict = collections.namedtuple('Verdict', 'n probs')\n\n\n"
            "def speculative_accept(p, q, draft_tokens, u):\n    return Verdict(*_accept(p, q, draft_tokens, u))\n\n\n"
            "def _accept(p, q, draft_tokens, u):")), {"test-speculative": 5}),
    },
}


@pytest.mark.parametrize("lab", sorted(VARIANTS))
def test_verdicts_match_the_notebook_for_in_place_and_subclass_answers(tmp_path, lab):
    subs = tmp_path / "subs"
    template = nbformat.read(sorted((ROOT / "labs" / lab).glob("*.ipynb"))[0], as_version=4)
    for name, (answers, _) in VARIANTS[lab].items():
        (subs / name).mkdir(parents=True)
        nbformat.write(samples.apply(template, answers), subs / name / sorted((ROOT / "labs" / lab).glob("*.ipynb"))[0].name)
    results = {r.student: r for r in pipeline.grade(lab, subs, workers=2, progress=False)}
    for name, (_, expected) in VARIANTS[lab].items():
        r = results[name]
        assert r.error is None, r.error
        got = {t: r.tests.get(t) for t in expected}
        assert got == expected, f"{lab}/{name}: {got}, expected {expected}; notes {r.notes}"
