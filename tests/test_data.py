"""llmlab.data: cleaning, dedup with planted duplicates, stable splits, LM blocks, classification and synthetic sets."""
from __future__ import annotations

import json

import pytest
import torch

from llmlab import agent, data, tokenizer
from llmlab.data import Document


def test_clean_text_strips_boilerplate_markup_and_whitespace():
    raw = ("The Project Gutenberg EBook\r\n*** START OF THIS PROJECT GUTENBERG EBOOK ***\r\n"
           "<p>To  be,\tor not&nbsp;to be</p>   \r\n\r\n\r\n\r\nCafe\u0301\r\n*** END OF THIS EBOOK ***\r\nlicence")
    assert data.clean_text(raw) == "To be, or not to be\n\nCaf\u00e9"


def test_filter_length():
    docs = [Document("a", "x" * 5), Document("b", "x" * 50), Document("c", "x" * 500)]
    assert [d.id for d in data.filter_length(docs, 10, 100)] == ["b"]


def _text(seed: int, n_words: int = 300) -> str:
    g = torch.Generator().manual_seed(seed)
    vocab = [f"w{i}" for i in range(2000)]
    return " ".join(vocab[i] for i in torch.randint(0, 2000, (n_words,), generator=g).tolist())


def test_dedup_finds_planted_exact_and_near_duplicates():
    originals = [Document(f"doc{i}", _text(i)) for i in range(30)]
    words = originals[3].text.split()
    near = " ".join(words[:140] + ["changed"] + words[141:])  # one word of 300 differs
    planted = [Document("copy-of-5", originals[5].text), Document("near-3", near),
               Document("copy-of-5-again", originals[5].text)]
    kept, report = data.dedup(originals + planted)
    assert sorted(report.exact) == [("copy-of-5", "doc5"), ("copy-of-5-again", "doc5")]
    assert report.near == [("near-3", "doc3")]
    assert [d.id for d in kept] == [d.id for d in originals], "no original may be lost"
    assert report.rate == pytest.approx(3 / 33)
    assert "3 " in str(report) or "1 near" in str(report)


def test_dedup_keeps_unrelated_documents_that_share_common_words():
    docs = [Document(f"d{i}", "the cat and the dog " + _text(100 + i)) for i in range(20)]
    kept, report = data.dedup(docs)
    assert len(kept) == 20 and report.rate == 0


def test_splits_are_stable_and_independent_of_other_documents():
    docs = [Document(f"doc{i}", "") for i in range(500)]
    a, b = data.split_docs(docs, seed=3), data.split_docs(docs, seed=3)
    assert {s: [d.id for d in v] for s, v in a.items()} == {s: [d.id for d in v] for s, v in b.items()}
    assert 350 < len(a["train"]) < 450 and a["val"] and a["test"]
    fewer = data.split_docs(docs[::2], seed=3)  # removing documents never moves the others
    where = {d.id: s for s, v in a.items() for d in v}
    assert all(where[d.id] == s for s, v in fewer.items() for d in v)
    assert data.split_docs(docs, seed=4)["test"] != a["test"]
    with pytest.raises(ValueError, match="fractions"):
        data.split_docs(docs, (0.5, 0.5, 0.5))


def test_lm_corpus_dedups_editions_and_holds_out_whole_plays():
    corpus = data.lm_corpus("shakespeare")
    assert corpus == data.lm_corpus("shakespeare"), "same seed, same corpus"
    n = {s: len(v) for s, v in corpus.items()}
    assert sum(n.values()) == 42, f"one edition of each of the 42 plays, got {n}"
    assert n["val"] >= 1 and n["test"] >= 1
    train = set(corpus["train"])
    assert not any(t in train for t in corpus["val"] + corpus["test"])


def test_token_blocks_shift_by_one():
    bpe = tokenizer.train_bpe(["hello world, hello there. " * 20], 300)
    eot = bpe.token_to_id(tokenizer.EOT)
    blocks = data.TokenBlocks.from_texts(["hello world " * 30, "hello there " * 30], bpe, 8, eot)
    x, y = blocks[0]
    assert x.shape == y.shape == (8,) and x.dtype == torch.long
    assert torch.equal(x[1:], y[:-1])
    assert torch.equal(blocks[1][0][0:1], blocks[0][1][-1:]), "blocks are consecutive"
    assert eot in blocks.ids.tolist()
    with pytest.raises(IndexError):
        blocks[len(blocks)]
    with pytest.raises(ValueError, match="block"):
        data.TokenBlocks(torch.arange(5), 8)


@pytest.mark.parametrize("loader, n_classes", [(data.load_bbc_news, 5), (data.load_tweets, 3)])
def test_classification_sets_are_fixed_stratified_and_reported(loader, n_classes):
    ds = loader()
    assert len(ds.labels) == n_classes
    texts = {s: v[0] for s, v in ds.splits.items()}
    assert not set(texts["train"]) & set(texts["test"]), "no text in both train and test"
    counts = ds.balance()
    total = [sum(c[k] for c in counts.values()) for k in range(n_classes)]
    for k in range(n_classes):  # each class is split 80/10/10 on its own
        assert counts["train"][k] / total[k] == pytest.approx(0.8, abs=0.02)
    table = ds.balance_table()
    assert all(label in table for label in ds.labels) and "total" in table
    again = loader()
    assert again.splits["test"] == ds.splits["test"]
    x, y = ds.subset("train", 60)
    assert len(x) == 60 - 60 % n_classes and sorted(set(y)) == list(range(n_classes))


@pytest.mark.parametrize("make, key", [(data.instruction_pairs, "instruction"), (data.tool_episodes, "question")])
def test_generators_are_seeded_and_hold_out_a_disjoint_test_split(make, key):
    train = make(300, "train", seed=1)
    assert train == make(300, "train", seed=1)
    assert train != make(300, "train", seed=2)
    test = make(40, "test", seed=1)
    assert len({x[key] for x in train}) == 300
    assert not {x[key] for x in train} & {x[key] for x in make(40, "test", seed=9)}
    assert not {x[key] for x in make(300, "train", seed=5)} & {x[key] for x in test}
    with pytest.raises(ValueError, match="split"):
        make(3, "validation")


def test_tool_episodes_follow_the_react_format_and_answer_correctly():
    episodes = data.tool_episodes(200, "train")
    kinds = {e["tool"] for e in episodes}
    assert kinds == {"calculator", "lookup", None}
    for e in episodes:
        lines = e["transcript"].splitlines()
        assert lines[0].startswith("Thought: ") and lines[-1] == f"Final Answer: {e['answer']}"
        if e["tool"] is None:
            assert "Action:" not in e["transcript"]
            continue
        action = lines.index(f"Action: {e['tool']}")
        args = json.loads(lines[action + 1].removeprefix("Action Input: "))
        spec = next(s for s in data.TOOL_SPECS if s["name"] == e["tool"])
        assert set(args) == set(spec["parameters"]["required"])
        observation = lines[action + 2].removeprefix("Observation: ")
        if e["tool"] == "lookup":
            assert observation == agent.lookup(args["query"]) and e["answer"] in observation  # what the tool returns
            assert e["answer"].lower() not in e["transcript"].split("Observation:")[0].lower()  # no answer leaks in
        else:
            assert observation == e["answer"]
            assert all(ch in "0123456789+-*/() " for ch in args["expression"])


def test_to_messages():
    pair = {"instruction": "Say hi.", "response": "hi"}
    assert data.to_messages(pair) == [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]
    episode = data.tool_episodes(1)[0]
    msgs = data.to_messages(episode, system=data.REACT_FORMAT)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"] and msgs[2]["content"] == episode["transcript"]


def test_lab7_sets_hold_out_whole_questions_and_goals():
    from llmlab import problems

    train, test = problems.word_problems(300, "train"), problems.word_problems(100, "test")
    assert not {p["question"] for p in train} & {p["question"] for p in test}
    assert {p["kind"] for p in test} == {"pick", "total"}
    for p in test:
        if p["kind"] == "pick":  # the answer is one of the question's two quantities
            assert p["answer"] in p["question"], p
    pairs_train, pairs_test = problems.preference_pairs(200, "train"), problems.preference_pairs(60, "test")
    assert not {p["group"] for p in pairs_train} & {p["group"] for p in pairs_test}
    assert not {p["prompt"] for p in pairs_test} & {p["question"] for p in train}
    goals = {s["goal"] for s in problems.safety_prompts("test")}
    assert goals and not goals & {s["goal"] for s in problems.safety_prompts("train")}
