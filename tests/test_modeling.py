"""Tests of the BAGEL model (modeling_bagel.py, modeling_siglip_navit.py, layers_bagel.py, attention_bagel.py).

Parity tests reproduce the reference outputs of the tiny-a fixture (`parity` fixture); every other
test builds a tiny random config here and runs without the fixtures.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bagel_remote.attention_bagel import AttentionPlan, TokenRoute
from bagel_remote.configuration_bagel import BagelConfig
from bagel_remote.kernels_bagel import apply_rotary
from bagel_remote.layers_bagel import Linear, rotary_cos_sin
from bagel_remote.modeling_bagel import (
    BagelForUnifiedMultimodal,
    BagelModel,
    Qwen2RMSNorm,
    _convert_patch_embedding_for_packed_vit,
    sincos_2d,
)
from bagel_remote.modeling_siglip_navit import SiglipRotary2D, SiglipVisionEmbeddings, apply_rotary_2d
from bagel_remote.ops_bagel import packed_attention
from bagel_remote.state_dict_adapter import load_bagel_checkpoint_state_dict
from conftest import TINY_VAE_CONFIG, assert_close

START, END = 12, 13  # <|vision_start|>, <|vision_end|> ids (as in the fixture); the tiny vocab holds them
GEN_MARKERS = ("_moe_gen", "time_embedder", "vae2llm", "llm2vae", "latent_pos_embed")


# ----------------------------------------------------------------------------------------------
# Tiny random model and a synthetic packed batch
# ----------------------------------------------------------------------------------------------


def tiny_config(stage=2, vit_rope=False, **kwargs) -> BagelConfig:
    llm = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        pad_token_id=0,
    )
    # 3 layers as released: the reference overrides drop the last one (vit_select_layer=-2).
    vit = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        patch_size=14,
        image_size=56,
        num_channels=3,
        hidden_act="gelu_pytorch_tanh",
        layer_norm_eps=1e-6,
    )
    return BagelConfig(
        llm_config=llm,
        vit_config=vit,
        vae_config=dict(TINY_VAE_CONFIG),
        max_latent_size=8,
        vit_max_num_patch_per_side=4,
        stage=stage,
        vit_rope=vit_rope,
        **kwargs,
    )


def tiny_model(stage=2, seed=0, **kwargs) -> BagelForUnifiedMultimodal:
    torch.manual_seed(seed)
    return BagelForUnifiedMultimodal(tiny_config(stage=stage, **kwargs))


def make_batch(config: BagelConfig, samples, seed: int = 0) -> dict:
    """Training-forward kwargs for a pack of `samples`, each a list of splits:
    ("text", n) causal text with CE on its next tokens; ("vit", (h, w)) a ViT image `full` split;
    ("clean", (h, w)) a clean VAE image (`full`, t=-inf); ("noised", (h, w)) a noised VAE image
    (`noise` split, MSE). Image splits are [start] tokens [end] at one rope position."""
    g = torch.Generator().manual_seed(seed)
    p, side, lat_side = config.vit_patch_size, config.vit_max_num_patch_per_side, config.max_latent_size
    lp, z, vocab = config.latent_patch_size, int(config.vae_config["z_channels"]), config.text_config.vocab_size
    b = {
        k: []
        for k in (
            "text_ids",
            "text_idx",
            "pos",
            "vit_tok",
            "vit_idx",
            "vit_pos",
            "vit_lens",
            "latents",
            "shapes",
            "lat_pos",
            "vae_idx",
            "t",
            "mse",
            "ce",
            "labels",
            "splits",
            "modes",
            "samples",
        )
    }
    cur = 0

    def text(token, pos):
        nonlocal cur
        b["text_ids"].append(token), b["text_idx"].append(cur), b["pos"].append(pos)
        cur += 1

    for sample in samples:
        sample_start, pos = cur, 0
        for kind, arg in sample:
            split_start = cur
            if kind == "text":
                ids = torch.randint(14, vocab, (arg,), generator=g).tolist()
                for i, token in enumerate(ids):
                    if i + 1 < len(ids):
                        b["ce"].append(cur), b["labels"].append(ids[i + 1])
                    text(token, pos)
                    pos += 1
                mode = "causal"
            else:
                h, w = arg
                n = h * w
                text(START, pos)
                if kind == "vit":
                    b["vit_tok"].append(torch.randn(n, 3 * p * p, generator=g))
                    b["vit_idx"] += range(cur, cur + n)
                    b["vit_pos"] += [r * side + c for r in range(h) for c in range(w)]
                    b["vit_lens"].append(n)
                    mode = "full"
                else:
                    b["latents"].append(torch.randn(z, h * lp, w * lp, generator=g))
                    b["shapes"].append((h, w))
                    b["vae_idx"] += range(cur, cur + n)
                    b["lat_pos"] += [r * lat_side + c for r in range(h) for c in range(w)]
                    if kind == "clean":
                        b["t"] += [-math.inf] * n
                        mode = "full"
                    else:
                        b["t"] += [torch.randn((), generator=g).item()] * n
                        b["mse"] += range(cur, cur + n)
                        mode = "noise"
                b["pos"] += [pos] * n
                cur += n
                text(END, pos)
                if kind != "noised":  # a noised image being generated does not advance the position
                    pos += 1
            b["splits"].append(cur - split_start), b["modes"].append(mode)
        b["samples"].append(cur - sample_start)

    long = lambda x: torch.tensor(x, dtype=torch.long)
    out = dict(
        sequence_length=cur,
        sample_lens=b["samples"],
        split_lens=b["splits"],
        attn_modes=b["modes"],
        packed_text_ids=long(b["text_ids"]),
        packed_text_indexes=long(b["text_idx"]),
        packed_position_ids=long(b["pos"]),
    )
    if b["vit_tok"]:
        out.update(
            packed_vit_tokens=torch.cat(b["vit_tok"]),
            packed_vit_token_indexes=long(b["vit_idx"]),
            packed_vit_position_ids=long(b["vit_pos"]),
            vit_token_seqlens=torch.tensor(b["vit_lens"], dtype=torch.int32),
        )
    if b["latents"]:
        hmax = max(x.shape[1] for x in b["latents"])
        wmax = max(x.shape[2] for x in b["latents"])
        padded = torch.stack([F.pad(x, (0, wmax - x.shape[2], 0, hmax - x.shape[1])) for x in b["latents"]])
        out.update(
            padded_latent=padded,
            patchified_vae_latent_shapes=b["shapes"],
            packed_latent_position_ids=long(b["lat_pos"]),
            packed_vae_token_indexes=long(b["vae_idx"]),
            packed_timesteps=torch.tensor(b["t"]),
            packed_noise=torch.randn(len(b["vae_idx"]), lp * lp * z, generator=g),
        )
        if b["mse"]:
            out["mse_loss_indexes"] = long(b["mse"])
    if b["ce"]:
        out.update(ce_loss_indexes=long(b["ce"]), packed_label_ids=long(b["labels"]))
    return out


JOINT_PACK = [
    [("clean", (2, 2)), ("text", 5), ("noised", (2, 3))],
    [("vit", (2, 2)), ("text", 6)],
]


@pytest.fixture(scope="module")
def tiny_stage2():
    return tiny_model(stage=2).eval()


# ----------------------------------------------------------------------------------------------
# 1. Parity with the reference (tiny-a fixture)
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parity_model(parity):
    cfg = BagelConfig.from_pretrained(parity.checkpoint)
    model = BagelForUnifiedMultimodal(cfg).eval()
    state = load_bagel_checkpoint_state_dict(parity.checkpoint, stage=2)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert [k for k in missing if not k.startswith("vae.")] == [], "only VAE weights may be missing"
    assert list(unexpected) == []
    return model


def test_parity_vit(parity, parity_model):
    vi = parity.case_inputs("vit")
    model = parity_model.model
    with torch.no_grad():
        vit_out = model.vit_model(vi["packed_pixel_values"], vi["packed_flattened_position_ids"], vi["cu_seqlens"])
        connector_out = model.connector(vit_out)
        embeddings = model.embed_vit_tokens(
            vi["packed_pixel_values"], vi["packed_flattened_position_ids"], torch.diff(vi["cu_seqlens"])
        )
    assert_close(vit_out, parity.expected["vit.vit_output"], 1e-4, "vit_output")
    assert_close(connector_out, parity.expected["vit.connector_output"], 1e-4, "connector_output")
    assert_close(embeddings, parity.expected["vit.embeddings"], 1e-4, "embeddings")


def test_parity_train(parity, parity_model):
    with torch.no_grad():
        out = parity_model(**parity.train_batch(), output_hidden_states=True)
    for name in ("ce", "mse", "last_hidden_state"):
        assert_close(out[name], parity.expected["train." + name], 1e-4, "train." + name)
    assert out["ce"].dtype == torch.float32 and out["mse"].dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# 2. Stage 1: understanding only
# ----------------------------------------------------------------------------------------------


def test_stage1_builds_und_only_and_reproduces_ce(parity):
    cfg = BagelConfig.from_pretrained(parity.checkpoint, stage=1)
    assert cfg.stage == 1 and cfg.visual_gen is False
    model = BagelForUnifiedMultimodal(cfg).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not [n for n in names if any(m in n for m in GEN_MARKERS)], "stage 1 must build no GEN weights"
    assert model.vae is None and not [n for n in names if n.startswith("vae.")]
    state = load_bagel_checkpoint_state_dict(parity.checkpoint, stage=1)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert list(missing) == [] and list(unexpected) == []

    # Sample 2 of the train case alone: a ViT image (`full`) then text with CE (`causal`).
    with torch.no_grad():
        out = model(**parity.understanding_batch())
    assert out["mse"] is None
    assert_close(out["ce"], parity.expected["train.ce"], 1e-4, "stage-1 ce")


# ----------------------------------------------------------------------------------------------
# 3. Gradients and freeze_und
# ----------------------------------------------------------------------------------------------

UND_NAMES = ["layers.0.self_attn.q_proj.weight", "layers.0.mlp.gate_proj.weight", "layers.1.self_attn.k_proj.weight"]
GEN_NAMES = [
    "layers.0.self_attn.q_proj_moe_gen.weight",
    "layers.0.mlp_moe_gen.gate_proj.weight",
    "layers.1.self_attn.k_proj_moe_gen.weight",
]


def _decoder_grads(model, batch):
    out = model(**batch)
    (out["ce"].mean() + out["mse"].mean()).backward()
    decoder = model.model.language_model.model
    return {n: p.grad for n, p in decoder.named_parameters()}


def _nonzero(grad) -> bool:
    return grad is not None and bool(grad.abs().sum() > 0)


def test_gradients_reach_und_and_gen_weights():
    model = tiny_model(stage=2)
    nn.init.normal_(model.model.llm2vae.weight, std=0.02)  # zero-initialised head would block the MSE gradient
    grads = _decoder_grads(model.train(), make_batch(model.config, JOINT_PACK))
    for name in UND_NAMES + GEN_NAMES:
        assert _nonzero(grads[name]), f"{name} got no gradient"
    assert _nonzero(model.model.vae2llm.weight.grad) and _nonzero(model.model.time_embedder.mlp[0].weight.grad)
    assert _nonzero(model.model.connector.fc1.weight.grad)


def test_freeze_und_blocks_und_gradients_only():
    model = tiny_model(stage=2)
    model.config.text_config.freeze_und = True
    nn.init.normal_(model.model.llm2vae.weight, std=0.02)
    grads = _decoder_grads(model.train(), make_batch(model.config, JOINT_PACK))
    und = {n: g for n, g in grads.items() if "_moe_gen" not in n and n.startswith("layers.")}
    assert und and all(g is None or not bool(g.abs().sum() > 0) for g in und.values()), [
        n for n, g in und.items() if _nonzero(g)
    ]
    for name in GEN_NAMES:
        assert _nonzero(grads[name]), f"{name} got no gradient with freeze_und"


def test_fresh_model_mse_gradient_stops_at_zero_head():
    """llm2vae starts at exactly zero, so the MSE alone sends no gradient upstream (but trains the head)."""
    model = tiny_model(stage=2).train()
    out = model(**make_batch(model.config, JOINT_PACK))
    out["mse"].mean().backward()
    assert _nonzero(model.model.llm2vae.weight.grad)
    q_gen = model.model.language_model.model.layers[0].self_attn.q_proj_moe_gen.weight.grad
    assert q_gen is None or not bool(q_gen.abs().sum() > 0)


def test_token_route_groups_tokens_and_applies_each_side():
    """GEN rows scattered through the pack: sort puts UND rows first, each side in packed order;
    routed ops see only their side; unsort restores packed order exactly."""
    x = torch.randn(9, 4)
    gen_index = torch.tensor([7, 1, 2, 5])
    route = TokenRoute(9, gen_index)
    sorted_x = route.sort(x)
    assert route.num_und == 5
    assert torch.equal(sorted_x, x[[0, 3, 4, 6, 8, 1, 2, 5, 7]])
    out = route.unsort(route(sorted_x, lambda t: t + 100, lambda t: -t))
    is_gen = torch.zeros(9, dtype=torch.bool)
    is_gen[gen_index] = True
    assert torch.equal(out, torch.where(is_gen[:, None], -x, x + 100))
    # a block with several outputs: each is joined over both sides
    doubled, first = route(sorted_x, lambda t: (2 * t, t[:, :1]), lambda t: (-2 * t, -t[:, :1]))
    assert torch.equal(route.unsort(doubled), 2 * torch.where(is_gen[:, None], -x, x))
    assert torch.equal(route.unsort(first), torch.where(is_gen[:, None], -x, x)[:, :1])
    assert TokenRoute(9).sort(x) is x  # no GEN tokens: nothing moves
    with pytest.raises(ValueError, match="stage-1"):
        route(sorted_x, lambda t: t, None)


# ----------------------------------------------------------------------------------------------
# 4. bf16
# ----------------------------------------------------------------------------------------------


def test_bf16_training_forward():
    model = tiny_model(stage=2).to(torch.bfloat16)
    nn.init.normal_(model.model.llm2vae.weight, std=0.02)
    batch = make_batch(model.config, JOINT_PACK)
    out = model(**batch, output_hidden_states=True)
    assert out["ce"].dtype == torch.float32 and out["mse"].dtype == torch.float32
    assert out["ce"].shape == batch["ce_loss_indexes"].shape
    assert out["mse"].shape == (batch["mse_loss_indexes"].shape[0], 64)
    assert out["last_hidden_state"].dtype == torch.bfloat16
    for name in ("ce", "mse", "last_hidden_state"):
        assert torch.isfinite(out[name]).all(), name
    (out["ce"].mean() + out["mse"].mean()).backward()
    assert _nonzero(model.model.language_model.model.layers[0].mlp_moe_gen.up_proj.weight.grad)


# ----------------------------------------------------------------------------------------------
# Training forward: sample isolation and noise invisibility at the model level
# ----------------------------------------------------------------------------------------------


def test_training_forward_noise_split_and_samples_isolated(tiny_stage2):
    pack = [
        [("text", 4), ("noised", (2, 2)), ("text", 5)],
        [("vit", (2, 3)), ("text", 4)],
    ]
    batch = make_batch(tiny_stage2.config, pack, seed=1)
    with torch.no_grad():
        base = tiny_stage2(**batch, output_hidden_states=True)["last_hidden_state"]
        # Other noise on the noised image: nothing outside the noise split may change.
        other_noise = dict(batch, packed_noise=torch.randn_like(batch["packed_noise"]))
        changed = tiny_stage2(**other_noise, output_hidden_states=True)["last_hidden_state"]
        # Other pixels in sample 2: nothing in sample 1 may change.
        other_vit = dict(batch, packed_vit_tokens=torch.randn_like(batch["packed_vit_tokens"]))
        changed_vit = tiny_stage2(**other_vit, output_hidden_states=True)["last_hidden_state"]
    vae = batch["packed_vae_token_indexes"]
    outside = torch.ones(batch["sequence_length"], dtype=torch.bool)
    outside[vae.min() - 1 : vae.max() + 2] = False  # the noise split: start, latents, end
    assert not torch.allclose(changed[vae], base[vae])
    torch.testing.assert_close(changed[outside], base[outside], rtol=0, atol=1e-6)
    n1 = batch["sample_lens"][0]
    torch.testing.assert_close(changed_vit[:n1], base[:n1], rtol=0, atol=1e-6)
    assert not torch.allclose(changed_vit[n1:], base[n1:])


def test_timestep_shift_applied_after_sigmoid(tiny_stage2):
    """With timestep_shift s the forward uses t = s*t0 / (1 + (s-1)*t0), t0 = sigmoid(raw): the same as
    shift 1 fed with raw' = logit(t)."""
    batch = make_batch(tiny_stage2.config, JOINT_PACK, seed=3)
    raw = batch["packed_timesteps"]
    s = 3.0
    t0 = torch.sigmoid(raw.double())
    shifted = s * t0 / (1 + (s - 1) * t0)
    equivalent = torch.logit(shifted).float()  # -inf stays -inf (t = 0)
    assert torch.isinf(equivalent).sum() == torch.isinf(raw).sum()
    config = tiny_stage2.config
    assert config.timestep_shift == 1.0
    with torch.no_grad():
        reference = tiny_stage2(**dict(batch, packed_timesteps=equivalent), output_hidden_states=True)
        config.timestep_shift = s
        try:
            out = tiny_stage2(**batch, output_hidden_states=True)
        finally:
            config.timestep_shift = 1.0
        unshifted = tiny_stage2(**batch, output_hidden_states=True)
    torch.testing.assert_close(out["last_hidden_state"], reference["last_hidden_state"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["mse"], reference["mse"], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out["last_hidden_state"], unshifted["last_hidden_state"], atol=1e-4)


# ----------------------------------------------------------------------------------------------
# 5. Attention-mask semantics
# ----------------------------------------------------------------------------------------------


def dense_mask(split_lens, attn_modes, sample_lens) -> torch.Tensor:
    """The reference's packed mask, built independently: mask[i, j] = query i may attend key j."""
    n = sum(sample_lens)
    sample_of = torch.repeat_interleave(torch.arange(len(sample_lens)), torch.tensor(sample_lens))
    split_of = torch.repeat_interleave(torch.arange(len(split_lens)), torch.tensor(split_lens))
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if sample_of[i] != sample_of[j]:
                continue
            si, sj = split_of[i].item(), split_of[j].item()
            if sj < si:
                mask[i, j] = attn_modes[sj] != "noise"
            elif sj == si:
                mask[i, j] = j <= i if attn_modes[si] == "causal" else True
    return mask


def dense_attention(q, k, v, mask) -> torch.Tensor:
    """q (N, H, D), k/v (N, Hkv, D), GQA as in Qwen2 (q head h uses kv head h // (H / Hkv))."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


def test_dense_mask_helper_semantics():
    # A sanity check of the reference mask itself, on a small hand-checked case.
    mask = dense_mask([2, 2, 1, 3], ["causal", "noise", "full", "full"], [5, 3])
    assert mask[1, 0] and not mask[0, 1]  # causal
    assert mask[2, 3] and mask[3, 2] and mask[2, 0]  # noise: full inside, sees earlier splits
    assert not mask[4, 2] and not mask[4, 3] and mask[4, 0]  # later split never sees noise
    assert not mask[5, 4] and not mask[4, 5] and mask[5, 7]  # no cross-sample attention


@pytest.mark.parametrize(
    "split_lens, attn_modes, sample_lens",
    [
        ([3, 4, 2, 3, 4, 5, 1], ["full", "causal", "causal", "noise", "causal", "full", "causal"], [7, 9, 6]),
        ([2, 5, 3, 4, 6], ["noise", "full", "causal", "noise", "noise"], [10, 4, 6]),
        ([8], ["causal"], [8]),
    ],
)
def test_packed_attention_matches_dense_mask(split_lens, attn_modes, sample_lens):
    g = torch.Generator().manual_seed(0)
    n = sum(sample_lens)
    q = torch.randn(n, 4, 8, generator=g)
    k = torch.randn(n, 2, 8, generator=g)
    v = torch.randn(n, 2, 8, generator=g)
    plan = AttentionPlan.from_splits(split_lens, attn_modes, sample_lens, torch.device("cpu"))
    out = packed_attention(q, k, v, plan)
    ref = dense_attention(q, k, v, dense_mask(split_lens, attn_modes, sample_lens))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


def test_plan_in_storage_order_reads_and_writes_rows_where_they_are():
    """Tokens stored permuted (as the decoder keeps them, UND rows first): the plan moved to that
    order gives the packed plan's output rows, permuted the same way."""
    g = torch.Generator().manual_seed(2)
    split_lens, attn_modes, sample_lens = [3, 4, 2, 3], ["full", "causal", "causal", "noise"], [7, 5]
    n = sum(sample_lens)
    q, k, v = torch.randn(n, 4, 8, generator=g), torch.randn(n, 2, 8, generator=g), torch.randn(n, 2, 8, generator=g)
    stored = torch.randperm(n, generator=g)  # storage row s holds packed row stored[s]
    position = torch.empty_like(stored)
    position[stored] = torch.arange(n)
    for plan in (
        AttentionPlan.from_splits(split_lens, attn_modes, sample_lens, torch.device("cpu")),
        AttentionPlan.segments([5, 7], causal=True),
    ):
        moved = packed_attention(q[stored], k[stored], v[stored], plan.in_storage_order(position))
        torch.testing.assert_close(moved, packed_attention(q, k, v, plan)[stored], rtol=0, atol=0)


def test_plan_from_offsets_matches_host_lengths():
    """Offsets with only an upper bound on the longest segment give the same attention."""
    g = torch.Generator().manual_seed(3)
    lens = [3, 6, 2]
    q, k, v = (torch.randn(sum(lens), 2, 8, generator=g) for _ in range(3))
    offsets = torch.tensor([0, 3, 9, 11], dtype=torch.int32)
    plan = AttentionPlan.from_offsets(offsets, max_len=11)
    assert plan.groups[0].max_q == 11
    torch.testing.assert_close(packed_attention(q, k, v, plan), packed_attention(q, k, v, AttentionPlan.segments(lens)))


def test_segments_causal_is_bottom_right_aligned():
    g = torch.Generator().manual_seed(1)
    q_lens, k_lens = [2, 3], [5, 4]
    q = torch.randn(sum(q_lens), 4, 8, generator=g)
    k = torch.randn(sum(k_lens), 2, 8, generator=g)
    v = torch.randn(sum(k_lens), 2, 8, generator=g)
    out = packed_attention(q, k, v, AttentionPlan.segments(q_lens, k_lens, causal=True))
    mask = torch.zeros(sum(q_lens), sum(k_lens), dtype=torch.bool)
    q0 = k0 = 0
    for ql, kl in zip(q_lens, k_lens):
        for i in range(ql):  # query i of the segment sees keys 0 .. i + (kl - ql): the whole cache
            mask[q0 + i, k0 : k0 + i + (kl - ql) + 1] = True
        q0, k0 = q0 + ql, k0 + kl
    torch.testing.assert_close(out.double(), dense_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
    # The non-causal version attends every key of its segment.
    full = packed_attention(q, k, v, AttentionPlan.segments(q_lens, k_lens, causal=False))
    block = torch.block_diag(*[torch.ones(ql, kl) for ql, kl in zip(q_lens, k_lens)]).bool()
    torch.testing.assert_close(full.double(), dense_attention(q, k, v, block), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# 6. Clear errors
# ----------------------------------------------------------------------------------------------


def test_error_text_index_lengths(tiny_stage2):
    batch = make_batch(tiny_stage2.config, JOINT_PACK)
    with pytest.raises(ValueError, match=r"packed_text_indexes must be a tensor of \d+ entries"):
        tiny_stage2(**dict(batch, packed_text_indexes=batch["packed_text_indexes"][:-1]))
    dropped = dict(
        batch, packed_text_indexes=batch["packed_text_indexes"][:-1], packed_text_ids=batch["packed_text_ids"][:-1]
    )
    with pytest.raises(ValueError, match="every packed position must be exactly one"):
        tiny_stage2(**dropped)
    with pytest.raises(ValueError, match=r"packed_position_ids must be a tensor of \d+ entries"):
        tiny_stage2(**dict(batch, packed_position_ids=batch["packed_position_ids"][:-1]))
    overlapping = batch["packed_text_indexes"].clone()
    overlapping[1] = overlapping[0]  # right counts, but one position twice and one never
    with pytest.raises(ValueError, match="exactly once"):
        tiny_stage2(**dict(batch, packed_text_indexes=overlapping))
    outside = batch["packed_text_indexes"].clone()
    outside[0] = batch["sequence_length"]  # past the end: an error, not an index fault
    with pytest.raises(ValueError, match=rf"packed_text_indexes must hold values in \[0, {outside[0] - 1}\]"):
        tiny_stage2(**dict(batch, packed_text_indexes=outside))


def test_error_vit_tokens_without_seqlens(tiny_stage2):
    batch = make_batch(tiny_stage2.config, JOINT_PACK)
    batch.pop("vit_token_seqlens")
    with pytest.raises(ValueError, match="packed_vit_tokens needs vit_token_seqlens"):
        tiny_stage2(**batch)


def test_error_latent_given_to_stage1():
    model = tiny_model(stage=1)
    batch = make_batch(model.config, JOINT_PACK)
    with pytest.raises(ValueError, match=r"stage-1 .*stage=2"):
        model(**batch)


def test_error_sample_lens_do_not_sum(tiny_stage2):
    batch = make_batch(tiny_stage2.config, JOINT_PACK)
    lens = list(batch["sample_lens"])
    lens[-1] -= 1
    with pytest.raises(ValueError, match=f"sample_lens add up to {sum(lens)}"):
        tiny_stage2(**dict(batch, sample_lens=lens))


def test_error_unknown_attn_mode(tiny_stage2):
    batch = make_batch(tiny_stage2.config, JOINT_PACK)
    modes = ["bidirectional"] + batch["attn_modes"][1:]
    with pytest.raises(
        ValueError, match="attn_modes\\[0\\] must be one of 'causal', 'full', 'noise', got 'bidirectional'"
    ):
        tiny_stage2(**dict(batch, attn_modes=modes))
    with pytest.raises(ValueError, match="split_lens has"):
        AttentionPlan.from_splits([2, 2], ["full"], [4], torch.device("cpu"))
    with pytest.raises(ValueError, match="split_lens add up to 3"):
        AttentionPlan.from_splits([1, 2], ["full", "causal"], [4], torch.device("cpu"))


def test_error_mse_indexes_and_noise_shape(tiny_stage2):
    batch = make_batch(tiny_stage2.config, JOINT_PACK)
    with pytest.raises(ValueError, match="mse_loss_indexes selects"):
        tiny_stage2(**dict(batch, mse_loss_indexes=batch["mse_loss_indexes"][:-1]))
    with pytest.raises(ValueError, match=r"packed_noise must be a tensor of \d+ rows"):
        tiny_stage2(**dict(batch, packed_noise=batch["packed_noise"][:-1]))


def test_error_timesteps_that_contradict_the_split_modes(tiny_stage2):
    batch = make_batch(tiny_stage2.config, JOINT_PACK)
    t = batch["packed_timesteps"]
    clean = torch.isinf(t)
    assert clean.any() and (~clean).any()  # JOINT_PACK: a clean image (full split), then a noised one
    finite_on_clean = torch.where(clean, torch.tensor(0.3), t)
    with pytest.raises(ValueError, match=r"outside a `noise` split has a finite timestep.*-inf"):
        tiny_stage2(**dict(batch, packed_timesteps=finite_on_clean))
    for bad in (float("-inf"), float("nan")):
        with pytest.raises(ValueError, match="in a `noise` split has timestep -inf or NaN"):
            tiny_stage2(**dict(batch, packed_timesteps=torch.where(clean, t, torch.tensor(bad))))
    with pytest.raises(ValueError, match=r"packed_timesteps must be a tensor of \d+ entries"):
        tiny_stage2(**dict(batch, packed_timesteps=t[:-1]))
    # The clean image relabelled `noise` (with its -inf timesteps): refused, not silently clean.
    modes = ["noise"] + batch["attn_modes"][1:]
    assert batch["attn_modes"][0] == "full"
    with pytest.raises(ValueError, match="in a `noise` split has timestep -inf"):
        tiny_stage2(**dict(batch, attn_modes=modes))
    # MSE indexes that are the noised tokens' count but not their positions, or out of order.
    mse = batch["mse_loss_indexes"]
    with pytest.raises(ValueError, match="mse_loss_indexes selects other positions.*in packed order"):
        tiny_stage2(**dict(batch, mse_loss_indexes=mse.flip(0)))
    with pytest.raises(ValueError, match="mse_loss_indexes selects other positions"):
        tiny_stage2(**dict(batch, mse_loss_indexes=mse - 1))
    with torch.no_grad():  # the consistent pack itself passes
        assert tiny_stage2(**batch)["mse"].shape == (mse.shape[0], 64)


# ----------------------------------------------------------------------------------------------
# 7. Weight initialisation and the PreTrainedModel API
# ----------------------------------------------------------------------------------------------


def reference_sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table, written out per entry: row r*grid+c holds [sin, cos](c * omega) for the
    column in the first half, then the same for the row (the reference's meshgrid puts w first)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    table = torch.empty(grid * grid, dim, dtype=torch.float64)
    for r in range(grid):
        for c in range(grid):
            col, row = c * omega, r * omega
            table[r * grid + c] = torch.cat([col.sin(), col.cos(), row.sin(), row.cos()])
    return table.float()


def test_sincos_table_matches_reference_formula():
    for dim, grid in ((32, 4), (64, 8), (16, 3)):
        torch.testing.assert_close(sincos_2d(dim, grid), reference_sincos_2d(dim, grid), rtol=0, atol=1e-6)


def test_rotary_matches_rotate_half_formula_and_its_gradient():
    """apply_rotary against the textbook x*cos + rotate_half(x)*sin, values and gradients, in
    float64; the 2-D form (each half of the head on its own) through gradcheck."""
    torch.manual_seed(0)
    positions = torch.tensor([0, 3, 7, 100, 517])
    x = torch.randn(5, 3, 16, dtype=torch.float64, requires_grad=True)
    cos, signed_sin = rotary_cos_sin(positions, 16, 10000.0)
    freqs = positions.float()[:, None] / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)
    # the tables' layout (float32 angles of up to 517 rad agree to ~1e-5)
    torch.testing.assert_close(cos, torch.cat((freqs, freqs), -1).cos(), rtol=0, atol=1e-4)
    torch.testing.assert_close(signed_sin, torch.cat((-freqs, freqs), -1).sin(), rtol=0, atol=1e-4)
    sin = signed_sin[:, 8:].repeat(1, 2)

    def textbook(x):
        rotate_half = torch.cat((-x[..., 8:], x[..., :8]), -1)
        return x * cos.double()[:, None] + rotate_half * sin.double()[:, None]

    ours, ref = apply_rotary(x, cos, signed_sin), textbook(x)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(
        torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(ref, x, grad)[0], rtol=0, atol=1e-12
    )
    rope = SiglipRotary2D(16, max_num_patch_per_side=8)
    tables = rope(torch.tensor([0, 9, 17, 63, 30]))
    assert torch.autograd.gradcheck(lambda t: apply_rotary_2d(t, *tables), (x.detach()[:, :1].requires_grad_(),))


def test_sincos_table_matches_checkpoint(parity):
    cfg = BagelConfig.from_pretrained(parity.checkpoint)
    state = load_bagel_checkpoint_state_dict(parity.checkpoint, stage=2)
    hidden = cfg.text_config.hidden_size
    assert_close(sincos_2d(hidden, cfg.vit_max_num_patch_per_side), state["model.vit_pos_embed.pos_embed"], 1e-6, "vit")
    assert_close(sincos_2d(hidden, cfg.max_latent_size), state["model.latent_pos_embed.pos_embed"], 1e-6, "latent")


def test_init_weights():
    model = tiny_model(stage=2)
    cfg = model.config
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
    hidden = cfg.text_config.hidden_size
    assert torch.equal(model.model.vit_pos_embed.pos_embed, sincos_2d(hidden, cfg.vit_max_num_patch_per_side))
    assert torch.equal(model.model.latent_pos_embed.pos_embed, sincos_2d(hidden, cfg.max_latent_size))
    torch.testing.assert_close(
        model.model.latent_pos_embed.pos_embed, reference_sincos_2d(hidden, cfg.max_latent_size), rtol=0, atol=1e-6
    )
    assert not model.model.vit_pos_embed.pos_embed.requires_grad
    assert not bool(model.model.llm2vae.weight.any()) and not bool(model.model.llm2vae.bias.any())
    norms = [m for m in model.modules() if isinstance(m, Qwen2RMSNorm)]
    assert len(norms) == 2 * (2 * 4 + 1)  # per layer: q/k norm + 2 layernorms, UND and GEN; final norms
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears
    for name, module in linears:
        if module.bias is not None:
            assert not bool(module.bias.any()), f"{name}.bias is not zero"
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm):
            assert torch.equal(module.weight, torch.ones_like(module.weight)) and not bool(module.bias.any()), name
    # Normal(0, initializer_range), not PyTorch's default kaiming-uniform (std ~ 1/sqrt(3 * fan_in)).
    std = cfg.text_config.initializer_range
    lm_head = model.get_output_embeddings().weight
    assert abs(lm_head.std().item() - std) < 0.25 * std
    assert abs(model.get_input_embeddings().weight.std().item() - std) < 0.25 * std


def test_embeddings_accessors_and_supports_config():
    model = tiny_model(stage=1)
    assert model.get_input_embeddings() is model.model.language_model.model.embed_tokens
    assert model.get_output_embeddings() is model.model.language_model.lm_head
    assert isinstance(model.get_input_embeddings(), nn.Embedding)
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()  # untied
    assert BagelForUnifiedMultimodal.supports_config(model.config)
    from transformers import Qwen2Config

    assert not BagelForUnifiedMultimodal.supports_config(Qwen2Config())
    assert not BagelForUnifiedMultimodal.supports_config(object())
    assert model.stage == 1


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_model(stage=2).eval()
    nn.init.normal_(model.model.llm2vae.weight, std=0.02)
    batch = make_batch(model.config, JOINT_PACK)
    model.save_pretrained(tmp_path)
    again = BagelForUnifiedMultimodal.from_pretrained(tmp_path).eval()
    assert again.config.vision_config.num_hidden_layers == 2 and again.stage == 2
    assert isinstance(again.model.vit_model.vision_model.embeddings.patch_embedding, nn.Linear)
    with torch.no_grad():
        a, b = model(**batch, output_hidden_states=True), again(**batch, output_hidden_states=True)
    for name in ("ce", "mse", "last_hidden_state"):
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# 8. Conv patch embedding -> Linear on flattened patches
# ----------------------------------------------------------------------------------------------


def _patchify(image: torch.Tensor, p: int) -> torch.Tensor:
    """(C, H, W) -> (H/p * W/p, p*p*C) in (row, col, py, px, c) order."""
    c, h, w = image.shape
    return image.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0).reshape(-1, p * p * c)


def test_low_precision_linear_on_the_cpu_computes_in_float32(monkeypatch):
    """A bf16 matmul on a CPU without native bf16 (AVX2) is ~180x slower than float32."""
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    linear, weights_seen = F.linear, []
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: weights_seen.append((x.dtype, w.dtype)) or linear(x, w, b))
    for bias in (True, False):
        layer = Linear(16, 8, bias=bias).to(torch.bfloat16)
        weights_seen.clear()
        out = layer(x.bfloat16())
        assert weights_seen == [(torch.float32, torch.float32)] and out.dtype == torch.bfloat16
        expected = linear(
            x.bfloat16().float(), layer.weight.float(), None if layer.bias is None else layer.bias.float()
        )
        torch.testing.assert_close(out, expected.bfloat16(), rtol=0, atol=0)
        assert layer.weight.dtype == torch.bfloat16  # stored in low precision


def test_convert_conv2d_to_linear_matches_conv():
    cfg = tiny_config(stage=1).vision_config
    torch.manual_seed(0)
    emb = SiglipVisionEmbeddings(cfg)
    nn.init.normal_(emb.patch_embedding.bias)
    image = torch.randn(3, 28, 42)
    with torch.no_grad():
        ref = emb.patch_embedding(image[None])[0].flatten(1).T  # (rows*cols, hidden), row-major
    emb.convert_conv2d_to_linear()
    assert isinstance(emb.patch_embedding, nn.Linear)
    patches = _patchify(image, cfg.patch_size)
    with torch.no_grad():
        out = emb.patch_embedding(patches)
        positions = torch.tensor([r * 4 + c for r in range(2) for c in range(3)])
        full = emb(patches, positions)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full, ref + emb.position_embedding(positions), rtol=1e-5, atol=1e-5)
    emb.convert_conv2d_to_linear()  # idempotent
    assert isinstance(emb.patch_embedding, nn.Linear)


def test_convert_patch_embedding_for_packed_vit():
    cfg = tiny_config(stage=1)
    torch.manual_seed(0)
    model = BagelModel(cfg)
    conv = model.vit_model.vision_model.embeddings.patch_embedding
    assert isinstance(conv, nn.Conv2d)
    image = torch.randn(3, 56, 28)
    with torch.no_grad():
        ref = conv(image[None])[0].flatten(1).T
    _convert_patch_embedding_for_packed_vit(model, cfg)
    linear = model.vit_model.vision_model.embeddings.patch_embedding
    assert isinstance(linear, nn.Linear) and linear.in_features == 3 * 14 * 14
    with torch.no_grad():
        torch.testing.assert_close(linear(_patchify(image, 14)), ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# 9. ViT: rope and per-image isolation
# ----------------------------------------------------------------------------------------------


def _vit_image(h, w, g, side=4):
    positions = torch.tensor([r * side + c for r in range(h) for c in range(w)])
    return torch.randn(h * w, 3 * 14 * 14, generator=g), positions


def _run_vit(vit, images):
    pixels = torch.cat([x for x, _ in images])
    positions = torch.cat([p for _, p in images])
    cu = F.pad(torch.tensor([x.shape[0] for x, _ in images]).cumsum(0), (1, 0)).int()
    with torch.no_grad():
        return vit(pixels, positions, cu)


@pytest.mark.parametrize("rope", [False, True])
def test_vit_images_isolated(rope):
    model = tiny_model(stage=1, vit_rope=rope).eval()
    vit = model.model.vit_model
    names = [n for n, _ in model.named_parameters()]
    assert any("position_embedding" in n for n in names) is (not rope)
    assert (vit.vision_model.rotary is not None) is rope
    g = torch.Generator().manual_seed(0)
    a, b, c = _vit_image(2, 3, g), _vit_image(4, 4, g), _vit_image(1, 2, g)
    alone = _run_vit(vit, [a])
    assert alone.shape == (6, 16) and torch.isfinite(alone).all()
    packed = _run_vit(vit, [b, a, c])
    torch.testing.assert_close(packed[16:22], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:16], _run_vit(vit, [b]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[22:], _run_vit(vit, [c]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope", [False, True])
def test_vit_position_dependence(rope):
    """With rope the ViT sees only relative 2-D positions (a shifted grid gives the same output);
    without rope the learned absolute table makes the output depend on where the grid sits."""
    model = tiny_model(stage=1, vit_rope=rope).eval()
    vit = model.model.vit_model
    if not rope:
        nn.init.normal_(vit.vision_model.embeddings.position_embedding.weight)
    g = torch.Generator().manual_seed(0)
    pixels, positions = _vit_image(2, 2, g)
    base = _run_vit(vit, [(pixels, positions)])
    shifted = _run_vit(vit, [(pixels, positions + 4 + 1)])  # one row down, one column right
    if rope:
        torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-5)
    else:
        assert not torch.allclose(shifted, base, atol=1e-4)
    # Positions do matter: a permutation of the grid that is not a translation changes the output.
    swapped = _run_vit(vit, [(pixels, positions[[1, 0, 2, 3]])])
    assert not torch.allclose(swapped, base, atol=1e-4)


def _gemv_reference(x, weight, bias=None, up_weight=None, norm=None, residual=None, add=None):
    """What `kernels_bagel.gemv` computes, in torch (tests/test_gpu.py checks the kernel's math)."""
    total = None
    if residual is not None:
        x = total = residual + x
    if norm is not None:
        x = F.rms_norm(x, norm[0].shape, norm[0], norm[1])
    out = F.linear(x, weight, bias)
    if up_weight is not None:
        out = F.silu(out) * F.linear(x, up_weight)
    if add is not None:
        out = add + out
    return out if residual is None else (total, out)


def _rms_norm_reference(x, weight, eps, residual=None):
    total = x if residual is None else residual + x
    out = F.rms_norm(total, weight.shape, weight, eps)
    return out if residual is None else (total, out)


@pytest.mark.parametrize("n, gen_index", [(1, None), (5, None), (5, [1, 3])])
def test_decoding_kernel_dispatch_matches_the_plain_path(monkeypatch, n, gen_index):
    """The decode-time dispatch as on a GPU (`fuses_decoding` true), with the Triton kernels
    replaced by their math in torch. One token (decoding): each input norm rides in the q/k/v
    GEMVs, and the residual add + post-attention norm in the gate/up GEMV. More tokens: the norms
    run alone. On UND tokens, the residual add after the MLP rides in the down GEMV; a mixed
    UND/GEN batch adds it alone. Gate and up always share one GEMV. Either way the decoder gives
    what the plain path gives."""
    from bagel_remote import ops_bagel

    decoder = tiny_model(stage=2).model.language_model.model
    x, position_ids = torch.randn(n, decoder.config.hidden_size), torch.arange(n)
    gen = None if gen_index is None else torch.tensor(gen_index)
    run = lambda: decoder(x, position_ids, AttentionPlan.segments([n], [n], True), TokenRoute(n, gen))  # noqa: E731
    with torch.no_grad():
        plain = run()
        calls = []
        monkeypatch.setattr(ops_bagel, "fuses_decoding", lambda *args: True)
        monkeypatch.setattr(ops_bagel, "gemv", lambda *a, **kw: calls.append(kw) or _gemv_reference(*a, **kw))
        monkeypatch.setattr(ops_bagel, "rms_norm_kernel", _rms_norm_reference)
        fast = run()
    sides = 1 if gen_index is None else 2
    layers = decoder.config.num_hidden_layers
    assert sum("norm" in kw for kw in calls) == 4 * layers * (n == 1)  # q, k, v and gate/up
    assert sum("residual" in kw for kw in calls) == layers * (n == 1)
    assert sum("add" in kw for kw in calls) == layers * (gen_index is None)
    assert sum("up_weight" in kw for kw in calls) == layers * sides
    assert len(calls) == 6 * layers * sides  # q, k, v, o, gate and up, down
    assert_close(fast, plain, rtol=1e-5)
