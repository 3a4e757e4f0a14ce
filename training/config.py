"""examples/finetune.py's configuration: a declared schema (pydantic), checked in full before
anything is built.

`load_config(["run.yaml", "key=value", ...])` reads the YAML file, applies the `key=value`
overrides (values read as YAML) and validates the whole: unknown keys (in the file or on the
command line), wrong types, out-of-range values and combinations that cannot train are refused
with a `ConfigError` naming the key, the value and what is allowed. `help_text()` is `--help`.
The defaults are the fields' (examples/finetune.yaml is the commented template a run copies).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, field_validator, model_validator

TEMPLATE = Path(__file__).resolve().parent.parent / "examples" / "finetune.yaml"  # the commented template a run copies


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key(s) and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)


class Source(_Strict):
    """One data source in the reference's format (docs/training.md, Data formats)."""

    kind: Literal["t2i", "edit", "llava"] = Field(description="t2i parquet, edit parquet or LLaVA-style JSONL")
    path: str | list[str] = Field(description="a file, a directory (its *.parquet) or a list of either")
    image_dir: str | None = Field(None, description="llava only: the folder the JSONL's image names are relative to")

    @model_validator(mode="after")
    def _image_dir_for_llava_only(self):
        if self.kind == "llava" and self.image_dir is None:
            raise ValueError("image_dir: a llava source needs image_dir, the folder its image names are relative to")
        if self.kind != "llava" and self.image_dir is not None:
            raise ValueError(f"image_dir: only llava sources take image_dir (a {self.kind} parquet holds its images)")
        return self


class Data(_Strict):
    """Sources mixed by weight and packed (`data.BagelPackedDataset`, `packing.Packer`)."""

    sources: list[Source] = Field(min_length=1, description="the data sources")
    weights: list[float] | None = Field(None, description="mixing weight per source (default: equal)")
    max_num_tokens: int = Field(36864, gt=0, description="hard cap of a pack's tokens")
    expected_num_tokens: int = Field(32768, gt=0, description="a pack is emitted once it holds this many tokens")
    max_num_tokens_per_sample: int = Field(16384, gt=0, description="longer samples are skipped")
    prefer_buffer_before: int = Field(16384, gt=0, description="draw waiting samples first while a pack is shorter")
    max_buffer_size: int = Field(50, ge=0, description="samples that may wait for a later pack")
    num_workers: int = Field(0, ge=0, description="DataLoader workers (torchdata StatefulDataLoader)")

    @model_validator(mode="after")
    def _consistent(self):
        if self.weights is not None:
            if len(self.weights) != len(self.sources) or min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(
                    f"weights: give one non-negative weight per source ({len(self.sources)}) with a "
                    f"positive sum, got {self.weights}"
                )
        for key in ("expected_num_tokens", "max_num_tokens_per_sample"):
            if getattr(self, key) > self.max_num_tokens:
                raise ValueError(
                    f"{key}: {getattr(self, key)} is above max_num_tokens ({self.max_num_tokens}); "
                    f"lower it or raise max_num_tokens"
                )
        return self


class FinetuneConfig(_Strict):
    """Every key of a fine-tuning run (examples/finetune.yaml)."""

    model: str = Field(
        "ByteDance-Seed/BAGEL-7B-MoT", min_length=1, description="checkpoint directory or Hub id, released layout"
    )
    out_dir: str = Field(
        "outputs/finetune", min_length=1, description="checkpoints/step_N, log.jsonl, final/ (and adapter/)"
    )
    seed: int = Field(0, ge=0, description="seeds initialisation, data order, noise")
    data: str | Data | None = Field(None, description="a torch.save'd list of packs, or {sources: [...], ...}")
    max_steps: int = Field(1000, gt=0, description="optimizer steps")
    lr: float = Field(2.0e-5, gt=0, description="peak learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr * min_lr_ratio")
    warmup_steps: int = Field(50, ge=0, description="linear warm-up steps")
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw (torch's) or adamw8bit (torchao's)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas, each in [0, 1)")
    eps: float = Field(1.0e-15, gt=0, description="AdamW eps")
    grad_clip: float = Field(1.0, ge=0, description="global gradient-norm clip (0: none)")
    ce_weight: float = Field(1.0, ge=0, description="weight of the CE loss")
    mse_weight: float = Field(1.0, ge=0, description="weight of the MSE loss")
    freeze_vit: StrictBool = Field(False, description="freeze the SigLIP tower")
    freeze_und: StrictBool = Field(False, description="freeze the understanding path (GEN-only training)")
    freeze_llm: StrictBool = Field(False, description="freeze the whole decoder, UND and GEN")
    lora_rank: int = Field(0, ge=0, description="> 0: LoRA through PEFT on lora_sides; everything else frozen")
    lora_alpha: float = Field(16, gt=0, description="LoRA alpha")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    lora_sides: list[Literal["und", "gen"]] = Field(
        ["und", "gen"], min_length=1, description="und: q/k/v/o, gate/up/down; gen: their *_moe_gen twins"
    )
    activation_checkpointing: StrictBool | float = Field(
        True, description="true, false or a fraction of each stack's layers in [0, 1]"
    )
    ema_decay: float = Field(0.0, ge=0, lt=1, description="> 0: keep an EMA of the trained weights")
    save_every: int = Field(500, gt=0, description="DCP checkpoint every N steps (and at the end)")
    log_every: int = Field(1, gt=0, description="a log.jsonl line every N steps")
    save_dtype: Literal["float32", "bfloat16", "float16"] = Field("bfloat16", description="dtype of the final save")
    resume: StrictBool = Field(
        True,
        description="resume from out_dir's last checkpoint; false: delete out_dir's "
        "checkpoints and log and start afresh",
    )

    @field_validator("betas", mode="before")
    @classmethod
    def _two_betas(cls, betas):
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise ValueError(f"give two numbers [beta1, beta2] (e.g. [0.9, 0.95]), got {betas!r}")
        return betas

    @field_validator("betas")
    @classmethod
    def _betas(cls, betas):
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas

    @field_validator("activation_checkpointing")
    @classmethod
    def _fraction(cls, value):
        if not isinstance(value, bool) and not 0.0 <= value <= 1.0:
            raise ValueError(f"use true, false or a fraction of the layers in [0, 1] (e.g. 0.25), got {value}")
        return value

    @model_validator(mode="after")
    def _trains_something(self):
        if self.lora_rank and self.freeze_llm:
            raise ValueError(
                "freeze_llm: LoRA (lora_rank > 0) adapts the decoder, which freeze_llm freezes; drop "
                "freeze_llm (with LoRA everything but the adapters is frozen anyway)"
            )
        if self.lora_rank and self.freeze_und and "und" in self.lora_sides:
            raise ValueError(
                "lora_sides: with freeze_und the understanding path gets no gradient, so its 'und' "
                "adapters would never train; use lora_sides=[gen]"
            )
        return self


# ----------------------------------------------------------------------------------------------
# Reading: file + command line -> validated dict
# ----------------------------------------------------------------------------------------------


_UNION_TAGS = {"str", "Data", "list[str]", "bool", "float", "none"}  # pydantic's names of a union's members
_KEYS = set(FinetuneConfig.model_fields) | set(Data.model_fields) | set(Source.model_fields)


def _describe(error: dict) -> str:
    """One line per problem: the dotted key, what is wrong, the value given."""
    loc = [part for part in error["loc"] if isinstance(part, int) or (part not in _UNION_TAGS and "[" not in part)]
    where = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        schema = Source if "sources" in loc else Data if "data" in loc[:-1] else FinetuneConfig
        return f"{where}: unknown key (allowed: {', '.join(schema.model_fields)})"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "value_error":  # our own checks, whose messages name the value
        if message.split(":")[0] in _KEYS:  # a check of a whole (sub)config: its message starts with the key
            return f"{where}.{message}" if where else message
        return f"{where}: {message}"
    given = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
    return f"{where}: {message}{given}"


def validate(raw: dict[str, Any]) -> dict[str, Any]:
    """The validated configuration as a plain dict (nested for `data`); a `ConfigError` listing
    every problem otherwise."""
    try:
        config = FinetuneConfig.model_validate(raw)
    except ValidationError as error:
        problems = [_describe(e) for e in error.errors(include_url=False)]
        if isinstance(raw.get("data"), dict):  # a data dict is also tried as a pack-file path: drop that echo
            problems = [p for p in problems if not p.startswith("data: Input should be a valid string")]
        raise ConfigError(
            "Invalid fine-tuning config (see `python examples/finetune.py --help`):\n  "
            + "\n  ".join(dict.fromkeys(problems))
        ) from None
    return config.model_dump()


def load_config(argv: list[str]) -> dict[str, Any]:
    """`[config.yaml] key=value ...` -> the validated config dict (unset keys take the defaults)."""
    raw: dict[str, Any] = {}
    if argv and "=" not in argv[0]:
        path, argv = Path(argv[0]), argv[1:]
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found (copy {TEMPLATE} and fill in its data).")
        raw = _yaml(path.read_text(), str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must hold a YAML mapping of keys to values, got {type(raw).__name__}.")
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{item!r}: overrides are key=value (e.g. lr=1e-4); see --help.")
        raw[key] = _yaml(value, repr(item))
    return validate(raw)


def _yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML ({error}).") from None


def help_text() -> str:
    lines = [
        "usage: torchrun --nproc_per_node N examples/finetune.py [config.yaml] [key=value ...]",
        "",
        f"Fine-tune BAGEL (FSDP2). A config file is a copy of {TEMPLATE.name}; key=value overrides any key",
        "(values read as YAML: lr=1e-4, freeze_und=true, lora_sides=[gen]). Without torchrun it runs as one process.",
        "",
        "keys (default):",
    ]
    for schema, prefix in ((FinetuneConfig, ""), (Data, "data."), (Source, "data.sources[].")):
        for name, field in schema.model_fields.items():
            default = "required" if field.is_required() else repr(field.default)
            lines.append(f"  {prefix + name:<30} {field.description} ({default})")
    return "\n".join(lines)
