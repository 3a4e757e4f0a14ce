"""Tests of BagelConfig (configuration_bagel.py)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from bagel_remote.configuration_bagel import BAGEL_PAD_TOKEN_ID, BagelConfig, normalize_stage
from conftest import REPO_ROOT
from transformers import Qwen2Config, SiglipVisionConfig

LLM = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_act="silu",
)
VIT = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    patch_size=14,
    image_size=56,
    num_channels=3,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
)


def make(**kwargs) -> BagelConfig:
    kwargs.setdefault("llm_config", dict(LLM))
    kwargs.setdefault("vit_config", dict(VIT))
    return BagelConfig(max_latent_size=8, vit_max_num_patch_per_side=4, **kwargs)


# ----------------------------------------------------------------------------------------------
# Key sets and nested types
# ----------------------------------------------------------------------------------------------


def test_both_key_sets_give_equal_configs():
    a = BagelConfig(llm_config=dict(LLM), vit_config=dict(VIT))
    b = BagelConfig(text_config=dict(LLM), vision_config=dict(VIT))
    assert a.to_dict() == b.to_dict()
    for cfg in (a, b):
        assert cfg.llm_config is cfg.text_config
        assert cfg.vit_config is cfg.vision_config
        assert isinstance(cfg.text_config, Qwen2Config)
        assert isinstance(cfg.vision_config, SiglipVisionConfig)
        assert cfg.text_config.hidden_size == 32 and cfg.vision_config.hidden_size == 16
        assert cfg.text_config.qk_norm is True
        assert cfg.text_config.layer_module == "Qwen2MoTDecoderLayer"
        assert cfg.text_config.freeze_und is False
        assert cfg.text_config.tie_word_embeddings is False
        assert cfg.vision_config.rope is False
        assert cfg.vision_config.num_hidden_layers == 2  # 3 released, the last dropped (vit_select_layer=-2)
        assert cfg.get_text_config() is cfg.text_config
    # Config objects are accepted as well as dicts, and the setters convert dicts.
    c = BagelConfig(text_config=Qwen2Config(**LLM), vision_config=SiglipVisionConfig(**VIT))
    assert c.to_dict() == a.to_dict()
    c.llm_config = dict(LLM, hidden_size=48)
    assert isinstance(c.text_config, Qwen2Config) and c.text_config.hidden_size == 48 and c.llm_config is c.text_config
    assert c.text_config.qk_norm is True and c.text_config.freeze_und is False
    with pytest.raises(TypeError, match="llm_config / text_config"):
        BagelConfig(llm_config=42)
    with pytest.raises(TypeError, match="vit_config / vision_config"):
        BagelConfig(llm_config=dict(LLM), vit_config="siglip")


def test_vit_rope_override_and_freeze_und_kept():
    cfg = make(vit_rope=True, llm_config=dict(LLM, freeze_und=True))
    assert cfg.vision_config.rope is True
    assert cfg.text_config.freeze_und is True


# ----------------------------------------------------------------------------------------------
# Serialisation round trips: the reference overrides are applied once
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", [1, 2])
def test_to_dict_round_trip(stage):
    cfg = make(stage=stage, vit_rope=True)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert d["stage"] == stage and d["reference_overrides_applied"] is True
    assert "llm_config" not in d and "vit_config" not in d and "_stage" not in d
    for rebuilt in (BagelConfig(**d), BagelConfig.from_dict(d)):
        assert rebuilt.to_dict() == cfg.to_dict()
        assert rebuilt.vision_config.num_hidden_layers == 2, "ViT layers reduced a second time"
        assert rebuilt.stage == stage and rebuilt.visual_gen is (stage == 2)
        assert rebuilt.vision_config.rope is True


def test_save_pretrained_round_trip(tmp_path):
    cfg = make(stage=2, timestep_shift=3.0)
    cfg.save_pretrained(tmp_path)
    again = BagelConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert again.vision_config.num_hidden_layers == 2
    assert again.timestep_shift == 3.0 and again.max_latent_size == 8
    # Save and load once more: still no drift.
    again.save_pretrained(tmp_path / "second")
    assert BagelConfig.from_pretrained(tmp_path / "second").to_dict() == cfg.to_dict()


def test_released_sidecar_configs_undo_the_overrides():
    cfg = make()
    files = cfg.released_sidecar_configs()
    assert files["vit_config.json"]["num_hidden_layers"] == VIT["num_hidden_layers"]
    assert cfg.vision_config.num_hidden_layers == 2  # the config itself is unchanged
    rebuilt = BagelConfig(llm_config=files["llm_config.json"], vit_config=files["vit_config.json"])
    assert rebuilt.vision_config.num_hidden_layers == 2


# ----------------------------------------------------------------------------------------------
# The parity checkpoint: config.json, and the released sidecar files alone
# ----------------------------------------------------------------------------------------------


def test_parity_checkpoint_config(parity):
    raw = json.loads((parity.checkpoint / "config.json").read_text())
    assert raw["vit_config"]["num_hidden_layers"] == 3
    cfg = BagelConfig.from_pretrained(parity.checkpoint)
    assert cfg.vision_config.num_hidden_layers == 2 == parity.meta["vit_layers_in_model"]
    assert cfg.text_config.hidden_size == raw["llm_config"]["hidden_size"]
    assert cfg.max_latent_size == raw["max_latent_size"]
    assert cfg.vae_config == raw["vae_config"]
    assert cfg.stage == 2 and cfg.text_config.layer_module == "Qwen2MoTDecoderLayer"


def test_from_pretrained_sidecar_files(parity, tmp_path):
    for name in ("llm_config.json", "vit_config.json"):
        shutil.copy(parity.checkpoint / name, tmp_path / name)
    cfg = BagelConfig.from_pretrained(tmp_path)
    vit_json = json.loads((parity.checkpoint / "vit_config.json").read_text())
    llm_json = json.loads((parity.checkpoint / "llm_config.json").read_text())
    assert cfg.vision_config.num_hidden_layers == vit_json["num_hidden_layers"] - 1
    assert cfg.text_config.hidden_size == llm_json["hidden_size"]
    assert cfg.text_config.qk_norm is True and cfg.text_config.tie_word_embeddings is False
    assert cfg.max_latent_size == 64 and cfg.vit_max_num_patch_per_side == 70  # BAGEL-7B-MoT defaults
    assert cfg.stage == 2
    stage1 = BagelConfig.from_pretrained(tmp_path, stage=1)
    assert stage1.stage == 1 and stage1.visual_gen is False


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"llm_config\.json"):
        BagelConfig.from_pretrained(tmp_path)
    (tmp_path / "llm_config.json").write_text(json.dumps(LLM))
    with pytest.raises(FileNotFoundError, match=r"vit_config\.json"):
        BagelConfig.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------
# pad_token_id
# ----------------------------------------------------------------------------------------------


def test_pad_token_id_always_set():
    assert "pad_token_id" not in LLM
    cfg = make()
    assert cfg.pad_token_id == BAGEL_PAD_TOKEN_ID == 151643
    assert cfg.text_config.pad_token_id == BAGEL_PAD_TOKEN_ID
    assert BagelConfig(llm_config=dict(LLM), pad_token_id=None).pad_token_id == BAGEL_PAD_TOKEN_ID
    explicit = BagelConfig(llm_config=dict(LLM, pad_token_id=0), pad_token_id=7)
    assert explicit.pad_token_id == 7 and explicit.text_config.pad_token_id == 0
    assert BagelConfig().text_config.pad_token_id == BAGEL_PAD_TOKEN_ID
    assert json.loads(json.dumps(cfg.to_dict()))["text_config"]["pad_token_id"] == BAGEL_PAD_TOKEN_ID


# ----------------------------------------------------------------------------------------------
# Stage normalisation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value, expected", [(1, 1), (2, 2), ("stage1", 1), ("STAGE2", 2), ("2", 2), ("Stage1", 1)])
def test_stage_accepted(value, expected):
    assert normalize_stage(value) == expected
    cfg = make(stage=value)
    assert cfg.stage == expected
    assert cfg.visual_gen is (expected == 2)


@pytest.mark.parametrize("value", [0, 3, "stage3", "", "one", True, False, 1.0])
def test_stage_rejected(value):
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        normalize_stage(value)
    with pytest.raises(ValueError, match=re.escape(repr(value))):
        make(stage=value)


def test_normalize_stage_none_rejected():
    with pytest.raises(ValueError, match="None"):
        normalize_stage(None)


def test_stage_none_follows_visual_gen():
    assert make().stage == 2
    assert make(visual_gen=False).stage == 1
    assert make(visual_gen=False).text_config.layer_module == "Qwen2DecoderLayer"


def test_setting_stage_updates_visual_gen_and_layer_module():
    cfg = make()
    assert cfg.stage == 2 and cfg.visual_gen is True
    cfg.stage = 1
    assert cfg.stage == 1 and cfg.visual_gen is False
    assert cfg.text_config.layer_module == "Qwen2DecoderLayer"
    cfg.stage = "stage2"
    assert cfg.stage == 2 and cfg.visual_gen is True
    assert cfg.text_config.layer_module == "Qwen2MoTDecoderLayer"
    with pytest.raises(ValueError, match="'stage3'"):
        cfg.stage = "stage3"
    # Explicit stage wins over a contradicting visual_gen.
    assert make(stage=1, visual_gen=True).visual_gen is False
    assert make(stage=2, visual_gen=False).visual_gen is True


# ----------------------------------------------------------------------------------------------
# Silent mistakes: misspelt keys, quoted numbers
# ----------------------------------------------------------------------------------------------


def test_unknown_keys_warn_with_the_likely_key(caplog, tmp_path):
    with caplog.at_level("WARNING", logger="bagel_remote.configuration_bagel"):
        config = make(max_latnet_size=16, my_note="x")
    messages = [r.getMessage() for r in caplog.records]
    assert any("unknown key 'max_latnet_size'" in m and "did you mean 'max_latent_size'" in m for m in messages)
    assert any("unknown key 'my_note'" in m for m in messages)
    assert config.max_latent_size == 8  # the misspelt key changed nothing
    # Known keys, from BagelConfig or from transformers, and a saved and reloaded config: no warning.
    caplog.clear()
    with caplog.at_level("WARNING", logger="bagel_remote.configuration_bagel"):
        config = make(tie_word_embeddings=False, output_hidden_states=False, problem_type=None, stage=1)
        config.save_pretrained(tmp_path)
        BagelConfig.from_pretrained(tmp_path)
        BagelConfig.from_pretrained(REPO_ROOT)
    assert not [r for r in caplog.records if "unknown key" in r.getMessage()]


def test_from_pretrained_keyword_arguments_that_nothing_takes_warn(caplog, tmp_path):
    """transformers drops a keyword argument of `from_pretrained` that no config attribute takes;
    a misspelt one warns, known ones apply, and the model's loader (which asks for the unused
    arguments back, its own among them) gets them without a warning."""
    make().save_pretrained(tmp_path)
    with caplog.at_level("WARNING", logger="bagel_remote.configuration_bagel"):
        config = BagelConfig.from_pretrained(tmp_path, vit_ropee=True, max_latent_size=16)
    assert any("unknown key 'vit_ropee'" in r.getMessage() and "'vit_rope'" in r.getMessage() for r in caplog.records)
    assert config.max_latent_size == 16 and not config.vit_rope
    caplog.clear()
    with caplog.at_level("WARNING", logger="bagel_remote.configuration_bagel"):
        _, unused = BagelConfig.from_pretrained(tmp_path, device_map="cpu", return_unused_kwargs=True)
    assert unused == {"device_map": "cpu"} and not caplog.records


@pytest.mark.parametrize(
    "field, value, kind",
    [
        ("latent_patch_size", "2", "an integer"),
        ("max_latent_size", 64.0, "an integer"),
        ("vit_select_layer", True, "an integer"),
        ("timestep_shift", "3.0", "a number"),
    ],
)
def test_numeric_fields_refuse_other_types_by_name(field, value, kind):
    with pytest.raises(TypeError, match=rf"BagelConfig\.{field} must be {kind}, got {re.escape(repr(value))}.*quotes"):
        BagelConfig(**{field: value})


def test_quoted_number_in_config_json_is_refused_by_name(tmp_path):
    make().save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["max_latent_size"] = "8"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(TypeError, match=r"BagelConfig\.max_latent_size must be an integer, got '8'"):
        BagelConfig.from_pretrained(tmp_path)
