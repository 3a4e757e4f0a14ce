"""Fine-tune BAGEL with torch FSDP2: full, GEN-only, frozen-tower or LoRA runs, resumable.

    torchrun --nproc_per_node 8 examples/finetune.py my_run.yaml out_dir=runs/full
    torchrun --nproc_per_node 1 examples/finetune.py my_run.yaml out_dir=runs/lora lora_rank=64

One config file (a copy of examples/finetune.yaml, its data filled in); any key can be overridden
as `key=value` (YAML values). Needs torch >= 2.7 (`fully_shard` with `ignored_params`).

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
- Loss (the reference's trainer): CE = sum(ce * weight) / sum(weights) and MSE = per-token mean
  over channels, summed / number of MSE tokens, both over all ranks; loss = ce_weight * CE +
  mse_weight * MSE.
- Checkpoints: torch DCP (sharded, every rank writes its own part) of the trained weights,
  optimizer, scheduler, EMA, data position and RNG states; resuming gives the same next loss.
  The final save gathers the weights on rank 0 and writes the released layout
  (`save_pretrained`: loads with `from_pretrained`); LoRA runs also write the PEFT adapter.
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from repo_package import import_repo  # noqa: E402

import_repo()  # this checkout, as the package `bagel_remote` (its modules import each other relatively)
from bagel_remote import data_bagel, packing_bagel  # noqa: E402
from bagel_remote.configuration_bagel import BagelConfig  # noqa: E402
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal  # noqa: E402
from bagel_remote.loading_bagel import (  # noqa: E402
    VAE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    config_from_directory,
    load_processor,
    resolve_checkpoint_dir,
)
from bagel_remote.state_dict_adapter import checkpoint_bucket  # noqa: E402

DEFAULT_CONFIG = Path(__file__).with_suffix(".yaml")
WEIGHT_FILES = {"model.": WEIGHTS_NAME, "vae.": VAE_WEIGHTS_NAME}  # native prefix -> released file


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def load_config(argv: list[str]) -> dict[str, Any]:
    """`[config.yaml] key=value ...` -> the config dict (defaults from examples/finetune.yaml)."""
    path = DEFAULT_CONFIG
    if argv and "=" not in argv[0]:
        path, argv = Path(argv[0]), argv[1:]
    cfg = yaml.safe_load(Path(path).read_text())
    defaults = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"Unknown override {item!r}: use key=value with a key of {DEFAULT_CONFIG.name}: "
                             f"{', '.join(defaults)}.")
        cfg[key] = yaml.safe_load(value)
    cfg = {**defaults, **cfg}
    for key, default in defaults.items():  # YAML reads 1e-3 (no dot) as a string
        if isinstance(default, float):
            cfg[key] = float(cfg[key])
    return cfg


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

    unknown = set(cfg["lora_sides"]) - set(LORA_TARGETS)
    if unknown or not cfg["lora_sides"]:
        raise SystemExit(f"lora_sides={cfg['lora_sides']}: pick from {sorted(LORA_TARGETS)}.")
    projections = "|".join(LORA_TARGETS[side] for side in cfg["lora_sides"])
    return LoraConfig(
        r=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
        target_modules=rf".*language_model\.model\.layers\.\d+\.({projections})",
    )  # fmt: skip


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
            if name.startswith(prefix) and name[len(prefix):] in self.keys[prefix]:
                return prefix, name[len(prefix):]
        return None

    def __contains__(self, name: str) -> bool:
        return self._stored(name) is not None

    def read(self, name: str) -> torch.Tensor:
        prefix, key = self._stored(name)
        return self.handles[prefix].get_tensor(key)


def materialize(module: torch.nn.Module, root, device: torch.device, reader: CheckpointReader | None,
                prefix: str) -> list[str]:  # fmt: skip
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
                        raise ValueError(f"{name}: checkpoint shape {tuple(stored.shape)} != model "
                                         f"{tuple(sub._parameters[n].shape)}; the config does not match the weights.")
                    sub._parameters[n].copy_(stored)
                elif "lora_" not in name:
                    missing.append(name)
    for sub in module.modules():  # LoRA A random, B zero: the adapter starts as the identity
        if hasattr(sub, "reset_lora_parameters") and any(p in made for p in sub.lora_A.parameters()):
            for adapter in sub.lora_A:
                sub.reset_lora_parameters(adapter, True)
    return missing


def load_and_shard(model, reader: CheckpointReader | None, device: torch.device, mesh, frozen_dtype: torch.dtype,
                   mp_policy: MixedPrecisionPolicy) -> list[str]:  # fmt: skip
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
        raise SystemExit(f"activation_checkpointing={setting!r}: use true, false or a fraction of the layers "
                         "in [0, 1] (e.g. 0.25).")  # fmt: skip
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
    enable_activation_checkpointing(model, cfg["activation_checkpointing"])
    cuda = device.type == "cuda"
    mp_policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if cuda else None, reduce_dtype=torch.float32 if cuda else None,
        cast_forward_inputs=False,  # latents, noise and timesteps stay float32 until the model casts them
    )  # fmt: skip
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
        packs = torch.load(path, weights_only=False)
        self.packs = packs[rank::world]
        if not self.packs:
            raise ValueError(f"{path} has {len(packs)} pack(s), fewer than the {world} ranks.")
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


def build_dataset(cfg: dict, model, checkpoint_dir: Path, rank: int, world: int):
    """This rank's packs, with `state_dict` / `load_state_dict` (its position, for exact resume).

    `data` is either a file of packs (`PackFile`), or data_bagel's readers with
    `BagelPackedDataset`'s packing limits:
    `{sources: [{kind: t2i | edit | llava, path: ..., image_dir: ... (llava)}], weights: [...],
    max_num_tokens: ..., expected_num_tokens: ..., max_num_tokens_per_sample: ...}`; with
    `num_workers` > 0, read in a torchdata `StatefulDataLoader` (its state covers the workers')."""
    data = cfg["data"]
    if not data:
        raise SystemExit("Set data=: a file of packs, or {sources: [...], ...} (see build_dataset in finetune.py).")
    if not isinstance(data, dict):
        return PackFile(data, rank, world)
    processor = load_processor(checkpoint_dir, model.config)
    if processor is None:
        raise SystemExit(f"{checkpoint_dir} has no tokenizer files: reading data needs the checkpoint's tokenizer.")
    sources = []
    for source in data["sources"]:
        source = dict(source)
        kind = source.pop("kind")
        if kind not in SOURCES:
            raise SystemExit(f"data source kind {kind!r}: use one of {', '.join(SOURCES)}.")
        paths = {"jsonl_path" if kind == "llava" else "paths": source.pop("path"), **source}
        sources.append(getattr(data_bagel, SOURCES[kind])(**paths))
    limits = {k: v for k, v in data.items() if k not in ("sources", "weights", "num_workers")}
    dataset = data_bagel.BagelPackedDataset(
        sources, packing_bagel.PlanBuilder(processor.tokenizer),
        packing_bagel.PackingConfig.from_model_config(model.config, processor.special_token_ids),
        weights=data.get("weights"), seed=cfg["seed"], rank=rank, world_size=world, **limits,
    )  # fmt: skip
    if not data.get("num_workers"):
        return dataset
    from torchdata.stateful_dataloader import StatefulDataLoader

    return StatefulDataLoader(dataset, batch_size=None, num_workers=data["num_workers"],
                              pin_memory=torch.cuda.is_available())  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Loss, optimisation, EMA
# ----------------------------------------------------------------------------------------------


def reduce_losses(out: dict, batch: dict, cfg: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """This rank's share of the global loss, scaled by the world size (FSDP averages gradients
    over ranks), and the global CE, MSE and loss for logging, and the tokens of all ranks' packs
    (`tokens`): one all-reduce for all of them."""
    ce, mse = out["ce"], out["mse"]
    zero = next(t for t in (ce, mse) if t is not None).new_zeros(())
    weights = batch.get("ce_loss_weights")
    if ce is not None and weights is None:
        weights = torch.ones_like(ce)
    local = torch.stack([
        (ce * weights).sum() if ce is not None else zero, weights.sum().float() if ce is not None else zero,
        mse.mean(-1).sum() if mse is not None else zero, zero + (mse.shape[0] if mse is not None else 0),
        zero + batch["sequence_length"],
    ])  # fmt: skip
    totals = local.detach().clone()
    dist.all_reduce(totals)
    ce_sum, weight_sum, mse_sum, mse_count, tokens = totals.tolist()
    ce_den, mse_den = max(weight_sum, 1e-12), max(mse_count, 1.0)
    loss = cfg["ce_weight"] * local[0] / ce_den + cfg["mse_weight"] * local[2] / mse_den
    metrics = {"ce": ce_sum / ce_den, "mse": mse_sum / mse_den, "tokens": tokens}
    metrics["loss"] = cfg["ce_weight"] * metrics["ce"] + cfg["mse_weight"] * metrics["mse"]
    return loss * dist.get_world_size(), metrics


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
            raise SystemExit("optimizer=adamw8bit needs torchao's 8-bit AdamW: pip install torchao "
                             "(or use optimizer=adamw).") from err  # fmt: skip
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
    return {
        "model": model_sd, "optim": optim_sd, "ema": ema.shadow if ema else {},
        "trainer": {"step": step, "scheduler": scheduler.state_dict()},
        # Each rank's own, as one opaque blob: DCP matches nested entries against the structure of
        # the state it loads into, which for the data (waiting samples, workers) is not known ahead.
        f"rank{rank}": _blob({"rng": rng, "data": dataset.state_dict()}),
    }  # fmt: skip


def _blob(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def save_checkpoint(path: Path, state: dict) -> None:
    dcp.save(state, checkpoint_id=str(path))
    dist.barrier()
    if dist.get_rank() == 0:
        (path / "complete").touch()


def load_checkpoint(path: Path, model, optimizer, scheduler, ema: EMA | None, dataset) -> int:
    """Restore everything `training_state` saved; returns the step to continue from."""
    state = training_state(model, optimizer, scheduler, ema, dataset, 0)
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=DCP_LOAD_OPTIONS)  # fmt: skip
    scheduler.load_state_dict(state["trainer"]["scheduler"])
    mine = state[f"rank{dist.get_rank()}"]  # DCP hands a blob back loaded
    if isinstance(mine, io.BytesIO):
        mine = torch.load(mine, weights_only=False)
    dataset.load_state_dict(mine["data"])
    torch.set_rng_state(mine["rng"]["cpu"])
    if "cuda" in mine["rng"]:
        torch.cuda.set_rng_state(mine["rng"]["cuda"])
    return int(state["trainer"]["step"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted(p.parent for p in (out_dir / "checkpoints").glob("step_*/complete"))
    return done[-1] if done else None


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
    """The process group torchrun describes (NCCL on GPUs, gloo on CPU)."""
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
    out = model(**batch)
    loss, metrics = reduce_losses(out, batch, cfg)
    if not loss.requires_grad:
        raise RuntimeError("This pack gives no gradient to the trained weights (e.g. freeze_und and no MSE tokens).")
    loss.backward()
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

    cfg = load_config(sys.argv[1:] if argv is None else argv)
    rank, world, device = init_distributed()
    mesh = init_device_mesh(device.type, (world,))
    out_dir = Path(cfg["out_dir"])
    for turn in (0, 1):  # rank 0 first (a Hub download), then the others from the cache
        if (rank == 0) == (turn == 0):
            checkpoint_dir = resolve_checkpoint_dir(cfg["model"], "", {}, None)
        dist.barrier()
    config = config_from_directory(checkpoint_dir)
    torch.manual_seed(cfg["seed"])  # the same random init (LoRA, missing weights) on every rank
    freeze_und = config.text_config.freeze_und
    model, lora = build_model(cfg, checkpoint_dir, config, device, mesh)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(trained.values())
    optimizer = build_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))
    ema = EMA(trained, cfg["ema_decay"]) if cfg["ema_decay"] else None
    dataset = build_dataset(cfg, model, checkpoint_dir, rank, world)
    torch.manual_seed(cfg["seed"] + rank)  # noise and timesteps differ between ranks

    step = 0
    resume = latest_checkpoint(out_dir)
    if resume is not None:
        step = load_checkpoint(resume, model, optimizer, scheduler, ema, dataset)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        n_trained = sum(p.numel() for p in params)
        print(f"{n_trained / 1e6:.1f}M trained parameters on {world} rank(s)" +
              (f"; resumed from {resume}" if resume else ""), file=sys.stderr)  # fmt: skip
    log = open(out_dir / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=cfg["max_steps"], initial=step, disable=rank != 0, dynamic_ncols=True)
    packs = iter(dataset)
    while step < cfg["max_steps"]:
        start = time.perf_counter()
        batch = packing_bagel.encode_pack(model, next(packs), device)  # on the device, images VAE-encoded
        metrics = train_step(model, batch, cfg, optimizer, scheduler, params, ema)
        step += 1
        metrics.update(step=step, tokens_per_s=metrics.pop("tokens") / (time.perf_counter() - start))
        if rank == 0 and step % cfg["log_every"] == 0:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
            bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "ce", "mse", "tokens_per_s")})
        bar.update(1)
        if step % cfg["save_every"] == 0 or step == cfg["max_steps"]:
            save_checkpoint(out_dir / "checkpoints" / f"step_{step:08d}",
                            training_state(model, optimizer, scheduler, ema, dataset, step))  # fmt: skip
    bar.close()
    save_final(model, lora, ema, cfg, checkpoint_dir, freeze_und)
    if log is not None:
        log.close()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
