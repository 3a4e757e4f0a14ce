"""This rank's packs, from the config's `data`: a file of packs, or the reference's data readers
mixed and packed (`data`, `packing`), optionally read in DataLoader workers. Each has
`state_dict` / `load_state_dict` (its position), so a resumed run gets the packs that came next."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..configuration_bagel import BagelConfig
from ..loading_bagel import load_processor
from . import data as readers
from .config import ConfigError
from .packing import PackingConfig, PlanBuilder


class PackFile:
    """Packs (dicts of the training forward's keyword arguments) from a `torch.save`d list:
    rank r takes packs r, r + world, ..., cycling; the position is its resumable state."""

    def __init__(self, path: str, rank: int, world: int):
        if not Path(path).is_file():
            raise ConfigError(f"data={path!r}: no such file of packs (or give data: {{sources: [...]}}; see --help).")
        packs = torch.load(path, weights_only=False)
        self.packs = packs[rank::world]
        if not self.packs:
            raise ConfigError(f"data={path!r} has {len(packs)} pack(s), fewer than the {world} ranks.")
        self.position = 0

    def __iter__(self) -> Iterator[dict]:
        while True:
            pack = self.packs[self.position % len(self.packs)]
            self.position += 1
            yield pack

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


SOURCES = {"t2i": "T2IParquet", "edit": "EditParquet", "llava": "LlavaJsonl"}  # training.data readers


def build_dataset(cfg: dict, config: BagelConfig, checkpoint_dir: Path, rank: int, world: int):
    """This rank's packs, with `state_dict` / `load_state_dict` (its position, for exact resume).

    `data` is either a file of packs (`PackFile`), or `training.data`'s readers with
    `BagelPackedDataset`'s packing limits (`config.Data`); with `num_workers` > 0, read
    in a torchdata `StatefulDataLoader` (its state covers the workers'). Each source must give a
    sample now (its first one is read), so a source that cannot stops the run before step 1."""
    data = cfg["data"]
    if not isinstance(data, dict):
        return PackFile(data, rank, world)
    processor = load_processor(checkpoint_dir, config)
    if processor is None:
        raise ConfigError(f"{checkpoint_dir} has no tokenizer files: reading data needs the checkpoint's tokenizer.")
    # The reference's training transforms over the checkpoint processor's rules (its strides and
    # largest sides come from the model config).
    builder = PlanBuilder.from_processor(processor)
    sources = []
    for index, spec in enumerate(data["sources"]):
        where = f"data.sources.{index} ({spec['kind']}: {spec['path']})"
        paths = {"jsonl_path" if spec["kind"] == "llava" else "paths": spec["path"]}
        try:
            source = getattr(readers, SOURCES[spec["kind"]])(
                **paths, **({"image_dir": spec["image_dir"]} if spec["kind"] == "llava" else {})
            )
            next(readers.SourceStream(source, builder, 0, 1, cfg["seed"], index))
        except (OSError, ValueError) as error:
            raise ConfigError(f"{where}: no readable sample: {error}") from error
        sources.append(source)
    limits = {k: v for k, v in data.items() if k not in ("sources", "weights", "num_workers")}
    dataset = readers.BagelPackedDataset(
        sources,
        builder,
        PackingConfig.from_model_config(config, processor.special_token_ids),
        weights=data["weights"],
        seed=cfg["seed"],
        rank=rank,
        world_size=world,
        **limits,
    )
    if not data["num_workers"]:
        return dataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(
        dataset, batch_size=None, num_workers=data["num_workers"], pin_memory=torch.cuda.is_available()
    )
