"""Image generation (and batches of any requests) over several processes: one process per GPU in a
torch.distributed job (NCCL on GPUs, gloo on CPU), each holding the whole model.

The ranks of the job form a 3-D `DeviceMesh` (batch, cfg, sp), outermost first, so rank
`(b * cfg + c) * sp + s`: the ranks of an sp group, which talk at every layer, are neighbours.

- **batch**: the requests of a call are cut into contiguous shares, one per batch group; every rank
  gets all results back, in request order.
- **cfg**: the guidance branches of a denoising step (full context, without the text, without the
  images) go round-robin to the cfg groups, branch j to group j % cfg; a group runs its branches as
  one forward, the velocities are all-gathered, and every rank combines them with the same
  `guide`, so all ranks hold the same latents. Steps outside the guidance interval need the full
  branch only: cfg group 0 computes it and broadcasts it (the same bits on every rank whatever
  the hardware, where computing it everywhere would rely on identical kernels).
- **sp** (Ulysses sequence parallelism): the ranks of an sp group split the new tokens of each
  forward (the latent tokens of every image and branch) into contiguous slices. Token-wise layers
  run on the rank's slice; for attention one all-to-all trades it for all tokens x 1/sp of the
  heads (each head attends its whole sequence, the cached prompt included), another trades back.
  It needs the heads to split evenly, each rank's query heads reading whole key/value heads
  (BAGEL-7B: 28 heads, 4 KV heads: sp 2 or 4).

Every rank builds the prompt contexts itself (a prefill is cheap next to 50 denoising steps) and
decodes the final latents with the VAE. Unseeded calls first agree on a seed, so that every rank
draws the same noise (and, with `think`, samples the same text).

CFG-parallel results equal one process's up to the rows each GEMM multiplies (a rank runs one
branch where one process runs all of them in one forward): bitwise where the BLAS does not
depend on the number of rows, which on the CPU holds from 4 rows up (tests/test_parallel.py).
Sequence parallelism adds float rounding (tokens cut into other GEMM shapes).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .contexts_bagel import BagelContext, CacheStep
from .guidance_bagel import StepCacheBranches, guide, request_seeds
from .validation_bagel import check_int

MESH_DIMS = ("batch", "cfg", "sp")
_MESHES: dict = {}  # (device type, sizes) -> DeviceMesh: its process groups are made once per job


@dataclass(frozen=True)
class BagelParallel:
    """How many ranks split each kind of work; the sizes multiply to the world size, and one of
    them may be -1 (all the ranks the others leave). `parallel="cfg"` stands for `cfg=-1`."""

    batch: int = 1
    cfg: int = 1
    sp: int = 1

    def __post_init__(self) -> None:  # checked when made, before any process group is started
        sizes = [check_int(f"parallel[{dim!r}]", getattr(self, dim), minimum=-1) for dim in MESH_DIMS]
        if 0 in sizes or sizes.count(-1) > 1:
            raise ValueError(f"{self}: sizes must be positive ints, one of them may be -1 (the rest of the ranks).")

    def sizes(self, world_size: int) -> tuple[int, int, int]:
        sizes = [self.batch, self.cfg, self.sp]
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes and world_size % known == 0:
            sizes[sizes.index(-1)] = world_size // known
        if math.prod(sizes) != world_size:
            raise ValueError(
                f"{self} does not fit the {world_size} ranks of this job: batch x cfg x sp must equal the number of "
                "ranks; launch that many processes (torchrun --nproc-per-node N) or set one size to -1."
            )
        return tuple(sizes)


class ParallelLayout:
    """A `BagelParallel` over the ranks of the default process group: the mesh and this rank's
    place in it."""

    def __init__(self, spec: BagelParallel, device: torch.device, requests_spread: bool = False):
        _init_distributed(device)
        sizes = spec.sizes(dist.get_world_size())
        key = (device.type, sizes)
        if key not in _MESHES:  # collective: every rank makes the same meshes in the same order
            from torch.distributed.device_mesh import init_device_mesh

            _MESHES[key] = init_device_mesh(device.type, sizes, mesh_dim_names=MESH_DIMS)
        self.spec, self.device, self.mesh = spec, device, _MESHES[key]
        self.requests_spread = requests_spread

    @classmethod
    def of(cls, parallel, device) -> ParallelLayout:
        """`parallel`: "batch", "cfg" or "sp" (all ranks on that), a dict of sizes
        (`{"cfg": 2, "sp": 2}`), a `BagelParallel` or a layout."""
        if isinstance(parallel, ParallelLayout):
            return parallel
        if isinstance(parallel, str) and parallel in MESH_DIMS:
            spec = BagelParallel(**{parallel: -1})
        elif isinstance(parallel, dict) and set(parallel) <= set(MESH_DIMS):
            spec = BagelParallel(**parallel)
        elif isinstance(parallel, BagelParallel):
            spec = parallel
        else:
            raise ValueError(
                f"parallel={parallel!r}: use 'batch', 'cfg' or 'sp' (all ranks of the job on that), or a dict of "
                "sizes whose product is the number of ranks, e.g. {'cfg': 2, 'sp': 2}."
            )
        return cls(spec, torch.device(device))

    def size(self, dim: str) -> int:
        return self.mesh.size(MESH_DIMS.index(dim))

    def rank(self, dim: str) -> int:
        return self.mesh.get_local_rank(dim)

    def group(self, dim: str) -> dist.ProcessGroup:
        return self.mesh.get_group(dim)

    # --- requests -------------------------------------------------------------------------------

    def spreads_requests(self, seed) -> bool:
        """Whether `interleave` must go through `run_requests` first: to cut the batch, or to agree
        on a seed."""
        return not self.requests_spread and (self.size("batch") > 1 or seed is None)

    def run_requests(self, run: Callable, requests: list, seed) -> list:
        """`run(requests, seeds, layout)` on this batch group's contiguous share of `requests`
        (every request keeps its own seed), then every share gathered in order on every rank."""
        seeds = request_seeds(seed, len(requests))
        if seeds is None:  # one random base seed for the whole job
            box = [int(torch.randint(2**31, ())) if dist.get_rank() == 0 else None]
            dist.broadcast_object_list(box, src=0)
            seeds = [box[0] + i for i in range(len(requests))]
        groups, index = self.size("batch"), self.rank("batch")
        lo, hi = len(requests) * index // groups, len(requests) * (index + 1) // groups
        inner = ParallelLayout(self.spec, self.device, requests_spread=True)
        mine = run(requests[lo:hi], seeds[lo:hi], inner) if hi > lo else []
        shares = [None] * groups
        dist.all_gather_object(shares, mine, group=self.group("batch"))
        return [out for share in shares for out in share]

    # --- denoising ------------------------------------------------------------------------------

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """x as rank (cfg 0, sp 0) of this batch group holds it, on every rank of the group."""
        for dim in ("cfg", "sp"):
            group = self.group(dim)
            dist.broadcast(x, dist.get_global_rank(group, 0), group=group)
        return x


def _init_distributed(device: torch.device) -> None:
    """Start the default process group under torchrun (NCCL for a GPU model, gloo for CPU)."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError(
            "parallel= needs a torch.distributed job: launch one process per GPU with "
            "`torchrun --nproc-per-node N script.py` and load the model on cuda:LOCAL_RANK, or call "
            "torch.distributed.init_process_group() first."
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def parallel_velocity(
    model, parallel, x, branches: list[BagelContext], pos, counts, special, params, seq_of_token, run=None
):
    """`generate_latents`'s `velocity(x, t, use_cfg)` over the cfg x sp ranks of this rank's batch
    group, and the starting latents x (N, p*p*C) as all ranks of the group share them. `run`: a
    step cache's state, this rank's own: it caches the branches this rank runs (an sp group's
    ranks hold the same gathered outputs, so they plan alike; a plan taken on values is agreed
    over the cfg group)."""
    layout = ParallelLayout.of(parallel, x.device)
    x = layout.broadcast_from_first(x.contiguous())
    cfg_group, cfg_rank, cfg_size = layout.group("cfg"), layout.rank("cfg"), layout.size("cfg")
    first_of_cfg = dist.get_global_rank(cfg_group, 0)
    shard = None
    if layout.size("sp") > 1:
        text = model.config.text_config
        shard = UlyssesShard(layout.group("sp"), text.num_attention_heads, text.num_key_value_heads)
    mine = branches[cfg_rank::cfg_size]  # branch j runs on cfg group j % cfg_size
    slots = -(-len(branches) // cfg_size)  # branches per group, the last ones padded

    def predict(context: BagelContext, n_branches: int, x: torch.Tensor, t: float) -> torch.Tensor:
        return model._predict_velocity(context, x, t, pos, counts, n_branches, special, shard=shard)

    if run is not None:

        def agree(value: float) -> float:  # the largest over the cfg group (its ranks plan the same step)
            box = torch.tensor([value], dtype=torch.float64, device=x.device)
            dist.all_reduce(box, op=dist.ReduceOp.MAX, group=cfg_group)
            return box.item()

        mine_ids = list(range(cfg_rank, len(branches), cfg_size))
        cached = StepCacheBranches(model, run, dict(enumerate(branches)), pos, counts, special, shard, agree)
        alone = StepCacheBranches(model, run, {0: branches[0]}, pos, counts, special, shard)  # rank 0 only
        predict_mine = lambda x, t: torch.cat(cached(mine_ids, x, t))  # noqa: E731
        predict_full = lambda x, t: alone([0], x, t)[0]  # noqa: E731
    else:
        mine_context = BagelContext.concat(mine) if mine else None
        predict_mine = lambda x, t: predict(mine_context, len(mine), x, t)  # noqa: E731
        predict_full = lambda x, t: predict(branches[0], 1, x, t)  # noqa: E731

    def velocity(x: torch.Tensor, t: float, use_cfg: bool) -> torch.Tensor:
        if not use_cfg:
            v = predict_full(x, t) if cfg_rank == 0 else torch.empty_like(x)
            dist.broadcast(v, first_of_cfg, group=cfg_group)
            return v
        if not mine and run is not None:
            run.plan([], t, agree)  # no branch here, but a plan taken on values needs every rank's word
        local = predict_mine(x, t) if mine else x.new_zeros(0, x.shape[1])
        local = F.pad(local, (0, 0, 0, slots * x.shape[0] - local.shape[0]))
        gathered = [torch.empty_like(local) for _ in range(cfg_size)]
        dist.all_gather(gathered, local, group=cfg_group)
        velocities = [gathered[j % cfg_size].chunk(slots)[j // cfg_size] for j in range(len(branches))]
        return guide(velocities, params, seq_of_token, counts)

    return x, velocity


# ----------------------------------------------------------------------------------------------
# Ulysses sequence parallelism
# ----------------------------------------------------------------------------------------------


def ulysses_kv_heads(num_heads: int, kv_heads: int, size: int) -> list[int]:
    """The KV heads each of `size` ranks attends with, rank after rank: rank r takes query heads
    [r*h, (r+1)*h), h = num_heads / size, and the KV heads they read (the same number per rank)."""
    per_rank, group = num_heads // size, num_heads // kv_heads
    if num_heads % size or (per_rank % group and group % per_rank):
        fits = [
            s
            for s in range(2, num_heads + 1)
            if num_heads % s == 0 and ((num_heads // s) % group == 0 or group % (num_heads // s) == 0)
        ]
        raise ValueError(
            f"Sequence parallelism over {size} ranks cannot split {num_heads} attention heads ({kv_heads} key/value "
            f"heads) into whole per-rank groups; use sp in {fits}."
        )
    kv_of = [sorted({h // group for h in range(r * per_rank, (r + 1) * per_rank)}) for r in range(size)]
    return [h for heads in kv_of for h in heads]


class UlyssesShard:
    """Sequence parallelism for `_forward_step`: this rank runs a contiguous slice of the new tokens
    (all ranks' slices padded to one size), and stands in for the KV-cache step in attention,
    trading token slices for head slices with all-to-all (`attend`)."""

    def __init__(self, group: dist.ProcessGroup, num_heads: int, kv_heads: int):
        self.group, self.size, self.rank = group, dist.get_world_size(group), dist.get_rank(group)
        kv_heads_per_rank = ulysses_kv_heads(num_heads, kv_heads, self.size)
        self.kv_index = torch.tensor(kv_heads_per_rank)  # moved to the GPU once, where first used
        self.kv_identity = kv_heads_per_rank == list(range(kv_heads))  # no copy needed
        self._contexts: dict[int, tuple[BagelContext, BagelContext]] = {}
        self.num_tokens = self.chunk = 0
        self.step: CacheStep | None = None

    def local(self, context: BagelContext, embeds, new_lengths: list[int], position_ids, gen_index):
        """This rank's rows of the new tokens' embeds (N, hidden), positions (N,) and GEN rows, and
        the cache step that attention calls (this object, over the context's KV heads it needs)."""
        n = embeds.shape[0]
        self.num_tokens, self.chunk = n, -(-n // self.size)
        start = min(self.rank * self.chunk, n)
        stop = min(start + self.chunk, n)
        pad = self.chunk - (stop - start)
        embeds = F.pad(embeds[start:stop], (0, 0, 0, pad))
        position_ids = F.pad(position_ids[start:stop], (0, pad))
        if gen_index is not None:  # (waits for the GPU once a step: the route needs its size)
            gen_index = gen_index[(gen_index >= start) & (gen_index < stop)] - start
        self.step = CacheStep(self._my_kv_heads(context), new_lengths, store=False)
        return embeds, position_ids, gen_index, self

    def _my_kv_heads(self, context: BagelContext) -> BagelContext:
        """The context's cache with only the KV heads this rank attends with, made once per context."""
        kept = self._contexts.get(id(context))
        if kept is None or kept[0] is not context:
            per_rank = self.kv_index.numel() // self.size
            index = self._kv_index(context.keys[0].device)[self.rank * per_rank : (self.rank + 1) * per_rank]
            heads = lambda tensors: tuple(t.index_select(1, index) for t in tensors)  # noqa: E731
            kept = (
                context,
                BagelContext(heads(context.keys), heads(context.values), context.lengths, context.positions),
            )
            self._contexts[id(context)] = kept
        return kept[1]

    def _kv_index(self, device: torch.device) -> torch.Tensor:
        if self.kv_index.device != device:  # a shard serves one device
            self.kv_index = self.kv_index.to(device)
        return self.kv_index

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
        """q (chunk, H, D), k, v (chunk, H_kv, D) of this rank's tokens -> attention output (chunk, H, D)."""
        n = self.num_tokens
        if not self.kv_identity:  # KV heads shared by several ranks: each gets its own copy
            index = self._kv_index(k.device)
            k, v = k.index_select(1, index), v.index_select(1, index)
        q, k, v = (self._tokens_to_heads(x)[:n] for x in (q, k, v))
        return self._heads_to_tokens(self.step.attend(layer_idx, q, k, v, plan))

    def _tokens_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(chunk, heads, D) of this rank's tokens -> (size * chunk, heads / size, D): every rank's
        tokens, in packed order, with this rank's heads."""
        chunk, heads, dim = x.shape
        send = x.reshape(chunk, self.size, heads // self.size, dim).transpose(0, 1).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received.flatten(0, 1)

    def _heads_to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """(N, heads / size, D) of all tokens -> (chunk, heads, D) of this rank's tokens."""
        heads, dim = out.shape[1], out.shape[2]
        send = F.pad(out, (0, 0, 0, 0, 0, self.size * self.chunk - out.shape[0]))
        send = send.view(self.size, self.chunk, heads, dim).contiguous()
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        return received.transpose(0, 1).reshape(self.chunk, self.size * heads, dim)

    def gather(self, hidden: torch.Tensor) -> torch.Tensor:
        """(chunk, hidden) of this rank -> (N, hidden) of all new tokens, on every rank."""
        parts = [torch.empty_like(hidden) for _ in range(self.size)]
        dist.all_gather(parts, hidden.contiguous(), group=self.group)
        return torch.cat(parts)[: self.num_tokens]
