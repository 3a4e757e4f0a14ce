"""Bad and unusual inputs across the public surface (issue 26): the generation API, the
processor, loading and configs, and the packed training forward. Every case either raises the
expected kind of error whose message names the argument (and shows the value where it has one), or
returns a sensible result; none returns silently wrong output or hangs.

All cases share the tiny-a checkpoint (`tiny_model`, conftest) and run on the CPU in a few seconds:
each bad input is refused before any model work, which the timings below also check.
"""

from __future__ import annotations

import json
import logging
import shutil
import time

import numpy as np
import pytest
import torch
from bagel_remote.configuration_bagel import BagelConfig
from bagel_remote.contexts_bagel import SpecialTokenIds
from bagel_remote.guidance_bagel import GuidanceParams
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal
from bagel_remote.parallel_bagel import BagelParallel
from bagel_remote.processing_bagel import BagelProcessor
from PIL import Image
from test_modeling import JOINT_PACK, make_batch


def _image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _raises(call, error: type[Exception], names: str | tuple[str, ...]):
    """`call()` raises `error` whose message names each of `names`; returns the message."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for name in (names,) if isinstance(names, str) else names:
        assert name in message, f"{name!r} not in {message!r}"
    return message


@pytest.fixture(scope="module")
def special(tiny_processor) -> SpecialTokenIds:
    p = tiny_processor
    return SpecialTokenIds(p.bos_token_id, p.eos_token_id, p.start_of_image_id, p.end_of_image_id)


# ----------------------------------------------------------------------------------------------
# The generation API: chat, generate_image, edit_image, interleave and the context API
# ----------------------------------------------------------------------------------------------

IMG = _image()
NAN, INF = float("nan"), float("inf")
T2I = dict(height=64, width=64, num_steps=1, progress=False)
EDIT = dict(num_steps=1, progress=False)


def _chat(**kwargs):
    return lambda m, p: m.chat(
        kwargs.pop("images", IMG), kwargs.pop("prompt", "What is it?"), processor=p, **{"max_new_tokens": 2, **kwargs}
    )


def _t2i(prompt="a red fox", **kwargs):
    return lambda m, p: m.generate_image(prompt, processor=p, **{**T2I, **kwargs})


def _edit(image=IMG, prompt="make it blue", **kwargs):
    return lambda m, p: m.edit_image(image, prompt, processor=p, **{**EDIT, **kwargs})


def _interleave(inputs, **kwargs):
    return lambda m, p: m.interleave(inputs, processor=p, **{"max_new_tokens": 2, "progress": False, **kwargs})


# (id, call, error, names the message must hold)
API_ERRORS = [
    ("think-str", _chat(think="no"), TypeError, ("think", "'no'", "True or False")),
    ("think-int", _t2i(think=1), TypeError, "think"),
    ("temperature-str", _chat(temperature="hot"), TypeError, ("temperature", "'hot'")),
    ("temperature-str-sampling", _chat(temperature="hot", do_sample=True), TypeError, "temperature"),
    ("temperature-zero", _chat(temperature=0.0, do_sample=True), ValueError, ("temperature", "> 0")),
    ("temperature-nan", _chat(temperature=NAN, do_sample=True), ValueError, ("temperature", "nan")),
    ("temperature-negative-greedy", _chat(temperature=-1.0), ValueError, ("temperature", ">= 0")),
    ("top_p-zero", _chat(top_p=0.0, do_sample=True), ValueError, "top_p"),
    ("top_p-above-one", _chat(top_p=1.5), ValueError, ("top_p", "1.5")),
    ("top_p-nan", _chat(top_p=NAN, do_sample=True), ValueError, "top_p"),
    ("do_sample-str", _chat(do_sample="yes"), TypeError, ("do_sample", "'yes'")),
    ("seed-2**70", _chat(seed=2**70, do_sample=True), ValueError, ("seed", str(2**70))),
    ("seed-float", _chat(seed=1.0), TypeError, ("seed", "1.0")),
    ("seed-str", _chat(seed="0"), TypeError, ("seed", "'0'")),
    ("seed-bool", _chat(seed=True), TypeError, "seed"),
    ("seed-list-short", _chat(images=[IMG, IMG], prompt=["a?", "b?"], seed=[1]), ValueError, ("seed", "1 seeds", "2")),
    ("seed-list-entry", _chat(images=[IMG, IMG], prompt=["a?", "b?"], seed=[1, "2"]), TypeError, ("seed[1]", "'2'")),
    ("seed-overflows-with-batch", _chat(images=[IMG, IMG], prompt=["a?", "b?"], seed=2**64 - 1), ValueError, "seed"),
    ("max_new_tokens-zero", _chat(max_new_tokens=0), ValueError, ("max_new_tokens", "at least 1")),
    ("max_new_tokens-bool", _chat(max_new_tokens=True), TypeError, "max_new_tokens"),
    ("max_new_tokens-float", _chat(max_new_tokens=2.0), TypeError, ("max_new_tokens", "2.0")),
    ("streamer-not-a-streamer", _chat(streamer=object()), TypeError, ("streamer", "put()")),
    (
        "streamer-on-a-batch",
        _chat(
            images=[IMG, IMG],
            prompt=["a?", "b?"],
            streamer=type("S", (), {"put": lambda self, x: None, "end": lambda self: None})(),
        ),
        ValueError,
        "streamer",
    ),
    ("processor-str", _chat(processor="bagel"), TypeError, "processor"),
    ("parallel-unknown", _chat(parallel="pipeline"), ValueError, ("parallel", "'pipeline'")),
    ("parallel-bool-size", _chat(parallel={"cfg": True}), TypeError, ("parallel['cfg']", "True")),
    ("parallel-zero-size", _chat(parallel={"cfg": 0}), ValueError, "sizes must be positive"),
    ("image-ndarray", _chat(images=np.zeros((64, 64, 3), np.uint8)), TypeError, ("images", "PIL.Image")),
    ("image-path", _chat(images="cat.png"), TypeError, "PIL.Image.open"),
    ("image-too-small", _chat(images=Image.new("RGB", (4, 4))), ValueError, ("4x4", "at least 16")),
    ("prompt-none", _chat(prompt=None), TypeError, ("prompt", "NoneType")),
    ("prompt-empty", _chat(prompt="  "), ValueError, "prompt"),
    ("prompts-and-one-image", _chat(prompt=["a?", "b?"]), ValueError, ("prompts", "[image] * 2")),
    ("chat-past-the-context", _chat(prompt="word " * 20000), ValueError, ("prompt", "too long", "512")),
    ("t2i-past-the-context", _t2i(prompt="word " * 1000), ValueError, ("prompt", "too long")),
    ("cfg_text_scale-nan", _t2i(cfg_text_scale=NAN), ValueError, ("cfg_text_scale", "nan", "finite")),
    ("cfg_text_scale-inf", _t2i(cfg_text_scale=INF), ValueError, ("cfg_text_scale", "inf")),
    ("cfg_text_scale-negative", _t2i(cfg_text_scale=-1.0), ValueError, ("cfg_text_scale", ">= 0")),
    ("cfg_text_scale-str", _t2i(cfg_text_scale="4"), TypeError, ("cfg_text_scale", "'4'")),
    ("cfg_img_scale-nan", _edit(cfg_img_scale=NAN), ValueError, "cfg_img_scale"),
    ("cfg_img_scale-inf", _edit(cfg_img_scale=-INF), ValueError, "cfg_img_scale"),
    ("timestep_shift-nan", _t2i(timestep_shift=NAN), ValueError, ("timestep_shift", "nan")),
    ("timestep_shift-zero", _t2i(timestep_shift=0), ValueError, ("timestep_shift", "> 0")),
    ("timestep_shift-negative", _edit(timestep_shift=-1.0), ValueError, "timestep_shift"),
    ("cfg_interval-strings", _t2i(cfg_interval=("a", "b")), TypeError, ("cfg_interval", "('a', 'b')")),
    ("cfg_interval-reversed", _t2i(cfg_interval=(0.6, 0.2)), ValueError, ("cfg_interval", "smaller bound first")),
    ("cfg_interval-above-one", _t2i(cfg_interval=(0.0, 2.0)), ValueError, "cfg_interval"),
    ("cfg_interval-number", _t2i(cfg_interval=0.5), TypeError, "cfg_interval"),
    ("cfg_interval-nan", _t2i(cfg_interval=(NAN, 1.0)), ValueError, "cfg_interval"),
    ("cfg_renorm_type-typo", _t2i(cfg_renorm_type="globl"), ValueError, ("cfg_renorm_type", "'global'")),
    ("cfg_renorm_min-nan", _t2i(cfg_renorm_min=NAN), ValueError, "cfg_renorm_min"),
    ("cfg_renorm_min-above-one", _edit(cfg_renorm_min=5.0), ValueError, ("cfg_renorm_min", "5.0")),
    ("num_steps-zero", _t2i(num_steps=0), ValueError, ("num_steps", "at least 1")),
    ("num_steps-float", _t2i(num_steps=2.5), TypeError, "num_steps"),
    ("num_steps-str", _edit(num_steps="4"), TypeError, ("num_steps", "'4'")),  # None: the generation config's
    ("max_think_tokens-zero", _t2i(think=True, max_think_tokens=0), ValueError, "max_think_tokens"),
    ("max_think_tokens-str", _edit(think=True, max_think_tokens="100"), TypeError, "max_think_tokens"),
    ("progress-str", _t2i(progress="no"), TypeError, "progress"),
    ("height-float", _t2i(height=64.0), TypeError, ("height", "64.0")),
    ("height-not-multiple", _t2i(height=70), ValueError, ("height", "multiples of 16", "70x64")),
    ("width-negative", _t2i(width=-16), ValueError, "multiples of 16"),
    ("size-too-large", _t2i(width=1024), ValueError, ("too large", "128")),
    ("edit-no-image", _edit(image=None), ValueError, "one image per prompt"),
    ("edit-path", _edit(image="cat.png"), TypeError, "PIL.Image.open"),
    ("interleave-str", _interleave("a cat"), TypeError, "inputs"),
    ("interleave-empty", _interleave([]), ValueError, "Nothing to run"),
    ("interleave-path", _interleave(["cat.png", "Describe it."], understanding_output=True), TypeError, "cat.png"),
    ("interleave-ragged-batch", _interleave([[IMG, "a"], ["b"]]), ValueError, "same sequence of inputs"),
    (
        "understanding_output-str",
        _interleave([IMG, "a"], understanding_output="yes"),
        TypeError,
        "understanding_output",
    ),
    ("params-dict", _interleave(["a cat"], params={"num_timesteps": 3}), TypeError, "params"),
    # Found unchecked while the checks moved to validation_bagel.py:
    # a batch whose later request is a string (it was split into characters), ...
    ("interleave-batch-with-a-str", _interleave([["a cat"], "a dog"]), TypeError, ("inputs[1]", "'a dog'")),
    # ... and height / width of wrong types beside understanding_output=True (ignored, but mistakes)
    (
        "height-str-when-understanding",
        _interleave([IMG, "a"], understanding_output=True, height="big"),
        TypeError,
        ("height", "'big'"),
    ),
    (
        "width-float-when-understanding",
        _interleave([IMG, "a"], understanding_output=True, width=64.0),
        TypeError,
        ("width", "64.0"),
    ),
]


@pytest.mark.parametrize("call, error, names", [c[1:] for c in API_ERRORS], ids=[c[0] for c in API_ERRORS])
def test_api_refuses_by_name(tiny_model, tiny_processor, call, error, names):
    start = time.perf_counter()
    _raises(lambda: call(tiny_model, tiny_processor), error, names)
    assert time.perf_counter() - start < 5  # refused before the work: no hang, no 18 GB


def test_max_think_tokens_is_not_reported_as_max_new_tokens(tiny_model, tiny_processor):
    message = _raises(
        lambda: _t2i(think=True, max_think_tokens=0)(tiny_model, tiny_processor), ValueError, "max_think_tokens"
    )
    assert "max_new_tokens" not in message


def test_context_api_refuses_by_name(tiny_model, special):
    m = tiny_model
    ctx = m.add_text_tokens(m.new_context(1), [[20, 21, 22]], special)
    two = m.new_context(2)
    params = GuidanceParams(num_timesteps=2)
    cases = [
        (lambda: m.generate_text_ids(ctx, special, max_length=0), ValueError, "max_length"),
        (lambda: m.generate_text_ids(ctx, special, max_length=10**6), ValueError, ("max_length", "too long")),
        (lambda: m.generate_text_ids(ctx, special, max_length=2, temperature="hot"), TypeError, "temperature"),
        (lambda: m.generate_text_ids(ctx, special, max_length=2, return_logits="yes"), TypeError, "return_logits"),
        (lambda: m.add_text_tokens(ctx, [[10**6]], special), ValueError, ("token_ids[0]", "1000000", "vocabulary")),
        (lambda: m.add_text_tokens(ctx, [[-1]], special), ValueError, "token_ids[0][0]"),
        (lambda: m.add_text_tokens(ctx, [[1], [2]], special), ValueError, "token_ids"),
        (lambda: m.generate_latents(ctx, ctx, ctx, [(64, 64), (64, 64)], special, params), ValueError, "image_sizes"),
        (lambda: m.generate_latents(ctx, two, ctx, [(64, 64)], special, params), ValueError, "cfg_text_context"),
        (lambda: m.generate_latents(ctx, ctx, "ctx", [(64, 64)], special, params), TypeError, "cfg_img_context"),
        (lambda: m.generate_latents(ctx, ctx, ctx, [64], special, params), TypeError, "image_sizes[0]"),
        (lambda: m.generate_latents(ctx, ctx, ctx, [(64, 64.0)], special, params), TypeError, "image_sizes[0][1]"),
        (lambda: m.generate_latents(ctx, ctx, ctx, [(64, 64)], special, {"cfg": 4}), TypeError, "params"),
        (
            lambda: m.generate_latents(ctx, ctx, ctx, [(64, 64)], special, params, init_noise=[torch.zeros(3, 64)]),
            ValueError,
            "init_noise",
        ),
        (lambda: m.generate_latents(ctx, ctx, ctx, [(64, 64)], special, params, progress="yes"), TypeError, "progress"),
        (lambda: GuidanceParams(num_timesteps=1), ValueError, "num_timesteps"),
        (lambda: GuidanceParams(cfg_text_scale=NAN), ValueError, "cfg_text_scale"),
        (lambda: BagelParallel(sp=-2), ValueError, "parallel['sp']"),
        (lambda: m.set_generation_cache_limits(max_entries=-1), ValueError, "max_entries"),
        (lambda: m.set_generation_cache_limits(max_entries=True), TypeError, "max_entries"),
        (lambda: m.new_context(0), ValueError, "batch_size"),
        (lambda: m.new_context("2"), TypeError, "batch_size"),
        (lambda: m.decode_latents([torch.zeros(16, 64)], [(64, 64), (64, 64)]), ValueError, "image_sizes"),
        (lambda: m.generate_text_ids(ctx, special, max_length=2, generator=[None, None]), ValueError, "generator"),
        (lambda: m.generate_text_ids(ctx, special, max_length=2, do_sample=True, generator=5), TypeError, "generator"),
        (lambda: m.generate_latents(ctx, ctx, ctx, [(64, 64)], special, params, generator=0), TypeError, "generator"),
    ]
    for call, error, names in cases:
        _raises(call, error, names)


def test_context_api_checks_found_missing(tiny_model, special):
    """Context API arguments that were not checked before the checks moved to validation_bagel.py:
    each used to fail later with an AttributeError, a reshape error or a message naming no argument."""
    m = tiny_model
    ctx = m.add_text_tokens(m.new_context(1), [[20, 21, 22]], special)
    params = GuidanceParams(num_timesteps=2)
    vit = torch.zeros(3, 28, 28)
    cases = [
        (lambda: m.add_text_tokens("ctx", [[1]], special), TypeError, ("context", "BagelContext", "new_context")),
        (lambda: m.add_text_tokens(ctx, [[1]], (1, 2, 3, 4)), TypeError, ("special", "SpecialTokenIds")),
        (lambda: m.generate_text_ids(None, special, max_length=2), TypeError, ("context", "None")),
        (lambda: m.add_vit_images(ctx, [vit, vit], special), ValueError, ("images", "per sequence (1)")),
        (lambda: m.add_vit_images(ctx, vit, special), ValueError, ("images", "vit_transform")),
        (lambda: m.add_vit_images(ctx, [IMG], special), TypeError, ("images[0]", "torch.Tensor")),
        (lambda: m.add_vit_images(ctx, [vit.long()], special), TypeError, ("images[0]", "floating point")),
        (lambda: m.add_vae_images(ctx, [torch.zeros(1, 64, 64)], special), ValueError, ("images[0]", "(3, H, W)")),
        (lambda: m.add_vae_images(ctx, [torch.zeros(64, 64)], special), ValueError, ("images[0]", "3 dimensions")),
        (
            lambda: m.generate_latents(ctx, ctx, ctx, [(64, 64)], special, params, init_noise=[None]),
            TypeError,
            "init_noise[0]",
        ),
        (
            lambda: m.generate_latents(ctx, ctx, ctx, [(64, 64)], special, params, init_noise=torch.zeros(16, 64)),
            TypeError,
            ("init_noise", "a list of 1 tensor"),
        ),
        (
            lambda: m.generate_latents(ctx, ctx, ctx, [(64, 64)], special, params, generator=[torch.Generator()]),
            TypeError,
            "generator",
        ),
        (lambda: m.decode_latents([torch.zeros(3, 64)], [(64, 64)]), ValueError, ("latent_tokens", "(16, 64)")),
        (lambda: m.decode_latents(torch.zeros(16, 64), [(64, 64)]), TypeError, "latent_tokens"),
        (lambda: m.decode_latents([torch.zeros(16, 64)], [64]), TypeError, "image_sizes[0]"),
        (lambda: m.decode_latents([torch.zeros(16, 64)], [(64, 70)]), ValueError, ("multiples of 16", "64x70")),
    ]
    for call, error, names in cases:
        _raises(call, error, names)
    # the sensible side: what the checks let through still works
    after = m.add_vit_images(ctx, [vit], special)
    assert after.batch_size == 1 and after.lengths[0] > ctx.lengths[0]
    images = m.decode_latents([torch.zeros(16, 64)], [(64, 64)])
    assert len(images) == 1 and images[0].shape == (1, 3, 64, 64)


def test_decoding_past_the_context_stops_at_its_end_with_a_warning(tiny_model, tiny_processor, caplog):
    """max_new_tokens larger than what the context leaves: decoding stops where the context ends
    (the prompt fits), and a warning says so; the answer is what a call asking for exactly that
    many tokens gets."""
    limit = tiny_model.config.text_config.max_position_embeddings
    prompt = "ab" * ((limit - 8) // 2)
    used = len(tiny_processor.encode_text(prompt)) + 2  # [bos] prompt [eos]
    room = limit - used - 1  # the bos decoding starts from
    assert 0 < room < 8
    with caplog.at_level(logging.WARNING):
        answer = tiny_model.chat(None, prompt, max_new_tokens=10**6, processor=tiny_processor)
    assert any(
        "max_new_tokens=1000000" in r.getMessage() and f"stops after {room}" in r.getMessage() for r in caplog.records
    )
    assert answer == tiny_model.chat(None, prompt, max_new_tokens=room, processor=tiny_processor)
    # One token more of prompt and nothing fits: refused by name.
    _raises(
        lambda: tiny_model.chat(None, prompt + "a" * (room + 1), processor=tiny_processor),
        ValueError,
        ("prompt", "too long"),
    )


@pytest.mark.parametrize("seed", [-1, np.int64(3), 2**64 - 1], ids=["negative", "numpy", "largest"])
def test_unusual_seeds_work_and_are_reproducible(tiny_model, tiny_processor, seed):
    kwargs = dict(max_new_tokens=3, do_sample=True, temperature=1.0, processor=tiny_processor, seed=seed)
    first = tiny_model.chat(IMG, "What is it?", **kwargs)
    assert isinstance(first, str) and first == tiny_model.chat(IMG, "What is it?", **kwargs)


def test_greedy_decoding_takes_temperature_zero(tiny_model, tiny_processor):
    """temperature=0 / top_p=0 are the usual 'no sampling': greedy decoding takes them as it is."""
    greedy = tiny_model.chat(IMG, "What is it?", max_new_tokens=4, processor=tiny_processor)
    assert (
        tiny_model.chat(IMG, "What is it?", max_new_tokens=4, temperature=0.0, top_p=0.0, processor=tiny_processor)
        == greedy
    )


def test_guidance_scales_at_their_edges_give_images(tiny_model, tiny_processor):
    """0 and 1 are valid scales (1 turns a branch off): real pictures, not refused."""
    for scale in (0.0, 1.0):
        image = tiny_model.generate_image("a fox", cfg_text_scale=scale, processor=tiny_processor, seed=0, **T2I)
        assert image.size == (64, 64) and len(image.getcolors(1 << 16)) > 1


# ----------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------


def test_processor_call_keeps_the_image(tiny_processor):
    """processor(text=..., images=...) returns the text's ids and the image's ViT patches, packed as
    the training forward takes them (the issue: the image was dropped)."""
    a, b = _image(64, 48, 1), _image(30, 90, 2)
    out = tiny_processor(text="What is it?", images=a)
    patches, positions = tiny_processor.vit_patches(a)
    assert out["input_ids"] == [tiny_processor.encode_text("What is it?")]
    assert torch.equal(out["packed_vit_tokens"], patches) and torch.equal(out["packed_vit_position_ids"], positions)
    assert out["vit_token_seqlens"].tolist() == [patches.shape[0]]
    both = tiny_processor(images=[a, b], text=["x", "yz"])
    assert both["vit_token_seqlens"].tolist() == [patches.shape[0], tiny_processor.vit_patches(b)[0].shape[0]]
    assert both["packed_vit_tokens"].shape[0] == sum(both["vit_token_seqlens"].tolist())
    assert both["input_ids"] == [tiny_processor.encode_text("x"), tiny_processor.encode_text("yz")]


PROCESSOR_ERRORS = [
    ("videos", lambda p: p(text="a", videos=[IMG]), ValueError, "videos"),
    ("audio", lambda p: p(text="a", audio=np.zeros(16000)), ValueError, "audio"),
    ("tokenizer-kwarg", lambda p: p(text="a", padding=True), TypeError, "padding"),
    ("text-int", lambda p: p(text=3), TypeError, ("text", "int")),
    ("text-list-of-int", lambda p: p(text=["a", 3]), TypeError, "text"),
    ("images-path", lambda p: p(images="cat.png"), TypeError, ("images[0]", "PIL.Image.open")),
    ("images-tensor", lambda p: p(images=[torch.zeros(3, 64, 64)]), TypeError, "images[0]"),
    ("images-empty", lambda p: p(images=[]), ValueError, "images"),
    ("nothing", lambda p: p(), ValueError, "text="),
    ("return_tensors-np", lambda p: p(text="a", return_tensors="np"), ValueError, ("return_tensors", "'np'")),
    ("image-too-small", lambda p: p(images=Image.new("RGB", (8, 8))), ValueError, ("8x8", "at least 16")),
    ("encode_text-bytes", lambda p: p.encode_text(b"abc"), TypeError, "text"),
    ("vit_patches-tensor", lambda p: p.vit_patches(torch.zeros(3, 28, 28)), TypeError, "image"),
    ("vae_max_size-float", lambda p: BagelProcessor(p.tokenizer, vae_max_size=2.5), TypeError, ("vae_max_size", "2.5")),
    ("vit_patch_size-zero", lambda p: BagelProcessor(p.tokenizer, vit_patch_size=0), ValueError, "vit_patch_size"),
    ("vit_stride-not-patches", lambda p: BagelProcessor(p.tokenizer, vit_stride=15), ValueError, "vit_stride"),
    ("max_pixels-str", lambda p: BagelProcessor(p.tokenizer, max_pixels="1e6"), TypeError, "max_pixels"),
    (
        "grid-not-the-configs",
        lambda p: BagelProcessor(p.tokenizer, vit_max_num_patch_per_side=35),
        ValueError,
        ("vit_max_num_patch_per_side=35", "70", "config="),
    ),
    ("config-dict", lambda p: BagelProcessor(p.tokenizer, config={"vit_patch_size": 16}), TypeError, "BagelConfig"),
]


@pytest.mark.parametrize("call, error, names", [c[1:] for c in PROCESSOR_ERRORS], ids=[c[0] for c in PROCESSOR_ERRORS])
def test_processor_refuses_by_name(tiny_processor, call, error, names):
    _raises(lambda: call(tiny_processor), error, names)


# ----------------------------------------------------------------------------------------------
# Configs and loading
# ----------------------------------------------------------------------------------------------

CONFIG_ERRORS = [
    ("timestep_shift-negative", dict(timestep_shift=-1), ValueError, ("BagelConfig.timestep_shift", "-1")),
    ("timestep_shift-nan", dict(timestep_shift=NAN), ValueError, "timestep_shift"),
    ("max_latent_size-negative", dict(max_latent_size=-4), ValueError, ("BagelConfig.max_latent_size", "-4")),
    ("latent_patch_size-zero", dict(latent_patch_size=0), ValueError, "latent_patch_size"),
    ("vit_patch_size-str", dict(vit_patch_size="14"), TypeError, ("vit_patch_size", "quotes")),
    ("dropout-above-one", dict(vit_cond_dropout_prob=1.5), ValueError, "vit_cond_dropout_prob"),
    ("vit_select_layer-positive", dict(vit_select_layer=1), ValueError, "vit_select_layer"),
    (
        "vit_select_layer-past-the-tower",
        dict(vit_config={"num_hidden_layers": 3}, vit_select_layer=-100),
        ValueError,
        ("vit_select_layer", "-100"),
    ),
    ("connector_act-typo", dict(connector_act="gelu_pytorch_tan"), ValueError, ("connector_act", "gelu_pytorch_tanh")),
    ("visual_gen-str", dict(visual_gen="yes"), TypeError, "visual_gen"),
    ("vae-z_channels-zero", dict(vae_config={"z_channels": 0}), ValueError, "vae_config['z_channels']"),
    ("vae-scale-str", dict(vae_config={"scale_factor": "0.3"}), TypeError, "vae_config['scale_factor']"),
    (
        "heads-not-dividing",
        dict(llm_config={"hidden_size": 64, "num_attention_heads": 5}),
        ValueError,
        ("text_config", "num_attention_heads"),
    ),
    ("vocab-zero", dict(llm_config={"vocab_size": 0}), ValueError, "text_config.vocab_size"),
    ("freeze_und-str", dict(llm_config={"freeze_und": "maybe"}), TypeError, "freeze_und"),
    ("stage-3", dict(stage=3), ValueError, "3"),
]


@pytest.mark.parametrize("kwargs, error, names", [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_config_values_are_checked_when_built(kwargs, error, names):
    _raises(lambda: BagelConfig(**kwargs), error, names)


@pytest.fixture
def tiny_copy(parity, tmp_path):
    """A copy of the tiny-a checkpoint directory (2.6 MB) to damage."""
    return shutil.copytree(parity.checkpoint, tmp_path / "bagel-tiny")


def test_config_json_with_a_negative_timestep_shift_does_not_load(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "timestep_shift": -1}))
    _raises(lambda: BagelForUnifiedMultimodal.from_pretrained(tiny_copy), ValueError, "timestep_shift")


def test_config_overrides_at_load_are_checked_too(tiny_copy):
    _raises(lambda: BagelConfig.from_pretrained(tiny_copy, max_latent_size=-4), ValueError, "max_latent_size")
    _raises(
        lambda: BagelForUnifiedMultimodal.from_pretrained(tiny_copy, timestep_shift=float("nan")),
        ValueError,
        "timestep_shift",
    )


def test_stage2_checkpoint_without_ae_is_refused(tiny_copy, caplog):
    (tiny_copy / "ae.safetensors").unlink()
    _raises(
        lambda: BagelForUnifiedMultimodal.from_pretrained(tiny_copy),
        FileNotFoundError,
        ("ae.safetensors", "stage=1", "strict=False"),
    )
    with caplog.at_level(logging.WARNING):  # asked for: a random VAE, with a warning
        model = BagelForUnifiedMultimodal.from_pretrained(tiny_copy, strict=False)
    assert model.vae is not None and any("randomly initialised" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["bagel-tiny-nowhere", "./bagel-tiny", "outputs/run1", "a/b/c", ""])
def test_paths_that_are_not_hub_ids_fail_without_the_network(tmp_path, monkeypatch, name):
    import huggingface_hub

    (tmp_path / "outputs").mkdir()  # "outputs/run1": its first folder exists, so a local path
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("asked the Hub"))
    start = time.perf_counter()
    _raises(lambda: BagelForUnifiedMultimodal.from_pretrained(name), (FileNotFoundError, ValueError), "director")
    assert time.perf_counter() - start < 2


def test_hub_id_offline_without_a_cached_copy_says_so(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    _raises(
        lambda: BagelForUnifiedMultimodal.from_pretrained("nobody/bagel-tiny", cache_dir=str(tmp_path / "hf")),
        FileNotFoundError,
        ("'nobody/bagel-tiny'", "offline", "Hub repository id"),
    )
    assert time.perf_counter() - start < 5


def test_loading_arguments_and_file_errors(tiny_copy):
    load = BagelForUnifiedMultimodal.from_pretrained
    _raises(lambda: load(tiny_copy, stage=3), ValueError, "3")
    _raises(lambda: load(tiny_copy, strict="no"), TypeError, ("strict", "'no'"))
    _raises(lambda: load(tiny_copy, config=3), TypeError, "config")
    _raises(lambda: load(tiny_copy, dtype="float33"), ValueError, "dtype")
    if not torch.cuda.is_available():
        _raises(lambda: load(tiny_copy, device_map="cuda"), ValueError, ("device_map='cuda'", "device_map='cpu'"))
        _raises(lambda: load(tiny_copy, device_map={"": "cuda:0"}), ValueError, "device_map")
    _raises(
        lambda: BagelForUnifiedMultimodal.from_pretrained(tiny_copy / "ema.safetensors"),
        NotADirectoryError,
        "ema.safetensors",
    )
    (tiny_copy / "ema.safetensors").write_bytes(b"not a safetensors file")
    _raises(lambda: BagelForUnifiedMultimodal.from_pretrained(tiny_copy), ValueError, "ema.safetensors")


# ----------------------------------------------------------------------------------------------
# The packed training forward (docs/training.md, "Training inputs")
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pack(tiny_model) -> dict:
    return make_batch(tiny_model.config, JOINT_PACK)


def _with(batch: dict, **changes) -> dict:
    return {**batch, **changes}


def _set(tensor: torch.Tensor, index: int, value) -> torch.Tensor:
    out = tensor.clone()
    out[index] = value
    return out


def _timesteps_differ(b):
    t = b["packed_timesteps"].clone()
    noised = torch.isfinite(t)
    t[noised.nonzero()[0]] += 0.5  # one token of the noised image gets another timestep
    return _with(b, packed_timesteps=t)


def _split_across_samples(b):
    splits = list(b["split_lens"])
    assert len(b["sample_lens"]) == 2 and sum(splits[:3]) == b["sample_lens"][0]  # JOINT_PACK: 3 splits, then 2
    return _with(b, split_lens=[*splits[:2], splits[2] + 1, splits[3] - 1, splits[4]])


def _image_in_a_text_split(b):
    modes = list(b["attn_modes"])
    assert modes[3] == "full"  # sample 2's ViT image
    return _with(b, attn_modes=[*modes[:3], "causal", modes[4]])


# (id, pack -> kwargs, error, names)
FORWARD_ERRORS = [
    ("labels", lambda b: _with(b, labels=b["packed_label_ids"]), TypeError, ("labels=", "packed_label_ids")),
    ("attention_mask", lambda b: _with(b, attention_mask=torch.ones(3)), TypeError, ("attention_mask", "sample_lens")),
    ("input_ids", lambda b: _with(b, input_ids=b["packed_text_ids"]), TypeError, "packed_text_ids"),
    (
        "typo",
        lambda b: _with(b, packed_label_id=b["packed_label_ids"]),
        TypeError,
        ("'packed_label_id'", "did you mean 'packed_label_ids'"),
    ),
    (
        "nested_attention_masks",
        lambda b: _with(b, nested_attention_masks=[torch.ones(2, 2)]),
        ValueError,
        "nested_attention_masks",
    ),
    (
        "negative-position",
        lambda b: _with(b, packed_position_ids=_set(b["packed_position_ids"], 3, -5)),
        ValueError,
        ("packed_position_ids", "[-5]"),
    ),
    (
        "position-past-the-context",
        lambda b: _with(b, packed_position_ids=_set(b["packed_position_ids"], 3, 10**5)),
        ValueError,
        ("packed_position_ids", "100000"),
    ),
    ("timesteps-differ-in-one-image", _timesteps_differ, ValueError, ("packed_timesteps", "one noised image")),
    (
        "text-id-out-of-vocab",
        lambda b: _with(b, packed_text_ids=_set(b["packed_text_ids"], 0, 10**6)),
        ValueError,
        ("packed_text_ids", "1000000", "vocabulary"),
    ),
    (
        "text-id-negative",
        lambda b: _with(b, packed_text_ids=_set(b["packed_text_ids"], 0, -1)),
        ValueError,
        "packed_text_ids",
    ),
    (
        "label-out-of-vocab",
        lambda b: _with(b, packed_label_ids=_set(b["packed_label_ids"], 0, 10**6)),
        ValueError,
        ("packed_label_ids", "1000000"),
    ),
    (
        "label-ignore-index",
        lambda b: _with(b, packed_label_ids=_set(b["packed_label_ids"], 0, -100)),
        ValueError,
        ("packed_label_ids", "-100", "ce_loss_indexes"),
    ),
    (
        "text-ids-float",
        lambda b: _with(b, packed_text_ids=b["packed_text_ids"].float()),
        TypeError,
        ("packed_text_ids", "integers"),
    ),
    (
        "text-ids-list",
        lambda b: _with(b, packed_text_ids=b["packed_text_ids"].tolist()),
        TypeError,
        ("packed_text_ids", "torch.Tensor"),
    ),
    (
        "positions-2d",
        lambda b: _with(b, packed_position_ids=b["packed_position_ids"][None]),
        ValueError,
        ("packed_position_ids", "1 dimension"),
    ),
    (
        "sequence_length-str",
        lambda b: _with(b, sequence_length=str(b["sequence_length"])),
        TypeError,
        "sequence_length",
    ),
    ("sample_lens-zero", lambda b: _with(b, sample_lens=[0, *b["sample_lens"]]), ValueError, "sample_lens[0]"),
    ("split-across-samples", _split_across_samples, ValueError, ("split_lens", "cross")),
    (
        "attn_mode-unknown",
        lambda b: _with(b, attn_modes=["bidirectional", *b["attn_modes"][1:]]),
        ValueError,
        "attn_modes[0]",
    ),
    ("image-in-a-causal-split", _image_in_a_text_split, ValueError, ("attn_modes", "causal")),
    ("attn_modes-short", lambda b: _with(b, attn_modes=b["attn_modes"][1:]), ValueError, "attn_modes"),
    (
        "vit-position-past-the-grid",
        lambda b: _with(b, packed_vit_position_ids=_set(b["packed_vit_position_ids"], 0, 10**4)),
        ValueError,
        ("packed_vit_position_ids", "10000"),
    ),
    (
        "vit-columns",
        lambda b: _with(b, packed_vit_tokens=b["packed_vit_tokens"][:, :10]),
        ValueError,
        ("packed_vit_tokens", "588 columns"),
    ),
    ("vit-seqlens-sum", lambda b: _with(b, vit_token_seqlens=[1]), ValueError, ("vit_token_seqlens", "add up")),
    (
        "latent-position-past-the-table",
        lambda b: _with(b, packed_latent_position_ids=_set(b["packed_latent_position_ids"], 0, 10**4)),
        ValueError,
        ("packed_latent_position_ids", "10000"),
    ),
    (
        "latent-shape-too-large",
        lambda b: _with(b, patchified_vae_latent_shapes=[(2, 2), (2, 30)]),
        ValueError,
        "patchified_vae_latent_shapes[1]",
    ),
    (
        "latent-channels",
        lambda b: _with(b, padded_latent=b["padded_latent"][:, :3]),
        ValueError,
        ("padded_latent", "channels"),
    ),
    (
        "latent-shapes-count",
        lambda b: _with(b, patchified_vae_latent_shapes=[(2, 2)]),
        ValueError,
        "patchified_vae_latent_shapes",
    ),
    (
        "ce-without-labels",
        lambda b: {k: v for k, v in b.items() if k != "packed_label_ids"},
        ValueError,
        ("ce_loss_indexes", "packed_label_ids"),
    ),
    (
        "ce-index-out-of-range",
        lambda b: _with(b, ce_loss_indexes=_set(b["ce_loss_indexes"], 0, 10**4)),
        ValueError,
        "ce_loss_indexes",
    ),
    (
        "mse-without-latents",
        lambda b: {k: v for k, v in b.items() if k != "padded_latent"},
        ValueError,
        ("mse_loss_indexes", "padded_latent"),
    ),
    ("noise-columns", lambda b: _with(b, packed_noise=b["packed_noise"][:, :3]), ValueError, "packed_noise"),
    ("output_hidden_states-str", lambda b: _with(b, output_hidden_states="yes"), TypeError, "output_hidden_states"),
]


@pytest.mark.parametrize("make, error, names", [c[1:] for c in FORWARD_ERRORS], ids=[c[0] for c in FORWARD_ERRORS])
def test_training_forward_refuses_by_name(tiny_model, pack, make, error, names):
    with torch.no_grad():
        _raises(lambda: tiny_model(**make(pack)), error, names)


def test_training_forward_takes_the_consistent_pack_and_the_processors_patches(tiny_model, tiny_processor, pack):
    """The sensible side: the pack itself, an empty noise tensor beside a pack without VAE images,
    and a ViT image from processor(images=...) in place of the random patches."""
    with torch.no_grad():
        out = tiny_model(**pack)
        assert torch.isfinite(out["ce"]).all() and torch.isfinite(out["mse"]).all()
        text_only = make_batch(tiny_model.config, [[("text", 6)]])
        assert tiny_model(**text_only, packed_noise=torch.zeros(0, 64))["mse"] is None
        image = tiny_processor(images=_image(28, 42))
        n = int(image["vit_token_seqlens"][0])
        batch = make_batch(tiny_model.config, [[("vit", (3, 2)), ("text", 4)]])
        assert n == 6
        batch.update({k: image[k] for k in ("packed_vit_tokens", "packed_vit_position_ids", "vit_token_seqlens")})
        assert torch.isfinite(tiny_model(**batch)["ce"]).all()


def test_refused_inputs_leave_the_model_usable(tiny_model, tiny_processor, pack):
    """After every kind of refusal the same model answers as before (nothing half-done is kept)."""
    before = tiny_model.chat(IMG, "What is it?", max_new_tokens=4, processor=tiny_processor)
    for call in (_chat(prompt="word " * 20000), _t2i(cfg_text_scale=NAN), _chat(seed=2**70)):
        with pytest.raises((TypeError, ValueError)):
            call(tiny_model, tiny_processor)
    with pytest.raises(TypeError), torch.no_grad():
        tiny_model(**pack, labels=pack["packed_label_ids"])
    assert tiny_model.chat(IMG, "What is it?", max_new_tokens=4, processor=tiny_processor) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_forward_refuses_on_the_gpu_before_any_lookup(tiny_model, pack):
    """On CUDA an out-of-range id or position would be a device-side assert that poisons the
    process; the lookups before the checks are read take clamped values, and nothing indexes with
    a value before they are read. So every refusal of the CPU is the same error on the GPU, and the
    GPU stays usable."""
    import copy

    model = copy.deepcopy(tiny_model).cuda()
    on_gpu = {k: v.cuda() if torch.is_tensor(v) else v for k, v in pack.items()}
    with torch.no_grad():
        for _, make, error, names in FORWARD_ERRORS:
            _raises(lambda: model(**make(on_gpu)), error, names)
        torch.cuda.synchronize()
        assert torch.isfinite(model(**on_gpu)["ce"]).all()


def test_special_ids_a_context_embeds_must_be_tokens(tiny_model):
    """An eos of -1 means "never stop" to generate_text_ids; embedded by add_text_tokens it was an
    index out of the table (a device-side assert on the GPU): refused by name instead."""
    import dataclasses

    from bagel_remote.contexts_bagel import SpecialTokenIds

    special = SpecialTokenIds(bos=10, eos=11, start_of_image=12, end_of_image=13)
    vocab = tiny_model.get_input_embeddings().num_embeddings
    context = tiny_model.new_context(1)
    for name, value in (("eos", -1), ("bos", vocab)):
        with pytest.raises(ValueError, match=f"special.{name}"):
            tiny_model.add_text_tokens(context, [[20, 21]], dataclasses.replace(special, **{name: value}))
    with pytest.raises(ValueError, match="special.start_of_image"):
        tiny_model.add_vit_images(context, [torch.zeros(3, 28, 28)], dataclasses.replace(special, start_of_image=-1))
    assert tiny_model.add_text_tokens(context, [[20, 21]], special).lengths == (4,)
