"""Configuration of BAGEL (ByteDance Seed's unified multimodal model).

`BagelConfig` nests a Qwen2 config for the language model and a SigLIP vision config for the
understanding tower, with the top-level BAGEL values around them. It accepts both key sets in use:
the released checkpoint's `llm_config` / `vit_config` and the transformers-style `text_config` /
`vision_config`; both attribute names point at the same nested object.

The reference applies a few overrides in code when it builds the model from the released json files
(LLM: `qk_norm=True`, untied embeddings, MoT layers for stage 2; ViT: `rope=vit_rope` and one layer
less, since BAGEL reads the second-to-last SigLIP layer). `BagelConfig` applies them once, when it
is built, and records that in `reference_overrides_applied` so a saved and reloaded config is not
changed twice.
"""

from __future__ import annotations

if not __package__:  # `import configuration_bagel` from a clone (no package for the relative imports)
    raise ImportError(
        "configuration_bagel.py is remote code whose modules import each other relatively, so it is not imported "
        "as a plain module. From a clone use transformers.dynamic_module_utils.get_class_from_dynamic_module("
        "'configuration_bagel.BagelConfig', 'path/to/the/clone'), or examples/quickstart.py --model "
        "(README: Use from a clone)."
    )

import difflib
import inspect
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig, Qwen2Config, SiglipVisionConfig

from .state_dict_adapter import _normalize_stage as normalize_stage
from .validation_bagel import check_bool, check_choice, check_int, check_int_list, check_number

BAGEL_PAD_TOKEN_ID = 151643
DEFAULT_VAE_CONFIG = {
    "resolution": 256,
    "in_channels": 3,
    "downsample": 8,
    "ch": 128,
    "out_ch": 3,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "z_channels": 16,
    "scale_factor": 0.3611,
    "shift_factor": 0.1159,
}
MOT_LAYER, PLAIN_LAYER = "Qwen2MoTDecoderLayer", "Qwen2DecoderLayer"
#: Integer fields and their smallest value (vit_select_layer: a layer counted from the end).
INT_FIELDS = {"max_latent_size": 1, "latent_patch_size": 1, "vit_patch_size": 1, "vit_max_num_patch_per_side": 1}
DROPOUT_FIELDS = ("text_cond_dropout_prob", "vae_cond_dropout_prob", "vit_cond_dropout_prob")
VAE_INT_FIELDS = ("resolution", "in_channels", "downsample", "ch", "out_ch", "num_res_blocks", "z_channels")
# Keys every transformers config takes or writes (config.json holds them), beyond BagelConfig's own.
PRETRAINED_CONFIG_KEYS = (
    frozenset(inspect.signature(PretrainedConfig.__init__).parameters)
    | frozenset(vars(PretrainedConfig()))
    | {
        "auto_map",
        "model_type",
        "torch_dtype",
        "name_or_path",
        "output_attentions",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "sep_token_id",
        "decoder_start_token_id",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
        "num_labels",
        "use_cache",
        "attn_implementation",
        "experts_implementation",  # transformers 5.0 writes it into every config (no experts here)
    }
)

logger = logging.getLogger(__name__)


def rope_theta(text_config: Qwen2Config) -> float:
    """The RoPE base, wherever this transformers version keeps it."""
    params = getattr(text_config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(text_config, "rope_theta", 10000.0)))


def _text_config(value: Any) -> Qwen2Config:
    if value is None:
        value = Qwen2Config()
    elif isinstance(value, Mapping):
        value = Qwen2Config(**{k: v for k, v in value.items() if k != "model_type"})
    elif not isinstance(value, Qwen2Config):
        raise TypeError(f"llm_config / text_config must be a dict or a Qwen2Config, got {type(value).__name__}.")
    for name, default in (("qk_norm", True), ("layer_module", None), ("freeze_und", False)):
        if not hasattr(value, name):
            setattr(value, name, default)
    if value.pad_token_id is None:
        value.pad_token_id = BAGEL_PAD_TOKEN_ID
    return value


def _vision_config(value: Any) -> SiglipVisionConfig | None:
    if value is None or isinstance(value, SiglipVisionConfig):
        pass
    elif isinstance(value, Mapping):
        value = SiglipVisionConfig(**{k: v for k, v in value.items() if k != "model_type"})
    else:
        raise TypeError(
            f"vit_config / vision_config must be a dict or a SiglipVisionConfig, got {type(value).__name__}."
        )
    if value is not None and not hasattr(value, "rope"):
        value.rope = False
    return value


def _check_values(config: BagelConfig) -> None:
    """Every value the model is built from, checked when the config is built: a quoted "64" or a
    negative size in a config.json would otherwise fail much later, obscurely, or not at all (a
    negative timestep shift loads and generates garbage)."""
    fix = "Fix it in config.json (numbers without quotes) or in the keyword argument."
    for name, minimum in INT_FIELDS.items():
        check_int(f"BagelConfig.{name}", getattr(config, name), minimum=minimum, fix=fix)
    check_int(
        "BagelConfig.vit_select_layer",
        config.vit_select_layer,
        maximum=-1,
        fix=f"It counts ViT layers from the end: -2 (the reference) reads the second-to-last. {fix}",
    )
    for name in DROPOUT_FIELDS:
        check_number(f"BagelConfig.{name}", getattr(config, name), minimum=0, maximum=1, fix=fix)
    check_number("BagelConfig.timestep_shift", config.timestep_shift, minimum=0, open_min=True, fix=fix)
    for name in ("visual_und", "visual_gen", "interpolate_pos"):
        check_bool(f"BagelConfig.{name}", getattr(config, name), fix=fix)
    from transformers.activations import ACT2FN

    check_choice("BagelConfig.connector_act", config.connector_act, sorted(ACT2FN))
    for name in VAE_INT_FIELDS:
        if name in config.vae_config:
            check_int(f"BagelConfig.vae_config[{name!r}]", config.vae_config[name], minimum=1, fix=fix)
    if "ch_mult" in config.vae_config:
        check_int_list("BagelConfig.vae_config['ch_mult']", config.vae_config["ch_mult"], minimum=1, fix=fix)
    for name in ("scale_factor", "shift_factor"):
        if name in config.vae_config:
            check_number(f"BagelConfig.vae_config[{name!r}]", config.vae_config[name], fix=fix)
    text = config.text_config
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "max_position_embeddings",
    ):
        check_int(f"text_config.{name}", getattr(text, name), minimum=1, fix=fix)
    if text.hidden_size % text.num_attention_heads or text.num_attention_heads % text.num_key_value_heads:
        raise ValueError(
            f"text_config: hidden_size ({text.hidden_size}) must be a multiple of num_attention_heads "
            f"({text.num_attention_heads}), and that of num_key_value_heads ({text.num_key_value_heads}). {fix}"
        )
    check_bool("text_config.freeze_und", text.freeze_und, fix=fix)
    vision = config.vision_config
    if vision is not None and not config.reference_overrides_applied:
        check_int(
            "BagelConfig.vit_select_layer",
            config.vit_select_layer,
            minimum=-vision.num_hidden_layers,
            fix=f"The ViT has {vision.num_hidden_layers} layers.",
        )


def _warn_unknown_keys(kwargs: Mapping[str, Any]) -> None:
    """Keys that neither BagelConfig nor PretrainedConfig knows are kept (as transformers does) but
    used by nothing: most likely a misspelling, so say so."""
    own = set(inspect.signature(BagelConfig.__init__).parameters)
    for key in sorted(set(kwargs) - own - PRETRAINED_CONFIG_KEYS):
        close = difflib.get_close_matches(key, sorted(own - {"self", "kwargs"}), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        logger.warning(f"BagelConfig got an unknown key {key!r}, which nothing reads{hint}")


class BagelConfig(PretrainedConfig):
    """Top-level BAGEL configuration (the NeMo AutoModel signature, both key sets accepted)."""

    model_type = "bagel"

    def __init__(
        self,
        vision_config: Mapping | SiglipVisionConfig | None = None,
        text_config: Mapping | Qwen2Config | None = None,
        *,
        visual_und: bool = True,
        visual_gen: bool = True,
        stage: int | str | None = None,
        llm_path: str = "",
        vit_path: str = "",
        vae_path: str = "",
        max_latent_size: int = 64,
        latent_patch_size: int = 2,
        vit_patch_size: int = 14,
        vit_max_num_patch_per_side: int = 70,
        connector_act: str = "gelu_pytorch_tanh",
        interpolate_pos: bool = False,
        vit_select_layer: int = -2,
        vit_rope: bool = False,
        text_cond_dropout_prob: float = 0.1,
        vae_cond_dropout_prob: float = 0.3,
        vit_cond_dropout_prob: float = 0.3,
        timestep_shift: float = 1.0,
        pad_token_id: int = BAGEL_PAD_TOKEN_ID,
        llm_config: Mapping | Qwen2Config | None = None,
        vit_config: Mapping | SiglipVisionConfig | None = None,
        vae_config: Mapping | None = None,
        reference_overrides_applied: bool = False,
        **kwargs: Any,
    ) -> None:
        self.text_config = _text_config(text_config if text_config is not None else llm_config)
        self.vision_config = _vision_config(vision_config if vision_config is not None else vit_config)
        self.vae_config = dict(DEFAULT_VAE_CONFIG if vae_config is None else vae_config)
        self.visual_und = visual_und
        self.visual_gen = visual_gen
        self.stage = stage
        self.llm_path, self.vit_path, self.vae_path = llm_path, vit_path, vae_path
        self.max_latent_size = max_latent_size
        self.latent_patch_size = latent_patch_size
        self.vit_patch_size = vit_patch_size
        self.vit_max_num_patch_per_side = vit_max_num_patch_per_side
        self.connector_act = connector_act
        self.interpolate_pos = interpolate_pos
        self.vit_select_layer = vit_select_layer
        self.vit_rope = vit_rope
        self.text_cond_dropout_prob = text_cond_dropout_prob
        self.vae_cond_dropout_prob = vae_cond_dropout_prob
        self.vit_cond_dropout_prob = vit_cond_dropout_prob
        self.timestep_shift = timestep_shift
        self.reference_overrides_applied = reference_overrides_applied
        _check_values(self)
        _warn_unknown_keys(kwargs)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(pad_token_id=pad_token_id, **kwargs)
        if self.pad_token_id is None:
            self.pad_token_id = BAGEL_PAD_TOKEN_ID
        if not self.architectures:
            self.architectures = ["BagelForUnifiedMultimodal"]
        self.apply_reference_overrides()

    # Both names of each nested config are the same object.
    @property
    def llm_config(self) -> Qwen2Config:
        return self.text_config

    @llm_config.setter
    def llm_config(self, value: Any) -> None:
        self.text_config = _text_config(value)

    @property
    def vit_config(self) -> SiglipVisionConfig | None:
        return self.vision_config

    @vit_config.setter
    def vit_config(self, value: Any) -> None:
        self.vision_config = _vision_config(value)

    @property
    def vit_rope(self) -> bool:
        """Whether the ViT uses 2-D RoPE (the reference's `vit_rope`). Setting it, also as a keyword
        argument of `from_pretrained`, sets the nested ViT config's `rope` once the reference
        overrides have been applied (before, they apply it)."""
        return self._vit_rope

    @vit_rope.setter
    def vit_rope(self, value: bool) -> None:
        self._vit_rope = bool(value)
        if getattr(self, "reference_overrides_applied", False) and self.vision_config is not None:
            self.vision_config.rope = self._vit_rope

    @property
    def stage(self) -> int | None:
        """1 (understanding only, plain decoder) or 2 (joint, MoT); setting it sets `visual_gen`
        and the decoder layer kind to match."""
        return self._stage

    @stage.setter
    def stage(self, value: int | str | None) -> None:
        self._stage = None if value is None else normalize_stage(value)
        if self._stage is not None:
            self.visual_gen = self._stage == 2
            self.text_config.layer_module = MOT_LAYER if self._stage == 2 else PLAIN_LAYER

    def apply_reference_overrides(self) -> None:
        """Apply the reference's build-time overrides once (idempotent, recorded in the config)."""
        self.stage = self.stage if self.stage is not None else (2 if self.visual_gen else 1)
        text = self.text_config
        if self.reference_overrides_applied:
            return
        text.qk_norm = True
        text.tie_word_embeddings = False
        if self.vision_config is not None:
            # The reference drops the layers after `vit_select_layer` (-2: the last one).
            self.vision_config.num_hidden_layers += 1 + self.vit_select_layer
            self.vision_config.rope = self.vit_rope
        self.reference_overrides_applied = True

    # The image geometry the processor and the training packing derive from this config (its one home).
    @property
    def vae_token_stride(self) -> int:
        """Pixels per latent token side: the VAE's downsampling times `latent_patch_size` (16)."""
        return int(self.vae_config.get("downsample", DEFAULT_VAE_CONFIG["downsample"])) * self.latent_patch_size

    @property
    def max_vae_image_size(self) -> int:
        """Largest image side the latent position table covers, in pixels (1024 for BAGEL-7B-MoT)."""
        return self.max_latent_size * self.vae_token_stride

    @property
    def max_vit_image_size(self) -> int:
        """Largest image side the ViT position table covers, in pixels (980 for BAGEL-7B-MoT)."""
        return self.vit_max_num_patch_per_side * self.vit_patch_size

    def get_text_config(self, *args: Any, **kwargs: Any) -> Qwen2Config:
        return self.text_config

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        for alias in ("llm_config", "vit_config", "_stage", "_vit_rope"):
            output.pop(alias, None)
        output["stage"] = self.stage
        output["vit_rope"] = self.vit_rope
        output["text_config"] = self.text_config.to_dict()
        output["vision_config"] = None if self.vision_config is None else self.vision_config.to_dict()
        return output

    def released_sidecar_configs(self) -> dict[str, dict[str, Any]]:
        """`llm_config.json` / `vit_config.json` as the reference reads them (before its overrides)."""
        files = {"llm_config.json": self.text_config.to_dict()}
        if self.vision_config is not None:
            vit = self.vision_config.to_dict()
            vit["num_hidden_layers"] -= 1 + self.vit_select_layer
            files["vit_config.json"] = vit
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> BagelConfig:
        """Read `config.json`, or, in a directory of the released layout that has none, build the
        config from `llm_config.json` + `vit_config.json` with BAGEL-7B-MoT's top-level values."""
        path = Path(pretrained_model_name_or_path)
        if path.is_dir() and not (path / "config.json").is_file():
            return cls.from_released_files(path, **kwargs)
        wants_unused = kwargs.pop("return_unused_kwargs", False)
        config, unused = super().from_pretrained(pretrained_model_name_or_path, return_unused_kwargs=True, **kwargs)
        _check_values(config)  # again: transformers sets keyword overrides after building the config
        if wants_unused:
            return config, unused
        _warn_unknown_keys(unused)  # transformers drops keyword arguments no config attribute takes
        return config

    @classmethod
    def from_released_files(cls, directory: str | os.PathLike, **kwargs: Any) -> BagelConfig:
        directory = Path(directory)
        sidecars = {}
        for name in ("llm_config.json", "vit_config.json"):
            file = directory / name
            if not file.is_file():
                raise FileNotFoundError(
                    f"{directory} has neither config.json nor {name}: a BAGEL checkpoint directory needs "
                    "config.json, or the released llm_config.json + vit_config.json."
                )
            sidecars[name] = json.loads(file.read_text())
        kwargs.pop("return_unused_kwargs", None)
        # A ViT trained with the reference's vit_rope says so in its json (`rope: true`).
        kwargs.setdefault("vit_rope", bool(sidecars["vit_config.json"].get("rope", False)))
        return cls(llm_config=sidecars["llm_config.json"], vit_config=sidecars["vit_config.json"], **kwargs)
