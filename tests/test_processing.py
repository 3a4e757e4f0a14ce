"""Tests of processing_bagel.py (image transforms, tokenizer helpers, BagelProcessor) and scripts/tiny_tokenizer.py."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from bagel_remote.configuration_bagel import BagelConfig
from bagel_remote.loading_bagel import remote_code_files
from bagel_remote.processing_bagel import (
    DEFAULT_MAX_PIXELS,
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    BagelProcessor,
    add_bagel_special_tokens,
    get_resize_size,
    image_to_tensor,
    patchify_vit,
    resize_image,
    tensor_to_image,
    to_rgb,
)
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parent.parent
BAGEL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>"]
VAE_RULE = dict(max_size=1024, min_size=512, stride=16)
VIT_RULE = dict(max_size=980, min_size=224, stride=14)


@pytest.fixture(scope="module")
def tiny_tokenizer_module():
    import tiny_tokenizer  # scripts/ is on sys.path (conftest)

    return tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_module):
    return tiny_tokenizer_module.build_tiny_tokenizer(None, vocab_size=320)


@pytest.fixture(scope="module")
def processor(tokenizer):
    return BagelProcessor(tokenizer)


def _noise_image(width, height, mode="RGB", seed=0):
    g = torch.Generator().manual_seed(seed)
    channels = len(mode)
    data = torch.randint(0, 256, (height, width, channels), generator=g, dtype=torch.uint8)
    return Image.frombytes(mode, (width, height), bytes(data.flatten().tolist()))


# ----------------------------------------------------------------------------------------------------------------------
# Resize rule. Expected sizes worked out by hand from the reference rule (Python round = half to even):
#   scale = max(min(max/long, 1), min/short); side -> snap(round(side*scale)); pixel cap; long-side cap.
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, rule, expected",
    [
        # tiny: scale = max(1, 512/16) = 32 -> 640 x 512
        ((20, 16), VAE_RULE, (640, 512)),
        # huge: scale = 1024/4000 = 0.256 -> 1024 x 768
        ((4000, 3000), VAE_RULE, (1024, 768)),
        # short side too small: scale = 512/400 = 1.28 -> 768 x 512
        ((600, 400), VAE_RULE, (768, 512)),
        # very wide: scale = 512/100 = 5.12 -> 20480 x 512 (10.5 MP > 1806336): x 0.172265625 -> 3528 -> 3520
        # (220.5 rounds to 220), 88.2 -> 88 -> 96 (5.5 rounds to 6); long side 3520 > 1024: x 1024/3520 -> 1024,
        # 27.9 -> 28 -> 32
        ((4000, 100), VAE_RULE, (1024, 32)),
        # very tall, same numbers transposed
        ((100, 4000), VAE_RULE, (32, 1024)),
        # already conforming
        ((1024, 512), VAE_RULE, (1024, 512)),
        ((512, 512), VAE_RULE, (512, 512)),
        # ViT tiny: scale = 224/16 = 14 -> 224 x 224
        ((16, 16), VIT_RULE, (224, 224)),
        # ViT huge: scale = 0.245 -> 980 x 735; 735/14 = 52.5 rounds to 52 -> 728
        ((4000, 3000), VIT_RULE, (980, 728)),
        # ViT in range: 300/14 = 21.4 -> 294, 500/14 = 35.7 -> 504
        ((300, 500), VIT_RULE, (294, 504)),
        # ViT already conforming (70 x 16 patches)
        ((980, 224), VIT_RULE, (980, 224)),
    ],
)
def test_resize_rule(size, rule, expected):
    assert get_resize_size(*size, **rule) == expected
    assert get_resize_size(*size, **rule, max_pixels=DEFAULT_MAX_PIXELS) == expected


def test_resize_rule_pixel_cap_is_linear_and_rounds_half_to_even():
    # 1000/16 = 62.5 rounds to 62 -> 992 x 992 (984064 px > 250000); the reference multiplies the sides by the
    # *area* ratio 250000/984064: 992 * 0.254 = 252.0 -> 252/16 = 15.75 -> 256.
    assert get_resize_size(1000, 1000, max_size=1024, min_size=16, stride=16, max_pixels=250_000) == (256, 256)
    assert DEFAULT_MAX_PIXELS == 14 * 14 * 9 * 1024


def test_resize_image_uses_bicubic_and_keeps_conforming_images():
    image = _noise_image(40, 30)
    out = resize_image(image, **VAE_RULE)
    # scale = 512/30: 40 -> 682.7 -> 683 -> 688 (683/16 = 42.7 -> 43); 30 -> 512
    assert out.size == (688, 512)
    assert out.tobytes() == image.resize((688, 512), resample=Image.Resampling.BICUBIC).tobytes()

    conforming = _noise_image(224, 980, seed=1)
    same = resize_image(conforming, **VIT_RULE)
    assert same.size == (224, 980)
    assert same.tobytes() == conforming.tobytes()
    assert same is not conforming


# ----------------------------------------------------------------------------------------------------------------------
# RGB conversion, tensors, patches
# ----------------------------------------------------------------------------------------------------------------------


def test_to_rgb_flattens_alpha_on_white():
    image = Image.new("RGBA", (2, 2))
    image.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    image.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue stays blue
    image.putpixel((0, 1), (0, 0, 0, 128))  # half transparent black -> mid grey
    image.putpixel((1, 1), (10, 20, 30, 255))
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (2, 2)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (0, 0, 255)
    assert all(abs(v - 127) <= 1 for v in rgb.getpixel((0, 1)))
    assert rgb.getpixel((1, 1)) == (10, 20, 30)


def test_to_rgb_la_palette_and_plain_modes():
    la = Image.new("LA", (1, 1), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)

    pal = Image.new("P", (2, 1))
    pal.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0
    rgb = to_rgb(pal)
    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (200, 10, 10)

    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    rgb_in = Image.new("RGB", (1, 1), (1, 2, 3))
    assert to_rgb(rgb_in).getpixel((0, 0)) == (1, 2, 3)


@pytest.mark.parametrize(
    "mode, values, expected",
    [
        ("I;16", [0, 257, 32896, 65535], [0, 1, 128, 255]),
        ("I;16B", [0, 257, 32896, 65535], [0, 1, 128, 255]),
        ("I", [0, 257, 32896, 65535], [0, 1, 128, 255]),
        ("F", [0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),
        ("F", [0.0, 63.6, 128.0, 255.0], [0, 64, 128, 255]),  # a float image of 0..255
    ],
)
def test_to_rgb_scales_16_bit_integer_and_float_images(mode, values, expected):
    import numpy as np

    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4", "F": "<f4"}[mode]
    image = Image.frombytes(mode, (4, 1), np.array(values, dtype=dtype).tobytes())
    assert image.mode == mode
    rgb = to_rgb(image)
    assert rgb.mode == "RGB" and rgb.size == (4, 1)
    assert [rgb.getpixel((i, 0)) for i in range(4)] == [(v, v, v) for v in expected]


@pytest.mark.parametrize(
    "mode, values",
    [("I", [0, 70000]), ("I", [-5, 10]), ("F", [0.0, 300.0]), ("F", [-0.5, 1.0]), ("F", [0.0, float("nan")])],
)
def test_to_rgb_refuses_values_outside_the_mode_range(mode, values):
    import numpy as np

    image = Image.frombytes(mode, (2, 1), np.array(values, dtype="<i4" if mode == "I" else "<f4").tobytes())
    with pytest.raises(ValueError, match=f"a mode '{mode}' image with values in .*PIL.Image.fromarray"):
        to_rgb(image)


@pytest.mark.parametrize("bad", ["image.png", torch.zeros(3, 4, 4)])
def test_to_rgb_rejects_non_pil(bad):
    with pytest.raises(TypeError, match="PIL.Image") as info:
        to_rgb(bad)
    assert type(bad).__name__ in str(info.value)


def test_image_to_tensor_values_and_round_trip():
    image = Image.new("RGB", (3, 2))
    image.putpixel((0, 0), (0, 128, 255))
    tensor = image_to_tensor(image)
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert tensor[0, 0, 0].item() == -1.0 and tensor[2, 0, 0].item() == 1.0
    assert tensor[1, 0, 0].item() == pytest.approx(128 / 255 * 2 - 1, abs=1e-6)

    noise = _noise_image(37, 23, seed=3)
    x = image_to_tensor(noise)
    assert x.shape == (3, 23, 37) and x.min() >= -1 and x.max() <= 1
    assert tensor_to_image(x).tobytes() == noise.tobytes()
    assert tensor_to_image(x[None]).tobytes() == noise.tobytes()
    # out-of-range values are clamped
    clamped = tensor_to_image(torch.full((3, 2, 2), 5.0))
    assert clamped.getpixel((0, 0)) == (255, 255, 255)
    assert tensor_to_image(torch.full((3, 2, 2), -5.0)).getpixel((1, 1)) == (0, 0, 0)
    # rounding (default) vs the reference decoder's truncation: 100.6 -> 101 or 100
    mid = torch.full((3, 1, 1), 2 * (100.6 / 255) - 1)
    assert tensor_to_image(mid).getpixel((0, 0)) == (101, 101, 101)
    assert tensor_to_image(mid, round_values=False).getpixel((0, 0)) == (100, 100, 100)


def test_tensor_to_image_bad_shape():
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        tensor_to_image(torch.zeros(4, 2, 2))
    with pytest.raises(ValueError):
        tensor_to_image(torch.zeros(2, 3, 2, 2))


def test_patchify_order_hand_built():
    # pixels[c, y, x] = 100 c + 10 y + x, H = 4, W = 6, P = 2 -> 2 x 3 grid
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(6), indexing="ij")
    pixels = (100 * c + 10 * y + x).float()
    patches, position_ids = patchify_vit(pixels, patch_size=2, max_num_patch_per_side=5)
    assert patches.shape == (6, 12)
    assert position_ids.tolist() == [0, 1, 2, 5, 6, 7]
    # patch 0 (row 0, col 0): (py, px, ch) order
    assert patches[0].tolist() == [0, 100, 200, 1, 101, 201, 10, 110, 210, 11, 111, 211]
    # patch 5 (row 1, col 2): rows 2-3, cols 4-5
    assert patches[5].tolist() == [24, 124, 224, 25, 125, 225, 34, 134, 234, 35, 135, 235]
    # patch 1 (row 0, col 1)
    assert patches[1].tolist() == [2, 102, 202, 3, 103, 203, 12, 112, 212, 13, 113, 213]


def test_patchify_errors():
    with pytest.raises(ValueError, match="multiple of the patch size"):
        patchify_vit(torch.zeros(3, 28, 30), patch_size=14, max_num_patch_per_side=70)
    with pytest.raises(ValueError, match="max_num_patch_per_side"):
        patchify_vit(torch.zeros(3, 14, 14 * 71), patch_size=14, max_num_patch_per_side=70)
    with pytest.raises(
        ValueError,
        match=r"pixels must be a tensor with 3 dimensions, got a tensor of shape \(14, 14\)",
    ):
        patchify_vit(torch.zeros(14, 14), patch_size=14, max_num_patch_per_side=70)
    with pytest.raises(TypeError, match="pixels must be a torch.Tensor"):  # a wrong type: TypeError, not ValueError
        patchify_vit([[0.0] * 14] * 14, patch_size=14, max_num_patch_per_side=70)
    patches, ids = patchify_vit(torch.zeros(3, 14, 14 * 70), patch_size=14, max_num_patch_per_side=70)
    assert patches.shape == (70, 588) and ids.tolist() == list(range(70))


def test_image_size_validation():
    with pytest.raises(ValueError, match=r"15x100") as info:
        resize_image(Image.new("RGB", (15, 100)), **VAE_RULE)
    assert str(MIN_IMAGE_SIDE) in str(info.value) and str(MAX_IMAGE_PIXELS) in str(info.value)
    with pytest.raises(ValueError, match=r"100x15"):
        resize_image(Image.new("RGB", (100, 15)), **VIT_RULE)
    # mode "1" keeps the 64 MP image cheap (1 bit per pixel)
    with pytest.raises(ValueError, match=r"8001x8000"):
        resize_image(Image.new("1", (8001, 8000)), **VAE_RULE)
    assert MAX_IMAGE_PIXELS == 64_000_000 and MIN_IMAGE_SIDE == 16
    assert resize_image(Image.new("RGB", (16, 16)), **VAE_RULE).size == (512, 512)
    with pytest.raises(TypeError, match="PIL.Image"):
        resize_image("not an image", **VAE_RULE)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer and processor
# ----------------------------------------------------------------------------------------------------------------------


def test_tiny_tokenizer_layout_and_determinism(tiny_tokenizer_module, tmp_path):
    build = tiny_tokenizer_module.build_tiny_tokenizer
    tok_a = build(tmp_path / "a", vocab_size=300)
    build(tmp_path / "b", vocab_size=300)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert len(tok_a) == 300 and max(tok_a.get_vocab().values()) == 299
    # default: the ids of the tiny parity checkpoint (pad 0, bos 10, eos 11, start/end of image 12/13)
    assert tok_a.convert_tokens_to_ids(["<|endoftext|>", *BAGEL_TOKENS]) == [0, 10, 11, 12, 13]
    # Qwen2 layout: right after the BPE vocabulary
    tok_end = build(None, vocab_size=300, special_token_ids=None)
    assert tok_end.convert_tokens_to_ids(["<|endoftext|>", *BAGEL_TOKENS]) == [295, 296, 297, 298, 299]
    # a large vocab_size: fewer tokens than asked (the built-in text runs out of merges), ids still in range
    tok_big = build(None, vocab_size=4096)
    assert max(tok_big.get_vocab().values()) == len(tok_big) - 1 < 4096
    with pytest.raises(ValueError, match="too small"):
        build(None, vocab_size=200)
    with pytest.raises(ValueError, match="gap"):
        far = {**tiny_tokenizer_module.TINY_A_SPECIAL_TOKEN_IDS, "<|im_end|>": 4000}
        build(None, vocab_size=4096, special_token_ids=far)

    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(tmp_path / "a")
    assert type(loaded).__name__ == "Qwen2Tokenizer"
    assert loaded.convert_tokens_to_ids(BAGEL_TOKENS) == [10, 11, 12, 13]
    assert loaded.pad_token == "<|endoftext|>" and loaded.pad_token_id == 0
    text = "Hello <|im_start|>world<|im_end|> naïve 😀"
    ids = loaded.encode(text, add_special_tokens=False)
    assert 10 in ids and 11 in ids and loaded.decode(ids) == text


def test_tiny_tokenizer_matches_parity_fixture_ids(tiny_tokenizer_module):
    fixture = REPO_ROOT.parent / "shared" / "parity" / "tiny-a" / "fixture.json"
    if not fixture.is_file():
        pytest.skip(f"parity fixture not found at {fixture}")
    expected = json.loads(fixture.read_text())["special_token_ids"]
    tok = tiny_tokenizer_module.build_tiny_tokenizer(None, vocab_size=320)
    proc = BagelProcessor(tok)
    assert proc.special_token_ids == {k: expected[k] for k in proc.special_token_ids}
    assert tok.pad_token_id == expected["pad_token_id"]


def test_special_token_ids(processor, tokenizer):
    ids = [processor.bos_token_id, processor.eos_token_id, processor.start_of_image_id, processor.end_of_image_id]
    assert ids == tokenizer.convert_tokens_to_ids(BAGEL_TOKENS)
    assert len(set(ids)) == 4
    assert all(isinstance(i, int) and 0 <= i < 320 for i in ids)
    assert max(tokenizer.get_vocab().values()) < 320
    assert processor.special_token_ids == dict(
        bos_token_id=ids[0], eos_token_id=ids[1], start_of_image=ids[2], end_of_image=ids[3]
    )


def test_encode_decode_round_trip(processor):
    text = "Describe the image: a cat, 2 dogs & naïve café 😀!"
    ids = processor.encode_text(text)
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert ids == processor.tokenizer.encode(text, add_special_tokens=False)
    assert processor.decode(ids) == text
    assert processor.decode(torch.tensor(ids)) == text
    assert not set(ids) & {processor.bos_token_id, processor.eos_token_id}
    # a special token in the text is one id
    marked = processor.encode_text("<|im_start|>hi<|im_end|>")
    assert marked[0] == processor.bos_token_id and marked[-1] == processor.eos_token_id
    assert processor.decode(marked, skip_special_tokens=True) == "hi"
    with pytest.raises(TypeError):
        processor.encode_text(["not", "a", "str"])


def test_add_bagel_special_tokens_adds_missing_only():
    from transformers import Qwen2Tokenizer

    vocab = {chr(i): i for i in range(ord("a"), ord("z") + 1)}
    bare = Qwen2Tokenizer(vocab=vocab, merges=[])
    assert not set(BAGEL_TOKENS) & set(bare.get_vocab())
    _, ids, added = add_bagel_special_tokens(bare)
    assert added == 4
    assert sorted(ids) == ["bos_token_id", "end_of_image", "eos_token_id", "start_of_image"]
    assert len(set(ids.values())) == 4
    _, ids_again, added_again = add_bagel_special_tokens(bare)
    assert added_again == 0 and ids_again == ids
    assert bare.encode("<|vision_start|>", add_special_tokens=False) == [ids["start_of_image"]]


def test_processor_image_methods(processor):
    image = _noise_image(600, 400, seed=5)
    vae = processor.vae_transform(image)
    assert vae.shape == (3, 512, 768) and vae.dtype == torch.float32

    rgba = _noise_image(300, 500, mode="RGBA", seed=6)
    vit = processor.vit_transform(rgba)
    assert vit.shape == (3, 504, 294)
    patches, position_ids = processor.vit_patches(rgba)
    assert patches.shape == (36 * 21, 3 * 14 * 14)
    assert position_ids[:3].tolist() == [0, 1, 2]
    assert position_ids[21].item() == 70 and position_ids[-1].item() == 35 * 70 + 20
    assert torch.equal(patches, patchify_vit(vit, 14, 70)[0])
    with pytest.raises(TypeError, match="PIL.Image"):
        processor.vae_transform(torch.zeros(3, 32, 32))


def test_processor_config_round_trip(tokenizer, tmp_path):
    proc = BagelProcessor(tokenizer, vit_max_size=490, vae_min_size=256)
    proc.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    assert config["auto_map"] == {"AutoProcessor": "processing_bagel.BagelProcessor"}
    assert config["processor_class"] == "BagelProcessor"
    assert config["vit_max_size"] == 490 and config["vae_min_size"] == 256
    # what the model config gives is not saved (its one home): the patch grid, the strides, the default largest side
    assert not {"vit_patch_size", "vit_stride", "vae_stride", "vit_max_num_patch_per_side", "vae_max_size"} & set(
        config
    )
    reloaded = BagelProcessor.from_pretrained(tmp_path)
    assert reloaded.vit_max_size == 490 and reloaded.vae_min_size == 256 and reloaded.vae_max_size == 1024
    assert reloaded.bos_token_id == proc.bos_token_id


def test_auto_processor_offline(tokenizer, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from transformers import AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    repo = tmp_path / "bagel-tiny"
    config = BagelConfig(vit_max_num_patch_per_side=35)
    BagelProcessor(tokenizer, config=config).save_pretrained(repo)
    config.save_pretrained(repo)  # the processor reads its geometry from the directory's config.json
    for module in remote_code_files(REPO_ROOT).values():  # processing_bagel.py and what it imports
        shutil.copy(module, repo / module.name)
    assert {p.name for p in repo.iterdir()} >= {
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processing_bagel.py",
    }

    loaded = AutoProcessor.from_pretrained(str(repo), trust_remote_code=True)
    assert type(loaded).__name__ == "BagelProcessor"
    assert type(loaded).__module__.startswith("transformers_modules")  # the copy in the dir, not bagel_remote
    assert (loaded.vit_max_num_patch_per_side, loaded.vit_max_size) == (35, 35 * 14)
    assert [loaded.bos_token_id, loaded.eos_token_id, loaded.start_of_image_id, loaded.end_of_image_id] == (
        tokenizer.convert_tokens_to_ids(BAGEL_TOKENS)
    )
    image = _noise_image(64, 48, seed=7)
    assert torch.equal(loaded.vae_transform(image), BagelProcessor(tokenizer).vae_transform(image))


# ----------------------------------------------------------------------------------------------
# The image rules come from the model config
# ----------------------------------------------------------------------------------------------


def test_processor_takes_its_geometry_from_the_config(tokenizer):
    """Another patch size, ViT grid and latent grid: strides, grids and largest sides follow; the
    processor's own settings (smallest sides) stay as given."""
    config = BagelConfig(vit_patch_size=16, vit_max_num_patch_per_side=20, max_latent_size=24, latent_patch_size=1)
    proc = BagelProcessor(tokenizer, config=config, vit_min_size=64)
    assert (proc.vit_patch_size, proc.vit_stride, proc.vit_max_num_patch_per_side) == (16, 16, 20)
    assert (proc.vit_max_size, proc.vit_min_size) == (320, 64)
    assert (proc.vae_stride, proc.vae_max_size, proc.vae_min_size) == (8, 24 * 8, 512)

    image = _noise_image(600, 400, seed=3)
    vit = proc.vit_transform(image)
    assert vit.shape == (3, 208, 320)  # longest side 320 = 20 patches of 16, both sides multiples of 16
    patches, position_ids = proc.vit_patches(image)
    assert patches.shape == (13 * 20, 3 * 16 * 16)
    assert position_ids[20].item() == 20 and position_ids[-1].item() == 12 * 20 + 19  # rows of the 20-wide grid
    assert proc.vae_transform(image).shape == (3, 128, 192)  # at most 24 tokens of 8 px
    # BAGEL-7B-MoT's numbers, where nothing is given
    default = BagelProcessor(tokenizer)
    assert (default.vit_max_size, default.vit_stride, default.vae_max_size, default.vae_stride) == (980, 14, 1024, 16)


def test_saved_processor_follows_the_config_it_is_loaded_with(tokenizer, tmp_path):
    """processor_config.json holds the processor's settings only: loaded beside another config, the
    geometry is that config's; an explicit largest side is kept; the directory's config.json is read."""
    BagelProcessor(tokenizer, vae_min_size=128).save_pretrained(tmp_path / "plain")
    other = BagelConfig(vit_patch_size=16, vit_max_num_patch_per_side=10, max_latent_size=8)
    loaded = BagelProcessor.from_pretrained(tmp_path / "plain", config=other)
    assert (loaded.vit_max_size, loaded.vit_patch_size, loaded.vae_max_size, loaded.vae_min_size) == (160, 16, 128, 128)

    BagelProcessor(tokenizer, config=other, vae_max_size=64).save_pretrained(tmp_path / "capped")
    other.save_pretrained(tmp_path / "capped")
    capped = BagelProcessor.from_pretrained(tmp_path / "capped")  # reads config.json there
    assert (capped.vae_max_size, capped.vit_max_size, capped.vit_patch_size) == (64, 160, 16)
    assert json.loads((tmp_path / "capped" / "processor_config.json").read_text())["vae_max_size"] == 64


def test_processor_config_written_before_still_loads(tokenizer, tmp_path):
    """A processor_config.json of the earlier format (every size, the config's too) loads when its
    values agree with the config, and is refused, naming the key, when they do not."""
    BagelProcessor(tokenizer).save_pretrained(tmp_path)
    file = tmp_path / "processor_config.json"
    old = dict(json.loads(file.read_text()), vae_max_size=1024, vae_stride=16, vit_max_size=980, vit_stride=14)
    file.write_text(json.dumps(dict(old, vit_patch_size=14, vit_max_num_patch_per_side=70)))
    loaded = BagelProcessor.from_pretrained(tmp_path)
    assert (loaded.vit_max_num_patch_per_side, loaded.vae_max_size, loaded.vit_max_size) == (70, 1024, 980)
    file.write_text(json.dumps(dict(old, vit_patch_size=14, vit_max_num_patch_per_side=35)))
    with pytest.raises(ValueError, match="vit_max_num_patch_per_side=35"):
        BagelProcessor.from_pretrained(tmp_path)


def test_tiny_fixture_processor_from_its_config(parity, tokenizer, tmp_path):
    """tiny-a (config.json, no processor file): a processor loaded beside it takes its grid (8 x 8
    ViT patches, 8 x 8 latent tokens); nothing new is needed in the checkpoint directory."""
    from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal

    checkpoint = tmp_path / "tiny-a"
    checkpoint.mkdir()
    for file in parity.checkpoint.iterdir():
        (checkpoint / file.name).symlink_to(file)
    tokenizer.save_pretrained(checkpoint)  # tokenizer files: the model loads a processor, with no processor_config
    model = BagelForUnifiedMultimodal.from_pretrained(checkpoint)
    proc = model.processor
    assert (proc.vit_max_size, proc.vit_max_num_patch_per_side, proc.vae_max_size) == (112, 8, 128)
    assert (proc.vit_min_size, proc.vae_min_size, proc.max_pixels) == (224, 512, DEFAULT_MAX_PIXELS)
    alone = BagelProcessor.from_pretrained(checkpoint)  # its config.json, read by the processor
    assert alone.image_settings == proc.image_settings


def test_tiny_checkpoint_processor_keeps_its_sizes(tokenizer):
    """scripts/make_tiny_checkpoint.py's processor: the same rules as when it typed every size."""
    from bagel_remote.processing_bagel import ImageSettings
    from make_tiny_checkpoint import TINY_VAE_MAX_SIZE, TINY_VAE_MIN_SIZE, tiny_config

    config = tiny_config(tokenizer)
    proc = BagelProcessor(tokenizer, config=config, vae_max_size=TINY_VAE_MAX_SIZE, vae_min_size=TINY_VAE_MIN_SIZE)
    assert proc.image_settings == ImageSettings(256, 128, 16, 980, 224, 14, 14, 70, DEFAULT_MAX_PIXELS)
