"""The KV cache: keys and values of the tokens seen so far, so a new token costs one position of work.

A model's forward takes it as `past_key_values` (as Hugging Face models take a `DynamicCache`)
and appends the new tokens' keys and values layer by layer; `llmlab.generate` and
`llmlab.serve` keep the padding mask of a batch with it and reshape it as requests come and go.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # transformers is slow to import; only Hugging Face models need it
    import transformers


class KVCache:
    """Keys and values of every layer for the tokens seen so far, with their padding mask.

    Per layer: keys and values (B, n_kv_heads, L, head_dim); `mask` (B, L) is 1 for a real
    token and 0 for padding. A decoding step appends one position per row; `crop` forgets
    the last positions (speculative decoding rejects drafts), `select` keeps some rows (a
    finished request leaves the batch) and `cat` stacks caches of different lengths by
    left-padding the shorter ones (a request joins a running batch).

    Appending writes in place: each layer's keys and values are the first L positions of a
    larger buffer, so a decoding step copies only its new position instead of the whole past
    (a `torch.cat` per layer per step). A buffer that is full grows by half its length; every
    operation that replaces the tensors (`crop`, `select`, `pad_left`, ...) lets it go.
    """

    def __init__(self):
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.mask: Tensor | None = None  # (B, L) long
        self._buffers: dict[int, tuple[Tensor, Tensor]] = {}  # layer -> (keys, values) (B, H, capacity, d)

    def __len__(self) -> int:
        """Number of positions held (padding included)."""
        return 0 if self.mask is None else self.mask.size(1)

    def get_seq_length(self) -> int:
        """Number of positions whose keys and values are held (what a model's forward continues from)."""
        return self.keys[0].size(-2) if self.keys else 0

    def copy(self) -> "KVCache":
        """The same tensors in new lists: extending the copy leaves this cache as it is."""
        out = KVCache()
        out.keys, out.values, out.mask = list(self.keys), list(self.values), self.mask
        return out  # without buffers: the copy's appends allocate its own

    def expand(self, batch: int) -> "KVCache":
        """A cache of `batch` rows, each this one-row cache: views of its tensors until extended."""
        if self.batch_size != 1:
            raise ValueError(f"only a one-row cache expands, this one has {self.batch_size} rows")
        out = KVCache()
        out.keys = [k.expand(batch, *k.shape[1:]) for k in self.keys]
        out.values = [v.expand(batch, *v.shape[1:]) for v in self.values]
        out.mask = self.mask.expand(batch, -1)
        return out

    @property
    def batch_size(self) -> int:
        """Number of rows (sequences)."""
        return 0 if self.mask is None else self.mask.size(0)

    def extend_mask(self, attention_mask: Tensor) -> Tensor:
        """Record the (B, T) mask of the tokens about to be added; return the (B, L + T) mask of all."""
        self.mask = attention_mask if self.mask is None else torch.cat([self.mask, attention_mask], dim=1)
        return self.mask

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append the new keys and values (B, H, T, d) of `layer`; return all of them (B, H, L + T, d)."""
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
            return k, v
        past, T = self.keys[layer].size(-2), k.size(-2)
        buffers = self._buffers.get(layer)
        if buffers is None or buffers[0].size(-2) < past + T:
            capacity = past + T + max(64, (past + T) // 2)
            buffers = tuple(x.new_empty(*x.shape[:-2], capacity, x.size(-1)) for x in (k, v))
            buffers[0][..., :past, :].copy_(self.keys[layer])
            buffers[1][..., :past, :].copy_(self.values[layer])
            self._buffers[layer] = buffers
        buffers[0][..., past:past + T, :].copy_(k)
        buffers[1][..., past:past + T, :].copy_(v)
        self.keys[layer], self.values[layer] = buffers[0][..., :past + T, :], buffers[1][..., :past + T, :]
        return self.keys[layer], self.values[layer]

    def as_hf_cache(self, config: "transformers.PretrainedConfig") -> "transformers.DynamicCache":
        """This cache as a Hugging Face `DynamicCache` for `config`'s model: its layers append here, in place.

        HF's own layers grow by `torch.cat`, copying the whole past at every step (a third of
        a decoding step's time for SmolLM2 behind a 350-token system prompt); these write into
        this cache's buffers instead, so the model's forward extends this cache directly.
        """
        from transformers import DynamicCache

        hf_cache = DynamicCache(config=config)
        if any(type(layer) is not _hf_layer_class().__base__ for layer in hf_cache.layers):
            raise ValueError("KVCache holds full-attention layers only (this model has sliding-window layers)")
        hf_cache.layers = [_hf_layer_class()(self, i) for i in range(len(hf_cache.layers))]
        return hf_cache

    def crop(self, length: int) -> None:
        """Keep the first `length` positions."""
        self.keys = [k[..., :length, :] for k in self.keys]
        self.values = [v[..., :length, :] for v in self.values]
        self._buffers = {}
        if self.mask is not None:
            self.mask = self.mask[:, :length]

    def select(self, rows: Sequence[int] | Tensor) -> None:
        """Keep only `rows` (in that order), then drop leading positions that are padding in every row."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.mask.device)
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self._buffers = {}
        self.mask = self.mask[rows]
        if self.mask.size(0):
            leading = int((self.mask.sum(0) > 0).long().argmax())  # first position some row uses
            if leading:
                self.crop_left(leading)

    def crop_left(self, n: int) -> None:
        """Drop the first `n` positions (padding in every row)."""
        self.keys = [k[..., n:, :] for k in self.keys]
        self.values = [v[..., n:, :] for v in self.values]
        self._buffers = {}
        self.mask = self.mask[:, n:]

    def pad_left(self, n: int) -> None:
        """Prepend `n` padding positions (zero keys and values, mask 0) to every row."""
        if n == 0:
            return
        self.keys = [F.pad(k, (0, 0, n, 0)) for k in self.keys]
        self.values = [F.pad(v, (0, 0, n, 0)) for v in self.values]
        self._buffers = {}
        self.mask = F.pad(self.mask, (n, 0))

    @staticmethod
    def cat(caches: Sequence["KVCache"]) -> "KVCache":
        """One cache holding the rows of all `caches`, left-padded to the longest."""
        caches = [c for c in caches if c.batch_size]
        length = max(len(c) for c in caches)
        padded = []
        for c in caches:
            c = c.copy()
            c.pad_left(length - len(c))
            padded.append(c)
        out = KVCache()
        out.keys = [torch.cat(layer, dim=0) for layer in zip(*(c.keys for c in padded))]
        out.values = [torch.cat(layer, dim=0) for layer in zip(*(c.values for c in padded))]
        out.mask = torch.cat([c.mask for c in padded], dim=0)
        return out


@functools.cache
def _hf_layer_class() -> type:
    """The Hugging Face cache layer behind `KVCache.as_hf_cache`, made on first use (no transformers import before)."""
    from transformers.cache_utils import DynamicLayer

    class KVCacheLayer(DynamicLayer):
        """One layer of a `KVCache`, seen by a Hugging Face model as a `DynamicLayer`."""

        def __init__(self, cache: KVCache, index: int):
            super().__init__()
            self.cache, self.index = cache, index
            if index < len(cache.keys):
                self.keys, self.values = cache.keys[index], cache.values[index]
                self.device, self.is_initialized = self.keys.device, True

        def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
            self.device, self.is_initialized = key_states.device, True
            self.keys, self.values = self.cache.update(self.index, key_states, value_states)
            return self.keys, self.values

    return KVCacheLayer
