"""Text decoding's engine: a preallocated KV cache written in place (`DecodeCache`), a decode step
kept at one shape and replayed as a CUDA graph on the GPU (`DecodeRunner`), the runners kept
across calls (`DecodePool`), and token sampling. `BagelGenerationMixin.generate_text_ids` drives them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
import torch.nn.functional as F

from .attention_bagel import to_device
from .contexts_bagel import BagelContext
from .ops_bagel import decode_attention, graph_branches


class DecodeCache:
    """A preallocated cache for decoding one token per sequence per step: (B, capacity, kv_heads,
    head_dim) per layer, written in place, so every step has the same shapes and runs as one CUDA
    graph on the GPU; `load` starts it over from another context, so one cache serves every call
    of its shape. Attention is exact, over each sequence's cached prefix and new token; rows past a
    sequence's length hold stale (finite) values that are never read.

    On the GPU one kernel call serves all sequences: sequence b's keys are its slot of `capacity`
    rows, of which the kernel reads the first length + 1 (`used_keys`), its query heads grouped by
    kv head and the keys split across the GPU: our Triton `decode_attention`, else torch's varlen
    flash kernel (bf16/fp16; 27 us a layer for one request on an H100, against 113 us for SDPA
    with a mask). Elsewhere SDPA with a mask does the same; `attn_implementation="eager"`, a
    matmul-softmax with the mask. Which runs is `ops_bagel.decode_attention`'s choice."""

    def __init__(self, batch: int, capacity: int, num_layers: int, like: torch.Tensor):
        """`like`: a (T, kv_heads, head_dim) tensor with the cache's dtype and device."""
        heads, dim = like.shape[1:]
        device = like.device
        self.capacity = capacity
        # Zeros, not empty: masked SDPA multiplies unused rows by a zero weight, so they must be finite.
        self.keys = [like.new_zeros(batch, capacity, heads, dim) for _ in range(num_layers)]
        self.values = [like.new_zeros(batch, capacity, heads, dim) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros_like(self.lengths)
        self.rows = torch.arange(batch, device=device)
        # the segments of torch's varlen kernel (`ops_bagel.decode_attention`): one query, one slot each
        self.cu_queries = torch.arange(batch + 1, dtype=torch.int32, device=device)
        self.cu_keys = self.cu_queries * capacity
        self.write_rows = self.used_keys = self.mask = None  # set each step (begin_step)

    def load(self, context: BagelContext) -> None:
        """Start over from `context`'s sequences: their keys/values copied into the slots, without
        waiting for the GPU."""
        device = self.rows.device
        self.lengths.copy_(to_device(list(context.lengths), device))
        self.positions.copy_(to_device(list(context.positions), device))
        total = sum(context.lengths)
        seq = torch.repeat_interleave(self.rows, self.lengths, output_size=total)  # packed row -> sequence
        slot = torch.arange(total, device=device) - F.pad(self.lengths.cumsum(0), (1, 0))[seq]
        for cache, packed in zip(self.keys + self.values, context.keys + context.values):
            cache[seq, slot] = packed.to(cache.dtype)

    def begin_step(self) -> None:
        """What each sequence sees this step; shared by all layers. Where its token goes and the
        SDPA mask are made when first needed (the Triton attention needs neither)."""
        self.used_keys = (self.lengths + 1).int()
        self.write_rows = self.mask = None

    def rows_to_write(self) -> torch.Tensor:
        """(B,): the flat cache row of each sequence's new token (made once a step)."""
        if self.write_rows is None:
            self.write_rows = self.rows * self.capacity + self.lengths
        return self.write_rows

    def sdpa_mask(self) -> torch.Tensor:
        """(B, 1, 1, capacity): 0 on the keys each sequence sees, -inf past them (made once a step)."""
        if self.mask is None:
            slots = torch.arange(self.capacity, device=self.rows.device)
            hidden = slots[None, :] > self.lengths[:, None]
            mask = torch.zeros(hidden.shape, dtype=self.keys[0].dtype, device=hidden.device)
            self.mask = mask.masked_fill(hidden, float("-inf"))[:, None, None]
        return self.mask

    def end_step(self) -> None:
        self.lengths += 1
        self.positions += 1

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
        """q (B, H, D), k, v (B, H_kv, D): one new token per sequence -> (B, H, D)."""
        return decode_attention(self, layer_idx, q, k, v)


# How many decode steps the host may queue before it reads a step's tokens (GPU only). The host
# never waits for the step it just queued, so the GPU runs steps back to back; the price is up to
# this many steps decoded past the point where every sequence has finished.
_HOST_LAG = 4


class DecodeRunner:
    """Decoding at one shape, kept across calls: the cache, the static token buffer `tokens` (B,)
    that the step reads and into which it writes the greedy choice (so greedy decoding feeds
    itself), and pinned host slots that each step's tokens are copied to.

    With `graph_stream` (a CUDA device) the step is a CUDA graph: the first step of the runner's
    life runs eagerly on that side stream (the warm-up a capture needs, doing real work), the
    second is captured on it, and every later step, of this call and of later ones, replays it
    (launching ~1000 small kernels a step one by one would dominate decoding). One set of streams
    (the capture stream and two for parallel branches) serves every runner of a model: each new
    stream gets its own cuBLAS workspace (32 MiB on Hopper) and its own cached blocks, which stay
    allocated for the life of the process."""

    def __init__(self, step, cache: DecodeCache, tokens: torch.Tensor, streams: tuple | None, on_capture=None):
        """`streams` (None on the CPU or to decode eagerly): the stream the graph is captured on, then
        the side streams of its parallel branches (`graph_branches`)."""
        self._step, self.cache, self.tokens = step, cache, tokens
        self.graph_stream, self.branch_streams = (streams[0], streams[1:]) if streams else (None, ())
        self._on_capture = on_capture
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # the graph's output
        self.warmed_up = False
        self.done: torch.cuda.Event | None = None  # recorded after the last step of the last call
        self.lag = _HOST_LAG if tokens.is_cuda else 0
        if tokens.is_cuda:  # lag + 1 slots: a slot is written again only after the host has read it
            self.host = torch.empty((self.lag + 1, tokens.shape[0]), dtype=torch.long, pin_memory=True)
            self.ready = [torch.cuda.Event() for _ in range(self.lag + 1)]
            self.copies = 0

    @property
    def nbytes(self) -> int:
        """GPU (or CPU) memory the runner holds: its cache, and the graph's outputs and state."""
        cache = self.cache
        held = [*cache.keys, *cache.values, self.tokens, self.logits, cache.write_rows, cache.used_keys, cache.mask]
        return sum(t.numel() * t.element_size() for t in held if t is not None)

    def start(self, context: BagelContext, bos: int) -> None:
        if self.done is not None:  # the last call (maybe on another stream) may still be stepping
            torch.cuda.current_stream().wait_event(self.done)
        self.cache.load(context)
        self.tokens.fill_(bos)

    def finish(self) -> None:
        """Mark the end of this call's steps: the GPU may still run the last few (the host lag)."""
        if self.tokens.is_cuda:
            self.done = torch.cuda.Event()
            self.done.record()

    def release(self) -> None:
        """Wait until the GPU is done with this runner, so that it can be dropped."""
        if self.done is not None:
            self.done.synchronize()

    def step(self) -> torch.Tensor:
        """One token per sequence: advances the cache, leaves the greedy choice in `tokens` and
        returns the logits (B, vocab) in float32, valid until the next step."""
        if self.graph_stream is None:
            return self._step()
        main = torch.cuda.current_stream()
        if not self.warmed_up:
            self.graph_stream.wait_stream(main)
            with torch.cuda.stream(self.graph_stream):
                logits = self._step()
            main.wait_stream(self.graph_stream)
            logits.record_stream(main)
            self.warmed_up = True
            return logits
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads may keep using the GPU (eagerly) during the capture.
            with (
                torch.cuda.graph(graph, stream=self.graph_stream, capture_error_mode="thread_local"),
                graph_branches(self.branch_streams),
            ):
                logits = self._step()
            self.graph, self.logits = graph, logits
            if self._on_capture is not None:
                self._on_capture()
        self.graph.replay()
        return self.logits

    def tokens_to_host(self) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Start copying this step's tokens to the host, without waiting: (host tensor, ready event)."""
        if not self.tokens.is_cuda:
            return self.tokens.clone(), None
        slot = self.copies % len(self.ready)
        self.copies += 1
        self.host[slot].copy_(self.tokens, non_blocking=True)
        self.ready[slot].record()
        return self.host[slot], self.ready[slot]


def capacity_bucket(rows: int) -> int:
    """Cache rows for `rows` tokens, rounded up to the next of 64, 96, 128, 192, 256, 384, ...
    (powers of two and their midpoints: at most 1.5x the rows, few distinct shapes)."""
    bucket = 64
    while bucket < rows:
        bucket = bucket * 3 // 2 if bucket & (bucket - 1) == 0 else bucket * 4 // 3
    return bucket


class DecodePool:
    """Decode runners kept across `generate_text_ids` calls, keyed by shape (batch size, capacity
    bucket, dtype, device, graphed), least recently used dropped first. At most `max_entries`
    runners and `max_bytes` of KV cache (None: an eighth of the GPU's memory, 1 GiB on the CPU); a
    runner bigger than that serves its call and is dropped, leaving the others. Built for one set
    of decoder weights: when their storage changes (moved, cast, replaced, adapters added) the pool
    starts over. `lock` serialises decoding on the model. Pickling or deep-copying the model gives
    an empty pool."""

    def __init__(self, max_entries: int = 16, max_bytes: int | None = None):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.lock = threading.RLock()
        self.runners: OrderedDict[tuple, DecodeRunner] = OrderedDict()
        self.weights: tuple | None = None
        self.captures = 0  # CUDA graphs captured, over the pool's life
        self._streams: dict[torch.device, tuple[torch.cuda.Stream, ...]] = {}

    def __reduce__(self):
        return DecodePool, (self.max_entries, self.max_bytes)

    @property
    def nbytes(self) -> int:
        """Memory held by the kept runners (mostly their KV caches)."""
        return sum(runner.nbytes for runner in self.runners.values())

    def clear(self) -> None:
        for runner in self.runners.values():
            runner.release()
        self.runners.clear()
        self.weights = None

    def byte_limit(self, device: torch.device) -> int:
        if self.max_bytes is not None:
            return self.max_bytes
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory // 8
        return 1 << 30

    def graph_streams(self, device: torch.device) -> tuple[torch.cuda.Stream, ...]:
        """The capture stream and the two branch streams (k and v beside q) of every runner here."""
        if device not in self._streams:
            self._streams[device] = tuple(torch.cuda.Stream(device) for _ in range(3))
        return self._streams[device]

    def count_capture(self) -> None:
        self.captures += 1

    def get(self, key: tuple, nbytes: int, weights: tuple, build) -> DecodeRunner:
        """The runner for `key`, built by `build()` (after making room for its `nbytes`) if missing."""
        if weights != self.weights:
            self.clear()
            self.weights = weights
        runner = self.runners.pop(key, None)
        if runner is None:
            limit = self.byte_limit(key[3])
            if nbytes > limit or self.max_entries == 0:
                return build()  # serves this call only; the kept runners stay
            while len(self.runners) >= self.max_entries or self.nbytes + nbytes > limit:
                self.runners.popitem(last=False)[1].release()  # free memory before allocating the new cache
            runner = build()
        self.runners[key] = runner
        return runner


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, generators: list) -> torch.Tensor:
    """Sampling with temperature and nucleus (top-p) filtering, each row with its own generator.
    logits (B, vocab) -> (B,)."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    if all(g is None for g in generators):
        return torch.multinomial(probs, 1).squeeze(1)
    rows = [
        torch.multinomial(p.to(g.device if g else p.device), 1, generator=g).to(logits.device)
        for p, g in zip(probs, generators)
    ]
    return torch.cat(rows)
