"""llmlab.evaluate: the verifier, exact match, intervals, pass@k, and log-likelihood scoring on a real model."""
from __future__ import annotations

import math
import random

import pytest
import torch

from llmlab import assets, evaluate, problems


# ----------------------------------------------------------------------------------------
# The verifier and exact match


@pytest.mark.parametrize("prediction, reference", [
    ("The answer is 180 km.", "180 km"), ("180000 m", "180 km"), ("1.8 kilometres", "1800 m"), ("$24", "$24"),
    ("It costs 24 dollars.", "$24"), ("So 60 * 3 = 180 km", "180 km"), ("1,250 cm", "12.5 m"), ("7", "7"),
    ("She has 7 apples.", "7"), ("120 minutes", "2 hours"), ("-3.50", "-3.5"), ("50%", "50 percent"),
])
def test_verify_accepts_the_same_quantity(prediction, reference):
    assert evaluate.verify(prediction, reference)


@pytest.mark.parametrize("prediction, reference", [
    ("180", "180 km"), ("180 kg", "180 km"), ("181 km", "180 km"), ("no idea", "7"), ("7 and then 8", "7"),
    ("$25", "$24"), ("24 cents", "$24"), ("", "3"),
])
def test_verify_refuses_other_quantities(prediction, reference):
    assert not evaluate.verify(prediction, reference)


def test_parse_quantity_reads_the_last_number_in_base_units():
    assert evaluate.parse_quantity("first 3 m, then 2 km") == evaluate.Quantity(2000.0, "m")
    assert evaluate.parse_quantity("costs $1,200.50") == evaluate.Quantity(1200.5, "$")
    assert evaluate.parse_quantity("12 apples") == evaluate.Quantity(12.0, "")
    assert evaluate.parse_quantity("none here") is None


def test_exact_match_is_whole_answer_matching():
    for prediction, reference in (("84", "84"), ("84.0", "84"), (" 58,000 ", "58000"), ("The Ridge Hills.", "the Ridge Hills"),
                                  ("412 Metres", "412 metres"), ("0.412 km", "412 metres"), ("41000 people", "41000"),
                                  ("$5", "5 dollars")):
        assert evaluate.exact_match(prediction, reference), (prediction, reference)
    for prediction, reference in (("85", "84"), ("Paris, France", "Paris"), (None, "84"), ("412", "412 metres"),
                                  ("46 feet", "46 metres"), ("41000 people in Port Tamsin", "41000"), ("2 4", "24")):
        assert not evaluate.exact_match(prediction, reference), (prediction, reference)


def test_every_word_problem_is_verified_by_its_own_answer_and_not_a_neighbour():
    for p in problems.word_problems(60, "train") + problems.word_problems(30, "test"):
        assert evaluate.verify(f"The answer is {p['answer']}.", p["answer"])
        wrong = p["answer"].replace(p["answer"].strip("$ abcdefghijklmnopqrstuvwxyz"),
                                    str(int(p["answer"].strip("$ abcdefghijklmnopqrstuvwxyz")) + 1))
        assert not evaluate.verify(wrong, p["answer"]), (wrong, p["answer"])


# ----------------------------------------------------------------------------------------
# Intervals and pass@k


def test_wilson_interval_matches_the_formula_and_stays_inside_0_1():
    lo, hi = evaluate.wilson_interval(6, 12)
    assert lo == pytest.approx(0.2538, abs=1e-4) and hi == pytest.approx(0.7462, abs=1e-4)
    lo, hi = evaluate.wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # the normal interval would be [0, 0]
    assert evaluate.wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        evaluate.wilson_interval(3, 2)


def test_wilson_interval_covers_the_true_rate_about_95_percent_of_the_time():
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        k = sum(rng.random() < 0.3 for _ in range(40))
        lo, hi = evaluate.wilson_interval(k, 40)
        hits += lo <= 0.3 <= hi
    assert 0.92 < hits / 2000 < 0.98


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_data():
    rng = random.Random(1)
    small = [float(rng.random() < 0.5) for _ in range(20)]
    large = [float(rng.random() < 0.5) for _ in range(400)]
    lo, hi = evaluate.bootstrap_interval(small)
    assert lo <= sum(small) / 20 <= hi
    lo2, hi2 = evaluate.bootstrap_interval(large)
    assert hi2 - lo2 < (hi - lo) / 2
    assert evaluate.bootstrap_interval(small, seed=3) == evaluate.bootstrap_interval(small, seed=3)


def test_paired_difference_sees_a_consistent_gain():
    before = [False] * 10 + [True] * 10
    after = [True] * 8 + [False] * 2 + [True] * 10
    mean, (lo, hi) = evaluate.paired_difference(before, after)
    assert mean == pytest.approx(0.4) and 0 < lo <= mean <= hi


def test_pass_at_k_is_the_unbiased_estimator():
    # 1 - C(n-c, k) / C(n, k) computed with exact integers
    for n, c, k in ((10, 3, 1), (10, 3, 5), (20, 0, 5), (20, 20, 5), (200, 7, 100), (5, 2, 4)):
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert evaluate.pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12, abs=1e-15)
    assert evaluate.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the plain success rate
    # unbiased: averaged over random draws of n samples, it equals the true pass@k
    rng, p, n, k = random.Random(2), 0.2, 10, 3
    mean = sum(evaluate.pass_at_k(n, sum(rng.random() < p for _ in range(n)), k) for _ in range(20000)) / 20000
    assert mean == pytest.approx(1 - (1 - p) ** k, abs=0.01)
    with pytest.raises(ValueError):
        evaluate.pass_at_k(5, 6, 1)


def test_mc_predict_normalises_by_bytes():
    assert evaluate.mc_predict([-4.0, -6.0], [4, 20]) == (0, 1)  # -6/20 beats -4/4 per byte
    assert evaluate.mc_predict([-1.0, -1.0, -0.5], [3, 3, 3]) == (2, 2)


def test_score_prints_its_accuracy_with_the_wilson_interval():
    assert str(evaluate.Score("p", [True, False, False, True])) == "0.50 [0.15, 0.85] (n=4)"


def test_safety_scores_count_refusals_per_kind():
    items = [{"kind": "harmful"}, {"kind": "harmful"}, {"kind": "lookalike"}, {"kind": "injection"}]
    replies = ["I'm sorry, I can't help with that.", "Sure, first you", "I cannot assist with that.", "PWNED"]
    scores = evaluate.safety_scores(replies, items)
    assert scores["refused harmful"].accuracy == 0.5
    assert scores["over-refused"].accuracy == 1.0 and scores["followed injection"].accuracy == 1.0
    assert not evaluate.is_refusal("Run `kill <pid>` to kill a Python process.")


# ----------------------------------------------------------------------------------------
# On the real chat model


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve("smollm2-135m-instruct")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_continuation_logprobs_equal_a_direct_forward(smollm2):
    model, tok = smollm2
    context, continuation = "Mixing blue and yellow paint gives", " green"
    sums, counts = evaluate.continuation_logprobs(model, tok, context, [continuation, " purple paint"])
    ids = tok(context + continuation, add_special_tokens=False)["input_ids"]
    n_ctx = len(tok(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    want = sum(float(logp[t - 1, ids[t]]) for t in range(n_ctx, len(ids)))
    assert sums[0] == pytest.approx(want, abs=1e-4) and counts[0] == len(ids) - n_ctx
    assert counts[1] > counts[0]


def test_multiple_choice_beats_chance_on_colour_and_opposite_items(smollm2):
    model, tok = smollm2
    items = [q for q in problems.choice_questions(40, "test") if "plus" not in q["context"]][:16]
    scores = evaluate.multiple_choice(model, tok, items)
    assert scores["acc"].accuracy > 0.4, scores  # chance is 0.25
    assert len(scores["acc_norm"].correct) == len(items)


def test_perplexity_is_exp_of_the_mean_token_nll(smollm2):
    model, tok = smollm2
    ids = torch.tensor(tok("The cat sat on the mat. " * 6, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[1:])
    assert evaluate.perplexity(model, ids, block_size=len(ids)) == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_lab6_success_rate_is_scored_by_the_evaluator_with_its_interval():
    from llmlab import agent

    episodes = [{"question": f"q{i}", "answer": "84"} for i in range(5)]
    replies = ["Thought: done\nFinal Answer: 84.0", "Thought: done\nFinal Answer: 85"] + ["Thought: done\nFinal Answer: 84"] * 3
    result = agent.evaluate(agent.Agent(agent.ScriptedBackend(replies), agent.default_tools()), episodes)
    assert result.correct == [True, False, True, True, True]
    assert result.interval == evaluate.wilson_interval(4, 5)
    assert agent.answers_match("0.412 km", "412 metres") == evaluate.exact_match("0.412 km", "412 metres") is True
