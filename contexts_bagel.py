"""KV-cache contexts: the keys/values of several sequences packed back to back, and the cache
step that merges a forward's new tokens into them.

A `BagelContext` is immutable: adding text or an image returns a new context, so the guidance
branches of the reference (the context without the latest text, the context without images) are
just earlier context objects, with no copy. All sequences of a batch advance together, each with its
own length and rope position. The decoder's `cache=` argument is a `KVCacheStep`: this module's
`CacheStep` (prefill and image steps), decoding_bagel's `DecodeCache`, parallel_bagel's `UlyssesShard`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from .attention_bagel import AttentionPlan
from .ops_bagel import packed_attention


@runtime_checkable
class KVCacheStep(Protocol):
    """What the decoder's `cache=` argument provides: each layer's attention over the cached
    tokens and the new ones."""

    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan | None
    ) -> torch.Tensor:
        """q (N, H, D), k, v (N, H_kv, D) of the new tokens -> their attention output (N, H, D)."""
        ...


@dataclass(frozen=True)
class SpecialTokenIds:
    bos: int
    eos: int
    start_of_image: int
    end_of_image: int


@dataclass(frozen=True)
class BagelContext:
    """Keys/values of B sequences packed back to back, per layer ((T, kv_heads, head_dim) each),
    with each sequence's cached length and next rope position."""

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    lengths: tuple[int, ...]
    positions: tuple[int, ...]

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @classmethod
    def concat(cls, contexts: list[BagelContext]) -> BagelContext:
        """The sequences of several contexts as one batch (one copy of the caches)."""
        if len(contexts) == 1:
            return contexts[0]
        return cls(
            tuple(torch.cat(layer) for layer in zip(*(c.keys for c in contexts))),
            tuple(torch.cat(layer) for layer in zip(*(c.values for c in contexts))),
            sum((c.lengths for c in contexts), ()),
            sum((c.positions for c in contexts), ()),
        )

    def select(self, indices: list[int]) -> BagelContext:
        """A context holding only the given sequences."""
        starts = [0]
        for n in self.lengths:
            starts.append(starts[-1] + n)
        device = self.keys[0].device
        rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=device) for i in indices])
        return BagelContext(
            tuple(k.index_select(0, rows.to(k.device)) for k in self.keys),
            tuple(v.index_select(0, rows.to(v.device)) for v in self.values),
            tuple(self.lengths[i] for i in indices),
            tuple(self.positions[i] for i in indices),
        )


def advance(context: BagelContext, steps: list[int]) -> BagelContext:
    """The same context with each sequence's next rope position moved on."""
    positions = tuple(p + s for p, s in zip(context.positions, steps))
    return BagelContext(context.keys, context.values, context.lengths, positions)


class CacheStep:
    """Merges the new tokens' keys/values into the cached ones, sequence by sequence, for one
    forward; with `store` it also keeps them to build the next context."""

    def __init__(self, context: BagelContext, new_lengths: list[int], store: bool):
        self.context, self.store = context, store
        device = context.keys[0].device
        old_dest, new_dest, start = [], [], 0
        for old, new in zip(context.lengths, new_lengths):
            old_dest.append(torch.arange(start, start + old))
            new_dest.append(torch.arange(start + old, start + old + new))
            start += old + new
        self.total = start
        self.old_dest = torch.cat(old_dest).to(device)
        self.new_dest = torch.cat(new_dest).to(device)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def _merge(self, cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        if cached.shape[0] == 0:
            return new
        merged = new.new_empty((self.total,) + new.shape[1:])
        # .to(): a no-op unless the model is spread over devices (each layer's cache stays on its own).
        old_dest, new_dest = self.old_dest.to(new.device), self.new_dest.to(new.device)
        return merged.index_copy(0, old_dest, cached.to(new.dtype)).index_copy(0, new_dest, new)

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
        k = self._merge(self.context.keys[layer_idx], k)
        v = self._merge(self.context.values[layer_idx], v)
        if self.store:
            self.keys.append(k)
            self.values.append(v)
        return packed_attention(q, k, v, plan)
