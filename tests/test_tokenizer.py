"""llmlab.tokenizer: the from-scratch BPE against hand-worked merges, the `tokenizers` BPE
round trip, and the Hugging Face save/load path."""
from __future__ import annotations

import pytest

from llmlab import tokenizer as tk

# Texts that break naive tokenizers: multi-byte UTF-8, emoji sequences joined by ZWJ,
# combining marks, control characters and whitespace runs.
HARD_TEXTS = [
    "",
    "a",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n\n",
    "naïve café, Zürich, São Paulo, Ελληνικά, русский, 日本語, 한국어, עברית, العربية",
    "emoji 🙂🚀 family 👨‍👩‍👧‍👦 flag 🇫🇷 skin 👍🏽",
    "combining: e\u0301 n\u0303 — zero width\u200bspace, nul\x00byte, bell\x07",
    "<|endoftext|> a special token inside text <|endoftext|>",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math: ∑ x² ≤ ∞ ≠ √2",
]
CORPUS = ["the cat sat on the mat. the dog sat on the log.", "naïve café 日本語 🙂 emoji", "aaabdaaabac"] * 20


# ----------------------------------------------------------------------------------------
# From scratch


def test_pair_counts_and_merge_by_hand():
    assert tk.pair_counts([1, 2, 1, 2]) == {(1, 2): 2, (2, 1): 1}
    assert tk.pair_counts([7]) == {} and tk.pair_counts([]) == {}
    assert tk.merge([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert tk.merge([1, 1, 1], (1, 1), 9) == [9, 1]  # non-overlapping, left to right
    assert tk.merge([1, 1, 1, 1], (1, 1), 9) == [9, 9]
    assert tk.merge([], (1, 1), 9) == []


def test_most_frequent_pair_breaks_ties_by_smallest_pair():
    assert tk.most_frequent_pair({(5, 1): 3, (2, 9): 3, (2, 3): 3, (0, 0): 1}) == (2, 3)


def test_simple_bpe_learns_the_textbook_merges():
    # Wikipedia's example "aaabdaaabac" (a=97 b=98 c=99 d=100), worked out by hand:
    # "aa" occurs 4 times -> 256; then (97,98) and (256,97) tie at 2, the smaller pair
    # (97,98) wins -> 257; then (256,257) occurs twice -> 258.
    bpe = tk.SimpleBPE().train("aaabdaaabac", vocab_size=259)
    assert bpe.merges == {(97, 97): 256, (97, 98): 257, (256, 257): 258}
    assert bpe.vocab[258] == b"aaab"
    assert bpe.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert bpe.vocab_size == 259


def test_simple_bpe_is_deterministic_and_stops_when_out_of_pairs():
    text = " ".join(CORPUS)
    first, second = tk.SimpleBPE().train(text, 300), tk.SimpleBPE().train(text, 300)
    assert list(first.merges.items()) == list(second.merges.items())
    assert len(first.merges) == 44
    tiny = tk.SimpleBPE().train("abab", 1000)
    assert tiny.encode("abab") == [max(tiny.vocab)] and len(tiny.merges) == 2
    with pytest.raises(ValueError, match="vocab_size"):
        tk.SimpleBPE().train("abc", 100)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_simple_bpe_round_trips_any_text(text):
    bpe = tk.SimpleBPE().train(" ".join(CORPUS), 320)
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert all(0 <= i < bpe.vocab_size for i in ids)
    assert len(ids) <= len(text.encode("utf-8"))


def test_simple_bpe_compresses_its_training_text():
    text = " ".join(CORPUS)
    bpe = tk.SimpleBPE().train(text, 320)
    assert len(bpe.encode(text)) < 0.4 * len(text.encode("utf-8"))
    assert bpe.decode(bpe.encode(text)) == text


# ----------------------------------------------------------------------------------------
# `tokenizers` BPE and Hugging Face


@pytest.fixture(scope="module")
def trained():
    return tk.train_bpe(CORPUS, vocab_size=400, special_tokens=(tk.EOT, "<|pad|>"))


def test_train_bpe_vocabulary_layout(trained):
    assert trained.token_to_id(tk.EOT) == 0 and trained.token_to_id("<|pad|>") == 1
    assert 2 + 256 < trained.get_vocab_size() <= 400  # specials, all bytes, then merges
    with pytest.raises(ValueError, match="vocab_size"):
        tk.train_bpe(CORPUS, vocab_size=200)


@pytest.mark.parametrize("text", HARD_TEXTS)
def test_train_bpe_round_trips_any_text(trained, text):
    ids = trained.encode(text).ids
    assert trained.decode(ids, skip_special_tokens=False) == text


def test_special_token_is_one_id(trained):
    ids = trained.encode(f"end{tk.EOT}start").ids
    assert ids.count(0) == 1


def test_to_hf_saves_and_loads_with_auto_tokenizer(trained, tmp_path):
    from transformers import AutoTokenizer

    hf = tk.to_hf(trained)
    hf.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.eos_token, loaded.bos_token, loaded.pad_token) == (tk.EOT, tk.EOT, tk.EOT)
    assert loaded.eos_token_id == loaded.pad_token_id == 0
    assert len(loaded) == trained.get_vocab_size()
    for text in HARD_TEXTS:
        ids = loaded(text)["input_ids"]
        assert ids == trained.encode(text).ids
        assert loaded.decode(ids, skip_special_tokens=False) == text
    batch = loaded(["a", "a longer text"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def test_to_hf_rejects_unknown_special_tokens(trained):
    with pytest.raises(ValueError, match="pad_token"):
        tk.to_hf(trained, pad_token="<|nope|>")
