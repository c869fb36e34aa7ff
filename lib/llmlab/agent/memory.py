"""Retrieval memory: MiniLM sentence embeddings in a faiss inner-product index.

Add texts, search the top k by meaning, forget by age or importance, compress old records
with a summariser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    import numpy as np


class TextEncoder:
    """Sentence embeddings from a BERT-style encoder: mean of the token vectors, L2-normalised."""

    def __init__(self, name: str = "minilm-l6", device: str = "cpu", batch_size: int = 64):
        from transformers import AutoModel, AutoTokenizer

        from llmlab import assets

        path = assets.resolve(name)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.batch_size = device, batch_size
        self.dim = self.model.config.hidden_size

    def encode(self, texts: Sequence[str]) -> "np.ndarray":
        """(n, dim) float32 unit vectors, one per text; cosine similarity is then a dot product."""
        import numpy as np
        import torch

        from llmlab.lora import mean_pool

        out = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True, truncation=True,
                                       max_length=256, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state  # (B, T, dim)
                pooled = mean_pool(hidden, batch["attention_mask"])  # (B, dim)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32)


@dataclass
class MemoryRecord:
    """One remembered text, when it was added (the memory's clock) and how much it matters."""

    id: int
    text: str
    importance: float
    added: int  # value of the memory's clock when added; age = clock - added


class Memory:
    """Long-term memory for an agent: add texts, search by meaning, forget, compress.

    Vectors live in a faiss `IndexFlatIP` (exact inner-product search); the encoder returns
    unit vectors, so the inner product is the cosine similarity. Row i of the index is
    `records[i]`; forgetting rebuilds the index from the records kept.
    """

    def __init__(self, encoder: TextEncoder):
        import faiss
        import numpy as np

        self.encoder = encoder
        self.index = faiss.IndexFlatIP(encoder.dim)
        self.records: list[MemoryRecord] = []
        self.vectors = np.zeros((0, encoder.dim), dtype=np.float32)  # (n, dim), row i = records[i]
        self.clock = 0  # one tick per record added
        self._next_id = 0

    def __len__(self) -> int:
        return len(self.records)

    def add(self, texts: str | Sequence[str], importance: float = 1.0) -> list[int]:
        """Remember one text or several (encoded in one batch); return their ids."""
        import numpy as np

        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return []
        vectors = self.encoder.encode(texts)
        ids = []
        for text in texts:
            self.records.append(MemoryRecord(self._next_id, text, float(importance), self.clock))
            ids.append(self._next_id)
            self._next_id += 1
            self.clock += 1
        self.vectors = np.concatenate([self.vectors, vectors])
        self.index.add(vectors)
        return ids

    def search(self, query: str, k: int = 3) -> list[tuple[MemoryRecord, float]]:
        """The k records most similar to `query`, best first, with their cosine similarity."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if not self.records:
            return []
        scores, rows = self.index.search(self.encoder.encode([query]), min(k, len(self.records)))
        return [(self.records[r], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]

    def forget(self, max_age: int | None = None, min_importance: float | None = None) -> int:
        """Drop records older than `max_age` ticks or less important than `min_importance`; return how many."""
        keep = [i for i, r in enumerate(self.records)
                if (max_age is None or self.clock - r.added <= max_age)
                and (min_importance is None or r.importance >= min_importance)]
        dropped = len(self.records) - len(keep)
        self._keep(keep)
        return dropped

    def compress(self, summarise: Callable[[list[str]], str], keep_recent: int) -> MemoryRecord | None:
        """Replace all but the `keep_recent` newest records by one record `summarise(their texts)`.

        The hook for summarise-to-compress: `summarise` may be a language model call or any
        function. The summary gets the highest importance of what it replaces and counts as
        new. Returns the summary record (None when there was nothing to compress).
        """
        if keep_recent < 0:
            raise ValueError(f"keep_recent must be >= 0, got {keep_recent}")
        old = self.records[: max(0, len(self.records) - keep_recent)]
        if len(old) < 2:
            return None
        summary = summarise([r.text for r in old])
        self._keep(list(range(len(old), len(self.records))))
        self.add(summary, importance=max(r.importance for r in old))
        return self.records[-1]

    def _keep(self, rows: list[int]) -> None:
        self.records = [self.records[i] for i in rows]
        self.vectors = self.vectors[rows]
        self.index.reset()
        self.index.add(self.vectors)
