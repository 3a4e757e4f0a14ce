"""Step caches for image generation (step_cache_bagel.py): the reference's TaylorSeer against its
fixture (tiny-a/taylorseer.*), the adaptive policy against TaylorSeer, and what a call leaves
behind. Float32 on the CPU, the tiny-a checkpoint; parallel generation is in test_parallel.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from bagel_remote.autoencoder_bagel import unpatchify_latent
from bagel_remote.contexts_bagel import SpecialTokenIds
from bagel_remote.guidance_bagel import GuidanceParams
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal
from bagel_remote.processing_bagel import BagelProcessor
from bagel_remote.step_cache_bagel import AdaptiveTaylor, TaylorSeer
from conftest import Recording, assert_close
from test_generation import PROCESSOR_SIZES, _max_pixel_diff, _pil


@pytest.fixture(scope="module")
def model(parity) -> BagelForUnifiedMultimodal:
    return BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint)


@pytest.fixture(scope="module")
def special(parity) -> SpecialTokenIds:
    s = parity.meta["special_token_ids"]
    return SpecialTokenIds(s["bos_token_id"], s["eos_token_id"], s["start_of_image"], s["end_of_image"])


@pytest.fixture(scope="module")
def fixture(parity):
    """The TaylorSeer cases: (tensors, cases of taylorseer.json)."""
    from safetensors.torch import load_file

    return load_file(str(parity.root / "taylorseer.safetensors")), json.loads(
        (parity.root / "taylorseer.json").read_text()
    )["cases"]


@pytest.fixture(scope="module")
def processor() -> BagelProcessor:
    from tiny_tokenizer import build_tiny_tokenizer

    return BagelProcessor(build_tiny_tokenizer(None, vocab_size=320), **PROCESSOR_SIZES)


def _case_latents(model, special, fixture, name: str, step_cache, **param_overrides):
    """generate_latents on one fixture case, as the reference built its contexts."""
    tensors, cases = fixture
    case = cases[name]
    p = {**case["params"], "cfg_interval": tuple(case["params"]["cfg_interval"]), **param_overrides}
    if name == "t2i":
        full = model.add_text_tokens(model.new_context(1), [case["prompt_ids"]], special)
        cfg_text, cfg_img = model.new_context(1), full
    else:
        image = model.add_vae_images(model.new_context(1), [tensors["input.edit.source_image_vae"]], special)
        image = model.add_vit_images(image, [tensors["input.edit.source_image_vit"]], special)
        full, cfg_text = model.add_text_tokens(image, [case["prompt_ids"]], special), image
        cfg_img = model.add_text_tokens(model.new_context(1), [case["prompt_ids"]], special)
    return model.generate_latents(
        full,
        cfg_text,
        cfg_img,
        [tuple(case["image_hw"])],
        special,
        GuidanceParams(**p),
        init_noise=[tensors[f"input.{name}.init_noise"]],
        step_cache=step_cache,
    )[0]


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------
# Parity with the reference's TaylorSeer
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["t2i", "edit"])
def test_taylorseer_and_uncached_parity(model, special, fixture, name):
    """The reference's outputs with (taylorseer.*) and without (full.*) its cache: latent tokens,
    latent and VAE image to 1e-4; the cache moved the result (~1%) and ran 20 of t2i's 42 branch
    passes (23 steps: 0-4 and every third from 7 for both branches while guided, 19 steps)."""
    tensors, cases = fixture
    height, width = cases[name]["image_hw"]
    h, w = height // 16, width // 16
    recording = Recording(TaylorSeer())
    outputs = {
        "full": _case_latents(model, special, fixture, name, None),
        "taylorseer": _case_latents(model, special, fixture, name, recording),
    }
    for kind, tokens in outputs.items():
        assert_close(tokens, tensors[f"{kind}.{name}.latent_tokens"], 1e-4, f"{kind}.{name}.latent_tokens")
        latent = unpatchify_latent(tokens, h, w, model.config.latent_patch_size)[None]
        assert_close(latent, tensors[f"{kind}.{name}.latent"], 1e-4, f"{kind}.{name}.latent")
        image = model.decode_latents([tokens], [(height, width)])[0]
        assert_close(image, tensors[f"{kind}.{name}.image"], 1e-4, f"{kind}.{name}.image")
    assert 0.005 < _relative(outputs["taylorseer"], outputs["full"]) < 0.02
    run = recording.run
    if name == "t2i":
        assert (run.runs, run.predictions) == (20, 22)
    else:  # three branches guided on all 23 steps: 11 runs each
        assert (run.runs, run.predictions) == (33, 36)


def test_adaptive_beats_taylorseer_on_the_fixture_cases(model, special, fixture):
    """On both cases (23 steps), the adaptive policy at tolerance 0.02 runs fewer branch passes
    than TaylorSeer and ends closer to the uncached latents; the default (0.01) ends at most a
    quarter of TaylorSeer's error away; a tighter tolerance runs more and is closer still;
    tolerance 0 runs every step and is the uncached result."""
    for name in ("t2i", "edit"):
        exact = _case_latents(model, special, fixture, name, None)
        results = {}
        for label, policy in (
            ("taylorseer", TaylorSeer()),
            ("default", AdaptiveTaylor()),
            ("0.02", AdaptiveTaylor(tolerance=0.02)),
            ("0.005", AdaptiveTaylor(tolerance=0.005)),
            ("zero", AdaptiveTaylor(tolerance=0)),
        ):
            recording = Recording(policy)
            latents = _case_latents(model, special, fixture, name, recording)
            results[label] = (recording.run.runs, recording.run.predictions, _relative(latents, exact), latents)
        ts, default, loose, tight, zero = (results[k] for k in ("taylorseer", "default", "0.02", "0.005", "zero"))
        assert loose[0] < ts[0] and loose[2] <= ts[2], (name, ts[:3], loose[:3])
        assert default[2] <= ts[2] / 4 and default[1] > 0, (name, ts[:3], default[:3])
        assert tight[0] > loose[0] and tight[2] < loose[2], (name, loose[:3], tight[:3])
        assert zero[1] == 0 and torch.allclose(zero[3], exact, rtol=0, atol=1e-5), name


def test_taylorseer_counts_each_branch_on_its_own(model, special, fixture):
    """Guidance from t <= 0.6 on (the t2i case, 23 steps): as in the reference, the text branch
    starts its own count when guidance starts (its calls at steps 16-22: runs 16-20, predicts 21
    and 22) while the full branch keeps its schedule (runs 0-4, 7, ..., 22), so some steps run
    one branch and predict the other; the latents stay within TaylorSeer's usual distance."""
    recording = Recording(TaylorSeer())
    cached = _case_latents(model, special, fixture, "t2i", recording, cfg_interval=(0.0, 0.6))
    exact = _case_latents(model, special, fixture, "t2i", None, cfg_interval=(0.0, 0.6))
    assert (recording.run.runs, recording.run.predictions) == (11 + 5, 12 + 2)
    assert 0 < _relative(cached, exact) < 0.02


# ----------------------------------------------------------------------------------------------
# A call leaves nothing behind
# ----------------------------------------------------------------------------------------------


def _module_state(model) -> dict:
    return {name: (type(m), sorted(vars(m))) for name, m in model.named_modules()}


@pytest.mark.parametrize("step_cache", ["taylorseer", "adaptive"])
def test_nothing_stays_set_after_a_cached_generation(model, processor, step_cache):
    """A chat and an uncached generation after a cached generation equal those before it; no
    module gained or lost an attribute; the cache's tensors are gone when the call returns."""
    kwargs = dict(height=32, width=48, num_steps=8, seed=3, progress=False, processor=processor)
    chat = lambda: model.chat(_pil(90, 60, 1), "what is this?", max_new_tokens=6, processor=processor)  # noqa: E731
    chat_before, image_before, state = chat(), model.generate_image("a red cat", **kwargs), _module_state(model)
    recording = Recording(AdaptiveTaylor(tolerance=0.05) if step_cache == "adaptive" else TaylorSeer())
    cached = model.generate_image("a red cat", step_cache=recording, **kwargs)
    assert recording.run.predictions > 0 and recording.run.peak_bytes > 0
    assert recording.run.nbytes == 0  # closed by the call (the run itself is held here)
    assert _module_state(model) == state
    assert chat() == chat_before
    assert _max_pixel_diff(model.generate_image("a red cat", **kwargs), image_before) == 0
    assert 0 < _max_pixel_diff(cached, image_before) <= 64  # predicted, and close


def test_cache_is_closed_when_the_call_fails(model, special, monkeypatch):
    """An error in the middle of the denoising loop still frees the cache's tensors."""
    full = model.add_text_tokens(model.new_context(1), [[272, 115, 200]], special)
    recording, calls = Recording(TaylorSeer()), []
    head = model._velocity_head

    def failing_head(hidden):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return head(hidden)

    monkeypatch.setattr(model, "_velocity_head", failing_head)
    with pytest.raises(KeyboardInterrupt):
        model.generate_latents(
            full,
            model.new_context(1),
            full,
            [(32, 32)],
            special,
            GuidanceParams(num_timesteps=12),
            generator=torch.Generator().manual_seed(0),
            step_cache=recording,
        )
    assert recording.run.peak_bytes > 0 and recording.run.nbytes == 0


# ----------------------------------------------------------------------------------------------
# Batches, think mode, the public API
# ----------------------------------------------------------------------------------------------


def test_taylorseer_batch_matches_single(model, processor):
    """TaylorSeer's schedule counts calls, not values: each request of a batch gets what it gets
    alone (as the uncached path does), editing's three branches included."""
    kwargs = dict(num_steps=9, progress=False, processor=processor, step_cache="taylorseer")
    sources, prompts = [_pil(90, 60, 5), _pil(64, 64, 6)], ["make it blue", "add a red hat to the cat"]
    batch = model.edit_image(sources, prompts, seed=[3, 4], **kwargs)
    for source, prompt, seed, image in zip(sources, prompts, (3, 4), batch):
        assert _max_pixel_diff(image, model.edit_image(source, prompt, seed=seed, **kwargs)) <= 1
    uncached = model.edit_image(sources[0], prompts[0], seed=3, **dict(kwargs, step_cache=None))
    assert 0 < _max_pixel_diff(batch[0], uncached) <= 64


def test_think_mode_and_interleave_take_a_step_cache(model, processor):
    """generate_image with think (the decoded plan joins the context, then a cached generation)
    and interleave: the cache predicts steps, and the same call twice gives the same result."""
    recording = Recording(TaylorSeer())
    kwargs = dict(height=32, width=32, num_steps=8, seed=1, progress=False, max_think_tokens=4, processor=processor)
    thought, image = model.generate_image("a castle", think=True, step_cache=recording, **kwargs)
    assert isinstance(thought, str) and image.size == (32, 32) and recording.run.predictions > 0
    again = model.generate_image("a castle", think=True, step_cache="taylorseer", **kwargs)
    assert again[0] == thought and _max_pixel_diff(again[1], image) == 0
    out = model.interleave(
        ["a castle"],
        height=32,
        width=32,
        params=GuidanceParams(num_timesteps=9),
        seed=1,
        progress=False,
        processor=processor,
        step_cache=AdaptiveTaylor(tolerance=0.05),
    )
    assert len(out) == 1 and out[0].size == (32, 32)


def test_bad_step_cache_is_refused_by_name(model, processor, special):
    kwargs = dict(height=32, width=32, num_steps=2, progress=False, processor=processor)
    with pytest.raises(ValueError, match="step_cache='teacache'.*'taylorseer'"):
        model.generate_image("a cat", step_cache="teacache", **kwargs)
    with pytest.raises(TypeError, match="step_cache must be"):
        model.edit_image(_pil(64, 64), "blue", step_cache=3, num_steps=2, progress=False, processor=processor)
    with pytest.raises(TypeError, match="step_cache must be"):
        model.interleave(["a cat"], step_cache=True, height=32, width=32, progress=False, processor=processor)
    full = model.new_context(1)
    with pytest.raises(ValueError, match="step_cache="):
        model.generate_latents(full, full, full, [(32, 32)], special, step_cache="TaylorSeer")
    # validation_bagel's number checks: a value out of range is a ValueError, one of the wrong type a TypeError
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"AdaptiveTaylor\.tolerance must be a finite number >= 0"):
            AdaptiveTaylor(tolerance=bad)
    for bad in ("0.1", True, None):
        with pytest.raises(TypeError, match=r"AdaptiveTaylor\.tolerance must be a number"):
            AdaptiveTaylor(tolerance=bad)
    for name, bad in (("warmup", 0), ("interval", -1), ("max_order", -1)):
        with pytest.raises(ValueError, match=rf"TaylorSeer\.{name} must be at least"):
            TaylorSeer(**{name: bad})
    for name, bad in (("warmup", 2.0), ("interval", True), ("max_order", "6")):
        with pytest.raises(TypeError, match=rf"TaylorSeer\.{name} must be an integer"):
            TaylorSeer(**{name: bad})
    assert TaylorSeer(warmup=np.int64(3)).warmup == 3 and type(TaylorSeer(warmup=np.int64(3)).warmup) is int
    assert AdaptiveTaylor(tolerance=0).tolerance == 0.0
