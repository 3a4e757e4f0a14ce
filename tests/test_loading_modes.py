"""transformers' loading modes on the tiny checkpoint: device maps that offload to the CPU and disk,
torchao int8 weight-only quantization (at load and after it), config keyword arguments and
checkpoints of a ViT trained with RoPE. (bitsandbytes needs CUDA: tests/test_gpu.py.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from bagel_remote.configuration_bagel import BagelConfig
from bagel_remote.contexts_bagel import SpecialTokenIds
from bagel_remote.guidance_bagel import GuidanceParams
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal
from PIL import Image
from safetensors.torch import load_file, save_file

LM = "model.language_model."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from make_tiny_checkpoint import make_tiny_checkpoint  # scripts/ is on sys.path (conftest)

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_modes") / "bagel_tiny", seed=0)


def _image() -> Image.Image:
    return Image.fromarray((np.arange(48 * 48 * 3) % 251).astype(np.uint8).reshape(48, 48, 3))


def _generate(model, high_level: bool = True) -> dict[str, torch.Tensor]:
    """Greedy chat ids and their step logits, and the latents of a guided text-to-image run, from
    the context API (fixed noise), plus the high-level chat, generate_image and edit_image
    results (the edit encodes its input with the VAE)."""
    proc = model.processor
    special = SpecialTokenIds(proc.bos_token_id, proc.eos_token_id, *list(proc.special_token_ids.values())[2:])
    context = model.new_context()
    context = model.add_vit_images(context, [proc.vit_transform(_image())], special)
    context = model.add_text_tokens(context, [proc.encode_text("what is in the picture")], special)
    ids, logits = model.generate_text_ids(context, special, max_length=6, return_logits=True)

    prompt = model.add_text_tokens(model.new_context(), [proc.encode_text("a red cat")], special)
    noise = [torch.randn(16, 64, generator=torch.Generator().manual_seed(0))]
    params = GuidanceParams(num_timesteps=4, cfg_text_scale=4.0)
    latents = model.generate_latents(prompt, model.new_context(), prompt, [(64, 64)], special, params, init_noise=noise)
    outputs = {"ids": torch.tensor(ids[0]), "logits": logits[0].float(), "latents": latents[0].float()}
    if not high_level:
        return outputs
    return {
        **outputs,
        "chat": model.chat(_image(), "what is it", max_new_tokens=4),
        "image": np.asarray(model.generate_image("a cat", height=64, width=64, num_steps=3, seed=0, progress=False)),
        # The edit encodes a processor-sized image with the VAE: only in float32 (bf16 convolutions
        # are very slow on the CPU).
        **(
            {"edited": np.asarray(model.edit_image(_image(), "make it blue", num_steps=3, seed=0, progress=False))}
            if model.dtype == torch.float32
            else {}
        ),
    }


@pytest.fixture(scope="module")
def one_device(tiny) -> dict:
    return _generate(BagelForUnifiedMultimodal.from_pretrained(tiny))


def _assert_same(outputs: dict, expected: dict) -> None:
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(outputs[key], value), key
        elif isinstance(value, np.ndarray):
            assert np.array_equal(outputs[key], value), key
        else:
            assert outputs[key] == value, key


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


# ----------------------------------------------------------------------------------------------
# Offloading: accelerate hooks, same results as one device
# ----------------------------------------------------------------------------------------------

OFFLOAD_MAP = {
    LM + "model.embed_tokens": "cpu",
    LM + "model.layers.0": "disk",
    LM + "model.layers.1": "cpu",
    LM + "model.norm": "disk",
    LM + "model.norm_moe_gen": "cpu",
    LM + "lm_head": "disk",
    "model.vit_model": "disk",
    "model.connector": "cpu",
    "model.vit_pos_embed": "cpu",
    "model.time_embedder": "disk",
    "model.vae2llm": "cpu",
    "model.llm2vae": "disk",
    "model.latent_pos_embed": "cpu",
    "vae": "disk",
}


def test_device_map_dict_with_cpu_and_disk_offload_matches_one_device(tiny, tmp_path, one_device):
    model, info = BagelForUnifiedMultimodal.from_pretrained(
        tiny, device_map=OFFLOAD_MAP, offload_folder=tmp_path / "offload", output_loading_info=True
    )
    assert not any(info.values())
    assert model.hf_device_map == OFFLOAD_MAP
    # Disk-offloaded weights wait on the meta device until their module runs.
    assert model.model.language_model.model.layers[0].mlp_moe_gen.up_proj.weight.is_meta
    assert model.vae.decoder.conv_in.weight.is_meta
    assert any(hasattr(module, "_hf_hook") for module in model.modules())  # accelerate's offload hooks
    _assert_same(_generate(model), one_device)


def test_device_map_auto_with_max_memory_offloads_and_matches_one_device(tiny, tmp_path, one_device):
    size = sum(p.numel() * p.element_size() for p in BagelForUnifiedMultimodal.from_pretrained(tiny).parameters())
    model = BagelForUnifiedMultimodal.from_pretrained(
        tiny, device_map="auto", max_memory={"cpu": size // 2}, offload_folder=tmp_path / "offload"
    )
    placed = set(model.hf_device_map.values())
    assert placed == {"cpu", "disk"}, model.hf_device_map  # split between the two by transformers
    outputs = _generate(model, high_level=False)  # every weight read from disk per call: slow
    _assert_same(outputs, {key: one_device[key] for key in outputs})


# ----------------------------------------------------------------------------------------------
# torchao int8 weight-only: at load (quantization_config) and after it (quantize_)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bf16(tiny) -> dict:
    return _generate(BagelForUnifiedMultimodal.from_pretrained(tiny, dtype=torch.bfloat16))


def _assert_int8_close(outputs: dict, reference: dict) -> None:
    # The tiny random model has near-ties late in its greedy text: the first tokens agree, and
    # the step logits (same inputs up to there) and the latents are within int8 rounding.
    steps = 5
    assert torch.equal(outputs["ids"][:steps], reference["ids"][:steps])
    assert _relative_error(outputs["logits"][:steps], reference["logits"][:steps]) < 0.05
    assert 0 < _relative_error(outputs["latents"], reference["latents"]) < 0.05  # > 0: something was quantized
    assert np.abs(outputs["image"].astype(float) - reference["image"]).mean() < 4  # of 255


def _weight_kinds(model) -> dict[str, str]:
    return {
        name: type(module.weight).__name__
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }


def test_torchao_int8_weight_only_at_load(tiny, bf16):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    config = TorchAoConfig(Int8WeightOnlyConfig())
    model, info = BagelForUnifiedMultimodal.from_pretrained(
        tiny, dtype=torch.bfloat16, quantization_config=config, output_loading_info=True
    )
    assert not any(info.values())
    assert config.modules_to_not_convert is None  # the caller's config is not modified
    with pytest.raises(ValueError, match="quantized when loaded"):
        model.save_pretrained(tiny.parent / "quantized")
    kinds = _weight_kinds(model)
    quantized = {name for name, kind in kinds.items() if kind != "Parameter"}
    # UND and GEN projections of every decoder layer, and the ViT, are int8 ...
    assert (
        f"{LM}model.layers.1.self_attn.q_proj" in quantized and f"{LM}model.layers.1.mlp_moe_gen.down_proj" in quantized
    )
    assert "model.vit_model.vision_model.encoder.layers.0.mlp.fc1" in quantized
    # ... the output embedding, the generation head's projections and time embedder stay bf16.
    for name in (f"{LM}lm_head", "model.llm2vae", "model.vae2llm", "model.time_embedder.mlp.0"):
        assert kinds[name] == "Parameter" and model.get_submodule(name).weight.dtype == torch.bfloat16
    assert all(type(p).__name__ == "Parameter" for p in model.vae.parameters())
    _assert_int8_close(_generate(model), bf16)


def test_torchao_quantize_after_load(tiny, bf16):
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = BagelForUnifiedMultimodal.from_pretrained(tiny, dtype=torch.bfloat16)
    quantize_(model, Int8WeightOnlyConfig())
    assert type(model.model.language_model.model.layers[0].mlp.up_proj.weight).__name__ != "Parameter"
    _assert_int8_close(_generate(model), bf16)


def test_which_quantized_weights_decode_as_a_cuda_graph():
    """torchao tensors and bitsandbytes 4-bit weights are captured; 8-bit LLM.int8() (outlier
    search on the host) and integer Parameters are not."""
    from bagel_remote.ops_bagel import capturable_weight
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = torch.nn.Linear(64, 64, dtype=torch.bfloat16)
    assert capturable_weight(layer.weight)
    quantize_(layer, Int8WeightOnlyConfig())
    assert type(layer.weight) is not torch.nn.Parameter and capturable_weight(layer.weight)
    assert not capturable_weight(torch.nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False))

    def bnb_param(name: str, **attributes):  # a stand-in of bitsandbytes' class (it needs CUDA to import usefully)
        kind = type(name, (torch.nn.Parameter,), {"__module__": "bitsandbytes.nn.modules"})
        param = kind(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
        for key, value in attributes.items():
            setattr(param, key, value)
        return param

    # known by their attributes (Params4bit keeps a `quant_state`, Int8Params its `SCB` scales)
    assert capturable_weight(bnb_param("Params4bit", quant_state=None))
    assert not capturable_weight(bnb_param("Int8Params", CB=None, SCB=None))
    assert not capturable_weight(bnb_param("SomeOtherParameter"))


def test_quantizers_find_plain_linear_layers(tiny):
    """bitsandbytes' replacement takes only modules whose type is exactly nn.Linear: under a
    quantization config the model builds its projections as such (same parameter names), while
    without one they keep the master-weight `Linear`."""
    from bagel_remote.layers_bagel import Linear

    config = BagelConfig.from_pretrained(tiny)
    with torch.device("meta"):
        plain = BagelForUnifiedMultimodal(config)
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with torch.device("meta"):
        quantizable = BagelForUnifiedMultimodal(config)
    linears = [name for name, m in plain.named_modules() if type(m) is Linear]
    assert f"{LM}model.layers.0.self_attn.q_proj" in linears and "model.llm2vae" in linears
    assert all(type(quantizable.get_submodule(name)) is torch.nn.Linear for name in linears)
    assert not any(type(m) is Linear for m in quantizable.modules())
    assert dict(quantizable.named_parameters()).keys() == dict(plain.named_parameters()).keys()


def test_unquantized_modules_default_only_when_the_user_names_none():
    from bagel_remote.loading_bagel import UNQUANTIZED_MODULES, with_unquantized_defaults

    assert with_unquantized_defaults({"quant_method": "bitsandbytes"})["llm_int8_skip_modules"] == UNQUANTIZED_MODULES
    mine = {"quant_method": "torchao", "modules_to_not_convert": ["vae"]}
    assert with_unquantized_defaults(mine) is mine


# ----------------------------------------------------------------------------------------------
# Config keyword arguments and ViT RoPE checkpoints
# ----------------------------------------------------------------------------------------------


def test_config_kwargs_reach_the_nested_vit_config(tiny):
    assert BagelConfig.from_pretrained(tiny).vision_config.rope is False
    config = BagelConfig.from_pretrained(tiny, vit_rope=True)
    assert config.vit_rope is True and config.vision_config.rope is True
    assert config.vision_config.num_hidden_layers == 2  # the overrides ran once
    # The same keyword to the model: a RoPE ViT (no learned position table, which the checkpoint
    # has: reported with strict=False).
    model, info = BagelForUnifiedMultimodal.from_pretrained(tiny, vit_rope=True, strict=False, output_loading_info=True)
    vit = model.model.vit_model.vision_model
    assert model.config.vision_config.rope is True and vit.rotary is not None
    assert not hasattr(vit.embeddings, "position_embedding")
    assert info["unexpected_keys"] == ["vit_model.vision_model.embeddings.position_embedding.weight"]
    assert json.loads(model.config.to_json_string())["vit_rope"] is True


def _reference_rope_tables(head_dim: int, side: int) -> dict[str, torch.Tensor]:
    """The reference ViT's persistent rotary tables (`rope.{cos,sin}_{h,w}`): rows then columns
    over head_dim // 2 channels each, base 10000, for a side x side grid."""
    dim = head_dim // 2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    grid = torch.arange(side).float()
    tables = {}
    for axis, coords in (("h", grid[:, None].expand(side, side)), ("w", grid[None, :].expand(side, side))):
        freqs = coords.reshape(-1)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        tables[f"cos_{axis}"], tables[f"sin_{axis}"] = emb.cos(), emb.sin()
    return tables


@pytest.mark.parametrize("layout", ["config.json", "released sidecars"])
def test_vit_rope_checkpoint_loads_with_rope_on(tiny, tmp_path, layout):
    """A checkpoint trained with the reference's vit_rope: vit_config.json says `rope: true` and
    ema.safetensors holds the ViT's rotary tables. It loads with RoPE on, nothing missing or
    unexpected, and its ViT output uses the rotary embedding."""
    config = BagelConfig.from_pretrained(tiny, vit_rope=True)
    torch.manual_seed(0)
    model = BagelForUnifiedMultimodal(config)
    repo = tmp_path / "rope"
    model.save_pretrained(repo)
    vit = config.vision_config
    state = load_file(str(repo / "ema.safetensors"))
    for name, table in _reference_rope_tables(
        vit.hidden_size // vit.num_attention_heads, vit.image_size // vit.patch_size
    ).items():
        state[f"vit_model.vision_model.rope.{name}"] = table
    save_file(state, str(repo / "ema.safetensors"))
    assert json.loads((repo / "vit_config.json").read_text())["rope"] is True
    stage = 2
    if layout == "released sidecars":  # which describe no VAE (BAGEL's default is real-size): stage 1
        (repo / "config.json").unlink()
        stage = 1
    else:  # the index of the save no longer lists the tables: the loader must not trust it
        assert (
            "vit_model.vision_model.rope.cos_h"
            not in json.loads((repo / "model.safetensors.index.json").read_text())["weight_map"]
        )
    loaded, info = BagelForUnifiedMultimodal.from_pretrained(repo, stage=stage, output_loading_info=True)
    assert not any(info.values())
    assert loaded.config.vit_rope is True and loaded.config.vision_config.rope is True
    assert loaded.model.vit_model.vision_model.rotary is not None
    pixels = torch.randn(8, 3 * 14 * 14)
    positions = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
    with torch.no_grad():
        out = loaded.model.embed_vit_tokens(pixels, positions, [8])
        expected = model.eval().model.embed_vit_tokens(pixels, positions, [8])
        shuffled = loaded.model.embed_vit_tokens(pixels, positions.flip(0), [8])
    assert torch.equal(out, expected)
    assert not torch.allclose(out, shuffled)  # positions matter: the rotary embedding is applied


def test_user_key_mapping_renames_checkpoint_keys(tiny, tmp_path):
    """`key_mapping` works as in transformers, next to the VAE's own mapping."""
    repo = tmp_path / "renamed"
    shutil.copytree(tiny, repo)
    state = load_file(str(repo / "ema.safetensors"))
    state = {k.replace("connector.", "projector.", 1) if k.startswith("connector.") else k: v for k, v in state.items()}
    save_file(state, str(repo / "ema.safetensors"))
    with pytest.raises(ValueError, match="projector.fc1.weight"):
        BagelForUnifiedMultimodal.from_pretrained(repo)
    model, info = BagelForUnifiedMultimodal.from_pretrained(
        repo, key_mapping={r"^projector\.": "connector."}, output_loading_info=True
    )
    assert not any(info.values())
    assert torch.equal(model.model.connector.fc1.weight, state["projector.fc1.weight"])
    assert torch.equal(
        model.vae.decoder.conv_in.weight, load_file(str(tiny / "ae.safetensors"))["decoder.conv_in.weight"]
    )
