"""Packed attention for both BAGEL towers, without padding.

Every attention BAGEL needs is a set of *segments*: segment i's queries attend a contiguous run of
keys, either fully or causally (causal aligned bottom-right, so queries appended after a cache see
the whole cache). A ViT batch is one segment per image; a KV-cached step is one segment per
sequence (cache + new tokens); a training pack is one segment per split, whose keys are the earlier
visible splits of its sample plus itself (gathered, so `noise` splits stay invisible to later
ones). `AttentionPlan` holds one or two groups of segments (causal and full), each run by a single
kernel call where one exists. This module holds the plans and the attention kernels over a
group's segments (`varlen_kernel`, `sdpa_per_segment`, `eager_per_segment`); which one runs is
decided by `ops_bagel.packed_attention`.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class SegmentGroup:
    """Segments run by one kernel call.

    `q_index` / `k_index` pick the group's query / key rows out of the packed tensors, in segment
    order (None: all rows, already in order). `q_lens[i]` queries attend `k_lens[i]` keys.
    """

    def __init__(
        self,
        q_lens: list[int],
        k_lens: list[int],
        causal: bool,
        q_index: torch.Tensor | None = None,
        k_index: torch.Tensor | None = None,
    ):
        self.q_lens, self.k_lens, self.causal = list(q_lens), list(k_lens), causal
        self.q_index, self.k_index = q_index, k_index
        self.max_q = max(self.q_lens, default=0)
        self.max_k = max(self.k_lens, default=0)
        self._cu: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_offsets(cls, cu_seqlens: torch.Tensor, max_len: int) -> SegmentGroup:
        """Full-attention segments given by offsets already on the device, `max_len` an upper bound
        on the longest: the varlen kernels need nothing else, so nothing waits for the GPU. (Only
        the per-segment fallback reads the lengths back.)"""
        group = cls([], [], causal=False)
        group.q_lens = group.k_lens = None
        group.max_q = group.max_k = max_len
        group._cu[cu_seqlens.device] = (cu_seqlens, cu_seqlens)
        return group

    def lengths(self) -> tuple[list[int], list[int]]:
        """Host query / key lengths (a host sync for a group made `from_offsets`)."""
        if self.q_lens is None:
            ((offsets, _),) = self._cu.values()
            self.q_lens = self.k_lens = offsets.diff().tolist()
        return self.q_lens, self.k_lens

    def cu_seqlens(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Cumulative query / key offsets (int32, n + 1), made once per device."""
        if device not in self._cu:
            offsets = lambda lens: to_device([0, *itertools.accumulate(lens)], device, torch.int32)
            q_lens, k_lens = self.lengths()
            self._cu[device] = (offsets(q_lens), offsets(k_lens))
        return self._cu[device]

    def in_storage_order(self, position: torch.Tensor) -> SegmentGroup:
        """The same segments over tokens stored elsewhere: packed row r lives at `position[r]`."""
        group = copy.copy(self)  # shares the offsets
        group.q_index = position if self.q_index is None else position[self.q_index]
        group.k_index = position if self.k_index is None else position[self.k_index]
        return group


def to_device(values: list[int], device: torch.device | str, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Host ints (or bools) as a tensor on `device`. To a GPU the copy goes through pinned memory, so that it
    does not wait for the work already queued there (a plain copy would)."""
    tensor = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class AttentionPlan:
    """Which queries attend which keys, as groups of varlen segments."""

    groups: list[SegmentGroup]

    @classmethod
    def segments(cls, q_lens: list[int], k_lens: list[int] | None = None, causal: bool = False) -> AttentionPlan:
        """One segment per sequence: the common case (ViT images, cached steps)."""
        return cls([SegmentGroup(q_lens, k_lens if k_lens is not None else q_lens, causal)])

    @classmethod
    def from_offsets(cls, cu_seqlens: torch.Tensor, max_len: int) -> AttentionPlan:
        """Full attention within each segment of device offsets `cu_seqlens`, `max_len` an upper
        bound on the longest (`SegmentGroup.from_offsets`)."""
        return cls([SegmentGroup.from_offsets(cu_seqlens, max_len)])

    def in_storage_order(self, position: torch.Tensor) -> AttentionPlan:
        """This plan over tokens stored in another order: packed row r lives at row `position[r]`
        (the decoder's route order), so attention reads and writes them where they are."""
        return AttentionPlan([group.in_storage_order(position) for group in self.groups])

    @classmethod
    def from_splits(
        cls, split_lens: list[int], attn_modes: list[str], sample_lens: list[int], device: torch.device
    ) -> AttentionPlan:
        """The reference's packed training mask: samples never see each other; a split sees the
        earlier splits of its sample except `noise` ones, and itself causally (`causal`) or fully
        (`full`, `noise`)."""
        if len(split_lens) != len(attn_modes):
            raise ValueError(f"split_lens has {len(split_lens)} entries but attn_modes has {len(attn_modes)}.")
        if sum(split_lens) != sum(sample_lens):
            raise ValueError(
                f"split_lens add up to {sum(split_lens)} tokens but sample_lens to {sum(sample_lens)}: "
                "every sample must be cut into splits exactly."
            )
        sample_ends = set(torch.tensor(sample_lens).cumsum(0).tolist())
        parts = {True: ([], [], [], []), False: ([], [], [], [])}  # causal -> q rows, k rows, lens
        visible: list[range] = []  # earlier splits of the current sample that later ones may see
        start = 0
        for length, mode in zip(split_lens, attn_modes):
            if mode not in ("causal", "full", "noise"):
                raise ValueError(f"Unknown attention mode {mode!r}; expected 'causal', 'full' or 'noise'.")
            rows = range(start, start + length)
            keys = [i for r in visible for i in r] + list(rows)
            q_rows, k_rows, q_lens, k_lens = parts[mode == "causal"]
            q_rows.extend(rows)
            k_rows.extend(keys)
            q_lens.append(length)
            k_lens.append(len(keys))
            if mode != "noise":
                visible.append(rows)
            start += length
            if start in sample_ends:
                visible = []
        if start not in sample_ends and start != 0:
            raise ValueError("The last split does not end where the last sample ends.")
        as_index = lambda rows: to_device(rows, device)
        groups = [
            SegmentGroup(q_lens, k_lens, causal, as_index(q_rows), as_index(k_rows))
            for causal, (q_rows, k_rows, q_lens, k_lens) in parts.items()
            if q_lens
        ]
        for group in groups:  # made now, not in the middle of the forward
            group.cu_seqlens(torch.device(device))
        return cls(groups)


def take(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """x's rows at `index` (all of x for None): a segment group's queries or keys."""
    return x if index is None else x.index_select(0, index)


def varlen_kernel(
    q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool = False, used_k: torch.Tensor | None = None
) -> torch.Tensor:
    """torch's varlen flash kernel over segments given by device offsets (`max_q` / `max_k` may be
    upper bounds); fewer KV heads than query heads are native, causal is aligned bottom-right.
    `used_k` (int32, one per segment) reads only the first `used_k[i]` keys of key segment i: a
    preallocated cache holds each sequence in a fixed-size slot of which it fills a prefix.

    This is the op that `torch.nn.attention.varlen.varlen_attn` wraps, called directly: that
    wrapper is a Python custom op whose backward waits for the GPU and which costs about 0.4 ms of
    host time a call, against 0.06 ms here (the op's backward is C++); a training step makes 84 of
    them (bench/train_step.py: 280 -> 272 ms on an H100)."""
    return torch.ops.aten._flash_attention_forward(
        q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, seqused_k=used_k
    )[0]


def sdpa_per_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: SegmentGroup) -> torch.Tensor:
    """Exact attention with `scaled_dot_product_attention`, one segment at a time (CPU, float32,
    no varlen kernel, or cuDNN first)."""
    gqa = q.shape[1] != k.shape[1]
    outputs, q_start, k_start = [], 0, 0
    for q_len, k_len in zip(*group.lengths()):
        q_s = q[q_start : q_start + q_len].transpose(0, 1)[None]  # (1, heads, len, dim)
        k_s = k[k_start : k_start + k_len].transpose(0, 1)[None]
        v_s = v[k_start : k_start + k_len].transpose(0, 1)[None]
        mask = None
        if group.causal:  # bottom-right aligned: query i sees keys up to i + (k_len - q_len)
            rows = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
            mask = torch.arange(k_len, device=q.device)[None, :] <= rows
        out = F.scaled_dot_product_attention(q_s, k_s, v_s, attn_mask=mask, enable_gqa=gqa)
        outputs.append(out[0].transpose(0, 1))
        q_start, k_start = q_start + q_len, k_start + k_len
    return torch.cat(outputs, dim=0) if outputs else q.new_empty(q.shape)


def eager_per_segment(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: SegmentGroup) -> torch.Tensor:
    """Plain attention, one segment at a time: softmax(q k^T / sqrt(dim)) v with the scores'
    softmax in float32 and no fused kernel (`attn_implementation="eager"`: the reference path,
    and what to debug against)."""
    outputs, q_start, k_start = [], 0, 0
    for q_len, k_len in zip(*group.lengths()):
        q_s = q[q_start : q_start + q_len].transpose(0, 1)  # (heads, len, dim)
        k_s = k[k_start : k_start + k_len].transpose(0, 1)
        v_s = v[k_start : k_start + k_len].transpose(0, 1)
        mask = None
        if group.causal:  # bottom-right aligned: query i sees keys up to i + (k_len - q_len)
            rows = torch.arange(q_len, device=q.device)[:, None] + (k_len - q_len)
            mask = torch.arange(k_len, device=q.device)[None, :] <= rows
        outputs.append(eager_attention(q_s, k_s, v_s, mask).transpose(0, 1))
        q_start, k_start = q_start + q_len, k_start + k_len
    return torch.cat(outputs, dim=0) if outputs else q.new_empty(q.shape)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(dim)) v for q (..., heads, Lq, dim), k, v (..., kv_heads, Lk, dim), the
    query heads of one kv head consecutive; `mask` (boolean, True where a query sees a key)
    broadcasts over the scores (..., heads, Lq, Lk). In q's dtype, the softmax in float32."""
    group = q.shape[-3] // k.shape[-3]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=-3), v.repeat_interleave(group, dim=-3)
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


class TokenRoute:
    """Which packed tokens use GEN weights; the rest use UND weights.

    Inside the decoder the tokens are kept grouped by route: all UND tokens first, then all GEN
    tokens, each group in packed order (`sort` on the way in, `unsort` on the way out). Every
    routed op is then two contiguous slices and one concatenation, instead of gathering and
    scattering both groups. Attention reads the tokens where they are, through a plan in route
    order (`AttentionPlan.in_storage_order`); only a KV cache, kept in packed order, unsorts them.
    `gen_index` None means all tokens are UND (text, ViT, stage 1) and nothing moves. With
    `freeze_und` the UND outputs are detached, so no gradient reaches UND weights. With `run_gen`
    the GEN weights run even when no token is GEN (on zero rows), so they get zero gradients
    rather than none: training ranks whose packs differ then make the same FSDP collectives.
    """

    def __init__(
        self, num_tokens: int, gen_index: torch.Tensor | None = None, freeze_und: bool = False, run_gen: bool = False
    ):
        self.freeze_und, self.run_gen = freeze_und, run_gen
        self.num_tokens = self.num_und = num_tokens
        self.order = self.inverse = None  # sorted row -> packed row, and back
        if gen_index is not None and gen_index.numel() > 0:
            is_gen = torch.zeros(num_tokens, dtype=torch.uint8, device=gen_index.device)
            is_gen.index_fill_(0, gen_index, 1)  # `is_gen[gen_index] = 1` would copy the 1 over and sync
            self.num_und = num_tokens - gen_index.numel()  # gen_index holds distinct rows
            # A stable sort puts UND rows (0) before GEN rows (1), each in packed order, without
            # a host sync (nonzero would wait for the GPU).
            self.order = torch.sort(is_gen, stable=True).indices
            self.inverse = torch.empty_like(self.order)
            self.inverse[self.order] = torch.arange(num_tokens, device=gen_index.device)

    @property
    def und_only(self) -> bool:
        """Every token takes UND weights, GEN weights do not run, and no output needs detaching
        (`freeze_und` with autograd on): a block may run on all tokens at once, unrouted."""
        return self.order is None and not self.run_gen and not (self.freeze_und and torch.is_grad_enabled())

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """Packed order -> route order (N, ...)."""
        return x if self.order is None else x.index_select(0, self.order)

    def unsort(self, x: torch.Tensor) -> torch.Tensor:
        """Route order -> packed order (N, ...)."""
        return x if self.order is None else x.index_select(0, self.inverse)

    def __call__(self, x: torch.Tensor | tuple[torch.Tensor, ...], und: Callable, gen: Callable | None):
        """Apply `und` to the UND tokens and `gen` to the GEN tokens of x (N, ...), in route order;
        x may be a tuple of such tensors, split alike. `und` / `gen` return a tensor or a tuple of
        tensors (N_side, ...); so does this, joined over both."""
        if self.order is None and not (self.run_gen and gen is not None):
            return self._detach_und(und(x))
        if gen is None:
            raise ValueError(
                "This is a stage-1 (understanding-only) model but the batch has generation (VAE) tokens; "
                "load the model with stage=2 to train or run image generation."
            )
        sizes = [self.num_und, self.num_tokens - self.num_und]
        if isinstance(x, tuple):
            x_und, x_gen = zip(*(part.split(sizes) for part in x))
        else:
            x_und, x_gen = x.split(sizes)
        out_und, out_gen = self._detach_und(und(x_und)), gen(x_gen)
        if isinstance(out_und, tuple):
            return tuple(torch.cat(pair) for pair in zip(out_und, out_gen))
        return torch.cat([out_und, out_gen])

    def _detach_und(self, out):
        if not self.freeze_und:
            return out
        return tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()
