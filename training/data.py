"""Training data readers for BAGEL and the packed, sharded, mixed, resumable dataset.

The readers take the reference's (ByteDance-Seed/Bagel) formats unchanged:
* `T2IParquet`: parquet rows with `image` (encoded image bytes) and `captions` (a JSON object of
  captions; one is picked per sample);
* `EditParquet`: parquet rows with `image_list` (encoded images of an editing chain) and
  `instruction_list` (per step, a list of alternative instructions);
* `LlavaJsonl`: LLaVA-style JSONL lines `{"image": name | [names], "conversations": [{"from": "human" |
  "gpt", "value": ...}]}` with `<image>` placeholders, images read from `image_dir`.

`BagelPackedDataset` mixes several sources by weight and packs their samples (`packing.Packer`).
Each reader (rank x DataLoader worker) reads its own shard of every source: the source's chunks
(parquet row groups, or row ranges when there are fewer chunks than readers) dealt round-robin. Each
epoch visits the shard's chunks and rows in an order drawn from the seed; everything random about a
sample (caption choice, sub-chain of an edit) is seeded by its position, so a sample can be read
again from its key. `state_dict()` / `load_state_dict()` save and restore the position of every
source, the mixing and packing generators and the samples waiting in the packer, so a resumed run
gets exactly the packs that would have come next. With DataLoader workers, torchdata's
`StatefulDataLoader` calls them inside each worker.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..validation_bagel import check_number
from .packing import Packer, PackingConfig, PlanBuilder, PlanItem

PathLike = str | os.PathLike


def seeded_generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by a stable hash of `parts` (ints and strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def _choice(options: Sequence[Any], generator: torch.Generator) -> Any:
    return options[int(torch.randint(len(options), (), generator=generator))]


def _open_image(data: bytes | PathLike) -> Image.Image:
    image = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    image.load()
    return image


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """Rows `start:stop` of one parquet row group (`row_group`) or of a JSONL file (`row_group` None)."""

    path: str
    row_group: int | None
    start: int
    stop: int

    @property
    def num_rows(self) -> int:
        return self.stop - self.start


class DataSource:
    """A table of rows in chunks; `to_plan` turns a row into a sample plan (None: skip the row)."""

    name = "source"

    def chunks(self) -> list[Chunk]:
        raise NotImplementedError

    def read_chunk(self, chunk: Chunk) -> list[Any]:
        raise NotImplementedError

    def to_plan(self, row: Any, builder: PlanBuilder, generator: torch.Generator) -> list[PlanItem] | None:
        raise NotImplementedError


def _parquet_files(paths: PathLike | Sequence[PathLike]) -> list[str]:
    """Parquet files from a file, a directory (its `*.parquet`, sorted) or a list of either."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    files = []
    for path in map(Path, paths):
        found = sorted(path.glob("*.parquet")) if path.is_dir() else [path] if path.is_file() else []
        if not found:
            raise FileNotFoundError(f"no parquet file at {path} (give .parquet files or directories holding them).")
        files += [str(f) for f in found]
    return files


class ParquetSource(DataSource):
    """Rows of parquet files, one chunk per row group; reads only `columns`."""

    columns: tuple[str, ...] = ()

    def __init__(self, paths: PathLike | Sequence[PathLike]):
        import pyarrow.parquet as pq

        self.files = _parquet_files(paths)
        self._chunks = []  # read once here, from each file's footer; every rank and worker shards them
        for file in self.files:
            parquet = pq.ParquetFile(file)
            missing = set(self.columns) - set(parquet.schema_arrow.names)
            if missing:
                raise ValueError(
                    f"{file} lacks the column(s) {sorted(missing)} that {type(self).__name__} reads "
                    f"(it needs {list(self.columns)})."
                )
            metadata = parquet.metadata
            self._chunks += [Chunk(file, g, 0, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)]

    def chunks(self) -> list[Chunk]:
        return list(self._chunks)

    def read_chunk(self, chunk: Chunk) -> list[dict[str, Any]]:
        import pyarrow.parquet as pq

        table = pq.ParquetFile(chunk.path).read_row_group(chunk.row_group, columns=list(self.columns))
        return table.slice(chunk.start, chunk.num_rows).to_pylist()


class T2IParquet(ParquetSource):
    """Text-to-image parquet: `image` bytes and `captions`, a JSON object whose values are captions."""

    name = "t2i"
    columns = ("image", "captions")

    def to_plan(self, row, builder, generator):
        captions = list(json.loads(row["captions"]).values())
        caption = _choice(captions, generator) if captions else " "  # the reference's fallback
        return builder.text_to_image(caption, _open_image(row["image"]))


class EditParquet(ParquetSource):
    """Editing parquet: `image_list` (a chain of encoded images) and `instruction_list` (one list of
    alternative instructions per step). As the reference does, each sample is a random stretch of
    one or two steps of the chain; a two-step stretch becomes, half of the time, one edit with the
    two instructions joined by ". ". (The reference then also cuts a joined stretch that ends on the
    chain's last image one step short; that looks unintended and is not reproduced.)"""

    name = "edit"
    columns = ("image_list", "instruction_list")

    def to_plan(self, row, builder, generator):
        images, instructions = row["image_list"], row["instruction_list"]
        if len(images) < 2 or len(instructions) < len(images) - 1:
            raise ValueError(
                f"an edit row needs >= 2 images and one instruction list per step, got {len(images)} "
                f"images and {len(instructions)} instruction lists."
            )
        start = int(torch.randint(len(images) - 1, (), generator=generator))
        end = start + 1 + int(torch.randint(min(2, len(images) - 1 - start), (), generator=generator))
        # a step's alternatives; a plain string is one instruction (not a list of characters to pick from)
        options = [[step] if isinstance(step, str) else list(step) for step in instructions]
        if not all(options[i - 1] and all(isinstance(o, str) for o in options[i - 1]) for i in range(1, len(images))):
            raise ValueError(
                "instruction_list must hold, per step, an instruction or a non-empty list of "
                f"alternative instructions (strings), got {instructions!r}."
            )
        steps = [_choice(options[i - 1], generator) for i in range(start + 1, end + 1)]
        if len(steps) > 1 and torch.rand((), generator=generator).item() < 0.5:
            chain, steps = [start, end], [". ".join(steps) + "."]
        else:
            chain = list(range(start, end + 1))
        return builder.edit([_open_image(images[i]) for i in chain], steps)


class LlavaJsonl(DataSource):
    """LLaVA-style understanding data: one JSON object a line (see the module docstring); image names
    are relative to `image_dir`. Lines are read once, as the reference does."""

    name = "understanding"

    def __init__(self, jsonl_path: PathLike, image_dir: PathLike):
        self.path, self.image_dir = str(jsonl_path), Path(image_dir)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(
                f"image_dir {str(image_dir)!r} is not a directory: give the folder that the image "
                f"names of {jsonl_path} are relative to."
            )
        with open(jsonl_path, encoding="utf-8") as f:
            self.lines = [line for line in f if line.strip()]
        if not self.lines:
            raise ValueError(f"{jsonl_path} holds no JSON lines.")

    def chunks(self) -> list[Chunk]:
        return [Chunk(self.path, None, 0, len(self.lines))]

    def read_chunk(self, chunk: Chunk) -> list[str]:
        return self.lines[chunk.start : chunk.stop]

    def to_plan(self, row, builder, generator):
        item = json.loads(row)
        if "video" in item:
            raise ValueError("video samples are not supported; give images ('image': name or list of names).")
        names = item.get("image") or []
        names = [names] if isinstance(names, str) else names
        images = [_open_image(self.image_dir / name) for name in names]
        return builder.understanding(images, item["conversations"])


# ----------------------------------------------------------------------------------------------
# One reader's shard of a source
# ----------------------------------------------------------------------------------------------


def shard_chunks(chunks: Sequence[Chunk], shard: int, num_shards: int) -> list[Chunk]:
    """The chunks of reader `shard` out of `num_shards`: dealt round-robin, after cutting each chunk
    into row ranges when there are fewer chunks than readers (so small data still reaches every one)."""
    if 0 < len(chunks) < num_shards:
        pieces = -(-num_shards // len(chunks))
        chunks = [
            Chunk(c.path, c.row_group, c.start + c.num_rows * i // pieces, c.start + c.num_rows * (i + 1) // pieces)
            for c in chunks
            for i in range(pieces)
        ]
        chunks = [c for c in chunks if c.num_rows > 0]
    if len(chunks) < num_shards:
        rows = sum(c.num_rows for c in chunks)
        raise ValueError(
            f"a source has {rows} rows, fewer than the {num_shards} readers (ranks x DataLoader workers) "
            "that share it; add data or use fewer workers."
        )
    return list(chunks[shard::num_shards])


class SourceStream:
    """Endless `(key, plan)` stream of one source's shard. The position is `[epoch, chunk, row]`
    within the epoch's seeded order; `key` = `(source_index, epoch, chunk, row)` reads a row again."""

    def __init__(
        self, source: DataSource, builder: PlanBuilder, shard: int, num_shards: int, seed: int, index: int = 0
    ):
        self.source, self.builder, self.index = source, builder, index
        self.chunks = shard_chunks(source.chunks(), shard, num_shards)
        self.num_rows = sum(c.num_rows for c in self.chunks)
        self.seed = (seed, index, shard)
        self.position = [0, 0, 0]
        self._cached: tuple[tuple[int, int], list, list[int]] | None = None
        self._epoch_order: tuple[int, list[int]] | None = None  # (epoch, its chunk order)

    def _chunk(self, epoch: int, chunk_pos: int) -> Chunk:
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            order = torch.randperm(len(self.chunks), generator=seeded_generator(*self.seed, epoch)).tolist()
            self._epoch_order = (epoch, order)
        return self.chunks[self._epoch_order[1][chunk_pos]]

    def _rows(self, epoch: int, chunk_pos: int) -> tuple[list, list[int]]:
        if self._cached is None or self._cached[0] != (epoch, chunk_pos):
            rows = self.source.read_chunk(self._chunk(epoch, chunk_pos))
            order = torch.randperm(len(rows), generator=seeded_generator(*self.seed, epoch, chunk_pos)).tolist()
            self._cached = ((epoch, chunk_pos), rows, order)
        return self._cached[1], self._cached[2]

    def read(self, epoch: int, chunk_pos: int, row_pos: int) -> list[PlanItem] | None:
        rows, order = self._rows(epoch, chunk_pos)
        generator = seeded_generator(*self.seed, epoch, chunk_pos, row_pos, "sample")
        try:
            return self.source.to_plan(rows[order[row_pos]], self.builder, generator)
        except Exception as error:
            chunk = self._chunk(epoch, chunk_pos)
            group = "" if chunk.row_group is None else f" of row group {chunk.row_group}"
            where = f"row {chunk.start + order[row_pos]}{group}"
            raise ValueError(f"{type(self.source).__name__}: {where} of {chunk.path}: {error}") from error

    def _advance(self) -> None:
        epoch, chunk_pos, row_pos = self.position
        row_pos += 1
        if row_pos == self._chunk(epoch, chunk_pos).num_rows:
            row_pos, chunk_pos = 0, chunk_pos + 1
            if chunk_pos == len(self.chunks):
                chunk_pos, epoch = 0, epoch + 1
        self.position = [epoch, chunk_pos, row_pos]

    def __iter__(self) -> SourceStream:
        return self

    def __next__(self) -> tuple[tuple[int, int, int, int], list[PlanItem]]:
        for _ in range(self.num_rows):  # rows the builder skips (understanding without an answer) are passed over
            key = (self.index, *self.position)
            self._advance()
            plan = self.read(*key[1:])
            if plan is not None:
                return key, plan
        raise ValueError(
            f"{type(self.source).__name__}: none of the {self.num_rows} rows of this reader's shard gives "
            "a training sample (understanding rows need an answer with tokens)."
        )


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


class BagelPackedDataset(torch.utils.data.IterableDataset):
    """Endless packs (see `packing.PackBuilder.build`) from weighted sources, sharded over ranks
    and DataLoader workers, resumable.

    Args:
        sources: the `DataSource`s to mix.
        builder: turns rows into plans (tokenizer and image sizes).
        packing: the packing rules (`PackingConfig.from_model_config`).
        weights: relative sampling weight of each source (default: equal).
        seed: seeds the epochs' orders, the mixing and the packing (CFG dropout, timesteps).
        rank, world_size: this process's place; default: torch.distributed's, else 0 of 1.
        **packer_kwargs: `Packer`'s limits (`max_num_tokens`, `expected_num_tokens`,
            `max_num_tokens_per_sample`, `prefer_buffer_before`, `max_buffer_size`).

    Use with `batch_size=None` (a pack is a batch). With workers, `torchdata`'s `StatefulDataLoader`
    saves and restores each worker's state; with `num_workers=0` call `state_dict()` here.
    """

    def __init__(
        self,
        sources: Sequence[DataSource],
        builder: PlanBuilder,
        packing: PackingConfig,
        *,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        **packer_kwargs: Any,
    ):
        super().__init__()
        if not sources:
            raise ValueError("BagelPackedDataset needs at least one source.")
        weights = [1.0] * len(sources) if weights is None else weights
        if not isinstance(weights, Sequence) or len(weights) != len(sources):
            raise ValueError(f"weights must be one non-negative number per source ({len(sources)}), got {weights!r}.")
        weights = [check_number(f"weights[{i}]", w, minimum=0) for i, w in enumerate(weights)]
        if sum(weights) <= 0:
            raise ValueError(f"weights must have a positive sum (one source at least is drawn from), got {weights}.")
        # checks the limits now rather than in a worker
        self.max_num_tokens_per_sample = Packer(packing, **packer_kwargs).max_num_tokens_per_sample
        self.sources, self.builder, self.packing = list(sources), builder, packing
        self.weights, self.seed, self.packer_kwargs = torch.tensor(weights, dtype=torch.float64), seed, packer_kwargs
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if rank is None:
            rank = torch.distributed.get_rank() if distributed else 0
        if world_size is None:
            world_size = torch.distributed.get_world_size() if distributed else 1
        self.rank, self.world_size = rank, world_size
        self._reader: dict[str, Any] | None = None  # built in the process that iterates (a worker)
        self._pending_state: Mapping[str, Any] | None = None

    def _shard(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return self.rank * workers + worker, self.world_size * workers

    def _setup(self) -> dict[str, Any]:
        shard, num_shards = self._shard()
        if self._reader is None or (self._reader["shard"], self._reader["num_shards"]) != (shard, num_shards):
            # (a reader built in the main process and copied into a worker is another shard's)
            self._reader = dict(
                shard=shard,
                num_shards=num_shards,
                streams=[
                    SourceStream(source, self.builder, shard, num_shards, self.seed, index)
                    for index, source in enumerate(self.sources)
                ],
                mixer=seeded_generator(self.seed, shard, "mix"),
                packer=Packer(self.packing, seed=self.seed * 1_000_003 + shard, **self.packer_kwargs),
            )
            if self._pending_state is not None:
                self._apply_state(self._pending_state)
                self._pending_state = None
        return self._reader

    def read(self, key: Sequence[int]) -> list[PlanItem]:
        """The plan at `key` (`(source_index, epoch, chunk, row)`), as it was first read."""
        plan = self._setup()["streams"][key[0]].read(*key[1:])
        if plan is None:
            raise ValueError(f"the sample at {tuple(key)} is one the builder skips; it cannot have been packed.")
        return plan

    def samples(self) -> Iterator[tuple[tuple[int, ...], list[PlanItem]]]:
        """This reader's endless `(key, plan)` stream, each from a source drawn by weight. A source
        whose samples come out longer than `max_num_tokens_per_sample` (which the packer skips) for
        two epochs of its shard in a row can never give one: an error, not an endless loop."""
        reader = self._setup()
        limit = self.max_num_tokens_per_sample
        too_long = [(0, math.inf, 0) for _ in reader["streams"]]  # per source: skipped in a row, shortest, longest
        while True:
            index = int(torch.multinomial(self.weights, 1, generator=reader["mixer"]))
            stream = reader["streams"][index]
            key, plan = next(stream)
            length = self.packing.plan_length(plan)
            if length <= limit:
                too_long[index] = (0, math.inf, 0)
            else:
                count, shortest, longest = too_long[index]
                too_long[index] = (count + 1, min(shortest, length), max(longest, length))
            if too_long[index][0] >= 2 * stream.num_rows:
                raise ValueError(
                    f"{type(stream.source).__name__} (source {index}): all {stream.num_rows} samples of this reader's "
                    f"shard are longer than max_num_tokens_per_sample={limit} ({too_long[index][1]} to "
                    f"{too_long[index][2]} tokens), so none can be packed; raise max_num_tokens_per_sample (and "
                    "max_num_tokens) or use smaller images and shorter texts."
                )
            yield key, plan

    def __iter__(self) -> Iterator[dict[str, Any]]:
        yield from self._setup()["packer"].packs(self.samples())

    def state_dict(self) -> dict[str, Any]:
        """Where this reader stands between packs: source positions, generators, waiting samples."""
        reader = self._setup()
        return dict(
            shard=reader["shard"],
            num_shards=reader["num_shards"],
            seed=self.seed,
            positions=[list(stream.position) for stream in reader["streams"]],
            mixer=reader["mixer"].get_state(),
            packer=reader["packer"].state_dict(),
        )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()`'s result (applied when this reader starts, in its worker)."""
        if self._reader is None:
            self._pending_state = state
        else:
            self._apply_state(state)

    def _apply_state(self, state: Mapping[str, Any]) -> None:
        reader = self._reader
        saved = (state["shard"], state["num_shards"], state["seed"], len(state["positions"]))
        here = (reader["shard"], reader["num_shards"], self.seed, len(reader["streams"]))
        if saved != here:
            raise ValueError(
                f"the data state (shard, readers, seed, sources) = {saved} was saved by another setup "
                f"than this one {here}; resume with the same world size, num_workers, seed and sources."
            )
        for stream, position in zip(reader["streams"], state["positions"]):
            stream.position = list(position)
        reader["mixer"].set_state(state["mixer"])
        reader["packer"].load_state_dict(state["packer"], self.read)


__all__ = [
    "BagelPackedDataset",
    "Chunk",
    "DataSource",
    "EditParquet",
    "LlavaJsonl",
    "ParquetSource",
    "SourceStream",
    "T2IParquet",
    "seeded_generator",
    "shard_chunks",
]
