"""Tokenizers: text <-> integer ids, learned with byte-pair encoding (BPE).

Read top-down: a small BPE written from scratch for the lesson (`pair_counts`, `merge`,
`SimpleBPE`), then the production path (`train_bpe` with the `tokenizers` library and
`to_hf`, which wraps it for `transformers`).

Both are *byte-level*: a text is first turned into its UTF-8 bytes, so the 256 byte values
form the base vocabulary and no text is ever out of vocabulary. Emoji, accents, tabs and
runs of spaces all survive encode -> decode exactly. Each merge then adds one token for the
most frequent adjacent pair, until the vocabulary reaches the size asked for.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Iterable, Sequence

if TYPE_CHECKING:  # imported lazily: `tokenizers` and `transformers` are slow to load
    import tokenizers
    import transformers

EOT = "<|endoftext|>"  # GPT-2's document separator, our default special token
CHAT_SPECIALS = (EOT, "<|im_start|>", "<|im_end|>")  # plus ChatML's turn markers (as SmolLM2 uses)
# ChatML, as SmolLM2-Instruct's template writes it (without its default system prompt)
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# ----------------------------------------------------------------------------------------
# BPE from scratch: two small functions do all the work


def pair_counts(ids: Sequence[int]) -> dict[tuple[int, int], int]:
    """Count every adjacent pair: [1, 2, 1, 2] -> {(1, 2): 2, (2, 1): 1}."""
    return dict(Counter(zip(ids, ids[1:])))


def merge(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace each non-overlapping occurrence of `pair`, left to right, by `new_id`.

    merge([1, 1, 1], (1, 1), 9) -> [9, 1]: once a pair is merged its second id is used up.
    """
    out: list[int] = []
    i = 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def most_frequent_pair(counts: dict[tuple[int, int], int]) -> tuple[int, int]:
    """The pair with the highest count; ties go to the smallest pair (deterministic)."""
    return min(counts, key=lambda pair: (-counts[pair], pair))


class SimpleBPE:
    """Byte-level BPE in plain Python, for reading and for the lab's exercises.

    After `train`, `merges` maps (left id, right id) -> new id in the order learned, and
    `vocab` maps every id to the bytes it stands for.
    """

    def __init__(self):
        self.merges: dict[tuple[int, int], int] = {}
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}

    def train(self, text: str, vocab_size: int) -> "SimpleBPE":
        """Learn `vocab_size - 256` merges from `text` (fewer if the text runs out of pairs)."""
        if vocab_size < 256:
            raise ValueError(f"vocab_size must be >= 256 (the byte alphabet), got {vocab_size}")
        self.__init__()
        ids = list(text.encode("utf-8"))
        for new_id in range(256, vocab_size):
            counts = pair_counts(ids)
            if not counts:
                break  # the whole text is one token already
            pair = most_frequent_pair(counts)
            ids = merge(ids, pair, new_id)
            self.merges[pair] = new_id
            self.vocab[new_id] = self.vocab[pair[0]] + self.vocab[pair[1]]
        return self

    @property
    def vocab_size(self) -> int:
        """Number of ids: 256 bytes plus one per merge."""
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Text -> ids, applying the learned merges in the order they were learned."""
        ids = list(text.encode("utf-8"))
        while len(ids) >= 2:
            # Of the pairs present, the one merged earliest in training must go first:
            # later merges may be built on top of it.
            pair = min(pair_counts(ids), key=lambda p: self.merges.get(p, float("inf")))
            if pair not in self.merges:
                break
            ids = merge(ids, pair, self.merges[pair])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Ids -> text; a slice that cuts a multi-byte character shows U+FFFD there."""
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def token_strings(self, ids: Iterable[int]) -> list[str]:
        """Each id as readable text (partial UTF-8 characters shown as U+FFFD), for display."""
        return [self.vocab[i].decode("utf-8", errors="replace") for i in ids]


# ----------------------------------------------------------------------------------------
# The production tokenizer: Hugging Face `tokenizers` (Rust), same algorithm, much faster


def train_bpe(
    texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (EOT,),
) -> "tokenizers.Tokenizer":
    """Train a GPT-2-style byte-level BPE tokenizer on `texts`.

    The special tokens get the first ids (0, 1, ...), then the 256 bytes, then merges.
    `decode(encode(text).ids, skip_special_tokens=False) == text` for any text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    min_size = len(special_tokens) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (specials + 256 bytes), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # Split on GPT-2's regex (words, numbers, punctuation, spaces) so merges never cross a
    # word boundary, and map each byte to a printable character (" " -> "Ġ").
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def to_hf(
    tokenizer: "tokenizers.Tokenizer", eos_token: str = EOT, bos_token: str | None = None,
    pad_token: str | None = None, chat_template: str | None = None,
) -> "transformers.PreTrainedTokenizerFast":
    """Wrap a `tokenizers.Tokenizer` for `transformers` (save_pretrained / AutoTokenizer).

    bos and pad default to the eos token, as for GPT-2: one separator token between
    documents, and padding that the attention mask hides anyway. `chat_template` (Jinja,
    e.g. CHATML_TEMPLATE) enables `apply_chat_template`.
    """
    from transformers import PreTrainedTokenizerFast

    for name, token in (("eos_token", eos_token), ("bos_token", bos_token), ("pad_token", pad_token)):
        if token is not None and tokenizer.token_to_id(token) is None:
            raise ValueError(f"{name}={token!r} is not in the tokenizer's vocabulary")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=eos_token,
        bos_token=bos_token or eos_token,
        pad_token=pad_token or eos_token,
        clean_up_tokenization_spaces=False,  # keep " ." as " .": decode must invert encode
        chat_template=chat_template,
    )
