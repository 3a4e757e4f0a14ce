"""The training model: BAGEL built on the meta device, frozen by the config's switches or wrapped
with PEFT LoRA, then materialised, filled from the checkpoint and sharded with FSDP2 one decoder /
ViT layer at a time, so no rank holds more than one layer unsharded, on the device or in host RAM.
(transformers' loader builds the whole model on one device; it cannot fill FSDP2 shards layer by
layer, hence `load_and_shard`.)

Precision: on CUDA the trained weights are float32 master weights computed in bf16
(`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`) and frozen weights are stored in
bf16; on CPU (gloo) everything is float32. The VAE is never trained and never sharded.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ..configuration_bagel import BagelConfig
from ..loading_bagel import VAE_WEIGHTS_NAME, WEIGHTS_NAME
from ..modeling_bagel import BagelForUnifiedMultimodal
from ..state_dict_adapter import SafetensorsReader, checkpoint_bucket
from .config import ConfigError

WEIGHT_FILES = {"model.": WEIGHTS_NAME, "vae.": VAE_WEIGHTS_NAME}  # native prefix -> released file


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
    """PEFT's `LoraConfig` for the decoder projections of `lora_sides` (`LORA_TARGETS`)."""
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


def checkpoint_reader(directory: Path) -> SafetensorsReader:
    """The released checkpoint's weights by native name (ema.safetensors, ae.safetensors when present)."""
    if not (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}: not a BAGEL checkpoint directory.")
    return SafetensorsReader(
        {prefix: directory / file for prefix, file in WEIGHT_FILES.items() if (directory / file).is_file()}
    )


def materialize(
    module: torch.nn.Module, root, device: torch.device, reader: SafetensorsReader | None, prefix: str
) -> list[str]:
    """Give the meta parameters of `module` storage on `device`, initialised by the model's
    `_init_weights` (LoRA layers by PEFT's own init), then overwritten from the checkpoint where it
    has them (a PEFT-wrapped weight, `q_proj.base_layer.weight`, from the wrapped layer's name).
    `prefix` is the module's name in `root`. Returns the names the checkpoint lacked."""
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
                stored_name = name.replace(".base_layer.", ".")
                if reader is not None and stored_name in reader:
                    stored = reader.read(stored_name)
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
    reader: SafetensorsReader | None,
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
        raise ConfigError(
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
        raise ConfigError(
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
    frozen_dtype = torch.bfloat16 if cuda else torch.float32
    if checkpoint_dir is None:  # random weights
        load_and_shard(model, None, device, mesh, frozen_dtype, mp_policy)
    else:
        with checkpoint_reader(checkpoint_dir) as reader:
            missing = load_and_shard(model, reader, device, mesh, frozen_dtype, mp_policy)
        if missing and dist.get_rank() == 0:
            print(f"Initialised {len(missing)} weight(s) the checkpoint lacks: {missing[:8]}", file=sys.stderr)
    model.train()
    return model, lora
