"""GPU checks of the loading modes on the tiny checkpoint (skipped without CUDA; the bitsandbytes
ones without bitsandbytes): bnb 4-bit and 8-bit and torchao layers inside the UND/GEN routing
(chat with the graphed decode, text-to-image), and CPU offloading against one GPU. Errors against
bf16 are printed (`pytest -s`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from bagel_remote import kernels_bagel, ops_bagel
from bagel_remote.contexts_bagel import SpecialTokenIds
from bagel_remote.guidance_bagel import GuidanceParams
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal
from PIL import Image

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LM = "model.language_model."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from make_tiny_checkpoint import make_tiny_checkpoint  # scripts/ is on sys.path (conftest)

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gpu") / "bagel_tiny", seed=0)


def _special_ids(proc) -> SpecialTokenIds:
    return SpecialTokenIds(proc.bos_token_id, proc.eos_token_id, proc.start_of_image_id, proc.end_of_image_id)


def _run(model) -> dict:
    """First-step chat logits, greedy ids (graphed decode), guided latents, and the high-level
    chat / generate_image / edit_image results."""
    proc = model.processor
    special = _special_ids(proc)
    image = Image.fromarray((np.arange(48 * 48 * 3) % 251).astype(np.uint8).reshape(48, 48, 3))
    context = model.add_vit_images(model.new_context(), [proc.vit_transform(image)], special)
    context = model.add_text_tokens(context, [proc.encode_text("what is in the picture")], special)
    ids, logits = model.generate_text_ids(context, special, max_length=12, return_logits=True)
    prompt = model.add_text_tokens(model.new_context(), [proc.encode_text("a red cat")], special)
    noise = [torch.randn(16, 64, generator=torch.Generator().manual_seed(0))]
    latents = model.generate_latents(
        prompt, model.new_context(), prompt, [(64, 64)], special, GuidanceParams(num_timesteps=4), init_noise=noise
    )
    texts = model.chat(image, "what is it", max_new_tokens=8)
    picture = model.generate_image("a cat", height=64, width=64, num_steps=3, seed=0, progress=False)
    edited = model.edit_image(image, "make it blue", num_steps=3, seed=0, progress=False)
    assert isinstance(texts, str) and picture.size == (64, 64) and edited.size[0] > 0
    return {"ids": ids[0], "logits": logits[0][0].float().cpu(), "latents": latents[0].float().cpu()}


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="module")
def bf16(tiny) -> dict:
    return _run(BagelForUnifiedMultimodal.from_pretrained(tiny, dtype=torch.bfloat16, device_map={"": 0}))


def _graphed_decode_matches_eager(model, monkeypatch) -> None:
    """The CUDA-graph decode of a quantized model gives the eager decode's ids and logits."""
    proc = model.processor
    special = _special_ids(proc)
    no_stop = dataclasses.replace(special, eos=-1)  # decode every step
    context = model.add_text_tokens(model.new_context(2), [proc.encode_text(t) for t in ("a red cat", "hi")], special)
    pool = model._decode_pool()
    captures = pool.captures
    graphed = model.generate_text_ids(context, no_stop, max_length=10, return_logits=True)
    assert pool.captures == captures + 1  # the quantized step was captured, not skipped
    with monkeypatch.context() as patch:
        patch.setattr(type(model), "_can_graph", lambda self, device: False)
        eager = model.generate_text_ids(context, no_stop, max_length=10, return_logits=True)
    assert graphed[0] == eager[0]
    for a, b in zip(graphed[1], eager[1]):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3)


def _check(name: str, model, reference: dict, bound: float) -> None:
    out = _run(model)
    errors = {key: _relative_error(out[key], reference[key]) for key in ("logits", "latents")}
    print(f"{name}: relative error vs bf16 {errors}")
    assert all(torch.isfinite(out[key]).all() for key in ("logits", "latents"))
    assert all(0 < err < bound for err in errors.values()), errors


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_chat_and_t2i(tiny, bf16, bits, monkeypatch):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    model, info = BagelForUnifiedMultimodal.from_pretrained(
        tiny, dtype=torch.bfloat16, device_map={"": 0}, quantization_config=config, output_loading_info=True
    )
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    kind = "Linear4bit" if bits == 4 else "Linear8bitLt"
    layer = model.model.language_model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == kind and type(layer.mlp_moe_gen.down_proj).__name__ == kind
    for name in (f"{LM}lm_head", "model.llm2vae", "model.vae2llm"):  # left in bf16
        assert model.get_submodule(name).weight.dtype == torch.bfloat16
    # 4-bit decodes as a CUDA graph; LLM.int8() looks for outliers on the host: eager
    assert model._can_graph(torch.device("cuda", 0)) == (bits == 4)
    if bits == 4:
        _graphed_decode_matches_eager(model, monkeypatch)
    _check(f"bnb {bits}-bit", model, bf16, 0.3 if bits == 4 else 0.1)


@pytest.mark.parametrize("kind", ["int8", "float8"])
def test_torchao_chat_and_t2i(tiny, bf16, kind, monkeypatch):
    pytest.importorskip("torchao")
    if kind == "float8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("float8 needs compute capability 8.9+")
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    config = TorchAoConfig(Int8WeightOnlyConfig() if kind == "int8" else Float8DynamicActivationFloat8WeightConfig())
    model = BagelForUnifiedMultimodal.from_pretrained(
        tiny, dtype=torch.bfloat16, device_map={"": 0}, quantization_config=config
    )
    assert type(model.model.language_model.model.layers[0].mlp.up_proj.weight).__name__ != "Parameter"
    assert model._can_graph(torch.device("cuda", 0))
    _graphed_decode_matches_eager(model, monkeypatch)
    _check(f"torchao {kind}", model, bf16, 0.1)


def test_cpu_offload_matches_one_gpu(tiny, bf16, monkeypatch):
    """Half the decoder on the CPU (accelerate streams it in): eager decode, same results as one GPU
    within the kernels' differences (the fused norm + rotary steps aside for offloaded layers). The
    layer left on the GPU, whose hooks only move inputs, keeps the fused decode kernels."""
    on_gpu = ("model.embed_tokens", "model.layers.0", "model.norm", "model.norm_moe_gen")
    device_map = {
        **{LM + name: 0 for name in on_gpu},
        LM + "model.layers.1": "cpu",
        LM + "lm_head": "cpu",
        "vae": "cpu",
    }
    for name in ("vit_model", "connector", "vit_pos_embed", "time_embedder", "vae2llm", "llm2vae", "latent_pos_embed"):
        device_map["model." + name] = 0
    model = BagelForUnifiedMultimodal.from_pretrained(tiny, dtype=torch.bfloat16, device_map=device_map)
    assert not model._can_graph(torch.device("cuda", 0))  # hooks move weights: the decode runs eagerly
    folded, gemv = [], ops_bagel.gemv
    monkeypatch.setattr(ops_bagel, "gemv", lambda *a, **kw: folded.append("norm" in kw) or gemv(*a, **kw))
    out = _run(model)
    assert kernels_bagel.triton is None or any(folded)  # layer 0's one-row steps: norms folded into the GEMVs
    for key in ("logits", "latents"):
        assert _relative_error(out[key], bf16[key]) < 1e-2, key
