"""Fine-tune BAGEL with torch FSDP2: full, GEN-only, frozen-tower or LoRA runs, resumable.

    torchrun --nproc_per_node 8 examples/finetune.py my_run.yaml out_dir=runs/full
    torchrun --nproc_per_node 1 examples/finetune.py my_run.yaml out_dir=runs/lora lora_rank=64

One config file (a copy of examples/finetune.yaml, its data filled in); any key can be overridden
as `key=value` (YAML values); the whole is checked before anything is built (finetune_config.py,
`--help`). Without torchrun it runs as one process. Needs torch >= 2.7 (`fully_shard` with
`ignored_params`).

How it runs:
- Code: this checkout's (imported as the package `bagel_remote`; the final save copies it).
- Model: every rank builds BAGEL on the meta device, then materialises, fills and shards one
  decoder / ViT layer at a time (`fully_shard` right after), then the rest (`fully_shard` of
  the root). Weights are read from the checkpoint's safetensors files one tensor at a time
  (memory-mapped), so no rank holds more than one layer unsharded, on the device or in host RAM.
  (transformers' loader builds the whole model on one device; it cannot fill FSDP2 shards layer
  by layer, hence `load_and_shard`.)
- Precision: on CUDA the trained weights are float32 master weights, computed in bf16
  (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`), frozen weights are stored in
  bf16; on CPU (gloo) everything is float32. The VAE is never trained and never sharded.
- Ranks with different packs (text only, images to understand only, latents only, no CE, no
  MSE): before the forward one all-reduce (on the host) adds up every rank's token counts; a
  part that some rank's pack has (ViT, GEN path, lm head, llm2vae) then runs on every rank, on
  zero tokens where its pack has none (`always_run` of the forward), so every FSDP all-gather
  and reduce-scatter happens on every rank; parts no rank needs are skipped by all.
- Loss (the reference's trainer): CE = sum(ce * weight) / sum(weights) and MSE = per-token mean
  over channels, summed / number of MSE tokens, both over all ranks (the all-reduced counts);
  loss = ce_weight * CE + mse_weight * MSE. N ranks on N packs give one process's loss and
  gradients on the same N packs.
- Checkpoints: torch DCP (sharded, every rank writes its own part) of the trained weights,
  optimizer (with the names of the weights that have optimizer state: one never given a gradient
  has none), scheduler, EMA, data position and RNG states, written to `step_N.partial` and
  renamed to `step_N` once complete; resuming gives the same next losses, and log.jsonl drops the
  steps after the checkpoint before they are redone. The final save gathers the weights on rank 0
  and writes the released layout (`save_pretrained`: loads with `from_pretrained`); LoRA runs
  also write the PEFT adapter.
- `BAGEL_FINETUNE_EXIT_AT=step:K` (or `save:K`) exits every rank hard after step K (or while
  step K's checkpoint is written, before it is published): the tests' kill.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_config import ConfigError, help_text  # noqa: E402
from finetune_config import load_config as _load_config  # noqa: E402

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # before torch is imported: at once
    print(help_text())
    sys.exit(0)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from repo_package import import_repo  # noqa: E402

import_repo()  # this checkout, as the package `bagel_remote` (its modules import each other relatively)
from bagel_remote import data_bagel, packing_bagel  # noqa: E402
from bagel_remote.configuration_bagel import BagelConfig  # noqa: E402
from bagel_remote.loading_bagel import (  # noqa: E402
    VAE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    config_from_directory,
    load_processor,
    resolve_checkpoint_dir,
)
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal  # noqa: E402
from bagel_remote.state_dict_adapter import checkpoint_bucket  # noqa: E402

WEIGHT_FILES = {"model.": WEIGHTS_NAME, "vae.": VAE_WEIGHTS_NAME}  # native prefix -> released file
PARTS = {"vit": "vit_tokens", "gen": "vae_tokens", "ce": "ce_tokens", "mse": "mse_tokens"}  # forward part -> count


# ----------------------------------------------------------------------------------------------
# Config (finetune_config.py: the schema)
# ----------------------------------------------------------------------------------------------


def load_config(argv: list[str]) -> dict[str, Any]:
    """`[config.yaml] key=value ...` -> the validated config dict; a clear exit otherwise."""
    try:
        return _load_config(argv)
    except ConfigError as error:
        raise SystemExit(str(error)) from None


# ----------------------------------------------------------------------------------------------
# Model: build on meta, freeze / LoRA, load and shard layer by layer
# ----------------------------------------------------------------------------------------------


def apply_freezing(model, cfg: dict) -> None:
    """requires_grad per the freeze switches. The VAE is always frozen. `freeze_und` also tells the
    forward to detach the UND outputs (`text_config.freeze_und`), so no gradient flows through the
    understanding path at all: its weights, the embeddings, the lm head, the ViT and the connector."""
    model.config.text_config.freeze_und = bool(cfg["freeze_und"])
    for name, param in model.named_parameters():
        frozen = (
            name.startswith("vae.")
            or (cfg["freeze_vit"] and name.startswith("model.vit_model."))
            or (cfg["freeze_llm"] and name.startswith("model.language_model."))
            or (cfg["freeze_und"] and is_und_param(name))
        )
        param.requires_grad_(param.requires_grad and not frozen)


def is_und_param(name: str) -> bool:
    """Whether a parameter belongs to the understanding path (its own weights or those it shares)."""
    return checkpoint_bucket(name) in ("und", "shared")


LORA_TARGETS = {
    "und": r"self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj",
    "gen": r"self_attn\.[qkvo]_proj_moe_gen|mlp_moe_gen\.(gate|up|down)_proj",
}


def lora_config(cfg: dict):
    from peft import LoraConfig

    projections = "|".join(LORA_TARGETS[side] for side in cfg["lora_sides"])
    return LoraConfig(
        r=cfg["lora_rank"],
        lora_alpha=cfg["lora_alpha"],
        lora_dropout=cfg["lora_dropout"],
        target_modules=rf".*language_model\.model\.layers\.\d+\.({projections})",
    )


def shard_units(model) -> list[torch.nn.Module]:
    """The modules sharded one by one: the decoder and ViT layers (`_no_split_modules`)."""
    return [m for m in model.modules() if type(m).__name__ in model._no_split_modules]


class CheckpointReader:
    """Tensors of a released-layout checkpoint by native name, read one at a time (memory-mapped).
    Names under a PEFT wrapper (`q_proj.base_layer.weight`) read the wrapped layer's weight."""

    def __init__(self, directory: Path):
        from safetensors import safe_open

        self.handles = {}
        for prefix, file in WEIGHT_FILES.items():
            if (directory / file).is_file():
                self.handles[prefix] = safe_open(str(directory / file), framework="pt", device="cpu")
        if "model." not in self.handles:
            raise FileNotFoundError(f"{directory} has no {WEIGHT_FILES['model.']}: not a BAGEL checkpoint directory.")
        self.keys = {prefix: set(handle.keys()) for prefix, handle in self.handles.items()}

    def _stored(self, name: str) -> tuple[str, str] | None:
        name = name.replace(".base_layer.", ".")
        for prefix in self.handles:
            if name.startswith(prefix) and name[len(prefix) :] in self.keys[prefix]:
                return prefix, name[len(prefix) :]
        return None

    def __contains__(self, name: str) -> bool:
        return self._stored(name) is not None

    def read(self, name: str) -> torch.Tensor:
        prefix, key = self._stored(name)
        return self.handles[prefix].get_tensor(key)


def materialize(
    module: torch.nn.Module, root, device: torch.device, reader: CheckpointReader | None, prefix: str
) -> list[str]:
    """Give the meta parameters of `module` storage on `device`, initialised by the model's
    `_init_weights` (LoRA layers by PEFT's own init), then overwritten from the checkpoint where it
    has them. `prefix` is the module's name in `root`. Returns the names the checkpoint lacked."""
    missing, made = [], set()
    for sub_name, sub in module.named_modules(prefix=prefix):
        meta = [n for n, p in sub._parameters.items() if p is not None and p.is_meta]
        if not meta:
            continue
        for n in meta:
            old = sub._parameters[n]
            sub._parameters[n] = torch.nn.Parameter(torch.empty_like(old, device=device), old.requires_grad)
            made.add(sub._parameters[n])
        root._init_weights(sub)
        with torch.no_grad():
            for n in meta:
                name = f"{sub_name}.{n}" if sub_name else n
                if reader is not None and name in reader:
                    stored = reader.read(name)
                    if stored.shape != sub._parameters[n].shape:
                        raise ValueError(
                            f"{name}: checkpoint shape {tuple(stored.shape)} != model "
                            f"{tuple(sub._parameters[n].shape)}; the config does not match the weights."
                        )
                    sub._parameters[n].copy_(stored)
                elif "lora_" not in name:
                    missing.append(name)
    for sub in module.modules():  # LoRA A random, B zero: the adapter starts as the identity
        if hasattr(sub, "reset_lora_parameters") and any(p in made for p in sub.lora_A.parameters()):
            for adapter in sub.lora_A:
                sub.reset_lora_parameters(adapter, True)
    return missing


def load_and_shard(
    model,
    reader: CheckpointReader | None,
    device: torch.device,
    mesh,
    frozen_dtype: torch.dtype,
    mp_policy: MixedPrecisionPolicy,
) -> list[str]:
    """Materialise (from `reader`, else random), cast frozen weights to `frozen_dtype` and shard
    each layer in turn, then the rest with the root (the VAE left unsharded). Returns the names
    the checkpoint lacked."""
    names = {m: n for n, m in model.named_modules()}

    def finish(module, name):
        missing = materialize(module, model, device, reader, name)
        for param in module.parameters():
            if not param.requires_grad and not isinstance(param, torch.distributed.tensor.DTensor):
                param.data = param.data.to(frozen_dtype)
        return missing

    missing = []
    for layer in shard_units(model):
        missing += finish(layer, names[layer])
        fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
    missing += finish(model, "")
    vae = getattr(model, "vae", None)
    ignored = set(vae.parameters()) if vae is not None else None
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, ignored_params=ignored)
    return missing


def enable_activation_checkpointing(model, setting: bool | float) -> None:
    """`activation_checkpointing`: true (every decoder and ViT layer recomputes in the backward),
    false, or a fraction in [0, 1]: the first round(fraction * n) layers of each stack recompute,
    the others keep their activations (every layer of a stack keeps the same amount, so which
    ones does not matter). Full recomputation adds a forward of every layer to the step (LoRA's
    backward skips the frozen weights' gradients: 6/4 of its FLOPs); a fraction spends the memory
    that full checkpointing leaves unused on speed. Built on `gradient_checkpointing_enable()`
    (transformers' GradientCheckpointingLayer flags); transformers' own `every_n_layers` exists
    only in recent versions and counts the ViT and decoder layers as one sequence."""
    fraction = float(setting) if isinstance(setting, (bool, int, float)) else -1.0
    if not 0.0 <= fraction <= 1.0:
        raise SystemExit(
            f"activation_checkpointing={setting!r}: use true, false or a fraction of the layers in [0, 1] (e.g. 0.25)."
        )
    if fraction == 0.0:
        return
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    for stack in model.modules():
        if isinstance(stack, torch.nn.ModuleList) and all(hasattr(layer, "gradient_checkpointing") for layer in stack):
            recomputed = round(fraction * len(stack))
            for index, layer in enumerate(stack):
                layer.gradient_checkpointing = index < recomputed


def build_model(cfg: dict, checkpoint_dir: Path | None, config: BagelConfig, device: torch.device, mesh):
    """The sharded training model and its PEFT LoRA config (None without LoRA). Without a
    checkpoint directory the weights are random (benchmarks)."""
    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(config)
    apply_freezing(model, cfg)
    lora = None
    if cfg["lora_rank"]:
        from peft import get_peft_model

        lora = lora_config(cfg)
        get_peft_model(model, lora)  # wraps the projections in place; only LoRA weights train
    if not any(p.requires_grad for p in model.parameters()):
        switches = {k: cfg[k] for k in ("freeze_vit", "freeze_und", "freeze_llm", "lora_rank") if cfg[k]}
        raise SystemExit(
            f"Nothing to train: {switches} freeze every weight of this stage-{config.stage} model; "
            "unset a freeze switch."
        )
    enable_activation_checkpointing(model, cfg["activation_checkpointing"])
    cuda = device.type == "cuda"
    mp_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if cuda else None,
        reduce_dtype=torch.float32 if cuda else None,
        cast_forward_inputs=False,  # latents, noise and timesteps stay float32 until the model casts them
    )
    reader = CheckpointReader(checkpoint_dir) if checkpoint_dir is not None else None
    missing = load_and_shard(model, reader, device, mesh, torch.bfloat16 if cuda else torch.float32, mp_policy)
    if missing and reader is not None and dist.get_rank() == 0:
        print(f"Initialised {len(missing)} weight(s) the checkpoint lacks: {missing[:8]}", file=sys.stderr)
    model.train()
    return model, lora


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


class PackFile:
    """Packs (dicts of the training forward's keyword arguments) from a `torch.save`d list:
    rank r takes packs r, r + world, ..., cycling; the position is its resumable state."""

    def __init__(self, path: str, rank: int, world: int):
        if not Path(path).is_file():
            raise SystemExit(f"data={path!r}: no such file of packs (or give data: {{sources: [...]}}; see --help).")
        packs = torch.load(path, weights_only=False)
        self.packs = packs[rank::world]
        if not self.packs:
            raise SystemExit(f"data={path!r} has {len(packs)} pack(s), fewer than the {world} ranks.")
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


SOURCES = {"t2i": "T2IParquet", "edit": "EditParquet", "llava": "LlavaJsonl"}  # data_bagel readers


def build_dataset(cfg: dict, config: BagelConfig, checkpoint_dir: Path, rank: int, world: int):
    """This rank's packs, with `state_dict` / `load_state_dict` (its position, for exact resume).

    `data` is either a file of packs (`PackFile`), or data_bagel's readers with
    `BagelPackedDataset`'s packing limits (`finetune_config.Data`); with `num_workers` > 0, read
    in a torchdata `StatefulDataLoader` (its state covers the workers'). Each source must give a
    sample now (its first one is read), so a source that cannot stops the run before step 1."""
    data = cfg["data"]
    if not isinstance(data, dict):
        return PackFile(data, rank, world)
    processor = load_processor(checkpoint_dir, config)
    if processor is None:
        raise SystemExit(f"{checkpoint_dir} has no tokenizer files: reading data needs the checkpoint's tokenizer.")
    # VAE images at the checkpoint processor's sizes (BAGEL's: 512 to 1024 px, the reference's
    # training transform); ViT images at the reference's training sizes
    vae_sizes = packing_bagel.ImageSizes(processor.vae_max_size, processor.vae_min_size, processor.vae_stride)
    builder = packing_bagel.PlanBuilder(processor.tokenizer, vae_sizes=vae_sizes)
    sources = []
    for index, spec in enumerate(data["sources"]):
        where = f"data.sources.{index} ({spec['kind']}: {spec['path']})"
        paths = {"jsonl_path" if spec["kind"] == "llava" else "paths": spec["path"]}
        try:
            source = getattr(data_bagel, SOURCES[spec["kind"]])(
                **paths, **({"image_dir": spec["image_dir"]} if spec["kind"] == "llava" else {})
            )
            next(data_bagel.SourceStream(source, builder, 0, 1, cfg["seed"], index))
        except (OSError, ValueError) as error:
            raise SystemExit(f"{where}: no readable sample: {error}") from error
        sources.append(source)
    limits = {k: v for k, v in data.items() if k not in ("sources", "weights", "num_workers")}
    dataset = data_bagel.BagelPackedDataset(
        sources,
        builder,
        packing_bagel.PackingConfig.from_model_config(config, processor.special_token_ids),
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


# ----------------------------------------------------------------------------------------------
# Loss, optimisation, EMA
# ----------------------------------------------------------------------------------------------


COUNTS = ("tokens", "text_tokens", "vit_tokens", "vae_tokens", "ce_tokens", "mse_tokens")
_HOST_GROUP = {}


def host_group():
    """A gloo group for the host's numbers (the default group on CPU): with NCCL, adding up token
    counts on the GPU would make the host wait for the queued work before the forward."""
    if "group" not in _HOST_GROUP:  # made at the first step, by every rank alike
        _HOST_GROUP["group"] = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return _HOST_GROUP["group"]


def pack_counts(batch: dict) -> list[int]:
    """This pack's tokens by kind (`COUNTS`), from its tensors' shapes."""
    rows = lambda key: 0 if batch.get(key) is None else batch[key].shape[0]  # noqa: E731
    return [
        batch["sequence_length"],
        rows("packed_text_ids"),
        rows("packed_vit_tokens"),
        rows("packed_vae_token_indexes"),
        rows("ce_loss_indexes"),
        rows("mse_loss_indexes"),
    ]


def forward_backward(model, batch: dict, cfg: dict) -> dict[str, float]:
    """Forward and backward of this rank's pack, so that the gradients (after FSDP's average over
    ranks) are those of one process on all ranks' packs; returns the global loss, CE, MSE and
    token counts. Every part some rank needs runs on every rank (see the module docstring)."""
    world = dist.get_world_size()
    totals = torch.tensor(pack_counts(batch), dtype=torch.float64)
    dist.all_reduce(totals, group=host_group())
    counts = dict(zip(COUNTS, (int(n) for n in totals.tolist())))
    weights = batch.get("ce_loss_weights") if batch.get("ce_loss_indexes") is not None else None
    zero = batch["packed_position_ids"].new_zeros((), dtype=torch.float32)
    ce_den = zero + (weights.sum() if weights is not None else pack_counts(batch)[4])
    dist.all_reduce(ce_den)  # all ranks' CE weights (the CE normaliser): queued on the device, no wait
    out = model(**batch, always_run=[part for part, key in PARTS.items() if counts[key] > 0])
    ce, mse = out["ce"], out["mse"]
    if ce is not None and (weights is None or weights.shape != ce.shape):  # (absent, or CE run on zero tokens)
        weights = torch.ones_like(ce)
    ce_sum = (ce * weights).sum() if ce is not None else zero
    mse_sum = mse.mean(-1).sum() if mse is not None else zero
    ce_den, mse_den = ce_den.clamp_min(1e-12), max(counts["mse_tokens"], 1)
    loss = cfg["ce_weight"] * ce_sum / ce_den + cfg["mse_weight"] * mse_sum / mse_den
    if loss.requires_grad:  # the same on every rank (the same parts run); no: nothing trained gets a gradient
        (loss * world).backward()  # FSDP averages gradients over ranks
    sums = torch.stack([ce_sum.detach(), mse_sum.detach()]).double()
    dist.all_reduce(sums)
    metrics = {"ce": (sums[0] / ce_den).item(), "mse": sums[1].item() / mse_den}
    metrics["loss"] = cfg["ce_weight"] * metrics["ce"] + cfg["mse_weight"] * metrics["mse"]
    return {**metrics, **counts}


def build_optimizer(cfg: dict, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over the trained weights, by `optimizer`:
    - `adamw`: torch's, fused on CUDA (one kernel, in place: the default multi-tensor version
      makes temporaries as large as all the trained weights, 26 GB for GEN-only's 6.5B);
      float32 states, 8 bytes per trained weight.
    - `adamw8bit`: torchao's `AdamW8bit`, block-wise 8-bit states (2 bytes per weight; weights
      under 4096 values keep float32 states), which GEN-only training needs to fit one 141 GB GPU
      (float32 master weights + gradients + states: 6.5B x 16 bytes = 105 GB before activations;
      8-bit states: 65 GB). Chosen over bitsandbytes' AdamW8bit because torchao's takes FSDP2's
      DTensor parameters and keeps its states sharded like them (bitsandbytes' kernels need plain
      tensors: bitsandbytes-foundation/bitsandbytes#1633); gradients stay float32 and global-norm
      clipping works as with `adamw`. Its step is compiled (torch.compile) on first use."""
    kwargs = dict(lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        fused = bool(params) and all(p.device.type == "cuda" for p in params)
        return torch.optim.AdamW(params, fused=fused or None, **kwargs)
    if cfg["optimizer"] == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as err:
            raise SystemExit(
                "optimizer=adamw8bit needs torchao's 8-bit AdamW: pip install torchao (or use optimizer=adamw)."
            ) from err
        return AdamW8bit(params, **kwargs)
    raise SystemExit(f"optimizer={cfg['optimizer']!r}: use adamw or adamw8bit.")


def warmup_cosine(cfg: dict):
    """lr factor at a step: linear warm-up, then cosine down to `min_lr_ratio`."""
    warmup, total, floor = cfg["warmup_steps"], cfg["max_steps"], cfg["min_lr_ratio"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class EMA:
    """Exponential moving average of the trained weights, sharded like them (DTensors)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = params
        self.shadow = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1 - self.decay)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

# Frozen weights are not saved: they come from the model checkpoint. (Loading is not strict for
# them; a trained weight missing from a DCP checkpoint fails in `dcp.load` already.)
DCP_OPTIONS = StateDictOptions(ignore_frozen_params=True)
DCP_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def training_state(model, optimizer, scheduler, ema: EMA | None, dataset, step: int) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=DCP_OPTIONS)
    rank = dist.get_rank()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    # A weight no pack has given a gradient yet has no AdamW state, while a fresh optimizer gets
    # one for every weight (`get_state_dict` steps it once with zero gradients): which have one.
    stepped = [name for name, p in model.named_parameters() if optimizer.state.get(p)]
    return {
        "model": model_sd,
        "optim": optim_sd,
        "ema": ema.shadow if ema else {},
        "trainer": {"step": step, "scheduler": scheduler.state_dict()},
        "stepped": _blob(stepped),
        # Each rank's own, as one opaque blob: DCP matches nested entries against the structure of
        # the state it loads into, which for the data (waiting samples, workers) is not known ahead.
        f"rank{rank}": _blob({"rng": rng, "data": dataset.state_dict()}),
    }


def _blob(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _unblob(obj):
    return torch.load(obj, weights_only=False) if isinstance(obj, io.BytesIO) else obj  # DCP hands blobs back loaded


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(out_dir: Path, step: int, state: dict) -> None:
    """Every rank writes its part to `step_N.partial`; rank 0 then renames it `step_N` (atomic), so
    a run killed while writing leaves only a `.partial` directory, which is never resumed from."""
    path = checkpoint_path(out_dir, step)
    partial = path.with_name(path.name + ".partial")
    if dist.get_rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(partial))
    dist.barrier()
    exit_if_asked("save", step)
    if dist.get_rank() == 0:
        if path.exists():  # a checkpoint of a run whose later steps are redone
            shutil.rmtree(path)
        os.replace(partial, path)
    dist.barrier()


def load_checkpoint(path: Path, model, optimizer, scheduler, ema: EMA | None, dataset) -> tuple[int, dict]:
    """Restore what `training_state` saved but the RNG states; returns the step to continue from
    and this rank's RNG states (`set_rng_state`, once the data iterator exists)."""
    stepped = {"stepped": _blob(None)}
    dcp.load(stepped, checkpoint_id=str(path))
    stepped = set(_unblob(stepped["stepped"]))
    state = training_state(model, optimizer, scheduler, ema, dataset, 0)
    # (the states `get_state_dict` made for every weight are replaced by the loaded ones, these only)
    state["optim"]["state"] = {name: v for name, v in state["optim"]["state"].items() if name in stepped}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=DCP_LOAD_OPTIONS
    )
    scheduler.load_state_dict(state["trainer"]["scheduler"])
    mine = _unblob(state[f"rank{dist.get_rank()}"])
    dataset.load_state_dict(mine["data"])
    return int(state["trainer"]["step"]), mine["rng"]


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The last published checkpoint (`step_N`, not `step_N.partial`)."""
    done = sorted(p for p in (out_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit() and p.is_dir())
    return done[-1] if done else None


def prepare_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """Rank 0 clears what a killed or restarted run left; returns the checkpoint to resume from."""
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for partial in (out_dir / "checkpoints").glob("step_*.partial"):  # a write that was killed
            shutil.rmtree(partial)
        if not resume and (latest_checkpoint(out_dir) or (out_dir / "log.jsonl").exists()):
            print(f"resume=false: deleting {out_dir}/checkpoints and log.jsonl, starting at step 0.", file=sys.stderr)
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
            (out_dir / "log.jsonl").unlink(missing_ok=True)
    dist.barrier()
    return latest_checkpoint(out_dir)


def continue_log(path: Path, step: int) -> None:
    """Keep log.jsonl's lines up to `step`: those after the checkpoint resumed from are redone
    (a line cut short by a kill is dropped too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("step", 0) <= step:
            kept.append(line + "\n")
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(kept))
    os.replace(partial, path)


def exit_if_asked(where: str, step: int) -> None:
    """The tests' kill: `BAGEL_FINETUNE_EXIT_AT=step:K` after step K, `save:K` while K's checkpoint
    is written (after DCP's files, before it is published)."""
    if os.environ.get("BAGEL_FINETUNE_EXIT_AT") == f"{where}:{step}":
        sys.stderr.flush()
        os._exit(17)


def save_final(model, lora, ema: EMA | None, cfg: dict, checkpoint_dir: Path | None, freeze_und: bool) -> None:
    """Gather the weights (EMA ones where kept) on rank 0 and write the released layout to
    out_dir/final; with LoRA, the adapter to out_dir/adapter and the merged model to final."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ema is not None:  # every rank takes part in each gather
        gathered = {name: shadow.full_tensor().cpu() for name, shadow in ema.shadow.items()}
        full.update(gathered if dist.get_rank() == 0 else {})
    if dist.get_rank() != 0:
        return
    out = Path(cfg["out_dir"])
    dtype = getattr(torch, cfg["save_dtype"])
    full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
    config = model.config
    config.text_config.freeze_und = freeze_und  # the switch of this run, not of the saved model
    with torch.device("meta"):
        fresh = BagelForUnifiedMultimodal(config)
    if lora is not None:
        from peft import get_peft_model

        adapted = get_peft_model(fresh, lora)
        fresh.load_state_dict(full, assign=True)
        adapted.save_pretrained(str(out / "adapter"))
        fresh = adapted.merge_and_unload()
    else:
        fresh.load_state_dict(full, assign=True)
    fresh.processor = load_processor(checkpoint_dir, config)  # saved with it: `final` is complete
    fresh.save_pretrained(str(out / "final"))


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------


def init_distributed() -> tuple[int, int, torch.device]:
    """The process group torchrun describes (NCCL on GPUs, gloo on CPU); without torchrun, a
    group of one process."""
    if "RANK" not in os.environ:
        with socket.socket() as probe:  # a free port for the one-process group's store
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        print(
            "Not started by torchrun: training as one process (torchrun --nproc_per_node N examples/finetune.py "
            "... for N).",
            file=sys.stderr,
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def train_step(model, batch: dict, cfg: dict, optimizer, scheduler, params: list, ema: EMA | None) -> dict:
    """Forward, backward, clipped AdamW step; returns the global metrics and the grad norm."""
    metrics = forward_backward(model, batch, cfg)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
    metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    metrics["lr"] = float(scheduler.get_last_lr()[0])  # a tensor with torchao's optimizers
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    return metrics


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(help_text())
        return
    cfg = load_config(argv)
    if not cfg["data"]:
        raise SystemExit("Set data=: a file of packs, or {sources: [...], ...} (see --help, examples/finetune.yaml).")
    rank, world, device = init_distributed()
    mesh = init_device_mesh(device.type, (world,))
    out_dir = Path(cfg["out_dir"])
    for turn in (0, 1):  # rank 0 first (a Hub download), then the others from the cache
        if (rank == 0) == (turn == 0):
            checkpoint_dir = resolve_checkpoint_dir(cfg["model"], "", {}, None)
        dist.barrier()
    config = config_from_directory(checkpoint_dir)
    freeze_und = config.text_config.freeze_und
    dataset = build_dataset(cfg, config, checkpoint_dir, rank, world)  # data errors before the model is built
    torch.manual_seed(cfg["seed"])  # the same random init (LoRA, missing weights) on every rank
    model, lora = build_model(cfg, checkpoint_dir, config, device, mesh)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(trained.values())
    optimizer = build_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))
    ema = EMA(trained, cfg["ema_decay"]) if cfg["ema_decay"] else None
    torch.manual_seed(cfg["seed"] + rank)  # noise and timesteps differ between ranks

    step, rng = 0, None
    resume = prepare_out_dir(out_dir, cfg["resume"])
    if resume is not None:
        try:
            step, rng = load_checkpoint(resume, model, optimizer, scheduler, ema, dataset)
        except (Exception, dcp.api.CheckpointException) as error:  # (DCP's is a BaseException)
            detail = [line for line in str(error).splitlines() if line.strip()][-1:] or [type(error).__name__]
            raise SystemExit(
                f"Cannot resume from {resume}: {detail[0][:500]}\nIt was written by a run with other "
                "settings (ranks, num_workers, data sources, freeze / LoRA switches) or is damaged. Rerun with that "
                "run's settings, or start afresh: resume=false (deletes out_dir's checkpoints and log) or another "
                "out_dir."
                if rank == 0
                else 1  # one message, not one per rank
            ) from error
    if rank == 0:
        continue_log(out_dir / "log.jsonl", step)
        n_trained = sum(p.numel() for p in params)  # DTensor numel: the whole tensor
        print(
            f"{n_trained:,} trained parameters ({n_trained / 1e6:.2f}M) on {world} rank(s)"
            + (f"; resumed from {resume} (step {step})" if resume else ""),
            file=sys.stderr,
        )
    log = open(out_dir / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=rank != 0, dynamic_ncols=True)
    packs = iter(dataset)  # a StatefulDataLoader draws its base seed from the global generator here,
    if rng is not None:  # so the saved RNG states are restored after it
        set_rng_state(rng)
    while step < cfg["max_steps"]:
        start = time.perf_counter()
        batch = packing_bagel.encode_pack(model, next(packs), device)  # on the device, images VAE-encoded
        metrics = train_step(model, batch, cfg, optimizer, scheduler, params, ema)
        step += 1
        metrics.update(step=step, tokens_per_s=metrics["tokens"] / (time.perf_counter() - start))
        if rank == 0 and step % cfg["log_every"] == 0:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "ce", "mse", "tokens_per_s")})
        bar.update(1)
        if step % cfg["save_every"] == 0 or step == cfg["max_steps"]:
            save_checkpoint(out_dir, step, training_state(model, optimizer, scheduler, ema, dataset, step))
        exit_if_asked("step", step)
    bar.close()
    save_final(model, lora, ema, cfg, checkpoint_dir, freeze_und)
    if log is not None:
        log.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
