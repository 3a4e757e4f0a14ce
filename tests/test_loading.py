"""Loading and saving BAGEL checkpoints in the released layout (from_pretrained / save_pretrained,
AutoModel with trust_remote_code, the root config.json and the tiny checkpoint builder)."""

from __future__ import annotations

import filecmp
import json
import logging
import shutil
import warnings
from pathlib import Path

import make_tiny_checkpoint  # scripts/ is on sys.path (conftest)
import pytest
import torch
from bagel_remote.configuration_bagel import DEFAULT_VAE_CONFIG, BagelConfig
from bagel_remote.modeling_bagel import AUTO_MAP, BagelForUnifiedMultimodal, remote_code_files
from bagel_remote.state_dict_adapter import load_bagel_checkpoint_state_dict
from conftest import REPO_ROOT, assert_close
from safetensors import safe_open
from safetensors.torch import load_file, save_file

GEN_MARKERS = ("_moe_gen", "time_embedder", "vae2llm", "llm2vae", "latent_pos_embed")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    """A tiny random checkpoint in the released layout, with tokenizer, processor and code."""
    return make_tiny_checkpoint.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "bagel_tiny", seed=0)


def _copy_repo(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy a checkpoint into a fresh directory that looks like a Hub repository."""
    dst.mkdir(parents=True)
    for file in src.iterdir():
        if file.is_file() and file.name not in skip:
            shutil.copyfile(file, dst / file.name)
    return dst


def _parity_repo(parity, dst: Path) -> Path:
    """The parity checkpoint plus our remote code and a config.json with auto_map (it has none)."""
    _copy_repo(parity.checkpoint, dst)
    for name, source in remote_code_files(REPO_ROOT).items():
        shutil.copyfile(source, dst / name)
    config = json.loads((dst / "config.json").read_text())
    assert "auto_map" not in config
    config["auto_map"] = dict(AUTO_MAP)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for file in dst.iterdir():  # the fixture files are read-only; the copies need not be
        file.chmod(0o644)
    return dst


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def _checkpoint_state(directory: Path) -> dict[str, torch.Tensor]:
    """What the files hold, under the model's names (model.* from ema, vae.* from ae)."""
    state = {"model." + k: v for k, v in load_file(str(directory / "ema.safetensors")).items()}
    if (directory / "ae.safetensors").is_file():
        state.update({"vae." + k: v for k, v in load_file(str(directory / "ae.safetensors")).items()})
    return state


def _automodel():
    from transformers import AutoModel

    return AutoModel


# ----------------------------------------------------------------------------------------------
# Root config.json
# ----------------------------------------------------------------------------------------------

# The released llm_config.json (Qwen2.5-7B-Instruct's) and vit_config.json (SigLIP so400m/14 at 980).
RELEASED_LLM_CONFIG = dict(
    architectures=["Qwen2ForCausalLM"],
    attention_dropout=0.0,
    bos_token_id=151643,
    eos_token_id=151645,
    hidden_act="silu",
    hidden_size=3584,
    initializer_range=0.02,
    intermediate_size=18944,
    max_position_embeddings=32768,
    max_window_layers=28,
    num_attention_heads=28,
    num_hidden_layers=28,
    num_key_value_heads=4,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    sliding_window=131072,
    tie_word_embeddings=False,
    use_cache=True,
    use_sliding_window=False,
    vocab_size=152064,
)
RELEASED_VIT_CONFIG = dict(
    architectures=["SiglipVisionModel"],
    attention_dropout=0.0,
    hidden_act="gelu_pytorch_tanh",
    hidden_size=1152,
    image_size=980,
    intermediate_size=4304,
    layer_norm_eps=1e-6,
    num_attention_heads=16,
    num_channels=3,
    num_hidden_layers=27,
    patch_size=14,
)


def bagel_7b_config() -> BagelConfig:
    """How the root config.json is generated (then written with to_json_string(use_diff=False))."""
    config = BagelConfig(
        llm_config=dict(RELEASED_LLM_CONFIG),
        vit_config=dict(RELEASED_VIT_CONFIG),
        latent_patch_size=2,
        max_latent_size=64,
        vit_max_num_patch_per_side=70,
        connector_act="gelu_pytorch_tanh",
        interpolate_pos=False,
        timestep_shift=1.0,
        stage=2,
    )
    config.auto_map = dict(AUTO_MAP)
    return config


def test_root_config_json_is_bagel_7b_mot(tmp_path):
    written = json.loads((REPO_ROOT / "config.json").read_text())
    expected = json.loads(bagel_7b_config().to_json_string(use_diff=False))
    # Top level: exactly what BagelConfig writes. Nested Qwen2 / SigLIP configs: every value both have
    # agrees (transformers versions add or drop a few defaults, e.g. SigLIP's vision_use_head).
    assert set(written) == set(expected)
    for key in expected:
        if key in ("text_config", "vision_config"):
            common = (set(written[key]) & set(expected[key])) - {"transformers_version"}
            assert {k: written[key][k] for k in common} == {k: expected[key][k] for k in common}, key
            assert len(common) >= len(expected[key]) - 3, key
        elif key != "transformers_version":
            assert written[key] == expected[key], key
    assert written["auto_map"] == {
        "AutoConfig": "configuration_bagel.BagelConfig",
        "AutoModel": "modeling_bagel.BagelForUnifiedMultimodal",
        "AutoProcessor": "processing_bagel.BagelProcessor",
    }
    assert written["architectures"] == ["BagelForUnifiedMultimodal"]
    assert written["reference_overrides_applied"] is True and written["stage"] == 2
    assert written["vae_config"] == DEFAULT_VAE_CONFIG

    config = BagelConfig.from_pretrained(REPO_ROOT)  # loading does not re-apply the overrides
    text, vit = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads) == (
        3584,
        28,
        28,
        4,
    )
    assert (text.intermediate_size, text.vocab_size, text.max_position_embeddings) == (18944, 152064, 32768)
    assert (text.rms_norm_eps, text.hidden_act, text.bos_token_id, text.eos_token_id) == (1e-6, "silu", 151643, 151645)
    assert text.rope_parameters["rope_theta"] == 1e6 and text.qk_norm is True and text.tie_word_embeddings is False
    assert text.layer_module == "Qwen2MoTDecoderLayer"
    assert (vit.hidden_size, vit.num_hidden_layers, vit.num_attention_heads, vit.intermediate_size) == (
        1152,
        26,
        16,
        4304,
    )
    assert (vit.patch_size, vit.image_size, vit.layer_norm_eps, vit.hidden_act, vit.rope) == (
        14,
        980,
        1e-6,
        "gelu_pytorch_tanh",
        False,
    )
    assert (config.latent_patch_size, config.max_latent_size, config.vit_max_num_patch_per_side) == (2, 64, 70)
    assert (config.connector_act, config.interpolate_pos, config.timestep_shift) == ("gelu_pytorch_tanh", False, 1.0)
    # The released sidecars are recovered exactly (27 ViT layers in the json).
    assert config.released_sidecar_configs()["vit_config.json"]["num_hidden_layers"] == 27

    # AutoConfig reads it through the remote code; the model it describes has BAGEL-7B-MoT's shapes.
    repo = tmp_path / "bagel_7b_config"
    repo.mkdir()
    shutil.copyfile(REPO_ROOT / "config.json", repo / "config.json")
    for name, source in remote_code_files(REPO_ROOT).items():
        shutil.copyfile(source, repo / name)
    from transformers import AutoConfig

    auto = AutoConfig.from_pretrained(repo, trust_remote_code=True)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert type(auto).__name__ == "BagelConfig" and strip(auto.to_dict()) == strip(config.to_dict())
    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.language_model.model.embed_tokens.weight"] == (152064, 3584)
    assert shapes["model.language_model.model.layers.27.mlp_moe_gen.down_proj.weight"] == (3584, 18944)
    assert shapes["model.vit_model.vision_model.encoder.layers.25.mlp.fc1.weight"] == (4304, 1152)
    assert "model.vit_model.vision_model.encoder.layers.26.mlp.fc1.weight" not in shapes
    assert shapes["model.vit_pos_embed.pos_embed"] == (4900, 3584)
    assert shapes["model.latent_pos_embed.pos_embed"] == (4096, 3584)
    assert shapes["model.llm2vae.weight"] == (64, 3584)
    assert shapes["vae.encoder.conv_in.weight"] == (128, 3, 3, 3)


# ----------------------------------------------------------------------------------------------
# AutoModel with trust_remote_code
# ----------------------------------------------------------------------------------------------


def test_automodel_loads_tiny_repo_offline(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = _copy_repo(tiny, tmp_path / "hub_tiny")
    model, info = _automodel().from_pretrained(str(repo), trust_remote_code=True, output_loading_info=True)
    assert type(model).__name__ == "BagelForUnifiedMultimodal"
    assert type(model).__module__.startswith("transformers_modules.")  # the repository's code, not ours
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    assert not model.training and model.config.stage == 2
    # The checkpoint's processor comes with the model (chat / generate_image use it).
    assert type(model.processor).__name__ == "BagelProcessor"
    assert model.processor.bos_token_id == model.config.text_config.bos_token_id
    assert model.processor.eos_token_id == model.config.text_config.eos_token_id
    assert all(not p.is_meta and p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    _assert_same_state(_state(model), _checkpoint_state(repo))

    stage1 = _automodel().from_pretrained(str(repo), trust_remote_code=True, stage=1)
    assert stage1.config.stage == 1 and stage1.vae is None and not stage1.training
    names = list(_state(stage1))
    assert not [n for n in names if any(m in n for m in GEN_MARKERS) or n.startswith("vae.")]
    full = _checkpoint_state(repo)
    for name, tensor in _state(stage1).items():
        assert torch.equal(tensor, full[name]), name


def test_automodel_reproduces_parity_outputs(parity, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = _parity_repo(parity, tmp_path / "hub_parity")
    model, info = _automodel().from_pretrained(str(repo), trust_remote_code=True, output_loading_info=True)
    assert not any(info.values())
    assert not model.training and model.processor is None  # no tokenizer files in the fixture

    vit = parity.case_inputs("vit")
    train = parity.case_inputs("train")
    meta = parity.meta["cases"]["train"]
    noise = train.pop("noise")
    train.pop("padded_images")
    with torch.no_grad():
        seqlens = torch.diff(vit["cu_seqlens"])
        embeddings = model.model.embed_vit_tokens(
            vit["packed_pixel_values"], vit["packed_flattened_position_ids"], seqlens
        )
        out = model(
            **train,
            packed_noise=noise,
            output_hidden_states=True,
            sequence_length=meta["sequence_length"],
            sample_lens=meta["sample_lens"],
            split_lens=meta["split_lens"],
            attn_modes=meta["attn_modes"],
            patchified_vae_latent_shapes=meta["patchified_vae_latent_shapes"],
        )
    assert_close(embeddings, parity.expected["vit.embeddings"], 1e-4, "vit.embeddings")
    for name in ("ce", "mse", "last_hidden_state"):
        assert_close(out[name], parity.expected[f"train.{name}"], 1e-4, f"train.{name}")

    # Stage 1 through AutoModel: understanding weights only, the understanding sample's CE.
    stage1 = _automodel().from_pretrained(str(repo), trust_remote_code=True, stage=1)
    assert stage1.vae is None and not hasattr(stage1.model, "llm2vae")
    with torch.no_grad():
        ce = stage1(**parity.understanding_batch())["ce"]
    assert_close(ce, parity.expected["train.ce"], 1e-4, "stage-1 train.ce")


def test_automodel_forwards_extra_kwargs_and_honours_config(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = _copy_repo(tiny, tmp_path / "hub_kwargs")
    # Config attributes given as keyword arguments override the config, as in transformers.
    model = _automodel().from_pretrained(str(repo), trust_remote_code=True, timestep_shift=3.0, strict=True)
    assert model.config.timestep_shift == 3.0
    # Our classmethod accepts what AutoModel passes on, and honours config=.
    config = BagelConfig.from_pretrained(repo, stage=1)
    model = BagelForUnifiedMultimodal.from_pretrained(
        repo,
        config=config,
        trust_remote_code=True,
        _from_auto=True,
        adapter_kwargs={},
        code_revision=None,
        low_cpu_mem_usage=True,
        attn_implementation="sdpa",
        revision=None,
    )
    assert model.config.stage == 1 and model.vae is None
    assert config.stage == 1  # the caller's config object is not modified...
    BagelForUnifiedMultimodal.from_pretrained(repo, config=config, stage=2)
    assert config.stage == 1  # ...even when stage overrides it


def test_loading_emits_no_warnings(tiny, tmp_path, monkeypatch, caplog):
    import transformers

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = _copy_repo(tiny, tmp_path / "hub_quiet")
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _automodel().from_pretrained(str(repo), trust_remote_code=True)
            _automodel().from_pretrained(str(repo), trust_remote_code=True, stage=1, dtype=torch.bfloat16)
            BagelForUnifiedMultimodal.from_pretrained(repo, device_map="auto")
    finally:
        transformers.utils.logging.disable_propagation()
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not noisy, [r.getMessage() for r in noisy]
    words = ("initializ", "missing", "newly", "not used", "unexpected")
    assert not [r for r in caplog.records if any(w in r.getMessage().lower() for w in words)]
    ours = [w for w in caught if "transformers" in w.filename or "bagel" in w.filename or "modeling" in w.filename]
    assert not ours, [str(w.message) for w in ours]


# ----------------------------------------------------------------------------------------------
# dtype and device_map
# ----------------------------------------------------------------------------------------------


def test_dtype_and_device_map(tiny, tmp_path, monkeypatch):
    reference = _checkpoint_state(tiny)
    for kwargs in ({"dtype": torch.bfloat16}, {"torch_dtype": "bfloat16"}, {"dtype": "torch.bfloat16"}):
        model = BagelForUnifiedMultimodal.from_pretrained(tiny, device_map="cpu", **kwargs)
        assert model.dtype == torch.bfloat16 and model.config.dtype == torch.bfloat16
        for name, tensor in _state(model).items():
            assert tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu", name
            assert torch.equal(tensor, reference[name].to(torch.bfloat16)), name
        assert model.model.vit_pos_embed.pos_embed.dtype == torch.bfloat16
        assert model.model.latent_pos_embed.pos_embed.dtype == torch.bfloat16
        assert not model.model.vit_pos_embed.pos_embed.requires_grad  # frozen tables stay frozen
        assert model.model.llm2vae.weight.requires_grad
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = _copy_repo(tiny, tmp_path / "hub_dtype")
    model = _automodel().from_pretrained(str(repo), trust_remote_code=True, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}

    cpu = torch.device("cpu")
    for device_map in (None, "cpu", cpu, {"": "cpu"}, {"": cpu}, "auto"):
        model = BagelForUnifiedMultimodal.from_pretrained(tiny, device_map=device_map, stage=1)
        expected = "cuda" if device_map == "auto" and torch.cuda.is_available() else "cpu"
        assert {p.device.type for p in model.parameters()} == {expected}
    # A dict over modules is transformers' business now (the old loader refused it).
    model = BagelForUnifiedMultimodal.from_pretrained(tiny, device_map={"model": "cpu", "vae": "cpu"})
    assert {p.device.type for p in model.parameters()} == {"cpu"}  # offloading: tests/test_loading_modes.py
    _assert_same_state(_state(model), reference)
    with pytest.raises(ValueError, match="torch.dtype"):
        BagelForUnifiedMultimodal.from_pretrained(tiny, dtype="float33")


def test_dtype_auto_follows_the_checkpoint(tiny, tmp_path):
    model = BagelForUnifiedMultimodal.from_pretrained(tiny, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    again = BagelForUnifiedMultimodal.from_pretrained(tmp_path / "bf16")  # default: "auto"
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    (tmp_path / "bf16" / "config.json").unlink()  # no config dtype: the weights' dtype decides
    again = BagelForUnifiedMultimodal.from_pretrained(tmp_path / "bf16", stage=1, dtype="auto")
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in BagelForUnifiedMultimodal.from_pretrained(tiny).parameters()} == {torch.float32}
    # a float32 VAE beside bf16 model weights, and a config without a dtype passed in: still bf16
    shutil.copy(tiny / "ae.safetensors", tmp_path / "bf16" / "ae.safetensors")
    config = BagelConfig.from_pretrained(tiny)
    config.dtype = None  # as in the Hub repository's config.json
    again = BagelForUnifiedMultimodal.from_pretrained(tmp_path / "bf16", config=config)
    assert again.model.language_model.lm_head.weight.dtype == torch.bfloat16


# ----------------------------------------------------------------------------------------------
# save_pretrained
# ----------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_bit_exact(tiny, tmp_path, monkeypatch):
    model = BagelForUnifiedMultimodal.from_pretrained(tiny)
    out = tmp_path / "saved"
    model.save_pretrained(out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "llm_config.json", "vit_config.json", "ema.safetensors", "ae.safetensors"} <= names
    assert {
        "configuration_bagel.py",
        "modeling_bagel.py",
        "processing_bagel.py",
        "state_dict_adapter.py",
        "autoencoder_bagel.py",
        "attention_bagel.py",
        "generation_bagel.py",
        "modeling_siglip_navit.py",
        "contexts_bagel.py",
        "decoding_bagel.py",
        "guidance_bagel.py",
        "parallel_bagel.py",
        "step_cache_bagel.py",
        "layers_bagel.py",
        "ops_bagel.py",
        "kernels_bagel.py",
    } <= names
    assert not {"model.safetensors", "pytorch_model.bin"} & names
    assert {"tokenizer.json", "tokenizer_config.json", "processor_config.json"} <= names  # model.processor
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP and config["architectures"] == ["BagelForUnifiedMultimodal"]
    assert json.loads((out / "vit_config.json").read_text())["num_hidden_layers"] == 3  # as released
    assert json.loads((out / "llm_config.json").read_text())["hidden_size"] == 64

    # Released key names: no model. root in ema, FLUX names in ae.
    with safe_open(str(out / "ema.safetensors"), "pt") as f:
        assert all(not k.startswith(("model.", "vae.")) for k in f.keys())
    with safe_open(str(out / "ae.safetensors"), "pt") as f:
        assert all(k.startswith(("encoder.", "decoder.")) for k in f.keys())

    again = BagelForUnifiedMultimodal.from_pretrained(out)
    _assert_same_state(_state(model), _state(again))
    assert again.processor.special_token_ids == model.processor.special_token_ids
    # The NeMo-layout adapter reads the saved ema.safetensors too.
    nemo = load_bagel_checkpoint_state_dict(out, stage=2)
    _assert_same_state(nemo, {k: v for k, v in _state(model).items() if k.startswith("model.")})
    # The saved directory is itself a loadable remote-code repository.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    auto = _automodel().from_pretrained(str(out), trust_remote_code=True)
    _assert_same_state(_state(model), _state(auto))
    # ... and saving what AutoModel loaded gives the same files again.
    auto.save_pretrained(tmp_path / "saved_again")
    for name in ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json"):
        assert filecmp.cmp(out / name, tmp_path / "saved_again" / name, shallow=False), name


def test_save_stage1_and_bf16(tiny, tmp_path):
    stage1 = BagelForUnifiedMultimodal.from_pretrained(tiny, stage=1, dtype=torch.bfloat16)
    stage1.save_pretrained(tmp_path / "s1")
    assert not (tmp_path / "s1" / "ae.safetensors").exists()
    again = BagelForUnifiedMultimodal.from_pretrained(tmp_path / "s1")
    assert again.config.stage == 1
    _assert_same_state(_state(stage1), _state(again))
    # A stage-1 checkpoint has no GEN weights: asking for stage 2 says so.
    with pytest.raises(ValueError, match="stage=1"):
        BagelForUnifiedMultimodal.from_pretrained(tmp_path / "s1", stage=2)


def test_save_pretrained_arguments(tiny, tmp_path):
    model = BagelForUnifiedMultimodal.from_pretrained(tiny, stage=1)
    model.save_pretrained(tmp_path / "not_main", is_main_process=False)
    assert not (tmp_path / "not_main").exists()
    with pytest.raises(NotImplementedError, match="upload_folder"):
        model.save_pretrained(tmp_path / "hub", push_to_hub=True)
    with pytest.raises(ValueError, match="safetensors"):
        model.save_pretrained(tmp_path / "bin", safe_serialization=False)
    state = _state(model)
    state["model.connector.fc1.bias"] = torch.zeros_like(state["model.connector.fc1.bias"])
    model.save_pretrained(tmp_path / "custom", state_dict=state, max_shard_size="1GB")
    again = BagelForUnifiedMultimodal.from_pretrained(tmp_path / "custom")
    assert not again.model.connector.fc1.bias.any()


# ----------------------------------------------------------------------------------------------
# Released-layout variants: sidecar configs only, no VAE weights, stage 1
# ----------------------------------------------------------------------------------------------


def test_sidecar_configs_without_config_json(tiny, tmp_path):
    repo = _copy_repo(tiny, tmp_path / "released", skip=("config.json", "ae.safetensors", "processor_config.json"))
    assert json.loads((repo / "vit_config.json").read_text())["num_hidden_layers"] == 3
    model, info = BagelForUnifiedMultimodal.from_pretrained(repo, stage=1, output_loading_info=True)
    assert not any(info.values())
    # The reference overrides were applied exactly once: 3 layers in the json, 2 built.
    assert model.config.vision_config.num_hidden_layers == 2 and model.config.reference_overrides_applied
    assert len(model.model.vit_model.vision_model.encoder.layers) == 2
    assert model.processor.bos_token_id == model.config.text_config.bos_token_id  # tokenizer files alone suffice
    full = _checkpoint_state(tiny)
    for name, tensor in _state(model).items():
        assert torch.equal(tensor, full[name]), name
    # Stage 2 too: the VAE, whose weights are absent, gets BAGEL's default (real-size) VAE config.
    shutil.copyfile(tiny / "ae.safetensors", repo / "ae.safetensors")
    pattern = r"(?s)vae\.decoder\.conv_in\.weight: checkpoint \[32, 16, 3, 3\] vs model \[512, 16, 3, 3\].*vae_config"
    with pytest.raises(ValueError, match=pattern):
        BagelForUnifiedMultimodal.from_pretrained(repo, stage=2)


def test_foreign_config_json_falls_back_to_sidecars(tiny, tmp_path):
    """A config.json that is not BAGEL's (say a copy of the Qwen2 LLM config) next to the released
    sidecars: the sidecars describe the model."""
    repo = _copy_repo(tiny, tmp_path / "qwen_config", skip=("config.json",))
    shutil.copyfile(repo / "llm_config.json", repo / "config.json")
    model = BagelForUnifiedMultimodal.from_pretrained(repo, stage=1)
    assert model.config.text_config.hidden_size == 64 and model.config.vision_config.num_hidden_layers == 2
    (repo / "vit_config.json").unlink()
    with pytest.raises(ValueError, match="'qwen2' config, not a BAGEL one"):
        BagelForUnifiedMultimodal.from_pretrained(repo, stage=1)


def test_missing_ae_is_refused_and_strict_false_keeps_a_random_vae(tiny, tmp_path, caplog):
    repo = _copy_repo(tiny, tmp_path / "no_ae", skip=("ae.safetensors",))
    with pytest.raises(FileNotFoundError, match=r"has no ae\.safetensors.*stage=1.*strict=False"):
        BagelForUnifiedMultimodal.from_pretrained(repo)
    assert BagelForUnifiedMultimodal.from_pretrained(repo, stage=1).vae is None  # understanding needs no VAE
    with caplog.at_level(logging.WARNING):
        model, info = BagelForUnifiedMultimodal.from_pretrained(
            repo, dtype=torch.bfloat16, output_loading_info=True, strict=False
        )
    assert any("ae.safetensors" in r.getMessage() and "randomly initialised" in r.getMessage() for r in caplog.records)
    vae = dict(model.vae.named_parameters())
    assert vae and all(not p.is_meta and p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in vae.values())
    assert all(torch.isfinite(p.float()).all() for p in vae.values())
    assert torch.equal(vae["encoder.norm_out.weight"], torch.ones_like(vae["encoder.norm_out.weight"]))
    assert vae["encoder.conv_in.weight"].float().std() > 0
    assert sorted(info["missing_keys"]) == sorted("vae." + k for k in vae)  # reported, not an error
    full = _checkpoint_state(tiny)
    for name, tensor in _state(model).items():  # the rest is the checkpoint's
        if name.startswith("model."):
            assert torch.equal(tensor, full[name].to(torch.bfloat16)), name
    with torch.no_grad():  # and the random VAE works
        image = model.vae.decode(torch.zeros(1, 16, 2, 2, dtype=torch.bfloat16))
    assert image.shape == (1, 3, 16, 16)


def test_stage1_builds_and_reads_no_gen_weights(tiny, transformers_reads):
    model, info = BagelForUnifiedMultimodal.from_pretrained(tiny, stage="stage1", output_loading_info=True)
    read = transformers_reads
    assert len(read) == len(_state(model))  # every stage-1 weight, each read once...
    assert not [k for k in read if any(m in k for m in GEN_MARKERS)]  # ...and no GEN tensor
    assert not [k for k in read if k.startswith(("encoder.", "decoder."))]  # ae.safetensors untouched
    assert not any(info.values())  # the skipped tensors are not reported as unexpected
    assert model.vae is None and not hasattr(model.model, "llm2vae")
    assert not [n for n, _ in model.named_parameters() if any(m in n for m in GEN_MARKERS)]
    assert not hasattr(model.model.language_model.model, "norm_moe_gen")
    assert model.config.text_config.layer_module == "Qwen2DecoderLayer" and not model.config.visual_gen


# ----------------------------------------------------------------------------------------------
# Hub ids
# ----------------------------------------------------------------------------------------------


def test_hub_id_goes_through_snapshot_download(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tiny)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = BagelForUnifiedMultimodal.from_pretrained(
        "some-org/bagel-tiny",
        stage=1,
        revision="v1",
        cache_dir=str(tmp_path),
        token="hf_x",
        local_files_only=True,
        force_download=True,
    )
    assert model.config.stage == 1
    ((repo_id, kwargs),) = calls
    assert repo_id == "some-org/bagel-tiny"
    assert kwargs["revision"] == "v1" and kwargs["cache_dir"] == str(tmp_path) and kwargs["token"] == "hf_x"
    assert kwargs["local_files_only"] is True and kwargs["force_download"] is True
    patterns = kwargs["allow_patterns"]
    assert "ema.safetensors" in patterns and "ae.safetensors" not in patterns  # stage 1 needs no VAE
    assert {"*.json", "*.py", "*.txt"} <= set(patterns)
    # huggingface_hub's own filter over a repository like ours: the checkpoint's folder, not the repo's others
    files = ["config.json", "modeling_bagel.py", "ema.safetensors", "ae.safetensors", "tokenizer.json"]
    files += ["training/model.py", "tests/test_ops.py", "docs/x.json", "demo/app.py", "README.md"]
    kept = huggingface_hub.utils.filter_repo_objects(
        files, allow_patterns=patterns, ignore_patterns=kwargs["ignore_patterns"]
    )
    assert list(kept) == ["config.json", "modeling_bagel.py", "ema.safetensors", "tokenizer.json"]
    calls.clear()
    BagelForUnifiedMultimodal.from_pretrained("some-org/bagel-tiny")
    assert "ae.safetensors" in calls[0][1]["allow_patterns"]

    with pytest.raises(FileNotFoundError, match="local checkpoint directory"):
        BagelForUnifiedMultimodal.from_pretrained(str(tmp_path / "does" / "not" / "exist"))


# ----------------------------------------------------------------------------------------------
# Clear errors
# ----------------------------------------------------------------------------------------------


def test_error_no_weights(tiny, tmp_path):
    repo = _copy_repo(tiny, tmp_path / "no_weights", skip=("ema.safetensors", "ae.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"No BAGEL weights .*ema\.safetensors is missing"):
        BagelForUnifiedMultimodal.from_pretrained(repo)
    save_file({"x": torch.zeros(1)}, str(repo / "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors, which is not the BAGEL layout"):
        BagelForUnifiedMultimodal.from_pretrained(repo)


@pytest.mark.parametrize("damage", ["truncated", "pickle", "empty", "garbage_header"])
def test_error_unreadable_weights(tiny, tmp_path, damage):
    repo = _copy_repo(tiny, tmp_path / damage)
    path = repo / "ema.safetensors"
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        pattern = "truncated"
    elif damage == "pickle":
        torch.save({"a": torch.zeros(3)}, path)
        pattern = "not a safetensors file"
    elif damage == "empty":
        path.write_bytes(b"")
        pattern = "not a safetensors file"
    else:
        path.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 16)
        pattern = "not a safetensors file"
    with pytest.raises(ValueError, match=pattern) as err:
        BagelForUnifiedMultimodal.from_pretrained(repo)
    assert "ema.safetensors" in str(err.value)


def test_error_wrong_shape_names_key_and_shapes(tiny, tmp_path):
    repo = _copy_repo(tiny, tmp_path / "wrong_shape")
    state = load_file(str(repo / "ema.safetensors"))
    state["connector.fc1.weight"] = torch.zeros(64, 48)  # model: (64, 32)
    save_file(state, str(repo / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"model\.connector\.fc1\.weight: checkpoint \[64, 48\] vs model \[64, 32\]"):
        BagelForUnifiedMultimodal.from_pretrained(repo)
    model, info = BagelForUnifiedMultimodal.from_pretrained(
        repo, ignore_mismatched_sizes=True, output_loading_info=True
    )
    assert info["mismatched_keys"] == [("model.connector.fc1.weight", (64, 48), (64, 32))]
    assert info["missing_keys"] == [] and model.model.connector.fc1.weight.shape == (64, 32)


@pytest.mark.parametrize("stage", [3, 0, "stage3", "gen", 2.5])
def test_error_unknown_stage(tiny, stage):
    with pytest.raises(ValueError, match="Unknown BAGEL stage"):
        BagelForUnifiedMultimodal.from_pretrained(tiny, stage=stage)


def test_error_unknown_stage_through_automodel(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = _copy_repo(tiny, tmp_path / "hub_stage")
    with pytest.raises(ValueError, match="Unknown BAGEL stage"):
        _automodel().from_pretrained(str(repo), trust_remote_code=True, stage=5)


def test_unknown_and_extra_keys_strict(tiny, tmp_path):
    repo = _copy_repo(tiny, tmp_path / "unknown_key")
    state = load_file(str(repo / "ema.safetensors"))
    state["some_adapter.lora_A.weight"] = torch.zeros(2, 2)  # no BAGEL checkpoint has this name
    save_file(state, str(repo / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"some_adapter\.lora_A\.weight.*strict=False"):
        BagelForUnifiedMultimodal.from_pretrained(repo)
    model, info = BagelForUnifiedMultimodal.from_pretrained(repo, strict=False, output_loading_info=True)
    assert info["unexpected_keys"] == ["some_adapter.lora_A.weight"] and info["missing_keys"] == []

    # A BAGEL-named key the config has no module for (a third decoder layer) is unexpected too.
    repo = _copy_repo(tiny, tmp_path / "extra_layer")
    state = load_file(str(repo / "ema.safetensors"))
    extra = "language_model.model.layers.2.input_layernorm.weight"
    state[extra] = torch.ones(64)
    save_file(state, str(repo / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"no place for: language_model\.model\.layers\.2\.input_layernorm\.weight"):
        BagelForUnifiedMultimodal.from_pretrained(repo)
    model, info = BagelForUnifiedMultimodal.from_pretrained(repo, strict=False, output_loading_info=True)
    assert info["unexpected_keys"] == [extra]  # transformers names it as the checkpoint does


def test_missing_key_strict_and_not(tiny, tmp_path):
    repo = _copy_repo(tiny, tmp_path / "missing_key")
    state = load_file(str(repo / "ema.safetensors"))
    del state["connector.fc2.bias"]
    save_file(state, str(repo / "ema.safetensors"))
    with pytest.raises(ValueError, match=r"lacks 1 weight.*model\.connector\.fc2\.bias"):
        BagelForUnifiedMultimodal.from_pretrained(repo)
    model, info = BagelForUnifiedMultimodal.from_pretrained(repo, strict=False, output_loading_info=True)
    assert info["missing_keys"] == ["model.connector.fc2.bias"]
    assert not model.model.connector.fc2.bias.is_meta and not model.model.connector.fc2.bias.any()  # zero-init
    assert torch.equal(model.model.connector.fc2.weight, state["connector.fc2.weight"])  # kept its loaded value


# ----------------------------------------------------------------------------------------------
# The tiny checkpoint builder
# ----------------------------------------------------------------------------------------------


def test_make_tiny_checkpoint(tiny, tmp_path):
    from transformers import AutoTokenizer

    names = {p.name for p in tiny.iterdir()}
    assert {
        "config.json",
        "llm_config.json",
        "vit_config.json",
        "ema.safetensors",
        "ae.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "configuration_bagel.py",
        "modeling_bagel.py",
        "processing_bagel.py",
    } <= names
    tokenizer = AutoTokenizer.from_pretrained(tiny, trust_remote_code=True)  # config.json has an auto_map
    vocab = tokenizer.get_vocab()
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
    assert all(t in vocab for t in specials)
    config = BagelConfig.from_pretrained(tiny)
    text = config.text_config
    assert text.vocab_size >= len(tokenizer)
    assert text.bos_token_id == vocab["<|im_start|>"] and text.eos_token_id == vocab["<|im_end|>"]
    assert text.pad_token_id == tokenizer.pad_token_id == config.pad_token_id
    assert config.vision_config.image_size // config.vision_config.patch_size == config.vit_max_num_patch_per_side
    llm2vae = load_file(str(tiny / "ema.safetensors"))["llm2vae.weight"]
    assert llm2vae.abs().max() > 0  # not the zero init: generation is non-trivial

    state = torch.random.get_rng_state()
    make_tiny_checkpoint.main(["--out", str(tmp_path / "same"), "--seed", "0"])  # the command line
    same = tmp_path / "same"
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left alone
    other = make_tiny_checkpoint.make_tiny_checkpoint(tmp_path / "other", seed=1)
    for name in ("ema.safetensors", "ae.safetensors", "config.json", "tokenizer.json"):
        assert filecmp.cmp(tiny / name, same / name, shallow=False), name
    assert not filecmp.cmp(tiny / "ema.safetensors", other / "ema.safetensors", shallow=False)

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny), trust_remote_code=True)
    assert processor.special_token_ids == {
        "bos_token_id": vocab["<|im_start|>"],
        "eos_token_id": vocab["<|im_end|>"],
        "start_of_image": vocab["<|vision_start|>"],
        "end_of_image": vocab["<|vision_end|>"],
    }


def test_weights_missing_from_the_checkpoint_are_initialised_as_a_normal_build(tiny, tmp_path):
    """transformers builds the model on the meta device; what the checkpoint lacks (with
    strict=False) must come out of `_init_weights` as a normal build makes it, and a tensor
    loaded next to a missing one keeps its loaded value."""
    repo = _copy_repo(tiny, tmp_path / "sparse")
    state = load_file(str(repo / "ema.safetensors"))
    dropped = [
        "vit_pos_embed.pos_embed",
        "latent_pos_embed.pos_embed",
        "language_model.model.norm.weight",
        "connector.fc2.bias",
        "llm2vae.weight",
    ]
    save_file({k: v for k, v in state.items() if k not in dropped}, str(repo / "ema.safetensors"))
    model, info = BagelForUnifiedMultimodal.from_pretrained(repo, strict=False, output_loading_info=True)
    assert info["missing_keys"] == sorted("model." + k for k in dropped)
    normal = BagelForUnifiedMultimodal(BagelConfig.from_pretrained(tiny))
    for key in (
        "model.vit_pos_embed.pos_embed",
        "model.latent_pos_embed.pos_embed",
        "model.language_model.model.norm.weight",
    ):  # deterministic tables and norms: exactly
        assert torch.equal(_state(model)[key], _state(normal)[key]), key
    assert not model.model.connector.fc2.bias.any() and not model.model.llm2vae.weight.any()  # zero inits
    assert torch.equal(model.model.llm2vae.bias, state["llm2vae.bias"])  # its loaded sibling kept
    assert [n for n, _ in normal.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert not [n for n, p in model.named_parameters() if p.is_meta or not torch.isfinite(p).all()]
