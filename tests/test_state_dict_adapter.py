"""Tests of the checkpoint <-> native key mapping (state_dict_adapter.py)."""

import logging
import re

import pytest
import torch
from bagel_remote import state_dict_adapter as sda
from bagel_remote.state_dict_adapter import (
    GEN_PATTERNS,
    SHARED_PATTERNS,
    UND_PATTERNS,
    VAE_PATTERNS,
    BagelStateDictAdapter,
    SafetensorsReader,
    _normalize_stage,
    _partition,
    load_bagel_checkpoint_state_dict,
)
from safetensors.torch import save_file

LM = "language_model.model."


def _synthetic_keys(num_layers: int = 2) -> dict[str, list[str]]:
    """Checkpoint keys of a BAGEL model with `num_layers` decoder layers, grouped by expected bucket."""
    und, gen = [], []
    for i in range(num_layers):
        layer = f"{LM}layers.{i}."
        for suffix in ("", "_moe_gen"):
            bucket = gen if suffix else und
            for p in "qkv":
                bucket += [f"{layer}self_attn.{p}_proj{suffix}.weight", f"{layer}self_attn.{p}_proj{suffix}.bias"]
            bucket += [
                f"{layer}self_attn.o_proj{suffix}.weight",
                f"{layer}self_attn.q_norm{suffix}.weight",
                f"{layer}self_attn.k_norm{suffix}.weight",
                f"{layer}input_layernorm{suffix}.weight",
                f"{layer}post_attention_layernorm{suffix}.weight",
            ]
            bucket += [f"{layer}mlp{suffix}.{p}_proj.weight" for p in ("gate", "up", "down")]
    und += [
        "vit_model.vision_model.embeddings.patch_embedding.weight",
        "vit_model.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "vit_model.vision_model.post_layernorm.bias",
        "connector.fc1.weight",
        "connector.fc1.bias",
        "connector.fc2.weight",
        "connector.fc2.bias",
        "vit_pos_embed.pos_embed",
    ]
    gen += [
        f"{LM}norm_moe_gen.weight",
        "latent_pos_embed.pos_embed",
        "vae2llm.weight",
        "vae2llm.bias",
        "llm2vae.weight",
        "llm2vae.bias",
    ]
    gen += [f"time_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    shared = [f"{LM}embed_tokens.weight", "language_model.lm_head.weight", f"{LM}norm.weight"]
    vae = ["encoder.conv_in.weight", "decoder.up.0.block.0.conv1.bias"]
    return {"und": und, "gen": gen, "shared": shared, "vae": vae}


def _synthetic_state_dict(*buckets: str) -> dict:
    keys = _synthetic_keys()
    return {k: torch.full((2,), float(i)) for i, k in enumerate(k for b in buckets for k in keys[b])}


def _assert_same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- pure logic, synthetic keys -------------------------------------------------------------------


def test_patterns_are_regex_strings():
    for patterns in (UND_PATTERNS, GEN_PATTERNS, VAE_PATTERNS, SHARED_PATTERNS):
        assert patterns and all(isinstance(p, str) for p in patterns)
        for p in patterns:
            re.compile(p)


def test_partition_synthetic():
    keys = _synthetic_keys()
    sd = {k: i for i, k in enumerate(k for b in ("und", "gen", "shared", "vae") for k in keys[b])}
    sd["something.else"] = -1
    parts = _partition(sd)
    assert set(parts) == {"und", "gen", "shared", "vae", "unknown"}
    for bucket in ("und", "gen", "shared", "vae"):
        assert sorted(parts[bucket]) == sorted(keys[bucket]), bucket
    assert list(parts["unknown"]) == ["something.else"]
    assert sum(len(p) for p in parts.values()) == len(sd)
    assert not any("_moe_gen" in k for k in parts["und"])


def test_partition_accepts_model_root_and_anchors_patterns():
    parts = _partition(
        {
            "model.vae2llm.weight": 0,
            "model.language_model.lm_head.weight": 1,
            "vit_model.vision_model.encoder.layers.0.mlp.fc1.weight": 2,  # not the VAE encoder
            "language_model.model.norm.weight.extra": 3,
            "xencoder.foo": 4,
        }
    )
    assert list(parts["gen"]) == ["model.vae2llm.weight"]
    assert list(parts["shared"]) == ["model.language_model.lm_head.weight"]
    assert list(parts["und"]) == ["vit_model.vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert sorted(parts["unknown"]) == ["language_model.model.norm.weight.extra", "xencoder.foo"]


@pytest.mark.parametrize(
    "stage,expected", [(1, 1), (2, 2), ("1", 1), ("2", 2), ("stage1", 1), ("Stage2", 2), ("STAGE1", 1)]
)
def test_normalize_stage(stage, expected):
    assert _normalize_stage(stage) == expected


@pytest.mark.parametrize("bad", [0, 3, None, True, False, "stage3", "", 1.0, "one"])
def test_normalize_stage_rejects(bad):
    with pytest.raises(ValueError) as info:
        _normalize_stage(bad)
    assert repr(bad) in str(info.value) and "stage1" in str(info.value)


def test_adapter_rejects_bad_stage():
    with pytest.raises(ValueError):
        BagelStateDictAdapter(stage=3)
    with pytest.raises(ValueError):
        BagelStateDictAdapter().from_hf({}, stage="gen")


def test_from_hf_stages_synthetic():
    keys = _synthetic_keys()
    sd = _synthetic_state_dict("und", "gen", "shared")
    adapter = BagelStateDictAdapter()
    stage2 = adapter.from_hf(sd)
    assert set(stage2) == {"model." + k for k in sd}
    stage1 = adapter.from_hf(sd, stage=1)
    assert set(stage1) == {"model." + k for k in keys["und"] + keys["shared"]}
    assert BagelStateDictAdapter(stage="stage1").from_hf(sd).keys() == stage1.keys()
    for key, value in stage1.items():
        assert value is sd[key[len("model.") :]]


def test_from_hf_accepts_model_root():
    sd = _synthetic_state_dict("und", "gen", "shared")
    rooted = {"model." + k: v for k, v in sd.items()}
    _assert_same(BagelStateDictAdapter().from_hf(rooted), BagelStateDictAdapter().from_hf(sd))


def test_from_hf_drops_vae_keys(caplog):
    sd = _synthetic_state_dict("und", "gen", "shared", "vae")
    with caplog.at_level(logging.INFO, logger=sda.__name__):
        out = BagelStateDictAdapter().from_hf(sd)
    assert not any(k.startswith(("model.encoder.", "model.decoder.")) for k in out)
    assert len(out) == len(sd) - len(_synthetic_keys()["vae"])
    assert "VAE" in caplog.text


def test_from_hf_strict_unknown_key():
    sd = _synthetic_state_dict("und", "shared")
    sd["language_model.model.rotary_emb.inv_freq"] = torch.ones(2)
    with pytest.raises(KeyError) as info:
        BagelStateDictAdapter().from_hf(sd)
    assert "language_model.model.rotary_emb.inv_freq" in str(info.value)
    assert "strict=False" in str(info.value)


def test_from_hf_strict_lists_at_most_ten():
    sd = {f"junk.{i}": torch.ones(1) for i in range(25)}
    with pytest.raises(KeyError) as info:
        BagelStateDictAdapter().from_hf(sd)
    assert "junk.9" in str(info.value) and "junk.10" not in str(info.value) and "15 more" in str(info.value)


def test_from_hf_non_strict_drops_unknown(caplog):
    sd = _synthetic_state_dict("und", "shared")
    sd["mystery.weight"] = torch.ones(2)
    with caplog.at_level(logging.WARNING, logger=sda.__name__):
        out = BagelStateDictAdapter().from_hf(sd, strict=False)
    assert "model.mystery.weight" not in out and len(out) == len(sd) - 1
    assert "mystery.weight" in caplog.text


def test_round_trip_synthetic():
    sd = _synthetic_state_dict("und", "gen", "shared")
    adapter = BagelStateDictAdapter()
    _assert_same(adapter.to_hf(adapter.from_hf(sd)), sd)


def test_to_hf_rejects_unrooted_keys():
    adapter = BagelStateDictAdapter()
    with pytest.raises(KeyError, match="vae2llm.weight"):
        adapter.to_hf({"vae2llm.weight": torch.ones(1)})
    t = torch.ones(1)
    assert adapter.convert_single_tensor_to_hf("model.vae2llm.weight", t) == [("vae2llm.weight", t)]


def test_loader_missing_dir_and_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="ema.safetensors"):
        load_bagel_checkpoint_state_dict(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as info:
        load_bagel_checkpoint_state_dict(tmp_path)
    assert str(tmp_path / "ema.safetensors") in str(info.value)


@pytest.mark.parametrize("payload", [b"garbage bytes, not a safetensors file", b"", b"\x80\x04\x95pickle"])
def test_loader_corrupt_file(tmp_path, payload):
    (tmp_path / "ema.safetensors").write_bytes(payload)
    with pytest.raises(ValueError, match="ema.safetensors"):
        load_bagel_checkpoint_state_dict(tmp_path)


def test_loader_synthetic(tmp_path):
    sd = _synthetic_state_dict("und", "gen", "shared")
    save_file(sd, str(tmp_path / "ema.safetensors"))
    out = load_bagel_checkpoint_state_dict(tmp_path, stage=1)
    assert set(out) == {"model." + k for k in _synthetic_keys()["und"] + _synthetic_keys()["shared"]}
    sd["unknown.weight"] = torch.ones(2)
    save_file(sd, str(tmp_path / "ema.safetensors"))
    with pytest.raises(KeyError, match="unknown.weight"):
        load_bagel_checkpoint_state_dict(tmp_path)
    assert "model.unknown.weight" not in load_bagel_checkpoint_state_dict(tmp_path, strict=False)


# --- the real tiny checkpoint ---------------------------------------------------------------------


def _ema(parity) -> dict:
    from safetensors.torch import load_file

    return load_file(str(parity.checkpoint / "ema.safetensors"))


def test_partition_real_checkpoint(parity):
    sd = _ema(parity)
    parts = _partition(sd)
    assert not parts["unknown"] and not parts["vae"]
    assert sum(len(p) for p in parts.values()) == len(sd)
    assert len(parts["shared"]) == 3
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"language_model\.model\.layers\.(\d+)\.", k))}
    per_layer = 14  # 3 qkv weights + 3 biases + o_proj + 2 qk norms + 3 mlp + 2 layernorms
    assert len(parts["gen"]) == per_layer * len(layers) + 10  # + final norm, time embedder, vae2llm/llm2vae, pos
    assert sum(k.startswith("language_model.") for k in parts["und"]) == per_layer * len(layers)
    assert all(k in parts["gen"] for k in sd if "_moe_gen" in k)
    assert any(k.startswith("vit_model.") for k in parts["und"]) and "connector.fc1.weight" in parts["und"]


def test_partition_real_vae(parity):
    from safetensors import safe_open

    with safe_open(str(parity.checkpoint / "ae.safetensors"), "pt") as f:
        parts = _partition(dict.fromkeys(f.keys()))
    assert parts["vae"] and not any(parts[b] for b in ("und", "gen", "shared", "unknown"))


def test_round_trip_real_checkpoint(parity):
    sd = _ema(parity)
    adapter = BagelStateDictAdapter()
    native = adapter.from_hf(sd)
    assert all(k.startswith("model.") for k in native) and len(native) == len(sd)
    back = adapter.to_hf(native)
    assert back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key


def test_loader_stages_real_checkpoint(parity, tensor_reads):
    read = tensor_reads
    sd = _ema(parity)
    gen = set(_partition(sd)["gen"])
    stage1 = load_bagel_checkpoint_state_dict(parity.checkpoint, stage=1)
    assert read and not gen & set(read)  # generation tensors are never read from disk
    assert not any(k[len("model.") :] in gen for k in stage1)
    assert set(stage1) == {"model." + k for k in sd if k not in gen}
    stage2 = load_bagel_checkpoint_state_dict(parity.checkpoint, stage="stage2")
    _assert_same(dict(sorted(stage2.items())), dict(sorted(BagelStateDictAdapter().from_hf(sd).items())))


def test_safetensors_reader_reads_one_tensor_by_native_name(tmp_path, tensor_reads):
    weights = {"x.weight": torch.randn(3, 2), "y": torch.arange(4)}
    save_file(weights, str(tmp_path / "a.safetensors"))
    save_file({"encoder.w": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    files = {"model.": tmp_path / "a.safetensors", "vae.": tmp_path / "b.safetensors"}
    with SafetensorsReader(files) as reader:
        assert reader.keys() == ["model.x.weight", "model.y", "vae.encoder.w"]
        assert "model.x.weight" in reader and "x.weight" not in reader and "vae.x.weight" not in reader
        assert torch.equal(reader.read("model.x.weight"), weights["x.weight"])
        assert tensor_reads == ["x.weight"]  # that tensor alone came from disk
        assert torch.equal(reader.read("model.x.weight"), weights["x.weight"])  # and again, the same
        assert torch.equal(reader.read("vae.encoder.w"), torch.ones(2))
        with pytest.raises(KeyError, match="'model.z' is in none of .*a.safetensors.*b.safetensors"):
            reader.read("model.z")
    (tmp_path / "bad.safetensors").write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(ValueError, match="bad.safetensors is not a readable safetensors file"):
        SafetensorsReader({"model.": tmp_path / "a.safetensors", "vae.": tmp_path / "bad.safetensors"})
