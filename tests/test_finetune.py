"""Tests of fine-tuning: activation checkpointing, LoRA through PEFT, the training package's pieces
(examples/finetune.py's runs under torchrun on CPU ranks: test_finetune_runs.py; its config:
test_finetune_config.py)."""

from __future__ import annotations

import sys

import pytest
import torch
from bagel_remote.modeling_bagel import BagelForUnifiedMultimodal
from bagel_remote.training.config import ConfigError, load_config
from bagel_remote.training.model import (
    apply_freezing,
    checkpoint_reader,
    enable_activation_checkpointing,
    is_und_param,
    lora_config,
    materialize,
)
from bagel_remote.training.optim import build_optimizer, warmup_cosine
from test_modeling import JOINT_PACK, make_batch, tiny_model

peft = pytest.importorskip("peft")


def trained_model(seed=0):
    """A tiny stage-2 model whose generation head is not zero (so MSE gradients reach the decoder)."""
    model = tiny_model(stage=2, seed=seed, vit_rope=True).train()
    with torch.no_grad():
        model.model.llm2vae.weight.normal_(0, 0.02)
    return model


def loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    loss = out["ce"].mean() + out["mse"].mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------------


def test_activation_checkpointing_same_loss_and_gradients():
    model = trained_model()
    batch = make_batch(model.config, JOINT_PACK)
    loss, grads = loss_and_grads(model, batch)

    calls = {"decoder": 0, "vit": 0}
    # pre-hooks: a recomputation stops as soon as it has what the backward needs, maybe mid-module
    model.model.language_model.model.layers[0].mlp.register_forward_pre_hook(
        lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1)
    )
    model.model.vit_model.vision_model.encoder.layers[0].mlp.register_forward_pre_hook(
        lambda *_: calls.__setitem__("vit", calls["vit"] + 1)
    )
    model.gradient_checkpointing_enable()
    loss_ckpt, grads_ckpt = loss_and_grads(model, batch)
    # each layer runs once forward and once more when the backward recomputes it
    assert calls == {"decoder": 2, "vit": 2}
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 50
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0, msg=name)

    model.gradient_checkpointing_disable()
    calls.update(decoder=0, vit=0)
    loss_and_grads(model, batch)
    assert calls == {"decoder": 1, "vit": 1}


def test_checkpointing_a_fraction_of_the_layers():
    """`activation_checkpointing: 0.5` recomputes the first of each stack's two layers only, with
    the plain gradients; true / false / bad values."""
    model = trained_model()
    batch = make_batch(model.config, JOINT_PACK)
    loss, grads = loss_and_grads(model, batch)
    decoder, vit = model.model.language_model.model.layers, model.model.vit_model.vision_model.encoder.layers
    calls = {}
    for name, stack in (("decoder", decoder), ("vit", vit)):
        for index, layer in enumerate(stack):
            key = f"{name}{index}"
            calls[key] = 0
            layer.mlp.register_forward_pre_hook(lambda *_, key=key: calls.__setitem__(key, calls[key] + 1))
    enable_activation_checkpointing(model, 0.5)
    loss_ckpt, grads_ckpt = loss_and_grads(model, batch)
    assert calls == {"decoder0": 2, "decoder1": 1, "vit0": 2, "vit1": 1}
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=0, atol=0, msg=name)

    flags = lambda: [layer.gradient_checkpointing for layer in [*decoder, *vit]]  # noqa: E731
    enable_activation_checkpointing(model, True)
    assert flags() == [True] * 4
    fresh = trained_model()
    enable_activation_checkpointing(fresh, False)
    assert not any(layer.gradient_checkpointing for layer in fresh.model.language_model.model.layers)
    for bad in (1.5, -0.1, "yes"):
        with pytest.raises(ConfigError, match="activation_checkpointing=.*a fraction of the layers"):
            enable_activation_checkpointing(fresh, bad)


def test_checkpointing_keeps_freeze_und_detach():
    model = trained_model()
    model.config.text_config.freeze_und = True
    model.gradient_checkpointing_enable()
    _, grads = loss_and_grads(model, make_batch(model.config, JOINT_PACK))
    layer = "model.language_model.model.layers.0."
    assert layer + "self_attn.q_proj.weight" not in grads  # UND outputs detached, recomputed too
    assert grads[layer + "self_attn.q_proj_moe_gen.weight"].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# always_run: every part in the graph, whatever the pack holds (ranks with different packs)
# ----------------------------------------------------------------------------------------------

ALL_PARTS = ("vit", "gen", "ce", "mse")


PACKS_MISSING_PARTS = {
    "text": [[("text", 5)]],  # no image: no ViT, no GEN tokens, no MSE
    "t2i": [[("noised", (2, 2)), ("text", 3)]],  # no ViT
    "und": [[("vit", (2, 2)), ("text", 4)]],  # no GEN tokens, no MSE
    "clean": [[("clean", (2, 2)), ("text", 4)]],  # GEN tokens, no MSE, no ViT
}


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs CUDA (the float32-master-weight path under bf16 autocast)"
            ),
        ),
    ],
)
@pytest.mark.parametrize("freeze_und", [False, True])
def test_always_run_gives_every_trained_weight_a_gradient_and_changes_nothing(device, freeze_und):
    """Packs without ViT images, latents, CE or MSE: with `always_run` those parts still run (on
    zero tokens, the ViT on one patch times zero), so every trained weight gets a gradient, zero
    where the pack has nothing for it; the outputs are the pack's alone, the other gradients too
    (to rounding: an empty GEN side joins the UND one, so q/k/v are laid out anew)."""
    model = trained_model().to(device)
    model.config.text_config.freeze_und = freeze_und
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")
    tolerance = (
        {"out": dict(rtol=0, atol=0), "grad": dict(rtol=1e-4, atol=1e-6)}
        if device == "cpu"
        else {"out": dict(rtol=2e-2, atol=2e-2), "grad": dict(rtol=5e-2, atol=1e-3)}
    )
    trained = {
        n
        for n, p in model.named_parameters()
        if p.requires_grad and not n.startswith("vae.") and not (freeze_und and is_und_param(n))
    }

    def run(batch, **kwargs):
        model.zero_grad(set_to_none=True)
        with autocast:
            out = model(**batch, **kwargs)
        loss = sum(v.float().sum() for v in out.values() if v is not None)
        if loss.requires_grad:
            loss.backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    for kind, pack in PACKS_MISSING_PARTS.items():
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in make_batch(model.config, pack).items()}
        plain, plain_grads = run(batch)
        out, grads = run(batch, always_run=ALL_PARTS)
        for key, value in plain.items():  # bf16 on CUDA: kernels may pick other blockings for the new layout
            if value is not None:
                torch.testing.assert_close(out[key], value, **tolerance["out"], msg=f"{kind} {key}")
        assert out["ce"] is not None and out["mse"] is not None  # (0,) where the pack has none
        assert trained <= grads.keys(), (kind, sorted(trained - grads.keys())[:5])
        for name, grad in grads.items():
            assert torch.isfinite(grad).all(), (kind, name)
            if name in plain_grads:
                torch.testing.assert_close(grad, plain_grads[name], **tolerance["grad"], msg=f"{kind} {name}")
            else:
                assert not grad.any(), (kind, name)
    with pytest.raises(ValueError, match="always_run=\\['bogus'\\]: use parts among"):
        model(**batch, always_run=["bogus"])


# ----------------------------------------------------------------------------------------------
# LoRA through PEFT
# ----------------------------------------------------------------------------------------------

LORA_CFG = {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0}


@pytest.mark.parametrize("sides", [["und"], ["gen"], ["und", "gen"]])
def test_lora_targets_the_chosen_sides(sides):
    model = peft.get_peft_model(trained_model(), lora_config({**LORA_CFG, "lora_sides": sides}))
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "lora_A")}
    und = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    gen = {"q_proj_moe_gen", "k_proj_moe_gen", "v_proj_moe_gen", "o_proj_moe_gen"}
    expected = (und if "und" in sides else set()) | (gen if "gen" in sides else set())
    if sides == ["gen"]:
        expected |= {"gate_proj", "up_proj", "down_proj"}  # under mlp_moe_gen
    assert wrapped == expected
    vit = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "vit_model" in n]
    assert vit == []  # the ViT's q/k/v are not BAGEL's UND projections
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_lora_trains_only_adapters_and_merge_gives_unmerged_outputs():
    model = trained_model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapted = peft.get_peft_model(model, lora_config({**LORA_CFG, "lora_sides": ["und", "gen"]}))
    batch = make_batch(model.config, JOINT_PACK)
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        _, grads = loss_and_grads(model, batch)
        assert grads and all("lora_" in n for n in grads)
        optimizer.step()
    for name, param in model.named_parameters():  # base weights untouched, B moved off zero
        if "lora_" not in name:
            assert torch.equal(param, base[name.replace(".base_layer", "")]), name
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)

    model.eval()
    with torch.no_grad():
        unmerged = model(**batch, output_hidden_states=True)
        assert not torch.allclose(
            unmerged["last_hidden_state"], _fresh_outputs(base, model.config, batch)["last_hidden_state"]
        )
        merged_model = adapted.merge_and_unload()
        assert not any(hasattr(m, "lora_A") for m in merged_model.modules())
        merged = merged_model(**batch, output_hidden_states=True)
    for key in ("ce", "mse", "last_hidden_state"):
        torch.testing.assert_close(merged[key], unmerged[key], rtol=1e-5, atol=1e-5)


def _fresh_outputs(state, config, batch):
    model = BagelForUnifiedMultimodal(config).eval()
    model.load_state_dict(state)
    return model(**batch, output_hidden_states=True)


# ----------------------------------------------------------------------------------------------
# The training package's pieces (examples/finetune.py's runs under torchrun: test_finetune_runs.py)
# ----------------------------------------------------------------------------------------------


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(["lr=3e-4", "lora_sides=[und]", "freeze_vit=true"])
    assert cfg["lr"] == 3e-4 and cfg["lora_sides"] == ["und"] and cfg["freeze_vit"] is True
    with pytest.raises(ConfigError, match="lrr: unknown key"):
        load_config(["lrr=1"])
    factor = warmup_cosine({"warmup_steps": 4, "max_steps": 14, "min_lr_ratio": 0.1})
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(9) == pytest.approx(0.55) and factor(14) == pytest.approx(0.1)


def test_optimizer_choice(monkeypatch):
    """`optimizer`: torch's AdamW, torchao's AdamW8bit (lazily imported, a clear error without
    torchao), anything else refused."""
    cfg = load_config(["lr=3e-4", "weight_decay=0.1", "betas=[0.8,0.9]", "eps=1e-6"])
    params = [torch.nn.Parameter(torch.zeros(3))]
    adamw = build_optimizer(cfg, params)
    assert type(adamw) is torch.optim.AdamW and not adamw.defaults["fused"]  # fused on CUDA only
    assert (adamw.defaults["lr"], adamw.defaults["weight_decay"], adamw.defaults["betas"]) == (3e-4, 0.1, (0.8, 0.9))

    class FakeAdamW8bit:
        def __init__(self, params, **kwargs):
            self.params, self.kwargs = params, kwargs

    fake = type(sys)("torchao.optim")
    fake.AdamW8bit = FakeAdamW8bit
    monkeypatch.setitem(sys.modules, "torchao.optim", fake)
    eight_bit = build_optimizer({**cfg, "optimizer": "adamw8bit"}, params)
    assert eight_bit.params is params
    assert eight_bit.kwargs == {"lr": 3e-4, "betas": (0.8, 0.9), "eps": 1e-6, "weight_decay": 0.1}

    monkeypatch.setitem(sys.modules, "torchao.optim", None)  # as if torchao were not installed
    with pytest.raises(ConfigError, match="needs torchao.*pip install torchao"):
        build_optimizer({**cfg, "optimizer": "adamw8bit"}, params)
    with pytest.raises(ConfigError, match="optimizer='sgd': use adamw or adamw8bit"):
        build_optimizer({**cfg, "optimizer": "sgd"}, params)


def test_freeze_switches():
    model = trained_model()
    base = {"freeze_vit": False, "freeze_und": False, "freeze_llm": False}
    trainable = lambda m: {n for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731

    apply_freezing(model, base)
    everything = trainable(model)
    assert not any(n.startswith("vae.") for n in everything)  # the VAE never trains

    model = trained_model()
    apply_freezing(model, {**base, "freeze_und": True})
    assert model.config.text_config.freeze_und
    left = trainable(model)
    assert left and all(
        "_moe_gen" in n or n.startswith(("model.time_embedder", "model.vae2llm", "model.llm2vae")) for n in left
    )

    model = trained_model()
    apply_freezing(model, {**base, "freeze_vit": True, "freeze_llm": True})
    left = trainable(model)
    assert left and not any(n.startswith(("model.vit_model", "model.language_model")) for n in left)
    assert any(n.startswith("model.connector") for n in left)


def test_trainer_fills_its_weights_through_the_adapters_reader(tmp_path, tensor_reads):
    """The trainer's weights come from state_dict_adapter's reader, one tensor read once each: a
    plain model equals `from_pretrained`'s, a LoRA-wrapped one reads its base layers under the
    wrapped names and starts as the identity (B = 0)."""
    from bagel_remote.loading_bagel import config_from_directory
    from make_tiny_checkpoint import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path / "checkpoint")
    expected = BagelForUnifiedMultimodal.from_pretrained(checkpoint).state_dict()
    tensor_reads.clear()
    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(config_from_directory(checkpoint))
    with checkpoint_reader(checkpoint) as reader:
        missing = materialize(model, model, torch.device("cpu"), reader, "")
    assert missing == [] and model.state_dict().keys() == expected.keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert sorted(tensor_reads) == sorted(set(tensor_reads)) and len(tensor_reads) == len(expected)

    with torch.device("meta"):
        model = BagelForUnifiedMultimodal(config_from_directory(checkpoint))
    peft.get_peft_model(model, lora_config({**LORA_CFG, "lora_sides": ["und"]}))
    with checkpoint_reader(checkpoint) as reader:
        assert materialize(model, model, torch.device("cpu"), reader, "") == []
    q_proj = model.model.language_model.model.layers[0].self_attn.q_proj
    assert torch.equal(
        q_proj.base_layer.weight, expected["model.language_model.model.layers.0.self_attn.q_proj.weight"]
    )
    assert not q_proj.lora_B["default"].weight.any() and q_proj.lora_A["default"].weight.any()

    with pytest.raises(FileNotFoundError, match="has no ema.safetensors: not a BAGEL checkpoint directory"):
        checkpoint_reader(tmp_path)
