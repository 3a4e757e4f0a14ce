"""Tests of the kernel policy (ops_bagel.py) on the CPU: what its predicates decide from their
inputs, and `attn_implementation` ("sdpa" and "eager" honoured at forward time, the parity
fixtures under both, anything else refused by name). The CUDA/Triton branches themselves are
tests/test_gpu.py's."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
from bagel_remote import ops_bagel
from bagel_remote.attention_bagel import AttentionPlan, sdpa_per_segment
from bagel_remote.contexts_bagel import SpecialTokenIds
from bagel_remote.layers_bagel import Linear
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal, Qwen2RMSNorm
from conftest import assert_close

# ----------------------------------------------------------------------------------------------
# The predicates, on their inputs
# ----------------------------------------------------------------------------------------------


def test_weight_kind_by_type_and_attributes():
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    layer = nn.Linear(64, 64, dtype=torch.bfloat16)
    assert ops_bagel.weight_kind(layer.weight) == "plain"
    assert ops_bagel.weight_kind(layer.weight.detach()) == "plain"  # a bare tensor
    assert ops_bagel.weight_kind(nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False)) == "other"
    quantize_(layer, Int8WeightOnlyConfig())
    assert ops_bagel.weight_kind(layer.weight) == "torchao"

    def stand_in(**attributes):  # bitsandbytes needs CUDA: its Parameter subclasses, by their attributes
        kind = type("Stand", (nn.Parameter,), {})
        param = kind(torch.zeros(4, dtype=torch.uint8), requires_grad=False)
        for key, value in attributes.items():
            setattr(param, key, value)
        return param

    assert ops_bagel.weight_kind(stand_in(quant_state=None)) == "bnb-4bit"
    assert ops_bagel.weight_kind(stand_in(CB=None, SCB=None)) == "bnb-8bit"
    assert ops_bagel.weight_kind(stand_in()) == "other"  # a Parameter subclass we do not know
    assert [ops_bagel.capturable_weight(w) for w in (stand_in(quant_state=None), stand_in(SCB=None))] == [True, False]


def test_plain_linears_and_unhooked_see_peft_wrappers_and_hooks():
    """A kernel reads `.weight` in a layer's place only for our own Linear with no hook on it."""
    from peft import LoraConfig, get_peft_model

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj = Linear(8, 8), Linear(8, 8)

    block = Block()
    assert ops_bagel.plain_linears(block.q_proj, block.k_proj)
    assert not ops_bagel.plain_linears(nn.Linear(8, 8))  # the class swap made for quantizers
    wrapped = get_peft_model(block, LoraConfig(r=2, target_modules=["q_proj"]))
    lora_q = wrapped.base_model.model.q_proj
    assert not ops_bagel.plain_linears(lora_q) and ops_bagel.plain_linears(wrapped.base_model.model.k_proj)

    norm = Qwen2RMSNorm(8)
    assert ops_bagel.unhooked(norm, block.k_proj)
    handle = norm.register_forward_hook(lambda module, args, out: None)
    assert not ops_bagel.unhooked(norm, block.k_proj)
    handle.remove()
    handle = block.k_proj.register_forward_pre_hook(lambda module, args: None)
    assert not ops_bagel.unhooked(norm, block.k_proj)
    handle.remove()
    norm._hf_hook = object()  # accelerate's hooks wrap forward and mark the module so
    assert not ops_bagel.unhooked(norm)


def test_unhooked_lets_through_accelerate_hooks_that_only_move_inputs(tmp_path):
    """A `device_map` over several devices puts an accelerate hook on every submodule: on layers
    whose weights stay on their device those hooks only move inputs, and the fused kernels still
    stand in for the modules' calls (as before the ops); offloaded layers load their weights in
    their hooks, and the model's top hook moves outputs back: those modules are called."""
    from accelerate import dispatch_model
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.q_proj, self.k_proj = Qwen2RMSNorm(8), Linear(8, 8), Linear(8, 8)

        def forward(self, x):
            return self.q_proj(self.norm(x)) + self.k_proj(x)

    model = nn.Sequential(Block(), Block())
    dispatch_model(model, device_map={"0": "cpu", "1": "disk"}, offload_dir=tmp_path)
    resident, offloaded = model[0], model[1]
    assert all(hasattr(m, "_hf_hook") for m in (resident.norm, resident.q_proj, offloaded.norm, offloaded.q_proj))
    assert ops_bagel.unhooked(resident, resident.norm, resident.q_proj, resident.k_proj)
    assert not ops_bagel.unhooked(offloaded.norm) and not ops_bagel.unhooked(offloaded.q_proj)  # loads weights
    assert not ops_bagel.unhooked(model)  # io_same_device: moves outputs back
    assert model(torch.randn(2, 8)).shape == (2, 8)  # the hooks are live
    moves = AlignDevicesHook(execution_device="cpu")
    assert ops_bagel.moves_inputs_only(SequentialHook(moves, AlignDevicesHook(execution_device="cpu")))
    assert not ops_bagel.moves_inputs_only(SequentialHook(moves, object()))
    handle = resident.q_proj.register_forward_hook(lambda module, args, out: None)
    assert not ops_bagel.unhooked(resident.q_proj)  # torch's hooks still count
    handle.remove()


def test_predicates_on_device_dtype_and_autograd():
    """On the CPU every fused kernel declines; low-precision CPU weights compute in float32;
    master weights train only under CUDA autocast, with autograd on."""
    x = torch.randn(1, 64, dtype=torch.bfloat16)
    w = torch.randn(64, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert not ops_bagel.fuses_decoding(x, w) and not ops_bagel.folds_norm(x, w)
    assert not ops_bagel.fuses_rms_norm_rotary(torch.randn(3, 2, 16))
    assert not ops_bagel.fuses_silu_mul(x, x)
    assert not ops_bagel.fuses_decode_attention(torch.randn(2, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16))
    assert not ops_bagel.has_varlen_kernel(x)
    assert ops_bagel.computes_in_float32(w) and ops_bagel.computes_in_float32(w.half())
    assert not ops_bagel.computes_in_float32(w.float())
    assert not ops_bagel.trains_master_weights(x.float(), nn.Parameter(w.float()))  # CPU: autocast's own
    group = AttentionPlan.segments([2048], [2048]).groups[0]
    q = torch.randn(2048, 2, 16)
    assert ops_bagel.prefers_cudnn(q, group) == ops_bagel._SDPA_HAS_PRIORITY  # inference, one long segment
    assert not ops_bagel.prefers_cudnn(q.requires_grad_(), group)  # training: one varlen call
    assert not ops_bagel.prefers_cudnn(q, AttentionPlan.segments([2048], [2048], causal=True).groups[0])


def test_rms_norm_op_matches_the_formula_and_adds_the_residual():
    norm = Qwen2RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 16))
    x, residual = torch.randn(5, 16), torch.randn(5, 16)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert_close(norm(x), expected, 1e-6)
    total, normed = norm(x, residual=residual)
    assert torch.equal(total, residual + x)
    assert_close(normed, norm(residual + x), 1e-6)


# ----------------------------------------------------------------------------------------------
# attn_implementation
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager_model(parity):
    model = BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    return model


def _special(parity) -> SpecialTokenIds:
    s = parity.meta["special_token_ids"]
    return SpecialTokenIds(s["bos_token_id"], s["eos_token_id"], s["start_of_image"], s["end_of_image"])


def _count(monkeypatch, name: str) -> list:
    calls, original = [], getattr(ops_bagel, name)
    monkeypatch.setattr(ops_bagel, name, lambda *args: calls.append(1) or original(*args))
    return calls


def test_eager_reproduces_the_parity_fixtures_and_sdpa(parity, eager_model, tiny_model, monkeypatch):
    """Under "eager" the training forward (ViT, both decoder sides, CE and MSE) and a chat (prefill
    over a cached image, then the decode step) match the reference to the parity tolerance and the
    "sdpa" model to float tolerance, and every attention ran the eager kernels."""
    eager_calls, sdpa_calls = _count(monkeypatch, "eager_per_segment"), _count(monkeypatch, "sdpa_per_segment")
    with torch.no_grad():
        eager = eager_model(**parity.train_batch(), output_hidden_states=True)
    layers = eager_model.config.text_config.num_hidden_layers + eager_model.config.vision_config.num_hidden_layers
    assert len(eager_calls) >= layers and sdpa_calls == []
    with torch.no_grad():
        sdpa = tiny_model(**parity.train_batch(), output_hidden_states=True)
    assert sdpa_calls and len(eager_calls) >= layers  # the sdpa model took SDPA, not eager
    for name in ("ce", "mse", "last_hidden_state"):
        assert_close(eager[name], parity.expected["train." + name], 1e-4, "eager train." + name)
        assert_close(eager[name], sdpa[name], 1e-5, "eager vs sdpa " + name)

    case, special = parity.meta["cases"]["chat"], _special(parity)
    decode_calls = _count(monkeypatch, "eager_attention")
    ctx = eager_model.add_vit_images(eager_model.new_context(1), [parity.inputs["chat.image"]], special)
    ctx = eager_model.add_text_tokens(ctx, [case["prompt_ids"]], special)
    ids, logits = eager_model.generate_text_ids(ctx, special, max_length=case["max_new_tokens"], return_logits=True)
    assert ids == [parity.expected["chat.generated_ids"].tolist()]
    assert_close(logits[0], parity.expected["chat.step_logits"], 1e-4, "eager chat.step_logits")
    layers = eager_model.config.text_config.num_hidden_layers
    assert decode_calls and len(decode_calls) % layers == 0  # every layer of every decode step


def test_eager_reproduces_the_t2i_parity_fixture(parity, eager_model, monkeypatch):
    """Text-to-image under "eager": the guided denoising (three cached contexts, full attention
    over the latent tokens) gives the reference's latent tokens."""
    case, special = parity.meta["cases"]["t2i"], _special(parity)
    params = parity.guidance_params("t2i")
    sdpa_calls = _count(monkeypatch, "sdpa_per_segment")
    full = eager_model.add_text_tokens(eager_model.new_context(1), [case["prompt_ids"]], special)
    noise = [parity.inputs["t2i.init_noise"]]
    hw = [tuple(case["image_hw"])]
    latents = eager_model.generate_latents(
        full, eager_model.new_context(1), full, hw, special, params, init_noise=noise
    )
    assert sdpa_calls == []
    assert_close(latents[0], parity.expected["t2i.latent_tokens"], 1e-4, "eager t2i.latent_tokens")


def test_set_attn_implementation_switches_at_forward_time(parity, monkeypatch):
    """`model.set_attn_implementation` takes effect on the next forward, and a pooled decode step
    is not reused across implementations."""
    model = BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint)
    assert model.config._attn_implementation == "sdpa"
    kwargs = dict(parity.train_batch(), output_hidden_states=True)
    eager_calls = _count(monkeypatch, "eager_per_segment")
    with torch.no_grad():
        before = model(**kwargs)["last_hidden_state"]
        assert eager_calls == []
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        after = model(**kwargs)["last_hidden_state"]
        assert eager_calls
    assert_close(after, before, 1e-5)

    special, prompt = _special(parity), parity.meta["cases"]["chat"]["prompt_ids"]
    ctx = model.add_text_tokens(model.new_context(1), [prompt], special)
    eager_ids = model.generate_text_ids(ctx, special, max_length=4)
    model.set_attn_implementation("sdpa")
    assert model.generate_text_ids(ctx, special, max_length=4) == eager_ids
    attentions = {key[-1] for key in model._decode_pool().runners}
    assert attentions == {"eager", "sdpa"}


@pytest.mark.parametrize("value", ["flash_attention_2", "flex_attention", "paged|eager", "bogus", 3])
def test_other_attn_implementations_are_refused_by_name(parity, value):
    with pytest.raises(ValueError, match=r"attn_implementation=.*not supported by BAGEL.*'sdpa'.*'eager'"):
        BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint, attn_implementation=value)


def test_set_or_edited_attn_implementation_is_refused_by_name(parity, tiny_model):
    model = BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint)
    with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not supported by BAGEL"):
        model.set_attn_implementation("flex_attention")
    assert model.config._attn_implementation == "sdpa"  # unchanged
    model.config._attn_implementation_internal = "flash_attention_2"  # past transformers' checks
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2' is not supported by BAGEL"):
        with torch.no_grad():
            model(**parity.train_batch(), output_hidden_states=True)
    assert ops_bagel._ATTENTION.get() == "sdpa"  # nothing left set in this thread


def test_the_implementation_is_per_thread_and_reset_after_an_error(parity, eager_model):
    """A forward sets the implementation for its own thread only, and leaves it as it found it,
    also when the forward fails."""
    seen, inside = [], threading.Event()
    release = threading.Event()

    def hold(q, k, v, group):  # called inside the eager model's forward
        inside.set()
        release.wait(timeout=30)
        return sdpa_per_segment(q, k, v, group)

    def other_thread():
        inside.wait(timeout=30)
        seen.append(ops_bagel._ATTENTION.get())
        release.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    original = ops_bagel.eager_per_segment
    ops_bagel.eager_per_segment = hold
    try:
        with torch.no_grad():
            eager_model(**parity.train_batch(), output_hidden_states=True)
    finally:
        ops_bagel.eager_per_segment = original
    thread.join()
    assert seen == ["sdpa"]

    def fail(*args):
        raise RuntimeError("a kernel failed")

    ops_bagel.eager_per_segment = fail
    try:
        with pytest.raises(RuntimeError, match="a kernel failed"), torch.no_grad():
            eager_model(**parity.train_batch(), output_hidden_states=True)
    finally:
        ops_bagel.eager_per_segment = original
    assert ops_bagel._ATTENTION.get() == "sdpa"


def test_eager_holds_in_the_recomputation_of_activation_checkpointing(parity, monkeypatch):
    """Checkpointed layers are recomputed in the backward, outside the model's forward: they run
    the model's implementation there too (SDPA there saved other tensors than eager, and the
    backward failed), and the gradients equal those without checkpointing."""
    model = BagelForUnifiedMultimodal.from_pretrained(parity.checkpoint, attn_implementation="eager").train()
    seen, original = [], ops_bagel._segment_attention
    monkeypatch.setattr(
        ops_bagel, "_segment_attention", lambda *a: seen.append(ops_bagel._ATTENTION.get()) or original(*a)
    )

    def gradients() -> dict:
        model.zero_grad(set_to_none=True)
        out = model(**parity.train_batch(), output_hidden_states=True)
        forward_calls = len(seen)
        (out["ce"].mean() + out["mse"].mean()).backward()
        assert ops_bagel._ATTENTION.get() == "sdpa"  # nothing left set
        return forward_calls, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    forward_calls, plain = gradients()
    assert len(seen) == forward_calls  # nothing recomputed
    model.gradient_checkpointing_enable()
    seen.clear()
    forward_calls, checkpointed = gradients()
    assert len(seen) == 2 * forward_calls and set(seen) == {"eager"}  # every layer recomputed, under eager
    assert plain.keys() == checkpointed.keys() and plain
    for name, grad in plain.items():
        assert_close(checkpointed[name], grad, 1e-6, name)


def test_und_only_route_runs_a_block_unrouted_only_when_nothing_is_detached():
    from bagel_remote.attention_bagel import TokenRoute

    assert TokenRoute(4).und_only
    assert not TokenRoute(4, torch.tensor([1])).und_only  # GEN tokens: routed
    assert not TokenRoute(4, run_gen=True).und_only  # GEN weights run on zero rows
    frozen = TokenRoute(4, freeze_und=True)
    assert not frozen.und_only  # autograd on: UND outputs are detached block by block
    with torch.no_grad():
        assert frozen.und_only
