"""Tests of training/packing.py: the reference's packing (pack-a fixture), a hand-computed layout, the
packer's buffering, the task builders, and per-token losses of a pack against each sample alone."""

from __future__ import annotations

import json

import pytest
import torch
from bagel_remote.configuration_bagel import DEFAULT_VAE_CONFIG, BagelConfig
from bagel_remote.training.packing import (
    ImageSizes,
    PackBuilder,
    Packer,
    PackingConfig,
    PlanBuilder,
    PlanItem,
    encode_pack,
    pack_samples,
)
from conftest import REPO_ROOT, require_fixture
from PIL import Image

PACK_DIR = REPO_ROOT.parent / "shared" / "parity" / "pack-a"
BOS, EOS, START, END = 10, 11, 12, 13
DROPOUTS = ("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob")


def small_config(model_config: BagelConfig | None = None, **overrides) -> PackingConfig:
    """Packing over a model config with an 8 x 8 ViT grid and 8 x 8 latent grid, no CFG dropout."""
    model_config = (
        BagelConfig(vit_max_num_patch_per_side=8, max_latent_size=8) if model_config is None else model_config
    )
    values = dict(
        bos_token_id=BOS,
        eos_token_id=EOS,
        start_of_image=START,
        end_of_image=END,
        text_cond_dropout_prob=0.0,
        vit_cond_dropout_prob=0.0,
        vae_cond_dropout_prob=0.0,
    )
    return PackingConfig(model_config, **{**values, **overrides})


# ----------------------------------------------------------------------------------------------
# Parity with the reference's pipeline (pack-a)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack_fixture():
    from safetensors.torch import load_file

    root = require_fixture(PACK_DIR)
    meta = json.loads((root / "fixture.json").read_text())
    return meta, load_file(str(root / "inputs.safetensors")), load_file(str(root / "expected.safetensors"))


def _fixture_plans(meta, inputs) -> dict[str, list[PlanItem]]:
    plans = {}
    for sample in meta["samples"]:
        texts, images = iter(sample["texts"]), iter(sample["images"])
        plans[sample["name"]] = [
            PlanItem.from_reference(item, next(texts) if item["type"] == "text" else inputs[next(images)])
            for item in sample["plan"]
        ]
    return plans


def _fixture_config(meta) -> PackingConfig:
    assert meta["vae_downsample"] * meta["latent_patch_size"] == 16
    model_config = BagelConfig(
        vit_patch_size=meta["vit_patch_size"],
        max_latent_size=meta["max_latent_size"],
        vit_max_num_patch_per_side=meta["vit_max_num_patch_per_side"],
        latent_patch_size=meta["latent_patch_size"],
        vae_config=dict(DEFAULT_VAE_CONFIG, downsample=meta["vae_downsample"]),
    )
    return small_config(model_config, **meta["special_token_ids"], loss_reduction=meta["loss_reduction"])


@pytest.mark.parametrize("group", ["t2i", "edit", "und", "all"])
def test_pack_a_parity(pack_fixture, group):
    meta, inputs, expected = pack_fixture
    plans = _fixture_plans(meta, inputs)
    chosen = list(plans.values()) if group == "all" else [plans[group]]
    pack = pack_samples(chosen, _fixture_config(meta), torch.Generator().manual_seed(0))

    want_json = meta["expected"][group]
    want_tensors = {k.split(".", 1)[1]: v for k, v in expected.items() if k.startswith(group + ".")}
    assert set(pack) == set(want_json) | set(want_tensors), "the pack's keys differ from the reference's"
    for key, value in want_json.items():
        got = [list(shape) for shape in pack[key]] if key == "patchified_vae_latent_shapes" else pack[key]
        assert got == value, key
    for key, want in want_tensors.items():
        got = pack[key]
        assert got.dtype == want.dtype and got.shape == want.shape, (
            f"{key}: {got.dtype} {got.shape} vs {want.dtype} {want.shape}"
        )
        if key == "packed_timesteps":  # raw N(0, 1) draws: which are finite, one value per image
            assert torch.equal(torch.isfinite(got), torch.isfinite(want)), key
            continue
        assert torch.equal(got, want), key
    if "packed_timesteps" in pack:
        start = 0
        for h, w in pack["patchified_vae_latent_shapes"]:
            image_t = pack["packed_timesteps"][start : start + h * w]
            assert (image_t == image_t[0]).all() or torch.isinf(image_t).all()
            start += h * w


# ----------------------------------------------------------------------------------------------
# Layout against hand-computed values
# ----------------------------------------------------------------------------------------------


def _image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_layout_hand_computed():
    """A t2i sample (2 caption ids, one 32x48 target), an edit (32x32 source in VAE + ViT 28x28,
    1 instruction id, 32x32 target) and an understanding sample (ViT 14x28, 1 question id, 2 answer
    ids, special-token loss on the answer's eos)."""
    t2i = [PlanItem("text", [20, 21], enable_cfg=True), PlanItem("vae_image", _image(32, 48), loss=True)]
    edit = [
        PlanItem("vae_image", _image(32, 32, 1), enable_cfg=True),
        PlanItem("vit_image", _image(28, 28, 2), enable_cfg=True),
        PlanItem("text", [30], enable_cfg=True),
        PlanItem("vae_image", _image(32, 32, 3), loss=True),
    ]
    und = [
        PlanItem("vit_image", _image(14, 28, 4)),
        PlanItem("text", [40]),
        PlanItem("text", [41, 42], loss=True, special_token_label=99),
    ]
    pack = pack_samples([t2i, edit, und], small_config(), torch.Generator().manual_seed(0))

    # t2i: [bos 20 21 eos] 0..3 causal; [start, 6 latents, end] 4..11 noise, all at rope 4
    # edit (from 12): [start 4 lat end] 12..17 full @0; [start 4 vit end] 18..23 full @1;
    #   [bos 30 eos] 24..26 causal @2,3,4; [start 4 lat end] 27..32 noise @5
    # und (from 33): [start 2 vit end] 33..36 full @0; [bos 40 eos] 37..39 @1..3; [bos 41 42 eos] 40..43 @4..7
    assert pack["sequence_length"] == 44
    assert pack["sample_lens"] == [12, 21, 11]
    assert pack["split_lens"] == [4, 8, 6, 6, 3, 6, 4, 3, 4]
    assert pack["attn_modes"] == ["causal", "noise", "full", "full", "causal", "noise", "full", "causal", "causal"]
    positions = [0, 1, 2, 3] + [4] * 8 + [0] * 6 + [1] * 6 + [2, 3, 4] + [5] * 6 + [0] * 4 + [1, 2, 3, 4, 5, 6, 7]
    assert pack["packed_position_ids"].tolist() == positions
    text = {
        0: BOS,
        1: 20,
        2: 21,
        3: EOS,
        4: START,
        11: END,
        12: START,
        17: END,
        18: START,
        23: END,
        24: BOS,
        25: 30,
        26: EOS,
        27: START,
        32: END,
        33: START,
        36: END,
        37: BOS,
        38: 40,
        39: EOS,
        40: BOS,
        41: 41,
        42: 42,
        43: EOS,
    }
    assert pack["packed_text_indexes"].tolist() == list(text)
    assert pack["packed_text_ids"].tolist() == list(text.values())
    assert pack["packed_vae_token_indexes"].tolist() == list(range(5, 11)) + list(range(13, 17)) + list(range(28, 32))
    assert pack["patchified_vae_latent_shapes"] == [(2, 3), (2, 2), (2, 2)]
    assert pack["packed_latent_position_ids"].tolist() == [0, 1, 2, 8, 9, 10] + [0, 1, 8, 9] * 2
    assert pack["mse_loss_indexes"].tolist() == list(range(5, 11)) + list(range(28, 32))
    t = pack["packed_timesteps"]
    assert (
        torch.isfinite(t[:6]).all()
        and torch.isinf(t[6:10]).all()
        and (t[6:10] < 0).all()
        and torch.isfinite(t[10:]).all()
    )
    assert pack["padded_images"].shape == (3, 3, 32, 48)
    assert (
        torch.equal(pack["padded_images"][1, :, :, :32], edit[0].data)
        and (pack["padded_images"][1, :, :, 32:] == 0).all()
    )
    assert pack["packed_vit_token_indexes"].tolist() == [19, 20, 21, 22, 34, 35]
    assert pack["packed_vit_position_ids"].tolist() == [0, 1, 8, 9, 0, 1]
    assert pack["vit_token_seqlens"].tolist() == [4, 2]
    assert pack["ce_loss_indexes"].tolist() == [40, 41, 42, 43]
    assert pack["packed_label_ids"].tolist() == [41, 42, EOS, 99]
    assert torch.allclose(pack["ce_loss_weights"], torch.tensor([3**-0.5] * 3 + [1.0]))


def test_loss_reductions_and_cfg_dropout():
    plan = [PlanItem("text", [5, 6, 7], loss=True)]
    weights = {r: pack_samples([plan], small_config(loss_reduction=r))["ce_loss_weights"] for r in ("token", "sample")}
    assert weights["token"].tolist() == [1.0] * 4 and torch.allclose(weights["sample"], torch.full((4,), 0.25))
    # Dropped: the text vanishes (rope unchanged), a dropped image still advances rope by one.
    dropped = small_config(text_cond_dropout_prob=1.0, vit_cond_dropout_prob=1.0, vae_cond_dropout_prob=1.0)
    plan = [
        PlanItem("vae_image", _image(16, 16), enable_cfg=True),
        PlanItem("text", [5], enable_cfg=True),
        PlanItem("vit_image", _image(14, 14), enable_cfg=True),
        PlanItem("text", [6]),
    ]
    pack = pack_samples([plan], dropped)
    assert pack["packed_text_ids"].tolist() == [BOS, 6, EOS] and pack["packed_position_ids"].tolist() == [2, 3, 4]
    assert "padded_images" not in pack and "packed_vit_tokens" not in pack
    all_dropped = [PlanItem("text", [5], enable_cfg=True)]
    assert pack_samples([all_dropped, [PlanItem("text", [6])]], dropped)["sample_lens"] == [3]
    # With probability 0.5 the draws of a seeded generator decide, reproducibly.
    half = small_config(text_cond_dropout_prob=0.5)
    cfg_plan = [[PlanItem("text", [5], enable_cfg=True), PlanItem("text", [6])] for _ in range(40)]
    lens = [pack_samples(cfg_plan, half, torch.Generator().manual_seed(s))["sample_lens"] for s in (1, 1, 2)]
    assert lens[0] == lens[1] != lens[2] and set(lens[0]) == {3, 6}


def test_pack_errors():
    with pytest.raises(ValueError, match="multiple of 16"):
        pack_samples([[PlanItem("vae_image", _image(24, 32), loss=True)]], small_config())
    with pytest.raises(ValueError, match="max_latent_size"):
        pack_samples([[PlanItem("vae_image", _image(16, 144), loss=True)]], small_config())
    with pytest.raises(ValueError, match="kind"):
        PlanItem("video", [1])
    with pytest.raises(ValueError, match="empty"):
        PackBuilder(small_config()).build()


# ----------------------------------------------------------------------------------------------
# The packer: thresholds, overflow buffer, per-sample limit, resume
# ----------------------------------------------------------------------------------------------


def _text_plan(n: int) -> list[PlanItem]:
    return [PlanItem("text", list(range(20, 20 + n - 2)))]  # n tokens with bos and eos


def test_packer_thresholds_buffer_and_skip():
    packer = Packer(
        small_config(),
        max_num_tokens=20,
        expected_num_tokens=15,
        max_num_tokens_per_sample=12,
        prefer_buffer_before=5,
        max_buffer_size=1,
    )
    stream = [("a", 8), ("b", 8), ("c", 13), ("d", 6), ("e", 10), ("f", 4), ("g", 9)]
    packs = list(packer.packs((key, _text_plan(n)) for key, n in stream))
    # a+b=16 >= 15: emitted. c skipped (13 > 12). d=6; e would make 16 <= 20: 16 >= 15 emitted.
    # f=4; g: 4+9=13 fine, end of stream: the last short pack.
    assert [p["sample_lens"] for p in packs] == [[8, 8], [6, 10], [4, 9]]
    packer = Packer(
        small_config(),
        max_num_tokens=20,
        expected_num_tokens=19,
        max_num_tokens_per_sample=12,
        prefer_buffer_before=5,
        max_buffer_size=1,
    )
    stream = [("a", 12), ("b", 10), ("c", 11), ("d", 4), ("e", 3)]
    packs = list(packer.packs((key, _text_plan(n)) for key, n in stream))
    # a=12; b overflows -> buffer; c overflows, buffer full -> emit [a], c opens the next pack;
    # b waits while the pack is >= 5 long; d=15, e=18; stream ends -> [c d e] then [b].
    assert [p["sample_lens"] for p in packs] == [[12], [11, 4, 3], [10]]


def test_packer_resume_gives_the_same_packs():
    config = small_config(text_cond_dropout_prob=0.5)
    plans = {
        i: [PlanItem("text", [20] * (3 + i % 7), enable_cfg=True), PlanItem("vae_image", _image(16, 32, i), loss=True)]
        for i in range(60)
    }
    kwargs = dict(
        max_num_tokens=40,
        expected_num_tokens=30,
        max_num_tokens_per_sample=30,
        prefer_buffer_before=10,
        max_buffer_size=2,
        seed=3,
    )
    full = list(Packer(config, **kwargs).packs(plans.items()))
    first = Packer(config, **kwargs)
    stream = iter(plans.items())
    consumed = []
    packs = first.packs((key, plan) for key, plan in stream if not consumed.append(key))
    head = [next(packs)]
    while not (state := first.state_dict())["buffer"] and state["carry"] is None:
        head.append(next(packs))  # cut where a sample waits, so the waiting list is resumed too
    second = Packer(config, **kwargs)
    second.load_state_dict(state, plans.__getitem__)
    tail = list(second.packs((k, plans[k]) for k in range(len(consumed), 60)))
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]) if torch.is_tensor(want[key]) else got[key] == want[key], key


# ----------------------------------------------------------------------------------------------
# Task builders
# ----------------------------------------------------------------------------------------------


class CharTokenizer:
    """One id per character (ord % 200 + 20), enough to check what was tokenized where."""

    def encode(self, text, add_special_tokens=False):
        assert not add_special_tokens
        return [ord(c) % 200 + 20 for c in text]


SMALL_SIZES = dict(
    vae_sizes=ImageSizes(64, 32, 16), vit_sizes=ImageSizes(56, 28, 14), edit_vit_sizes=ImageSizes(42, 28, 14)
)


def _pil(w: int, h: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _summary(plan):
    return [(i.kind, i.loss, i.enable_cfg, tuple(i.data.shape[1:]) if i.kind != "text" else len(i.data)) for i in plan]


def test_task_builders_follow_the_reference_plans():
    builder = PlanBuilder(CharTokenizer(), **SMALL_SIZES)
    assert _summary(builder.text_to_image("a cat", _pil(80, 40))) == [
        ("text", False, True, 5),
        ("vae_image", True, False, (32, 64)),
    ]
    chain = builder.edit([_pil(40, 40, 0), _pil(40, 40, 1), _pil(40, 40, 2)], ["red", "big"])
    assert _summary(chain) == [
        ("vae_image", False, True, (32, 32)),
        ("vit_image", False, True, (42, 42)),
        ("text", False, True, 3),
        ("vae_image", True, False, (32, 32)),
        ("vae_image", False, True, (32, 32)),
        ("vit_image", False, True, (42, 42)),
        ("text", False, True, 3),
        ("vae_image", True, False, (32, 32)),
    ]
    conversation = [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "A dog."},
        {"from": "human", "value": "And <image> here"},
        {"from": "gpt", "value": "Cat"},
    ]
    plan = builder.understanding([_pil(56, 28, 3), _pil(28, 28, 4)], conversation)
    assert _summary(plan) == [
        ("vit_image", False, False, (28, 56)),
        ("text", False, False, 11),
        ("text", True, False, 6),
        ("text", False, False, 3),
        ("vit_image", False, False, (28, 28)),
        ("text", False, False, 4),
        ("text", True, False, 3),
    ]
    assert plan[1].data == CharTokenizer().encode("What is it?")
    assert builder.understanding([], [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]) is None
    with pytest.raises(ValueError, match="placeholders"):
        builder.understanding([_pil(28, 28)], [{"from": "human", "value": "no image"}, {"from": "gpt", "value": "x"}])
    mixed = builder.interleaved([{"text": "hi"}, {"image": _pil(32, 32), "loss": True}, {"text": "ok", "loss": True}])
    assert _summary(mixed) == [("text", False, True, 2), ("vae_image", True, False, (32, 32)), ("text", True, True, 2)]


# ----------------------------------------------------------------------------------------------
# A pack gives each sample the losses it gets alone (tiny checkpoint)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal
    from bagel_remote.processing_bagel import BagelProcessor
    from make_tiny_checkpoint import make_tiny_checkpoint  # scripts/ is on sys.path (conftest)

    path = make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)
    return BagelForUnifiedMultimodal.from_pretrained(path).eval(), BagelProcessor.from_pretrained(path)


def _losses(model, pack, noise, timesteps):
    kwargs = encode_pack(model, dict(pack, packed_timesteps=timesteps), "cpu", sample=False)
    with torch.no_grad():
        out = model(**kwargs, packed_noise=noise)
    return out["ce"], out["mse"]


def test_pack_losses_equal_each_sample_alone(tiny):
    model, processor = tiny
    config = PackingConfig.from_model_config(
        model.config,
        processor.special_token_ids,
        text_cond_dropout_prob=0.0,
        vit_cond_dropout_prob=0.0,
        vae_cond_dropout_prob=0.0,
    )
    builder = PlanBuilder(processor.tokenizer, **SMALL_SIZES)
    samples = [
        builder.text_to_image("a red square", _pil(64, 32, 0)),
        builder.edit([_pil(48, 48, 1), _pil(48, 48, 2)], ["make it blue"]),
        builder.understanding(
            [_pil(42, 28, 3)], [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "blue"}]
        ),
    ]
    joint = pack_samples(samples, config, torch.Generator().manual_seed(0))
    z = 4 * model.config.vae_config["z_channels"]
    noise = torch.randn(len(joint["packed_vae_token_indexes"]), z, generator=torch.Generator().manual_seed(1))
    ce, mse = _losses(model, joint, noise, joint["packed_timesteps"])
    assert ce.numel() > 0 and mse.numel() > 0 and mse.abs().sum() > 0

    vae_seen = ce_seen = mse_seen = 0
    for sample in samples:
        alone = pack_samples([sample], config)
        n_vae = len(alone.get("packed_vae_token_indexes", []))
        timesteps = joint["packed_timesteps"][vae_seen : vae_seen + n_vae]  # the joint pack's draws
        ce_alone, mse_alone = _losses(model, alone, noise[vae_seen : vae_seen + n_vae], timesteps if n_vae else None)
        vae_seen += n_vae
        if ce_alone is not None:
            torch.testing.assert_close(ce[ce_seen : ce_seen + len(ce_alone)], ce_alone, rtol=1e-5, atol=1e-6)
            ce_seen += len(ce_alone)
        if mse_alone is not None:
            torch.testing.assert_close(mse[mse_seen : mse_seen + len(mse_alone)], mse_alone, rtol=1e-5, atol=1e-6)
            mse_seen += len(mse_alone)
    assert (ce_seen, mse_seen) == (len(ce), len(mse)), "every sample's losses are accounted for"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_encode_pack_on_gpu_matches_cpu(tiny):
    """The training step's side on the GPU: tensors moved, images encoded there (float32 tiny model)."""
    model, processor = tiny
    config = PackingConfig.from_model_config(model.config, processor.special_token_ids)
    builder = PlanBuilder(processor.tokenizer, **SMALL_SIZES)
    pack = pack_samples(
        [builder.text_to_image("a", _pil(64, 32)), builder.edit([_pil(48, 48, 1), _pil(48, 48, 2)], ["b"])],
        config,
        torch.Generator().manual_seed(0),
    )
    cpu = encode_pack(model, pack, "cpu", sample=False)
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # float32 convolutions, to compare with the CPU
    try:
        gpu = encode_pack(model.to("cuda"), pack, "cuda", sample=False)
        assert gpu["padded_latent"].is_cuda and gpu["packed_text_ids"].is_cuda
        torch.testing.assert_close(gpu["padded_latent"].cpu(), cpu["padded_latent"], rtol=1e-4, atol=1e-4)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
        model.to("cpu")


# ----------------------------------------------------------------------------------------------
# One source: the packing and the processor read the same model config
# ----------------------------------------------------------------------------------------------


def test_packing_and_processor_read_one_config():
    """A config with another patch size and grids: the processor's rules, the training transforms
    and the packing all follow it, and a pack of a processor-made image holds the processor's
    patches and position ids."""
    from bagel_remote.processing_bagel import BagelProcessor
    from bagel_remote.training.packing import training_image_sizes
    from tiny_tokenizer import build_tiny_tokenizer  # scripts/ is on sys.path (conftest)

    model_config = BagelConfig(vit_patch_size=16, vit_max_num_patch_per_side=12, max_latent_size=6)
    processor = BagelProcessor(build_tiny_tokenizer(None, vocab_size=320), config=model_config, vit_min_size=32)
    packing = PackingConfig.from_model_config(model_config, processor.special_token_ids)
    assert (packing.vit_patch_size, packing.vit_max_num_patch_per_side) == (16, 12)
    assert (packing.vae_token_stride, packing.max_latent_size) == (processor.vae_stride, 6)
    assert packing.text_cond_dropout_prob == model_config.text_cond_dropout_prob == 0.1  # the config's, not a copy

    sizes = training_image_sizes(processor.image_settings)
    assert sizes["vae_sizes"] == ImageSizes(96, 512, 16)  # the processor's VAE rule: 6 tokens of 16 px at most
    assert sizes["vit_sizes"] == ImageSizes(192, 378, 16, 2_007_040)  # the reference's understanding transform
    assert sizes["edit_vit_sizes"] == ImageSizes(192, 32, 16)  # 518 px capped at the ViT grid
    builder = PlanBuilder.from_processor(processor)
    assert (builder.vae_sizes, builder.vit_sizes, builder.edit_vit_sizes) == tuple(sizes.values())

    image = _pil(200, 120, 5)
    edit = builder.image(image, vae=True, vit=True)
    assert edit[0].data.shape[1:] == (64, 96) and edit[1].data.shape[1:] == (112, 192)
    kept = PackingConfig.from_model_config(model_config, processor.special_token_ids, **dict.fromkeys(DROPOUTS, 0.0))
    pack = pack_samples([edit], kept)
    patches, position_ids = processor.vit_patches(image)  # the processor's own rule for this image
    assert torch.equal(pack["packed_vit_tokens"], patches) and torch.equal(
        pack["packed_vit_position_ids"], position_ids
    )
    assert pack["patchified_vae_latent_shapes"] == [(4, 6)]
    with pytest.raises(ValueError, match="larger than max_latent_size=6"):
        pack_samples([[PlanItem("vae_image", torch.zeros(3, 16, 112), loss=True)]], packing)


def test_packing_config_names_what_belongs_to_the_model_config():
    model_config = BagelConfig(max_latent_size=8)
    ids = dict(bos_token_id=BOS, eos_token_id=EOS, start_of_image=START, end_of_image=END)
    with pytest.raises(TypeError, match="max_latent_size"):
        PackingConfig.from_model_config(model_config, ids, max_latent_size=16)
    with pytest.raises(ValueError, match="vae_cond_dropout_prob"):
        PackingConfig.from_model_config(model_config, ids, vae_cond_dropout_prob=1.5)
    with pytest.raises(ValueError, match="interpolate_pos"):
        PackingConfig.from_model_config(BagelConfig(interpolate_pos=True), ids)
    dropped = PackingConfig.from_model_config(model_config, ids, text_cond_dropout_prob=0.0)
    assert (dropped.text_cond_dropout_prob, dropped.vit_cond_dropout_prob) == (0.0, 0.3)


@pytest.mark.parametrize(
    "kwargs, kind, named",
    [
        (dict(max_num_tokens=2.5), TypeError, "max_num_tokens"),
        (dict(max_num_tokens=0), ValueError, "max_num_tokens"),
        (dict(max_num_tokens=100, expected_num_tokens=101), ValueError, "expected_num_tokens"),
        (dict(max_num_tokens=100, expected_num_tokens=50, max_num_tokens_per_sample=200), ValueError, "per_sample"),
        (dict(max_buffer_size=-1), ValueError, "max_buffer_size"),
        (dict(prefer_buffer_before="16"), TypeError, "prefer_buffer_before"),
        (dict(seed=True), TypeError, "seed"),
    ],
)
def test_packer_limits_are_checked_by_name(kwargs, kind, named):
    with pytest.raises(kind, match=named):
        Packer(small_config(), **kwargs)
