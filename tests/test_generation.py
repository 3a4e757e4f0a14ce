"""Tests of the inference code (generation_bagel.py): the context API (`new_context`, `add_*`,
`generate_text_ids`, `generate_latents`, `decode_latents`) and the high-level API (`interleave`,
`chat`, `generate_image`, `edit_image`).

Everything runs in float32 on CPU on the tiny-a parity checkpoint (`parity` fixture), loaded once
per module; the high-level API gets a tiny byte-level tokenizer (scripts/tiny_tokenizer.py) whose
special tokens sit at the checkpoint's ids, and a processor with small image sizes.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from bagel_remote.autoencoder_bagel import unpatchify_latent
from bagel_remote.configuration_bagel import BagelConfig
from bagel_remote.contexts_bagel import BagelContext, SpecialTokenIds
from bagel_remote.guidance_bagel import GuidanceParams
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal
from bagel_remote.processing_bagel import BagelProcessor, get_resize_size
from conftest import TINY_PROCESSOR_SIZES, assert_close
from PIL import Image

# The processor for the tiny checkpoint (its geometry from a config like tiny-a's).
PROCESSOR_SIZES = TINY_PROCESSOR_SIZES


# ----------------------------------------------------------------------------------------------
# Fixtures and helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(parity) -> BagelForUnifiedMultimodal:
    m = BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint)
    assert m.config.stage == 2 and not m.training
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    return m


@pytest.fixture(scope="module")
def stage1_model(parity) -> BagelForUnifiedMultimodal:
    config = BagelConfig.from_pretrained(parity.checkpoint, stage=1)
    m = BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint, config=config)
    assert m.config.stage == 1 and m.vae is None
    return m


@pytest.fixture(scope="module")
def special(parity) -> SpecialTokenIds:
    s = parity.meta["special_token_ids"]
    return SpecialTokenIds(s["bos_token_id"], s["eos_token_id"], s["start_of_image"], s["end_of_image"])


@pytest.fixture(scope="module")
def processor() -> BagelProcessor:
    from tiny_tokenizer import build_tiny_tokenizer  # scripts/ is on sys.path (conftest)

    return BagelProcessor(build_tiny_tokenizer(None, vocab_size=320), **PROCESSOR_SIZES)


def _grid(model, height: int, width: int) -> tuple[int, int]:
    stride = model.vae.downsample * model.config.latent_patch_size
    return height // stride, width // stride


def _noise(model, height: int, width: int, seed: int) -> torch.Tensor:
    h, w = _grid(model, height, width)
    dim = model.config.latent_patch_size**2 * model.model.latent_channel
    return torch.randn(h * w, dim, generator=torch.Generator().manual_seed(seed))


def _image_tensor(height: int, width: int, seed: int) -> torch.Tensor:
    """A (3, H, W) tensor in [-1, 1], as the processor's transforms produce."""
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _pil(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (height, width, len(mode)), generator=g, dtype=torch.uint8)
    return Image.frombytes(mode, (width, height), data.numpy().tobytes())


def _max_pixel_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size and a.mode == b.mode == "RGB"
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def _snapshot(ctx: BagelContext):
    return ctx.lengths, ctx.positions, [k.clone() for k in ctx.keys], [v.clone() for v in ctx.values]


def _assert_unchanged(ctx: BagelContext, snap) -> None:
    lengths, positions, keys, values = snap
    assert ctx.lengths == lengths and ctx.positions == positions
    assert len(ctx.keys) == len(keys) and len(ctx.values) == len(values)
    assert all(torch.equal(a, b) for a, b in zip(ctx.keys, keys))
    assert all(torch.equal(a, b) for a, b in zip(ctx.values, values))


# ----------------------------------------------------------------------------------------------
# 1. Parity with the reference through the public context API
# ----------------------------------------------------------------------------------------------


def test_chat_parity(model, special, parity):
    case = parity.meta["cases"]["chat"]
    ctx = model.add_vit_images(model.new_context(1), [parity.inputs["chat.image"]], special)
    ctx = model.add_text_tokens(ctx, [case["prompt_ids"]], special)
    ids, logits = model.generate_text_ids(ctx, special, max_length=case["max_new_tokens"], return_logits=True)
    assert ids == [parity.expected["chat.generated_ids"].tolist()]
    assert len(logits) == 1
    assert_close(logits[0], parity.expected["chat.step_logits"], 1e-4, "chat.step_logits")
    # Without return_logits only the ids come back.
    assert model.generate_text_ids(ctx, special, max_length=case["max_new_tokens"]) == ids


def _check_image_case(model, parity, name: str, latents: list[torch.Tensor]) -> None:
    height, width = parity.meta["cases"][name]["image_hw"]
    assert len(latents) == 1
    assert_close(latents[0], parity.expected[f"{name}.latent_tokens"], 1e-4, f"{name}.latent_tokens")
    h, w = _grid(model, height, width)
    latent = unpatchify_latent(latents[0], h, w, model.config.latent_patch_size)[None]
    assert_close(latent, parity.expected[f"{name}.latent"], 1e-4, f"{name}.latent")
    images = model.decode_latents(latents, [(height, width)])
    assert len(images) == 1 and images[0].shape == (1, 3, height, width)
    assert_close(images[0], parity.expected[f"{name}.image"], 1e-4, f"{name}.image")


def test_t2i_parity(model, special, parity):
    case = parity.meta["cases"]["t2i"]
    full = model.add_text_tokens(model.new_context(1), [case["prompt_ids"]], special)
    latents = model.generate_latents(
        full,
        model.new_context(1),
        full,
        [tuple(case["image_hw"])],
        special,
        parity.guidance_params("t2i"),
        init_noise=[parity.inputs["t2i.init_noise"]],
    )
    _check_image_case(model, parity, "t2i", latents)


def test_edit_parity(model, special, parity):
    case = parity.meta["cases"]["edit"]
    image_ctx = model.add_vae_images(model.new_context(1), [parity.inputs["edit.source_image_vae"]], special)
    image_ctx = model.add_vit_images(image_ctx, [parity.inputs["edit.source_image_vit"]], special)
    full = model.add_text_tokens(image_ctx, [case["prompt_ids"]], special)
    cfg_img = model.add_text_tokens(model.new_context(1), [case["prompt_ids"]], special)
    latents = model.generate_latents(
        full,
        image_ctx,
        cfg_img,
        [tuple(case["image_hw"])],
        special,
        parity.guidance_params("edit"),
        init_noise=[parity.inputs["edit.init_noise"]],
    )
    _check_image_case(model, parity, "edit", latents)


# ----------------------------------------------------------------------------------------------
# 2. A batch gives every request what it gets alone
# ----------------------------------------------------------------------------------------------

PROMPT_A = [272, 115, 200, 48, 82, 271]
PROMPT_B = [185, 28, 161, 276, 94, 17, 3, 250, 99]


@pytest.mark.parametrize("with_images", [False, True], ids=["text", "vit+text"])
def test_text_batch_matches_single(model, special, with_images):
    prompts = [PROMPT_A, PROMPT_B]
    images = [_image_tensor(42, 56, 0), _image_tensor(98, 28, 1)]  # 3x4 and 7x2 patches

    def build(indices):
        ctx = model.new_context(len(indices))
        if with_images:
            ctx = model.add_vit_images(ctx, [images[i] for i in indices], special)
        return model.add_text_tokens(ctx, [prompts[i] for i in indices], special)

    ids, logits = model.generate_text_ids(build([0, 1]), special, max_length=8, return_logits=True)
    assert len(ids) == len(logits) == 2
    for i in range(2):
        one_ids, one_logits = model.generate_text_ids(build([i]), special, max_length=8, return_logits=True)
        assert ids[i] == one_ids[0]
        assert_close(logits[i], one_logits[0], 1e-5, f"logits of request {i}")
    assert ids[0] != ids[1]


def test_text_batch_with_early_stop_matches_single(model, special):
    """One sequence hits eos and leaves the batch; the other goes on unaffected."""
    prompts = [PROMPT_A, PROMPT_B]
    ctx = model.add_text_tokens(model.new_context(2), prompts, special)
    greedy = model.generate_text_ids(ctx, special, max_length=8)
    stop = dataclasses.replace(special, eos=greedy[0][3])  # the 3rd id generated for request 0
    assert stop.eos not in greedy[1][:4]  # request 1 outlives request 0
    ids, logits = model.generate_text_ids(ctx, stop, max_length=8, return_logits=True)
    assert ids[0] == greedy[0][:3]
    assert len(ids[1]) > 3 and logits[0].shape[0] == 3
    for i in range(2):
        alone = model.add_text_tokens(model.new_context(1), [prompts[i]], special)
        one_ids, one_logits = model.generate_text_ids(alone, stop, max_length=8, return_logits=True)
        assert ids[i] == one_ids[0]
        assert_close(logits[i], one_logits[0], 1e-5, f"logits of request {i}")


@pytest.mark.parametrize(
    "renorm, img_scale", [("global", 1.0), ("channel", 2.0), ("text_channel", 2.0)], ids=lambda v: str(v)
)
def test_latent_batch_of_different_sizes_matches_single(model, special, renorm, img_scale):
    """Guided on every step, so the batched guidance branches and the per-sequence renorm are used."""
    sizes = [(64, 96), (48, 32)]
    prompts = [PROMPT_A, PROMPT_B]
    noise = [_noise(model, h, w, seed) for (h, w), seed in zip(sizes, (11, 12))]
    params = GuidanceParams(
        num_timesteps=4, cfg_text_scale=4.0, cfg_img_scale=img_scale, cfg_interval=(0.0, 1.0), cfg_renorm_type=renorm
    )

    def run(indices):
        full = model.add_text_tokens(model.new_context(len(indices)), [prompts[i] for i in indices], special)
        return model.generate_latents(
            full,
            model.new_context(len(indices)),
            full,
            [sizes[i] for i in indices],
            special,
            params,
            init_noise=[noise[i] for i in indices],
        )

    batch = run([0, 1])
    assert [tuple(x.shape) for x in batch] == [tuple(n.shape) for n in noise]
    for i in range(2):
        assert_close(batch[i], run([i])[0], 1e-5, f"latents of request {i}")
    images = model.decode_latents(batch, sizes)
    assert [tuple(img.shape) for img in images] == [(1, 3, h, w) for h, w in sizes]


def test_latents_with_generator_are_reproducible(model, special):
    full = model.add_text_tokens(model.new_context(1), [PROMPT_A], special)
    params = GuidanceParams(num_timesteps=3)
    run = lambda seed: model.generate_latents(
        full, model.new_context(1), full, [(32, 48)], special, params, generator=torch.Generator().manual_seed(seed)
    )[0]
    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_chat_batch_matches_single(model, processor):
    images = [_pil(90, 60, 0), _pil(300, 200, 1, "RGBA")]
    prompts = ["what is this?", "hello there, describe the picture"]
    batch = model.chat(images, prompts, max_new_tokens=8, processor=processor)
    assert isinstance(batch, list) and len(batch) == 2 and all(isinstance(t, str) for t in batch)
    for image, prompt, text in zip(images, prompts, batch):
        assert model.chat(image, prompt, max_new_tokens=8, processor=processor) == text
    # Text only (no image) also works, alone and batched.
    texts = model.chat(None, ["hi", "a longer question here"], max_new_tokens=4, processor=processor)
    assert texts[1] == model.chat(None, "a longer question here", max_new_tokens=4, processor=processor)


def test_sampled_chat_batch_matches_single(model, processor):
    images, prompts = [_pil(90, 60, 0), _pil(40, 70, 1)], ["what is this?", "hello there"]
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.0, processor=processor)
    batch = model.chat(images, prompts, seed=[3, 5], **kwargs)
    assert batch == [model.chat(img, p, seed=s, **kwargs) for img, p, s in zip(images, prompts, (3, 5))]


def test_generate_image_batch_matches_single(model, processor):
    kwargs = dict(height=64, width=96, num_steps=3, progress=False, processor=processor)
    p1, p2 = "a red cat", "a blue dog on a mat"
    batch = model.generate_image([p1, p2], seed=[1, 7], **kwargs)
    assert isinstance(batch, list) and len(batch) == 2
    alone1 = model.generate_image(p1, seed=1, **kwargs)
    alone2 = model.generate_image(p2, seed=7, **kwargs)
    assert isinstance(alone1, Image.Image) and alone1.size == (96, 64)
    assert _max_pixel_diff(batch[0], alone1) <= 1
    assert _max_pixel_diff(batch[1], alone2) <= 1
    # The same seed reproduces an image; another seed gives another image.
    assert _max_pixel_diff(model.generate_image(p1, seed=1, **kwargs), alone1) == 0
    assert _max_pixel_diff(model.generate_image(p1, seed=2, **kwargs), alone1) > 1
    # An int seed for a batch means seed + i for request i.
    int_seeded = model.generate_image([p1, p2], seed=1, **kwargs)
    assert _max_pixel_diff(int_seeded[0], alone1) <= 1
    assert _max_pixel_diff(int_seeded[1], model.generate_image(p2, seed=2, **kwargs)) <= 1


# ----------------------------------------------------------------------------------------------
# 3. Bad inputs give clear errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", [torch.zeros(3, 64, 64), np.zeros((64, 64, 3), dtype=np.uint8), 3], ids=["tensor", "ndarray", "int"]
)
def test_non_image_input(model, processor, bad):
    with pytest.raises(TypeError, match="PIL.Image"):
        model.chat(bad, "what is this?", max_new_tokens=2, processor=processor)
    with pytest.raises(TypeError, match="PIL.Image"):
        model.edit_image(bad, "make it blue", num_steps=2, progress=False, processor=processor)
    with pytest.raises(TypeError, match="PIL.Image"):
        model.interleave([bad, "hi"], understanding_output=True, max_new_tokens=2, processor=processor)


def test_str_path_as_chat_image(model, processor):
    with pytest.raises(TypeError, match="PIL.Image"):
        model.chat("cat.png", "what is this?", max_new_tokens=2, processor=processor)


def test_str_path_as_edit_image(model, processor):
    with pytest.raises(TypeError, match="PIL.Image"):
        model.edit_image("cat.png", "make it blue", num_steps=2, progress=False, processor=processor)


def test_image_too_small_or_too_large(model, processor):
    tiny = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="at least 16 pixels"):
        model.chat(tiny, "what is this?", max_new_tokens=2, processor=processor)
    with pytest.raises(ValueError, match="at least 16 pixels"):
        model.edit_image(tiny, "make it blue", num_steps=2, progress=False, processor=processor)
    with pytest.raises(ValueError, match="at least 16 pixels"):
        model.chat(Image.new("RGB", (200, 15)), "what is this?", max_new_tokens=2, processor=processor)
    # Just over the 64-megapixel cap (one byte per pixel: cheap to allocate).
    huge = Image.new("L", (8001, 8000))
    with pytest.raises(ValueError, match="megapixels"):
        model.chat(huge, "what is this?", max_new_tokens=2, processor=processor)


@pytest.mark.parametrize("height, width", [(70, 64), (64, 40), (0, 64), (-16, 64)])
def test_image_size_not_multiple_of_16(model, processor, height, width):
    with pytest.raises(ValueError, match="multiples of 16"):
        model.generate_image("a cat", height=height, width=width, num_steps=2, progress=False, processor=processor)


def test_image_size_too_large_for_model(model, processor):
    with pytest.raises(ValueError, match="too large"):
        model.generate_image("a cat", height=64, width=144, num_steps=2, progress=False, processor=processor)


def test_empty_prompt(model, processor):
    image = _pil(64, 64)
    with pytest.raises(ValueError, match="Empty prompt"):
        model.generate_image("", height=64, width=64, num_steps=2, progress=False, processor=processor)
    with pytest.raises(ValueError, match="Empty prompt"):
        model.generate_image(["a cat", "  \n"], height=64, width=64, num_steps=2, progress=False, processor=processor)
    with pytest.raises(ValueError, match="Empty prompt"):
        model.chat(image, "", max_new_tokens=2, processor=processor)
    with pytest.raises(ValueError, match="Empty prompt"):
        model.edit_image(image, " ", num_steps=2, progress=False, processor=processor)
    with pytest.raises(ValueError, match="Nothing to run"):
        model.interleave([], processor=processor)


@pytest.mark.parametrize("steps", [0, -1, -3])
def test_too_few_steps(model, processor, steps):
    with pytest.raises(ValueError, match=f"num_steps must be at least 1, got {steps}"):
        model.generate_image("a cat", height=64, width=64, num_steps=steps, progress=False, processor=processor)
    with pytest.raises(ValueError, match=f"num_steps must be at least 1, got {steps}"):
        model.edit_image(_pil(64, 64), "blue", num_steps=steps, progress=False, processor=processor)


@pytest.mark.parametrize("steps", [2.5, "4", True])  # None: the generation config's (test_generation_config.py)
def test_num_steps_must_be_an_integer(model, processor, steps):
    with pytest.raises(TypeError, match="num_steps must be an integer"):
        model.generate_image("a cat", height=64, width=64, num_steps=steps, progress=False, processor=processor)
    with pytest.raises(TypeError, match="num_steps must be an integer"):
        model.edit_image(_pil(64, 64), "blue", num_steps=steps, progress=False, processor=processor)


def test_wrong_argument_types_are_refused_by_name(model, processor):
    kwargs = dict(num_steps=1, progress=False, processor=processor)
    with pytest.raises(TypeError, match="seed must be an integer or a list of integers.*'abc'"):
        model.generate_image("a cat", height=64, width=64, seed="abc", **kwargs)
    with pytest.raises(TypeError, match=r"seed\[1\] must be an integer.*1.5"):
        model.generate_image(["a cat", "a dog"], height=64, width=64, seed=[1, 1.5], **kwargs)
    with pytest.raises(TypeError, match="seed must be an integer"):
        model.chat(None, "hi", seed="0", max_new_tokens=2, processor=processor)
    with pytest.raises(TypeError, match=r"height must be an integer, got 64\.0"):
        model.generate_image("a cat", height=64.0, width=64, **kwargs)
    with pytest.raises(TypeError, match="width must be an integer, got '64'"):
        model.generate_image("a cat", height=64, width="64", **kwargs)
    with pytest.raises(TypeError, match="prompt must be a str or a list of str, got int"):
        model.generate_image(42, height=64, width=64, **kwargs)
    with pytest.raises(TypeError, match="prompt must be a str or a list of str, got NoneType"):
        model.chat(_pil(64, 64), [None], max_new_tokens=2, processor=processor)
    with pytest.raises(TypeError, match="max_new_tokens must be an integer"):
        model.chat(None, "hi", max_new_tokens=2.0, processor=processor)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        model.chat(None, "hi", max_new_tokens=0, processor=processor)
    with pytest.raises(TypeError, match="cfg_text_scale must be a number, got '4'"):
        model.generate_image("a cat", height=64, width=64, cfg_text_scale="4", **kwargs)
    with pytest.raises(TypeError, match="inputs must be a list"):
        model.interleave("a cat", processor=processor)


def test_one_image_for_a_batch_of_prompts_says_what_is_expected(model, processor):
    image = _pil(64, 64)
    expected = r"list of 2 prompts and one Image: a batch needs a list of 2 image entries.*\[image\] \* 2"
    with pytest.raises(ValueError, match=expected):
        model.chat(image, ["a?", "b?"], max_new_tokens=2, processor=processor)
    with pytest.raises(ValueError, match=expected):
        model.edit_image(image, ["blue", "red"], num_steps=1, progress=False, processor=processor)
    # What the message suggests works, and gives each request the same answer as alone.
    answers = model.chat([image] * 2, ["a?", "b?"], max_new_tokens=3, processor=processor)
    assert answers[1] == model.chat(image, "b?", max_new_tokens=3, processor=processor)


@pytest.mark.parametrize("path", ["cat.png", "photos/Cat.JPG", "/tmp/x.webp"])
def test_image_paths_in_interleave_are_refused(model, processor, path):
    with pytest.raises(TypeError, match=r"looks like an image file path.*PIL\.Image\.open"):
        model.interleave([path, "Describe it."], understanding_output=True, max_new_tokens=2, processor=processor)
    with pytest.raises(TypeError, match="looks like an image file path"):
        model.interleave([[path, "a"], [path, "b"]], understanding_output=True, max_new_tokens=2, processor=processor)
    with pytest.raises(TypeError, match="PIL.Image"):  # chat refuses them too
        model.chat(path, "Describe it.", max_new_tokens=2, processor=processor)
    # Prompts that merely mention a file, or end in a dot, are prompts.
    for prompt in (f"Describe {path}", "Describe it.", "e.g."):
        out = model.interleave([prompt], understanding_output=True, max_new_tokens=2, processor=processor)
        assert isinstance(out[0], str)


def test_bad_guidance_params(model, processor):
    kwargs = dict(height=64, width=64, num_steps=2, progress=False, processor=processor)
    with pytest.raises(ValueError, match="cfg_text_scale must be a finite number >= 0, got -1.0"):
        model.generate_image("a cat", cfg_text_scale=-1.0, **kwargs)
    with pytest.raises(ValueError, match="cfg_img_scale must be a finite number >= 0, got -0.5"):
        model.edit_image(_pil(64, 64), "blue", cfg_img_scale=-0.5, num_steps=2, progress=False, processor=processor)
    with pytest.raises(ValueError, match="cfg_renorm_type must be one of .*got 'l2'"):
        model.generate_image("a cat", cfg_renorm_type="l2", **kwargs)
    with pytest.raises(ValueError, match="cfg_interval"):
        model.generate_image("a cat", cfg_interval=(0.6, 0.2), **kwargs)
    with pytest.raises(ValueError, match="timestep_shift"):
        model.generate_image("a cat", timestep_shift=0.0, **kwargs)


def test_bad_batch_arguments(model, processor):
    kwargs = dict(height=64, width=64, num_steps=2, progress=False, processor=processor)
    with pytest.raises(ValueError, match="1 seeds for 2 requests"):
        model.generate_image(["a cat", "a dog"], seed=[1], **kwargs)
    with pytest.raises(ValueError, match="2 prompts but 1 image"):
        model.chat([_pil(64, 64)], ["a", "b"], max_new_tokens=2, processor=processor)
    with pytest.raises(ValueError, match="same sequence of inputs"):
        model.chat([_pil(64, 64), None], ["a", "b"], max_new_tokens=2, processor=processor)
    with pytest.raises(ValueError, match="exactly one image per prompt"):
        model.edit_image([[_pil(64, 64), _pil(64, 64)]], ["blue"], num_steps=2, progress=False, processor=processor)


def test_bad_decoding_arguments(model, special):
    ctx = model.add_text_tokens(model.new_context(1), [PROMPT_A], special)
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        model.generate_text_ids(ctx, special, max_length=0)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        model.generate_text_ids(ctx, special, max_length=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate_text_ids(ctx, special, max_length=2, do_sample=True, top_p=0.0)


def test_stage1_model_cannot_generate_images(stage1_model, model, special, processor):
    with pytest.raises(ValueError, match="stage-2"):
        stage1_model.generate_image("a cat", height=64, width=64, num_steps=2, progress=False, processor=processor)
    with pytest.raises(ValueError, match="stage-2"):
        stage1_model.edit_image(_pil(64, 64), "blue", num_steps=2, progress=False, processor=processor)
    ctx = stage1_model.new_context(1)
    with pytest.raises(ValueError, match="stage-2"):
        stage1_model.add_vae_images(ctx, [_image_tensor(64, 64, 0)], special)
    with pytest.raises(ValueError, match="stage-2"):
        stage1_model.generate_latents(ctx, ctx, ctx, [(64, 64)], special)
    # Understanding works on stage 1 and matches stage 2 (same UND weights).
    image = _pil(90, 60)
    text = stage1_model.chat(image, "what is this?", max_new_tokens=6, processor=processor)
    assert text == model.chat(image, "what is this?", max_new_tokens=6, processor=processor)


def test_no_processor(model, monkeypatch):
    monkeypatch.setattr(model, "processor", None, raising=False)
    with pytest.raises(ValueError, match="No processor"):
        model.chat(_pil(64, 64), "what is this?", max_new_tokens=2)
    with pytest.raises(ValueError, match="No processor"):
        model.generate_image("a cat", height=64, width=64, num_steps=2, progress=False)
    with pytest.raises(ValueError, match="No processor"):
        model.edit_image(_pil(64, 64), "blue", num_steps=2, progress=False)


# ----------------------------------------------------------------------------------------------
# 4. Semantics of the context API
# ----------------------------------------------------------------------------------------------


def test_generate_text_ids_stops_at_eos(model, special):
    ctx = model.add_text_tokens(model.new_context(1), [PROMPT_A], special)
    ids, logits = model.generate_text_ids(ctx, special, max_length=8, return_logits=True)
    ids, logits = ids[0], logits[0]
    assert len(ids) == 8 and ids[0] == special.bos and logits.shape[0] == 8
    eos = ids[3]  # the 3rd generated id
    assert eos not in ids[:3]
    stop = dataclasses.replace(special, eos=eos)
    short, short_logits = model.generate_text_ids(ctx, stop, max_length=8, return_logits=True)
    assert short == [ids[:3]]  # bos and 2 ids; eos itself is not returned
    assert_close(short_logits[0], logits[:3], 1e-6, "logits up to eos")
    # max_length counts bos: max_length=1 returns bos only, after one step.
    assert model.generate_text_ids(ctx, special, max_length=1) == [ids[:1]]


def test_sampling_is_seeded_and_tiny_top_p_is_greedy(model, special):
    ctx = model.add_text_tokens(model.new_context(1), [PROMPT_A], special)
    greedy = model.generate_text_ids(ctx, special, max_length=8)

    def sample(seed, **kwargs):
        gen = torch.Generator().manual_seed(seed)
        return model.generate_text_ids(ctx, special, max_length=8, do_sample=True, generator=gen, **kwargs)

    assert sample(0) == sample(0)
    assert sample(0) != sample(1)
    assert sample(0, top_p=1e-6) == greedy
    assert sample(3, temperature=0.5, top_p=1e-6) == greedy


def test_contexts_are_immutable(model, special):
    ctx = model.add_vit_images(model.new_context(1), [_image_tensor(42, 56, 0)], special)
    assert dataclasses.is_dataclass(ctx)
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.positions = (0,)
    snap = _snapshot(ctx)
    ids_before = model.generate_text_ids(model.add_text_tokens(ctx, [PROMPT_A], special), special, max_length=6)

    longer = model.add_text_tokens(ctx, [PROMPT_B], special)
    model.add_vae_images(ctx, [_image_tensor(32, 48, 1)], special)
    model.generate_text_ids(ctx, special, max_length=4)
    model.generate_latents(
        ctx, model.new_context(1), ctx, [(32, 32)], special, GuidanceParams(num_timesteps=2, cfg_interval=(0.0, 1.0))
    )
    _assert_unchanged(ctx, snap)
    assert longer.lengths[0] == ctx.lengths[0] + len(PROMPT_B) + 2
    # The old context still serves another branch, with the same result as before.
    assert model.generate_text_ids(model.add_text_tokens(ctx, [PROMPT_A], special), special, max_length=6) == ids_before

    # select / concat build new contexts and leave theirs alone.
    pair = model.add_text_tokens(model.new_context(2), [PROMPT_A, PROMPT_B], special)
    pair_snap = _snapshot(pair)
    both = BagelContext.concat([pair.select([1]), pair.select([0])])
    assert both.lengths == pair.lengths[::-1] and both.positions == pair.positions[::-1]
    _assert_unchanged(pair, pair_snap)


def test_rope_positions_and_lengths(model, special):
    ctx = model.new_context(2)
    assert ctx.batch_size == 2 and ctx.lengths == (0, 0) and ctx.positions == (0, 0)
    # ViT images of 3x4 and 7x2 patches: [start] patches [end] at one position.
    ctx = model.add_vit_images(ctx, [_image_tensor(42, 56, 0), _image_tensor(98, 28, 1)], special)
    assert ctx.lengths == (12 + 2, 14 + 2) and ctx.positions == (1, 1)
    ctx = model.add_text_tokens(ctx, [PROMPT_A, PROMPT_B], special)  # [bos] ids [eos]
    na, nb = len(PROMPT_A) + 2, len(PROMPT_B) + 2
    assert ctx.lengths == (14 + na, 16 + nb) and ctx.positions == (1 + na, 1 + nb)
    # A VAE image of 2x3 and 4x2 latent tokens: one position too.
    ctx = model.add_vae_images(ctx, [_image_tensor(32, 48, 2), _image_tensor(64, 32, 3)], special)
    assert ctx.lengths == (14 + na + 8, 16 + nb + 10) and ctx.positions == (2 + na, 2 + nb)
    # Every cached layer holds all tokens of both sequences.
    layers = model.config.text_config.num_hidden_layers
    assert len(ctx.keys) == len(ctx.values) == layers
    assert all(k.shape[0] == sum(ctx.lengths) for k in ctx.keys)
    # Decoding advances each sequence by one position per id.
    text_only = model.add_text_tokens(model.new_context(1), [PROMPT_A], special)
    assert text_only.positions == (na,)


# ----------------------------------------------------------------------------------------------
# 5. The high-level API
# ----------------------------------------------------------------------------------------------


def test_interleave_think_understanding(model, processor):
    out = model.interleave(
        [_pil(90, 60), "what is this?"], understanding_output=True, think=True, max_new_tokens=6, processor=processor
    )
    assert isinstance(out, list) and len(out) == 1 and isinstance(out[0], str)
    assert isinstance(model.chat(_pil(90, 60), "what is this?", think=True, max_new_tokens=6, processor=processor), str)
    batch = model.interleave(
        [["what is this?"], ["and this?"]], understanding_output=True, think=True, max_new_tokens=4, processor=processor
    )
    assert len(batch) == 2 and all(len(o) == 1 and isinstance(o[0], str) for o in batch)


@pytest.mark.parametrize("size", [(90, 60), (200, 150), (64, 64)])
def test_edit_image_returns_vae_resized_size(model, processor, size):
    source = _pil(*size, seed=4)
    expected = get_resize_size(
        *size, processor.vae_max_size, processor.vae_min_size, processor.vae_stride, processor.max_pixels
    )
    out = model.edit_image(source, "make it blue", num_steps=2, seed=0, progress=False, processor=processor)
    assert isinstance(out, Image.Image) and out.mode == "RGB" and out.size == expected


def test_edit_image_batch_matches_single(model, processor):
    sources, prompts = [_pil(90, 60, 5), _pil(200, 150, 6)], ["make it blue", "add a red hat to the cat"]
    kwargs = dict(num_steps=2, progress=False, processor=processor)
    batch = model.edit_image(sources, prompts, seed=[3, 4], **kwargs)
    assert len(batch) == 2
    for source, prompt, seed, image in zip(sources, prompts, (3, 4), batch):
        assert _max_pixel_diff(image, model.edit_image(source, prompt, seed=seed, **kwargs)) <= 1


def test_progress_bar_counts_num_steps(model, processor, capsys, monkeypatch):
    calls = []
    predict = model._predict_velocity
    monkeypatch.setattr(model, "_predict_velocity", lambda *args: calls.append(1) or predict(*args))
    image = model.generate_image("a cat", height=32, width=32, num_steps=3, seed=0, progress=True, processor=processor)
    assert image.size == (32, 32)
    err = capsys.readouterr().err
    assert "Denoising" in err and "3/3" in err and "2/2" not in err
    assert len(calls) == 3  # num_steps model evaluations, as the bar says


def test_bf16_model_on_the_cpu_computes_matmuls_and_convolutions_in_float32(parity, processor, monkeypatch):
    """The README snippet with device_map="cpu" and bf16 must not fall to the CPU's slow bf16 kernels."""
    model = BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint, dtype=torch.bfloat16, device_map="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    seen = set()
    for name in ("linear", "conv2d"):
        real = getattr(F, name)
        monkeypatch.setattr(
            F, name, lambda x, w, *a, _real=real, _name=name, **k: seen.add((_name, w.dtype)) or _real(x, w, *a, **k)
        )
    image = model.generate_image("a cat", height=32, width=32, num_steps=1, seed=0, progress=False, processor=processor)
    assert seen == {("linear", torch.float32), ("conv2d", torch.float32)}
    answer = model.chat(image, "what is this?", max_new_tokens=3, processor=processor)
    assert isinstance(answer, str) and seen == {("linear", torch.float32), ("conv2d", torch.float32)}


def test_default_size_is_the_largest_the_checkpoint_generates(model, processor):
    """tiny-a's latent table is 8 x 8 tokens of 16 pixels: 128 x 128 (BAGEL-7B-MoT's: 1024 x 1024)."""
    stride = model.vae.downsample * model.config.latent_patch_size
    assert model.config.max_latent_size * stride == 128 and processor.vae_max_size == 128
    assert model.generate_image("a cat", num_steps=1, seed=0, progress=False, processor=processor).size == (128, 128)
    # The processor's VAE size caps it, and editing resizes its input within the same limit.
    small = BagelProcessor(processor.tokenizer, **dict(PROCESSOR_SIZES, vae_max_size=64))
    assert model.generate_image("a cat", num_steps=1, seed=0, progress=False, processor=small).size == (64, 64)
    big = BagelProcessor(processor.tokenizer, **dict(PROCESSOR_SIZES, vae_max_size=1024, vae_min_size=512))
    assert model.edit_image(_pil(300, 200), "blue", num_steps=1, seed=0, progress=False, processor=big).size == (
        128,
        80,
    )


def test_chat_streams_tokens_as_they_are_decoded(model, processor, monkeypatch):
    from bagel_remote import decoding_bagel
    from transformers import TextIteratorStreamer

    image = _pil(90, 60, 3)
    answer = model.chat(image, "what is this?", max_new_tokens=12, processor=processor)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
    assert model.chat(image, "what is this?", max_new_tokens=12, processor=processor, streamer=streamer) == answer
    assert "".join(streamer) == answer and len(answer) > 0

    steps, puts = [], []  # decoding steps taken when each id reached the streamer
    runner_step = decoding_bagel.DecodeRunner.step
    monkeypatch.setattr(decoding_bagel.DecodeRunner, "step", lambda self: steps.append(1) or runner_step(self))

    class Recording:
        def put(self, ids):
            puts.append((ids.tolist(), len(steps)))

        def end(self):
            puts.append(("end", len(steps)))

    model.chat(image, "what is this?", max_new_tokens=12, processor=processor, streamer=Recording())
    ids = [i for i, _ in puts[1:-1] for i in i]
    assert puts[0][0] == [processor.bos_token_id] and puts[-1][0] == "end"  # the prompt first, as generate() does
    assert all(len(i) == 1 for i, _ in puts[1:-1]) and processor.decode(ids) == answer
    arrival = [n for _, n in puts[1:-1]]
    assert arrival == sorted(arrival) and arrival[0] < arrival[-1]  # one by one while decoding, not at the end
    with pytest.raises(ValueError, match="streamer follows one request"):
        model.chat(None, ["a", "b"], max_new_tokens=2, processor=processor, streamer=Recording())


def test_generate_and_edit_stream_and_sample_their_thinking(model, processor):
    """`streamer` of generate_image / edit_image gets the thinking text, and the image is unchanged;
    `do_sample` / `temperature` reach the thinking (the seed makes a sample reproducible)."""
    from transformers import TextIteratorStreamer

    kwargs = dict(think=True, max_think_tokens=8, num_steps=2, seed=3, progress=False, processor=processor)
    for call, args in ((model.generate_image, ("a cat",)), (model.edit_image, (_pil(90, 60, 3), "blue"))):
        thought, image = call(*args, **kwargs)
        streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True)
        streamed_thought, streamed_image = call(*args, streamer=streamer, **kwargs)
        assert "".join(streamer) == thought == streamed_thought and len(thought) > 0
        assert np.array_equal(np.asarray(streamed_image), np.asarray(image))
        sampled = [call(*args, do_sample=True, temperature=t, **kwargs)[0] for t in (1.0, 1.0, 0.01)]
        assert sampled[0] == sampled[1] != thought  # same seed, same sample; greedy differs
        assert sampled[2] == thought  # a near-zero temperature is greedy


# ----------------------------------------------------------------------------------------------
# 6. Decoding state kept across calls (the pool), and calls from several threads
# ----------------------------------------------------------------------------------------------


def _decode(model, special, prompts, max_length=6, **kwargs):
    ctx = model.add_text_tokens(model.new_context(len(prompts)), prompts, special)
    return model.generate_text_ids(ctx, special, max_length=max_length, return_logits=True, **kwargs)


def _assert_same_decode(a, b, rtol: float = 0.0) -> None:
    """Same ids, and logits equal (within `rtol`: weights in new memory may take other CPU GEMM paths)."""
    (ids_a, logits_a), (ids_b, logits_b) = a, b
    assert ids_a == ids_b
    assert len(logits_a) == len(logits_b)
    for x, y in zip(logits_a, logits_b):
        if rtol:
            assert_close(x, y, rtol, "logits")
        else:
            assert torch.equal(x, y)


def test_decode_state_is_reused_across_calls(model, special):
    """One runner serves every call of its shape, and a reused one (stale rows of a longer
    context in its cache) gives exactly what a fresh one gives."""
    model.set_generation_cache_limits()  # defaults, empty
    pool = model._decode_pool()
    longer = model.add_vit_images(model.new_context(1), [_image_tensor(98, 28, 1)], special)
    longer = model.add_text_tokens(longer, [PROMPT_B], special)
    reused = [model.generate_text_ids(longer, special, max_length=6, return_logits=True)]
    reused.append(_decode(model, special, [PROMPT_A]))
    assert len(pool.runners) == 1  # both fit one capacity bucket
    ((key, runner),) = pool.runners.items()
    assert key[:2] == (1, 64) and runner.cache.capacity == 64
    again = _decode(model, special, [PROMPT_A])
    assert pool.runners[key] is runner
    model.clear_generation_cache()
    assert not pool.runners and pool.nbytes == 0
    _assert_same_decode(reused[1], _decode(model, special, [PROMPT_A]))  # fresh cache
    _assert_same_decode(reused[1], again)
    model.clear_generation_cache()
    _assert_same_decode(reused[0], model.generate_text_ids(longer, special, max_length=6, return_logits=True))


def test_decode_pool_is_bounded_in_entries_and_bytes(model, special):
    prompts = [PROMPT_A, PROMPT_B, PROMPT_A[:3]]
    alone = {n: _decode(model, special, prompts[:n]) for n in (1, 2, 3)}
    pool = model._decode_pool()
    try:
        model.set_generation_cache_limits(max_entries=2)
        for n in (1, 2, 3, 2, 1):  # least recently used out: batch 3 goes when batch 1 comes back
            _assert_same_decode(_decode(model, special, prompts[:n]), alone[n])
        assert [key[0] for key in pool.runners] == [2, 1]
        one_runner = pool.runners[next(k for k in pool.runners if k[0] == 1)].nbytes
        model.set_generation_cache_limits(max_bytes=2 * one_runner)  # batch 1 or 2 fits, not both
        for n in (1, 2, 3):
            _assert_same_decode(_decode(model, special, prompts[:n]), alone[n])
            assert pool.nbytes <= 2 * one_runner
        assert [key[0] for key in pool.runners] == [2]  # batch 3 (1.5x the bytes) served its call only
        model.set_generation_cache_limits(max_entries=0)
        _assert_same_decode(_decode(model, special, prompts[:1]), alone[1])
        assert not pool.runners
        with pytest.raises(ValueError, match="max_entries"):
            model.set_generation_cache_limits(max_entries=-1)
    finally:
        model.set_generation_cache_limits()


def test_decode_pool_is_cleared_when_weights_move_or_change(model, special):
    pool = model._decode_pool()
    expected = _decode(model, special, [PROMPT_A])
    assert pool.runners
    head = model.get_output_embeddings()
    original = head.weight
    try:
        model.double()  # any _apply: .to, .cuda, .half, ...
        assert not pool.runners
        ids, logits = _decode(model, special, [PROMPT_A])
        assert [key[2] for key in pool.runners] == [torch.float64] and logits[0].dtype == torch.float32
        assert ids == expected[0]
        model.float()
        assert not pool.runners
        _assert_same_decode(_decode(model, special, [PROMPT_A]), expected, 1e-5)
        # Weights replaced without _apply (load_state_dict(assign=True), adapters): the captured
        # state is rebuilt for the new tensors.
        runner = next(iter(pool.runners.values()))
        head.weight = torch.nn.Parameter(head.weight.detach() * 2)
        doubled = _decode(model, special, [PROMPT_A])
        assert next(iter(pool.runners.values())) is not runner
        assert_close(doubled[1][0], expected[1][0] * 2, 1e-5, "logits with the doubled lm head")
    finally:
        head.weight = original
        model.clear_generation_cache()
    _assert_same_decode(_decode(model, special, [PROMPT_A]), expected, 1e-5)


def test_decode_pool_travels_as_an_empty_pool(model, special):
    """Deep copies and pickles of a model (EMA copies, torch.save) get an empty pool of their own."""
    import copy
    import pickle

    _decode(model, special, [PROMPT_A])
    pool = model._decode_pool()
    assert pool.runners
    for clone in (copy.deepcopy(pool), pickle.loads(pickle.dumps(pool))):
        assert not clone.runners and clone.lock is not pool.lock and clone.max_entries == pool.max_entries


def test_graph_branches_are_set_for_the_capturing_thread_only():
    """`graph_branches` hands `linears` its side streams in this thread, for its duration
    (also when the capture fails); other threads and CPU inputs never branch."""
    import threading

    from bagel_remote import ops_bagel

    layers = tuple(torch.nn.Linear(4, n) for n in (4, 2, 2))
    x = torch.randn(3, 4)
    seen = []
    with ops_bagel.graph_branches(("side 1", "side 2")):
        thread = threading.Thread(target=lambda: seen.append(getattr(ops_bagel._CAPTURE, "branch_streams", ())))
        thread.start()
        thread.join()
        assert ops_bagel._CAPTURE.branch_streams == ("side 1", "side 2") and seen == [()]
        outputs = ops_bagel.linears(x, layers)  # on the CPU: plain, no stream touched
        assert all(torch.equal(out, layer(x)) for out, layer in zip(outputs, layers))
    assert ops_bagel._CAPTURE.branch_streams == ()
    with pytest.raises(RuntimeError), ops_bagel.graph_branches(("side",)):
        raise RuntimeError("capture failed")
    assert ops_bagel._CAPTURE.branch_streams == ()


def test_host_reading_steps_behind_returns_the_same_ids(model, special):
    """On the GPU the host reads each step's tokens a few steps late; with eos stops and max_length
    the ids and logits are those of reading every step at once."""
    prompts = [PROMPT_A, PROMPT_B]
    greedy = _decode(model, special, prompts)[0]
    stop = dataclasses.replace(special, eos=greedy[0][3])
    cases = [(special, 6), (stop, 6), (stop, 3), (special, 1)]
    expected = [_decode(model, stop_or_not, prompts, max_length=n) for stop_or_not, n in cases]
    runner = next(r for key, r in model._decode_pool().runners.items() if key[0] == 2)
    runner.lag = 3
    try:
        for (stop_or_not, n), want in zip(cases, expected):
            _assert_same_decode(_decode(model, stop_or_not, prompts, max_length=n), want)
    finally:
        runner.lag = 0


def test_decoding_from_two_threads_gives_sequential_results(model, special, monkeypatch):
    """Two threads decoding on one model (same shape, so the same pooled cache) take turns."""
    import threading
    import time

    from bagel_remote import decoding_bagel

    contexts = [model.add_text_tokens(model.new_context(1), [p], special) for p in (PROMPT_A, PROMPT_B)]
    expected = [model.generate_text_ids(ctx, special, max_length=6) for ctx in contexts]
    end_step = decoding_bagel.DecodeCache.end_step

    def slow_end_step(cache):  # lets the other thread run between steps, if nothing stops it
        time.sleep(0.002)
        end_step(cache)

    monkeypatch.setattr(decoding_bagel.DecodeCache, "end_step", slow_end_step)
    results: dict[int, list] = {}

    def worker(i: int) -> None:
        results[i] = [model.generate_text_ids(contexts[i], special, max_length=6) for _ in range(3)]

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: [expected[0]] * 3, 1: [expected[1]] * 3}
