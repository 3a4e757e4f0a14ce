"""BAGEL: a Qwen2 Mixture-of-Transformers decoder with a SigLIP understanding tower and a
flow-matching generation head over FLUX-VAE latents.

Every layer of the decoder has understanding (UND) weights and, in stage 2, `*_moe_gen`
generation (GEN) siblings. Text and ViT tokens go through UND weights, VAE-latent tokens through
GEN weights, and all tokens share one packed attention. Everything works on packed sequences:
(N, hidden) tensors holding several samples back to back, with no padding.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import json
import logging
import math
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention_bagel import AttentionPlan, TokenRoute, packed_attention
from .autoencoder_bagel import BagelAutoEncoder, patchify_latent
from .configuration_bagel import BagelConfig, normalize_stage, rope_theta
from .generation_bagel import BagelGenerationMixin, shift_timesteps
from .kernels_bagel import fuses_rms_norm_rotary, rms_norm_rotary, silu_mul
from .modeling_siglip_navit import Linear, SiglipVisionModel, apply_rotary, parallel_linears, rotary_cos_sin
from .state_dict_adapter import BagelStateDictAdapter, _classify

# ----------------------------------------------------------------------------------------------
# Qwen2 Mixture-of-Transformers decoder
# ----------------------------------------------------------------------------------------------


class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel that normalises in float32, as the reference does, and returns x's
        # dtype. CUDA autocast is off around it: it would widen bf16 input to float32 and back
        # (q/k where the fused norm + rotary kernel cannot run).
        with torch.autocast("cuda", enabled=False) if x.is_cuda else contextlib.nullcontext():
            return F.rms_norm(x, self.weight.shape, self.weight.to(x.dtype), self.variance_epsilon)


class Qwen2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.fused_silu = config.hidden_act == "silu"  # Qwen2's; one kernel each way on CUDA

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and torch.is_autocast_enabled("cuda"):
            # One cast of x for both projections, not one each (their input gradients add in bf16).
            x = x.to(torch.get_autocast_dtype("cuda"))
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(silu_mul(gate, up) if self.fused_silu else self.act_fn(gate) * up)


def _with_gen_sibling(module: nn.Module, name: str, build: Callable[[], nn.Module], mot: bool) -> None:
    """Register `name` and, in MoT layers, its `name_moe_gen` twin with the same shape."""
    module.add_module(name, build())
    if mot:
        module.add_module(name + "_moe_gen", build())


class Qwen2MoTAttention(nn.Module):
    def __init__(self, config, layer_idx: int, mot: bool):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // self.num_heads
        hidden, q_dim, kv_dim = config.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        _with_gen_sibling(self, "q_proj", lambda: Linear(hidden, q_dim, bias=True), mot)
        _with_gen_sibling(self, "k_proj", lambda: Linear(hidden, kv_dim, bias=True), mot)
        _with_gen_sibling(self, "v_proj", lambda: Linear(hidden, kv_dim, bias=True), mot)
        _with_gen_sibling(self, "o_proj", lambda: Linear(q_dim, hidden, bias=False), mot)
        norm = (lambda: Qwen2RMSNorm(self.head_dim, config.rms_norm_eps)) if config.qk_norm else nn.Identity
        _with_gen_sibling(self, "q_norm", norm, mot)
        _with_gen_sibling(self, "k_norm", norm, mot)

    def project(self, x: torch.Tensor, rotary, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (n, heads, head_dim), k, v (n, kv_heads, head_dim) of x through one side's weights
        (`side` "" for UND, "_moe_gen" for GEN), q and k normalised and rotated (`rotary`: cos and
        signed sin (n, head_dim) of x's tokens)."""
        n = x.shape[0]
        q, k, v = parallel_linears(x, tuple(getattr(self, name + side) for name in ("q_proj", "k_proj", "v_proj")))
        q = self._norm_rotary(q.view(n, self.num_heads, self.head_dim), getattr(self, "q_norm" + side), rotary)
        k = self._norm_rotary(k.view(n, self.num_kv_heads, self.head_dim), getattr(self, "k_norm" + side), rotary)
        return q, k, v.view(n, self.num_kv_heads, self.head_dim)

    @staticmethod
    def _norm_rotary(x: torch.Tensor, norm: nn.Module, rotary) -> torch.Tensor:
        if isinstance(norm, Qwen2RMSNorm) and fuses_rms_norm_rotary(x):  # one Triton kernel each way
            return rms_norm_rotary(x, norm.weight, norm.variance_epsilon, *rotary)
        return apply_rotary(norm(x), *rotary)

    def forward(self, q, k, v, plan: AttentionPlan, route: TokenRoute, cache=None) -> torch.Tensor:
        """Attention of the projected tokens, all in route order -> (n, heads * head_dim), before
        the output projection."""
        if cache is None:  # the plan is in route order (Qwen2MoTModel.forward)
            return packed_attention(q, k, v, plan).flatten(1)
        # attention over the cached context too, which is kept in packed order
        return route.sort(cache.attend(self.layer_idx, route.unsort(q), route.unsort(k), route.unsort(v), plan)).flatten(1)


class Qwen2MoTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer; in MoT form (stage 2) every weight has a `_moe_gen` twin. Tokens
    are routed block by block (norm + projections, output projection, norm + MLP): one
    concatenation per output instead of one per op. `model.gradient_checkpointing_enable()`
    recomputes it in the backward (transformers' `GradientCheckpointingLayer`); its forward is
    deterministic given its arguments (the plan and route are read, never changed), so the
    recomputation gives the same values."""

    def __init__(self, config, layer_idx: int, mot: bool):
        super().__init__()
        self.mot = mot
        self.self_attn = Qwen2MoTAttention(config, layer_idx, mot)
        _with_gen_sibling(self, "mlp", lambda: Qwen2MLP(config), mot)
        _with_gen_sibling(self, "input_layernorm", lambda: Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps), mot)
        _with_gen_sibling(
            self, "post_attention_layernorm", lambda: Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps), mot
        )

    def _qkv(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], side: str):
        x, *rotary = inputs
        return self.self_attn.project(getattr(self, "input_layernorm" + side)(x), rotary, side)

    def _out(self, x: torch.Tensor, side: str) -> torch.Tensor:
        return getattr(self.self_attn, "o_proj" + side)(x)

    def _mlp(self, x: torch.Tensor, side: str) -> torch.Tensor:
        return getattr(self, "mlp" + side)(getattr(self, "post_attention_layernorm" + side)(x))

    def _routed(self, block: Callable, x: torch.Tensor, route: TokenRoute):
        gen = (lambda part: block(part, "_moe_gen")) if self.mot else None
        return route(x, lambda part: block(part, ""), gen)

    def forward(self, x, rotary, plan: AttentionPlan, route: TokenRoute, cache=None) -> torch.Tensor:
        q, k, v = self._routed(self._qkv, (x, *rotary), route)
        x = x + self._routed(self._out, self.self_attn(q, k, v, plan, route, cache), route)
        return x + self._routed(self._mlp, x, route)


class Qwen2MoTModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        mot = config.layer_module == "Qwen2MoTDecoderLayer"
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rope_theta = rope_theta(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2MoTDecoderLayer(config, i, mot) for i in range(config.num_hidden_layers))
        _with_gen_sibling(self, "norm", lambda: Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps), mot)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        plan: AttentionPlan,
        route: TokenRoute,
        cache=None,
    ) -> torch.Tensor:
        """inputs_embeds (N, hidden), position_ids (N,) -> last hidden state (N, hidden), after the
        final norm of each token's side. The layers see the tokens in route order."""
        cos, sin = rotary_cos_sin(route.sort(position_ids), self.head_dim, self.rope_theta)
        rotary = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        x = route.sort(inputs_embeds)
        if cache is None and route.inverse is not None:
            plan = plan.in_storage_order(route.inverse)
        for layer in self.layers:
            x = layer(x, rotary, plan, route, cache)
        return route.unsort(route(x, self.norm, getattr(self, "norm_moe_gen", None)))


class Qwen2ForCausalLM(nn.Module):
    """Container matching the checkpoint's `language_model.{model,lm_head}` names."""

    def __init__(self, config):
        super().__init__()
        self.model = Qwen2MoTModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)


# ----------------------------------------------------------------------------------------------
# BAGEL's own small parts
# ----------------------------------------------------------------------------------------------


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE-style 1-D table: (P,) -> (P, dim), sin half then cos half, in float64."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.double().reshape(-1)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size**2, dim) table for index row * grid_size + col, built as the reference does
    (its meshgrid puts the column coordinate first, so the first half encodes the column)."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    col, row = torch.meshgrid(coords, coords, indexing="xy")
    return torch.cat([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], dim=1).float()


class PositionEmbedding2D(nn.Module):
    """Frozen 2-D sin-cos table indexed by `row * max_num_patch_per_side + col`."""

    def __init__(self, max_num_patch_per_side: int, hidden_size: int):
        super().__init__()
        self.max_num_patch_per_side = max_num_patch_per_side
        self.pos_embed = nn.Parameter(torch.zeros(max_num_patch_per_side**2, hidden_size), requires_grad=False)

    def reset_table(self) -> None:
        with torch.no_grad():
            table = sincos_2d(self.pos_embed.shape[1], self.max_num_patch_per_side)
            self.pos_embed.copy_(table.to(self.pos_embed.device, self.pos_embed.dtype))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """t (N,) -> sinusoidal features (cos half, then sin half; max period 10000) -> MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            Linear(frequency_embedding_size, hidden_size), nn.SiLU(), Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class Connector(nn.Module):
    """ViT features -> LLM width: fc1, activation, fc2."""

    def __init__(self, in_dim: int, out_dim: int, act: str):
        super().__init__()
        self.fc1 = Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.fc2 = Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BagelModel(nn.Module):
    """Container whose attribute names equal the checkpoint's top-level names."""

    def __init__(self, config: BagelConfig):
        super().__init__()
        self.config = config
        text = config.text_config
        self.language_model = Qwen2ForCausalLM(text)
        if config.visual_und:
            if config.vision_config is None:
                raise ValueError("visual_und=True needs a vit_config / vision_config for the ViT tower.")
            self.vit_model = SiglipVisionModel(config.vision_config)
            self.connector = Connector(config.vision_config.hidden_size, text.hidden_size, config.connector_act)
            self.vit_pos_embed = PositionEmbedding2D(config.vit_max_num_patch_per_side, text.hidden_size)
        if config.visual_gen:
            self.latent_channel = int(config.vae_config["z_channels"])
            patch_dim = config.latent_patch_size**2 * self.latent_channel
            self.time_embedder = TimestepEmbedder(text.hidden_size)
            self.vae2llm = Linear(patch_dim, text.hidden_size)
            self.llm2vae = Linear(text.hidden_size, patch_dim)
            self.latent_pos_embed = PositionEmbedding2D(config.max_latent_size, text.hidden_size)

    def embed_vit_tokens(
        self, pixel_values: torch.Tensor, position_ids: torch.Tensor, seqlens: torch.Tensor | list[int],
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """Packed patches (N, 3*P*P) of images with `seqlens` patches each -> (N, hidden).
        `max_seqlen` (an upper bound on the longest image) lets lengths on the GPU be used without
        a host sync, unchecked (`SiglipVisionModel.forward`)."""
        if not self.config.visual_und:
            raise ValueError("This model was built with visual_und=False and has no ViT tower.")
        seqlens = torch.as_tensor(seqlens)  # stays where it is: host lengths need no copy back
        cu_seqlens = F.pad(seqlens.cumsum(0), (1, 0)).int()
        features = self.vit_model(pixel_values, position_ids, cu_seqlens, max_seqlen)
        return self.connector(features) + self.vit_pos_embed(position_ids).to(features.dtype)

    def embed_latent_tokens(
        self, latent_tokens: torch.Tensor, timesteps: torch.Tensor, position_ids: torch.Tensor
    ) -> torch.Tensor:
        """Noised latent tokens x_t (N, p*p*C) at timesteps t (N,) -> (N, hidden)."""
        dtype = self.vae2llm.weight.dtype
        return (
            self.vae2llm(latent_tokens.to(dtype))
            + self.time_embedder(timesteps)
            + self.latent_pos_embed(position_ids).to(dtype)
        )


# ----------------------------------------------------------------------------------------------
# Stage helpers (the NeMo AutoModel API)
# ----------------------------------------------------------------------------------------------


def _stage_to_int(stage: int | str) -> int:
    """1, 2, "stage1", "stage2" (any case) -> 1 or 2."""
    return normalize_stage(stage)


def _prepare_config_for_stage(config: BagelConfig) -> None:
    """Make `visual_gen`, the decoder layer kind and the reference overrides agree with the stage
    before modules are built (idempotent)."""
    config.apply_reference_overrides()


def _convert_patch_embedding_for_packed_vit(model: BagelModel, config: BagelConfig) -> None:
    """Swap the ViT's conv patch embedding for the Linear that takes flattened patches."""
    if config.visual_und:
        model.vit_model.vision_model.embeddings.convert_conv2d_to_linear()


# ----------------------------------------------------------------------------------------------
# The Hub model
# ----------------------------------------------------------------------------------------------


class BagelPreTrainedModel(PreTrainedModel):
    config_class = BagelConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True  # decoder and ViT layers (GradientCheckpointingLayer)
    _no_split_modules = ["Qwen2MoTDecoderLayer", "SiglipEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.text_config.initializer_range
        if isinstance(module, PositionEmbedding2D):
            module.reset_table()
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, Qwen2RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            module.weight.fill_(1.0)
            module.bias.zero_()
        # The flow-matching head starts at zero so stage 2 begins with no velocity prediction.
        if getattr(self.model, "llm2vae", None) is module:
            module.weight.zero_()
            module.bias.zero_()


class BagelForUnifiedMultimodal(BagelGenerationMixin, BagelPreTrainedModel):
    """BAGEL for understanding (CE) and, in stage 2, generation (flow-matching MSE).

    `self.model` holds the weights of `ema.safetensors`; `self.vae` (stage 2) those of
    `ae.safetensors`.
    """

    def __init__(self, config: BagelConfig):
        _prepare_config_for_stage(config)
        super().__init__(config)
        self.model = BagelModel(config)
        _convert_patch_embedding_for_packed_vit(self.model, config)
        self.vae = BagelAutoEncoder(config.vae_config) if config.visual_gen else None
        self.post_init()

    @classmethod
    def supports_config(cls, config: Any) -> bool:
        return getattr(config, "model_type", None) == BagelConfig.model_type

    @property
    def stage(self) -> int:
        return self.config.stage

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.language_model.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.language_model.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.language_model.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.language_model.lm_head = value

    def forward(
        self,
        sequence_length: int,
        packed_text_ids: torch.LongTensor,
        packed_text_indexes: torch.LongTensor,
        sample_lens: list[int],
        packed_position_ids: torch.LongTensor,
        split_lens: list[int] | None = None,
        attn_modes: list[str] | None = None,
        packed_vit_tokens: torch.Tensor | None = None,
        packed_vit_token_indexes: torch.LongTensor | None = None,
        packed_vit_position_ids: torch.LongTensor | None = None,
        vit_token_seqlens: torch.Tensor | None = None,
        padded_latent: torch.Tensor | None = None,
        patchified_vae_latent_shapes: list[tuple[int, int]] | None = None,
        packed_latent_position_ids: torch.LongTensor | None = None,
        packed_vae_token_indexes: torch.LongTensor | None = None,
        packed_timesteps: torch.Tensor | None = None,
        mse_loss_indexes: torch.Tensor | None = None,
        ce_loss_indexes: torch.Tensor | None = None,
        packed_label_ids: torch.Tensor | None = None,
        ce_loss_weights: torch.Tensor | None = None,
        packed_noise: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        **unused: Any,
    ) -> dict[str, torch.Tensor | None]:
        """Packed training forward (the reference's), returning unreduced losses.

        Returns {"ce": (num_ce_tokens,) or None, "mse": (num_noised_tokens, p*p*C) or None}, plus
        "last_hidden_state" (sequence_length, hidden) when `output_hidden_states`. `packed_noise`
        (num_vae_tokens, p*p*C) fixes the flow-matching noise; by default it is drawn with randn.
        `ce_loss_weights` is accepted for collator compatibility; weighting is the trainer's job.
        """
        if unused.get("nested_attention_masks") is not None:
            raise ValueError("nested_attention_masks is not supported: pass split_lens and attn_modes instead.")
        model = self.model
        _check_packed_inputs(sequence_length, sample_lens, packed_position_ids, packed_text_ids, packed_text_indexes)
        split_lens = split_lens if split_lens is not None else list(sample_lens)
        attn_modes = attn_modes if attn_modes is not None else ["causal"] * len(split_lens)
        # Nothing here waits for the GPU before the ViT is queued (its kernels are too short to keep
        # the GPU busy on their own), so the host prepares this step while the GPU finishes the last.
        plan = AttentionPlan.from_splits(split_lens, attn_modes, sample_lens, packed_text_ids.device)
        checks = [_token_coverage(sequence_length, packed_text_indexes, packed_vit_token_indexes, packed_vae_token_indexes)]
        embeds = self.get_input_embeddings()(packed_text_ids)

        vit = None
        if packed_vit_tokens is not None:
            if vit_token_seqlens is None or packed_vit_position_ids is None or packed_vit_token_indexes is None:
                raise ValueError(
                    "packed_vit_tokens needs vit_token_seqlens, packed_vit_position_ids and packed_vit_token_indexes."
                )
            max_seqlen = None
            if torch.is_tensor(vit_token_seqlens) and vit_token_seqlens.device.type != "cpu":
                # All ViT tokens bound the longest image; the lengths are checked with the rest.
                max_seqlen = packed_vit_tokens.shape[0]
                checks.append(_vit_lengths_check(vit_token_seqlens, max_seqlen))
            vit = model.embed_vit_tokens(packed_vit_tokens, packed_vit_position_ids, vit_token_seqlens, max_seqlen)

        latents, target = None, None
        if padded_latent is not None:
            if not self.config.visual_gen:
                raise ValueError(
                    "padded_latent was given to a stage-1 (understanding-only) model; load it with stage=2."
                )
            if None in (patchified_vae_latent_shapes, packed_latent_position_ids, packed_vae_token_indexes,
                        packed_timesteps):  # fmt: skip
                raise ValueError(
                    "padded_latent needs patchified_vae_latent_shapes, packed_latent_position_ids, "
                    "packed_vae_token_indexes and packed_timesteps."
                )
            p = self.config.latent_patch_size
            clean = torch.cat(
                [patchify_latent(lat[:, : h * p, : w * p], p) for lat, (h, w) in zip(padded_latent, patchified_vae_latent_shapes)]
            )
            if clean.shape[0] != packed_vae_token_indexes.shape[0]:
                raise ValueError(
                    f"patchified_vae_latent_shapes give {clean.shape[0]} latent tokens but packed_vae_token_indexes "
                    f"has {packed_vae_token_indexes.shape[0]}."
                )
            noise = torch.randn_like(clean) if packed_noise is None else packed_noise.to(clean)
            if noise.shape != clean.shape:
                raise ValueError(f"packed_noise must have shape {tuple(clean.shape)}, got {tuple(noise.shape)}.")
            timesteps = shift_timesteps(torch.sigmoid(packed_timesteps.float()), self.config.timestep_shift)
            x_t = (1 - timesteps[:, None]) * clean + timesteps[:, None] * noise
            target = (noise - clean)[timesteps > 0]  # the velocity of noised tokens (this waits for the GPU)
            latents = model.embed_latent_tokens(x_t, timesteps, packed_latent_position_ids)

        _raise_failed(checks)  # before any index below is used
        sequence = embeds.new_zeros(sequence_length, embeds.shape[1]).index_copy(0, packed_text_indexes, embeds)
        if vit is not None:
            sequence = sequence.index_copy(0, packed_vit_token_indexes, vit.to(sequence.dtype))
        gen_index = None
        if latents is not None:
            sequence = sequence.index_copy(0, packed_vae_token_indexes, latents.to(sequence.dtype))
            gen_index = packed_vae_token_indexes

        route = TokenRoute(sequence_length, gen_index, freeze_und=self.config.text_config.freeze_und)
        hidden = model.language_model.model(sequence, packed_position_ids, plan, route)

        outputs: dict[str, torch.Tensor | None] = {"ce": None, "mse": None}
        if ce_loss_indexes is not None:
            if packed_label_ids is None:
                raise ValueError("ce_loss_indexes was given without packed_label_ids.")
            logits = self.get_output_embeddings()(hidden[ce_loss_indexes])
            outputs["ce"] = F.cross_entropy(logits.float(), packed_label_ids, reduction="none")
        if mse_loss_indexes is not None and target is not None:
            prediction = model.llm2vae(hidden[mse_loss_indexes])
            if target.shape[0] != prediction.shape[0]:
                raise ValueError(
                    f"mse_loss_indexes selects {prediction.shape[0]} tokens but {target.shape[0]} latent tokens are "
                    "noised (timestep > 0)."
                )
            outputs["mse"] = (prediction.float() - target.float()) ** 2
        if output_hidden_states:
            outputs["last_hidden_state"] = hidden
        return outputs

    # ------------------------------------------------------------------------------------------
    # Loading and saving: the released checkpoint layout (helpers at the bottom of this module)
    # ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        *model_args: Any,
        config: BagelConfig | str | os.PathLike | None = None,
        stage: int | str | None = None,
        strict: bool = True,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device_map: Any = None,
        output_loading_info: bool = False,
        ignore_mismatched_sizes: bool = False,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        token: str | bool | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        subfolder: str = "",
        **kwargs: Any,
    ):
        """Load BAGEL from a directory or Hub repository in the released layout.

        The directory holds `ema.safetensors` (every model weight, released key names), optionally
        `ae.safetensors` (the FLUX VAE) and either `config.json` or the released `llm_config.json` +
        `vit_config.json` (the reference's build-time overrides are then applied exactly once).
        A Hub id is fetched with `huggingface_hub.snapshot_download` (configs, tokenizer files,
        remote code, and only the weight files the stage needs); `revision`, `cache_dir`, `token`,
        `local_files_only` and `force_download` are passed through.

        The model is built on the `meta` device and the checkpoint tensors are assigned to it
        directly in their final dtype and device: nothing is randomly initialised first.

        Args:
            stage: 1 (understanding only: no GEN module is built and no GEN tensor is read) or
                2 (joint, MoT). Defaults to the config's stage.
            strict: with True (default), checkpoint keys the model has no place for and model
                weights the checkpoint lacks raise an error naming them; with False they are
                reported (`output_loading_info`) and the missing ones initialised by `_init_weights`.
            dtype / torch_dtype: a `torch.dtype`, its name, or "auto" (the default, as in
                transformers 5: the config's `dtype`, else the dtype of the checkpoint's first
                floating tensor). The whole model, VAE included, gets this one dtype.
            device_map: None / "cpu", "cuda", "cuda:1", an int, a `torch.device`, "auto" (first
                CUDA device, else CPU), or a dict mapping every module to one device ({"": dev}).
            output_loading_info: also return {"missing_keys", "unexpected_keys",
                "mismatched_keys", "error_msgs"} as transformers does.
            ignore_mismatched_sizes: skip (and re-initialise) tensors whose shape disagrees with
                the config instead of raising.

        Without `ae.safetensors` a stage-2 model keeps a randomly initialised VAE and a warning is
        logged. When the directory has tokenizer files, `model.processor` is the checkpoint's
        `BagelProcessor` (used by `chat` / `generate_image` / `edit_image`), else None.
        Keyword arguments that are attributes of the config override it (as in
        transformers); the loading arguments transformers' `AutoModel` forwards
        (`trust_remote_code`, `_from_auto`, `adapter_kwargs`, `code_revision`, ...) are accepted
        and ignored. The model is returned in eval mode.
        """
        return _load_bagel_pretrained(
            cls,
            pretrained_model_name_or_path,
            model_args,
            config=config,
            stage=stage,
            strict=strict,
            dtype=dtype if dtype is not None else torch_dtype,
            device_map=device_map,
            output_loading_info=output_loading_info,
            ignore_mismatched_sizes=ignore_mismatched_sizes,
            hub_kwargs=dict(
                revision=revision,
                cache_dir=cache_dir,
                token=token if token is not None else kwargs.pop("use_auth_token", None),
                local_files_only=local_files_only,
                force_download=force_download,
            ),
            subfolder=subfolder or "",
            extra_kwargs=kwargs,
        )

    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        is_main_process: bool = True,
        state_dict: dict[str, torch.Tensor] | None = None,
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        **kwargs: Any,
    ) -> None:
        """Save in the released BAGEL layout, a directory that is itself a loadable Hub repository.

        Decision: we write the layout of the released checkpoint rather than transformers'
        `model.safetensors`, so that one directory serves every reader: our `from_pretrained`
        (and `AutoModel` with `trust_remote_code=True`), the reference code, and the NeMo-style
        adapter (`load_bagel_checkpoint_state_dict`). Files written:

        * `config.json`: the full config (every nested value, not a diff against defaults) with
          `auto_map` (AutoConfig, AutoModel and, when `processing_bagel.py` is copied, AutoProcessor)
          and `dtype` set to the model's dtype;
        * `llm_config.json` + `vit_config.json`: `config.released_sidecar_configs()`, i.e. the
          released json files before the reference's overrides;
        * `ema.safetensors`: every `model.*` tensor with the `model.` root stripped
          (`BagelStateDictAdapter.to_hf`), in the model's dtype;
        * `ae.safetensors`: the `vae.*` tensors with `vae.` stripped (only when the model has a VAE);
        * the remote-code modules (`configuration_bagel.py`, `modeling_bagel.py`,
          `processing_bagel.py` and every sibling module they import).

        When the model has a `processor` (loaded with it), its files (tokenizer, `processor_config.json`)
        are written too, so the directory is complete. The weights
        are single, unsharded files, as released. Only the main process writes
        (`is_main_process=False` returns at once). `safe_serialization=False` and `push_to_hub=True`
        are not supported; other transformers arguments (`max_shard_size`, ...) are ignored.
        """
        _save_bagel_pretrained(self, save_directory, is_main_process, state_dict, safe_serialization, push_to_hub)


def _check_packed_inputs(sequence_length, sample_lens, position_ids, text_ids, text_indexes) -> None:
    """Clear errors for packed inputs whose lengths do not add up (host-side checks)."""
    if sum(sample_lens) != sequence_length:
        raise ValueError(f"sample_lens add up to {sum(sample_lens)} but sequence_length is {sequence_length}.")
    if position_ids.shape[0] != sequence_length:
        raise ValueError(
            f"packed_position_ids has {position_ids.shape[0]} entries; it needs one per token ({sequence_length})."
        )
    if text_ids.shape[0] != text_indexes.shape[0]:
        raise ValueError(
            f"packed_text_ids has {text_ids.shape[0]} ids but packed_text_indexes has {text_indexes.shape[0]}."
        )


def _token_coverage(sequence_length, text_indexes, vit_indexes, vae_indexes) -> tuple[torch.Tensor, str]:
    """Every packed position is exactly one text, ViT or VAE token: a check for `_raise_failed`."""
    indexes = {"text": text_indexes, "vit": vit_indexes, "vae": vae_indexes}
    indexes = {name: index for name, index in indexes.items() if index is not None}
    counts = {name: index.shape[0] for name, index in indexes.items()}
    message = (
        f"The token indexes ({counts}) do not cover positions 0..{sequence_length - 1} exactly once: every "
        "packed position must be exactly one text, ViT or VAE token."
    )
    if sum(counts.values()) != sequence_length:
        raise ValueError(message)
    index = torch.cat(list(indexes.values()))
    in_range = (index >= 0) & (index < sequence_length)
    hits = torch.zeros(sequence_length, dtype=torch.int32, device=index.device)
    hits.index_add_(0, index.clamp(0, sequence_length - 1), in_range.int())
    return in_range.all() & (hits == 1).all(), message


def _vit_lengths_check(seqlens: torch.Tensor, num_tokens: int) -> tuple[torch.Tensor, str]:
    """ViT lengths that cover the packed ViT tokens: a check for `_raise_failed`."""
    message = f"vit_token_seqlens must give one length per image, adding up to the {num_tokens} packed ViT tokens."
    return (seqlens >= 0).all() & (seqlens.sum() == num_tokens), message


def _raise_failed(checks: list[tuple[torch.Tensor, str]]) -> None:
    """Read the (passed, message) checks made on the device with one host sync; raise the first
    that failed."""
    passed = torch.stack([ok for ok, _ in checks]).tolist()
    for ok, (_, message) in zip(passed, checks):
        if not ok:
            raise ValueError(message)


# ----------------------------------------------------------------------------------------------
# Loading and saving in the released layout (used by BagelForUnifiedMultimodal.from_pretrained /
# save_pretrained)
# ----------------------------------------------------------------------------------------------

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "ema.safetensors"
VAE_WEIGHTS_NAME = "ae.safetensors"
CONFIG_NAME = "config.json"
AUTO_MAP = {
    "AutoConfig": "configuration_bagel.BagelConfig",
    "AutoModel": "modeling_bagel.BagelForUnifiedMultimodal",
    "AutoProcessor": "processing_bagel.BagelProcessor",
}
#: Entry modules of the remote code; the modules they import relatively are found by parsing them.
REMOTE_CODE_ENTRY_FILES = ("configuration_bagel.py", "modeling_bagel.py", "processing_bagel.py")
#: Files whose presence means a checkpoint directory has a tokenizer (and so a processor).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
#: What a Hub download fetches besides the weights: configs, tokenizer / processor files, code.
HUB_ALLOW_PATTERNS = ("*.json", "*.py", "*.txt", "*.model", "*.jinja", "*.tiktoken")

#: Arguments transformers' AutoModel / pipelines forward that mean nothing to this loader.
_IGNORED_LOAD_KWARGS = frozenset({
    "trust_remote_code", "_from_auto", "_from_pipeline", "adapter_kwargs", "adapter_name", "code_revision",
    "proxies", "_commit_hash", "low_cpu_mem_usage", "_fast_init", "mirror", "from_tf", "from_flax",
    "offload_state_dict", "offload_folder", "offload_buffers", "use_safetensors", "weights_only",
    "attn_implementation", "use_kernels", "kernel_config", "allow_all_kernels", "key_mapping", "tp_plan",
    "tp_size", "device_mesh", "distributed_config", "max_memory", "tqdm_class", "generation_config",
    "return_unused_kwargs", "use_auth_token",
})  # fmt: skip
#: Arguments that would change what gets loaded and that this loader does not implement.
_UNSUPPORTED_LOAD_KWARGS = ("quantization_config", "gguf_file", "state_dict", "variant")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
    "F8_E5M2": getattr(torch, "float8_e5m2", None),
}  # fmt: skip


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[torch.dtype | None, tuple[int, ...]]]:
    """`{key: (dtype, shape)}` of a safetensors file, read from its header alone (no tensor data).

    Raises a ValueError naming the file when it is not a complete safetensors file (a pickle, an
    empty or truncated file, a corrupt header).
    """
    path = Path(path)
    size = path.stat().st_size
    hint = (
        "re-download or re-save it; BAGEL weights must be safetensors files "
        "(ema.safetensors / ae.safetensors as released)"
    )
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path} is not a safetensors file ({size} bytes, no header): {hint}.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8 or header_len > 100_000_000:
            raise ValueError(
                f"{path} is not a safetensors file or is truncated (header of {header_len} bytes claimed in a file "
                f"of {size} bytes): {hint}."
            )
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise TypeError("header is not a JSON object")
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in entries.values()), default=0)
        info = {k: (_SAFETENSORS_DTYPES.get(v["dtype"]), tuple(int(d) for d in v["shape"])) for k, v in entries.items()}
    except Exception as err:  # noqa: BLE001 - any malformed header is the same user error
        raise ValueError(f"{path} is not a safetensors file (unreadable header: {err}): {hint}.") from err
    if 8 + header_len + end > size:
        raise ValueError(
            f"{path} is truncated: its header describes {8 + header_len + end} bytes but the file has {size}: {hint}."
        )
    return info


def _resolve_load_dtype(dtype: Any, config: BagelConfig, header: dict) -> torch.dtype:
    """transformers' rules: a dtype or its name; "auto"/None: config.dtype, else the checkpoint's."""
    if dtype is None or dtype == "auto":
        configured = getattr(config, "dtype", None)
        if configured is not None and configured != "auto":
            dtype = configured
        else:
            floating = [dt for dt, _ in header.values() if dt is not None and dt.is_floating_point]
            return floating[0] if floating else torch.get_default_dtype()
    if isinstance(dtype, dict):
        if set(dtype) - {""}:
            raise ValueError(f"dtype={dtype!r}: BAGEL loads in one dtype; pass a torch.dtype or {{'': dtype}}.")
        dtype = dtype[""]
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        candidate = getattr(torch, name, None)
        if not isinstance(candidate, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not a torch dtype; use e.g. torch.bfloat16, 'bfloat16' or 'auto'.")
        dtype = candidate
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r}: pass a floating torch.dtype (e.g. torch.bfloat16), its name, or 'auto'.")
    return dtype


def _single_device(value: Any) -> torch.device:
    if isinstance(value, torch.device):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return torch.device("cuda", value)
    if isinstance(value, str):
        if value in ("auto", "balanced", "balanced_low_0", "sequential"):
            return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if value in ("disk", "meta"):
            raise ValueError(f"device_map={value!r}: BAGEL loads every weight onto a real device (cpu, cuda, ...).")
        return torch.device(value)
    raise ValueError(f"device_map entry {value!r} is not a device (use 'cpu', 'cuda', 'cuda:0', an int, 'auto').")


def _resolve_device(device_map: Any) -> torch.device:
    """None -> cpu; "auto" -> first CUDA device, else cpu; a device / name / index; {"": device}."""
    if device_map is None:
        return torch.device("cpu")
    if isinstance(device_map, dict):
        devices = {str(_single_device(v)) for v in device_map.values()}
        if len(devices) != 1:
            raise NotImplementedError(
                f"device_map={device_map!r} spreads the model over {sorted(devices)}: BAGEL loads onto one device; "
                "pass one device (e.g. 'cuda:0' or {'': 'cuda:0'}) or move submodules yourself after loading."
            )
        device = torch.device(devices.pop())
    else:
        device = _single_device(device_map)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device_map={device_map!r} asks for CUDA but torch sees no CUDA device; use 'cpu' or 'auto'.")
    return device


def _resolve_checkpoint_dir(
    name_or_path: str | os.PathLike, subfolder: str, hub_kwargs: dict, stage: int | None
) -> Path:
    """A local directory as is; a Hub id through `snapshot_download` (configs, code, tokenizer files,
    ema.safetensors, and ae.safetensors unless stage 1 was asked for)."""
    local = Path(name_or_path) / subfolder if subfolder else Path(name_or_path)
    if local.is_dir():
        return local
    text = os.fspath(name_or_path)
    if Path(name_or_path).exists():
        raise NotADirectoryError(f"{text} is a file; pass the checkpoint directory that holds {WEIGHTS_NAME}.")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", "") or not text:
        raise FileNotFoundError(
            f"No directory {local}: pass a local checkpoint directory (holding {WEIGHTS_NAME} and config.json or "
            f"llm_config.json + vit_config.json) or a Hub repository id such as 'ByteDance-Seed/BAGEL-7B-MoT'."
        )
    from huggingface_hub import snapshot_download

    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    weights = [WEIGHTS_NAME] if stage == 1 else [WEIGHTS_NAME, VAE_WEIGHTS_NAME]
    patterns = [prefix + p for p in (*HUB_ALLOW_PATTERNS, *weights)]
    kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
    root = snapshot_download(text, allow_patterns=patterns, **kwargs)
    return Path(root) / subfolder if subfolder else Path(root)


def _config_from_directory(directory: Path) -> BagelConfig:
    """`config.json`, or the released `llm_config.json` + `vit_config.json` when there is no
    config.json or when it is not a BAGEL one (e.g. a copy of the Qwen2 LLM config)."""
    file = directory / CONFIG_NAME
    if file.is_file():
        try:
            model_type = json.loads(file.read_text(encoding="utf-8")).get("model_type")
        except (ValueError, AttributeError) as err:
            raise ValueError(f"{file} is not a valid JSON config: {err}") from err
        if model_type not in (None, BagelConfig.model_type):
            if all((directory / name).is_file() for name in ("llm_config.json", "vit_config.json")):
                logger.info("%s describes a %r model; building the BAGEL config from llm_config.json + "
                            "vit_config.json instead.", file, model_type)
                return BagelConfig.from_released_files(directory)
            raise ValueError(
                f"{file} is a {model_type!r} config, not a BAGEL one, and the directory has no llm_config.json + "
                "vit_config.json to build one from; pass config=BagelConfig(...) or fix config.json."
            )
    return BagelConfig.from_pretrained(directory)


def _load_config(
    directory: Path, config: Any, stage: int | None, extra_kwargs: dict
) -> BagelConfig:
    if config is None:
        config = _config_from_directory(directory)
    elif isinstance(config, (str, os.PathLike)):
        config = BagelConfig.from_pretrained(config)
    elif isinstance(config, BagelConfig) or getattr(config, "model_type", None) == BagelConfig.model_type:
        config = copy.deepcopy(config)
    else:
        raise TypeError(f"config must be a BagelConfig or a path to one, got {type(config).__name__}.")
    for name in _UNSUPPORTED_LOAD_KWARGS:
        if extra_kwargs.get(name) is not None:
            raise NotImplementedError(f"BAGEL's from_pretrained does not support {name}=...; load without it.")
    unknown = []
    for key, value in extra_kwargs.items():
        if key in _IGNORED_LOAD_KWARGS or key in _UNSUPPORTED_LOAD_KWARGS:
            continue
        if hasattr(config, key):  # config overrides, as transformers' from_pretrained allows
            setattr(config, key, value)
        else:
            unknown.append(key)
    if unknown:
        logger.warning("BagelForUnifiedMultimodal.from_pretrained ignored unknown keyword argument(s): %s",
                       ", ".join(sorted(unknown)))
    if stage is not None:
        config.stage = stage
    config.apply_reference_overrides()
    return config


def _model_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}


def _config_excluded(key: str, config: BagelConfig) -> bool:
    """Checkpoint keys the config deliberately has no module for (the ViT when visual_und=False)."""
    if config.visual_und:
        return False
    return key.startswith(("model.vit_model.", "model.connector.", "model.vit_pos_embed."))


def _plan_checkpoint(
    name: str, header: dict, kept: list[str], to_native: Callable[[str], str], model_shapes: dict,
    config: BagelConfig, ignore_mismatched_sizes: bool,
) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """Split a checkpoint's kept keys into loadable / unexpected / mismatched native names, comparing
    the shapes of the header against the model before any tensor is read."""
    load, unexpected, mismatched = [], [], []
    for key in kept:
        native = to_native(key)
        if native not in model_shapes:
            if not _config_excluded(native, config):
                unexpected.append(native)
            continue
        shape = header[key][1]
        if shape != model_shapes[native]:
            mismatched.append((native, shape, model_shapes[native]))
            continue
        load.append(native)
    if mismatched and not ignore_mismatched_sizes:
        source = (
            "the vae_config of config.json" if name.endswith(VAE_WEIGHTS_NAME)
            else "config.json, or llm_config.json + vit_config.json"
        )
        lines = "\n".join(
            f"  {key}: checkpoint {list(ckpt)} vs model {list(want)}" for key, ckpt, want in mismatched[:20]
        )
        more = f"\n  ... ({len(mismatched) - 20} more)" if len(mismatched) > 20 else ""
        raise ValueError(
            f"{name} does not match the configuration: {len(mismatched)} tensor(s) have another shape than the "
            f"model built from the config expects:\n{lines}{more}\nUse the config that belongs to these weights "
            f"({source}), or pass ignore_mismatched_sizes=True to re-initialise those tensors."
        )
    return load, unexpected, mismatched


def _materialize_meta_tensors(model: "BagelPreTrainedModel", device: torch.device, dtype: torch.dtype) -> list[str]:
    """Give every parameter or buffer still on the meta device real storage on `device`, set by the
    model's `_init_weights` (other tensors of the same module keep their loaded values), then cast
    to `dtype`. As in transformers 5, whatever a checkpoint does not hold (buffers included) must be
    initialised by `_init_weights`. Returns the names of the tensors it initialised."""
    names = []
    for module_name, module in model.named_modules():
        tensors = {**module._parameters, **module._buffers}
        meta = [n for n, t in tensors.items() if t is not None and t.is_meta]
        if not meta:
            continue
        kept = {n: t.detach().clone() for n, t in tensors.items() if t is not None and not t.is_meta}
        for n in meta:
            old = tensors[n]
            new = torch.empty(old.shape, device=device, dtype=old.dtype)
            if n in module._parameters:
                module._parameters[n] = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                module._buffers[n] = new
            names.append(f"{module_name}.{n}" if module_name else n)
        model._init_weights(module)
        with torch.no_grad():
            for n, value in kept.items():
                getattr(module, n).copy_(value)
            for n in meta:
                tensor = getattr(module, n)
                if tensor.is_floating_point() and tensor.dtype != dtype:
                    tensor.data = tensor.data.to(dtype)
    return names


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def _load_bagel_pretrained(
    cls, name_or_path, model_args, *, config, stage, strict, dtype, device_map, output_loading_info,
    ignore_mismatched_sizes, hub_kwargs, subfolder, extra_kwargs,
):
    if model_args:
        raise TypeError(f"{cls.__name__}.from_pretrained takes no extra positional arguments, got {len(model_args)}.")
    stage = None if stage is None else normalize_stage(stage)  # fail fast on an unknown stage
    if name_or_path is None:
        raise ValueError("from_pretrained needs a checkpoint directory or Hub repository id.")
    directory = _resolve_checkpoint_dir(name_or_path, subfolder, hub_kwargs, stage)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        present = sorted(p.name for p in directory.iterdir())
        extra = (
            f" It has {', '.join(n for n in present if n.endswith(('.safetensors', '.bin', '.pt')))}, which is not "
            "the BAGEL layout (save with BagelForUnifiedMultimodal.save_pretrained)."
            if any(n.endswith((".safetensors", ".bin", ".pt")) for n in present) else ""
        )
        raise FileNotFoundError(
            f"No BAGEL weights in {directory}: {WEIGHTS_NAME} is missing.{extra} A BAGEL checkpoint directory holds "
            f"{WEIGHTS_NAME} (model weights), optionally {VAE_WEIGHTS_NAME} (VAE), and config.json or "
            "llm_config.json + vit_config.json; download the full checkpoint (e.g. ByteDance-Seed/BAGEL-7B-MoT)."
        )
    config = _load_config(directory, config, stage, extra_kwargs)
    stage = config.stage
    header = read_safetensors_header(weights)
    dtype = _resolve_load_dtype(dtype, config, header)
    device = _resolve_device(device_map)

    with torch.device("meta"):
        model = cls(config)
    model_shapes = _model_shapes(model)
    adapter = BagelStateDictAdapter(config, stage=stage)
    try:
        kept = adapter.select_keys(list(header), strict=strict)
    except KeyError as err:  # key names no BAGEL checkpoint has
        raise ValueError(f"{weights}: {err.args[0]}") from None
    to_native = lambda key: "model." + key.removeprefix("model.")  # noqa: E731
    load, unexpected, mismatched = _plan_checkpoint(
        str(weights), header, kept, to_native, model_shapes, config, ignore_mismatched_sizes
    )
    unexpected += [to_native(k) for k in header if _classify(k) == "unknown"]
    vae_file = directory / VAE_WEIGHTS_NAME
    vae_load, vae_header = [], {}
    if model.vae is not None and vae_file.is_file():
        vae_header = read_safetensors_header(vae_file)
        vae_load, vae_unexpected, vae_mismatched = _plan_checkpoint(
            str(vae_file), vae_header, list(vae_header), lambda k: "vae." + k, model_shapes, config,
            ignore_mismatched_sizes,
        )
        unexpected += vae_unexpected
        mismatched += vae_mismatched
    if unexpected and strict:
        raise ValueError(
            f"The checkpoint in {directory} has {len(unexpected)} tensor(s) the model built from its config has no "
            f"place for: {_format_keys(unexpected)}. The config does not describe these weights (e.g. more layers); "
            "fix the config, or pass strict=False to skip them."
        )

    loaded = set(load) | set(vae_load) | {key for key, _, _ in mismatched}  # mismatched: reported apart
    missing = [k for k in model_shapes if not k.startswith("vae.") and k not in loaded]
    if missing and strict:
        gen_only = all(_classify(k) == "gen" for k in missing)
        hint = (
            " These are the generation (GEN) weights: the checkpoint is understanding-only; load it with stage=1."
            if gen_only and stage == 2 else ""
        )
        raise ValueError(
            f"{weights} lacks {len(missing)} weight(s) the model needs: {_format_keys(missing)}.{hint} "
            "Check that the config matches the checkpoint, or pass strict=False to initialise them randomly."
        )
    vae_missing = [k for k in model_shapes if k.startswith("vae.") and k not in loaded]
    if vae_header and vae_missing and strict:
        raise ValueError(
            f"{vae_file} lacks {len(vae_missing)} VAE weight(s): {_format_keys(vae_missing)}. Check the vae_config, or "
            "pass strict=False to initialise them randomly."
        )

    # Read only the tensors that are loaded (never GEN ones at stage 1), one at a time, straight
    # onto the target device, and cast there: host memory holds at most one tensor at a time.
    from safetensors import safe_open

    read_on = str(device) if device.type == "cuda" else "cpu"

    def read(path: Path, names: dict[str, str]) -> dict[str, torch.Tensor]:
        out = {}
        with safe_open(str(path), framework="pt", device=read_on) as handle:
            for native, stored in names.items():
                tensor = handle.get_tensor(stored)
                target = dtype if tensor.is_floating_point() else tensor.dtype
                out[native] = tensor.to(device=device, dtype=target)
        return out

    stored_name = {to_native(k): k for k in kept}
    state = read(weights, {native: stored_name[native] for native in load})
    if vae_load:
        state.update(read(vae_file, {native: native[len("vae."):] for native in vae_load}))
    model.load_state_dict(state, strict=False, assign=True)
    del state

    if model.vae is not None and not vae_header:
        logger.warning(
            "%s has no %s: the VAE of this stage-2 model is randomly initialised, so encoding / decoding images "
            "gives noise. Put the FLUX autoencoder weights (ae.safetensors from the BAGEL release) in the "
            "checkpoint directory, or load with stage=1 for understanding only.", directory, VAE_WEIGHTS_NAME,
        )
    _materialize_meta_tensors(model, device, dtype)
    partial = missing + (vae_missing if vae_header else [])
    if partial:
        logger.warning("Initialised %d weight(s) missing from the checkpoint: %s", len(partial), _format_keys(partial))

    model.config.dtype = dtype
    model.config._name_or_path = os.fspath(name_or_path)
    model._bagel_checkpoint_dir = directory
    model.processor = _load_processor(directory, model.config)
    model.eval()
    if not output_loading_info:
        return model
    info = {
        "missing_keys": missing + vae_missing,
        "unexpected_keys": unexpected,
        "mismatched_keys": mismatched,
        "error_msgs": [],
    }
    return model, info


def _load_processor(directory: Path, config: BagelConfig):
    """The BagelProcessor of a checkpoint directory that has tokenizer files, else None."""
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        return None
    from .processing_bagel import BagelProcessor

    try:
        # config= spares AutoTokenizer a second read of config.json, which would need trust_remote_code.
        return BagelProcessor.from_pretrained(str(directory), config=config)
    except Exception as err:  # noqa: BLE001 - the model itself loaded; say why the processor did not
        logger.warning(
            "Loaded the model but not its processor from %s (%s: %s); pass processor=BagelProcessor.from_pretrained"
            "(...) to chat / generate_image / edit_image.", directory, type(err).__name__, err,
        )
        return None


# ---- saving ----------------------------------------------------------------------------------


def _relative_imports(file: Path) -> list[str]:
    """Module names a remote-code file imports relatively (`from .x import ...`)."""
    tree = ast.parse(file.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            names.append(node.module.split(".")[0])
    return names


def remote_code_files(*search_dirs: str | os.PathLike | None) -> dict[str, Path]:
    """`{file name: source path}` of the remote-code modules: the entry files
    (`REMOTE_CODE_ENTRY_FILES`, processing_bagel.py only when found) and, transitively, every
    sibling module they import; each found in the first of `search_dirs` that has it."""
    dirs = [Path(d) for d in (Path(__file__).resolve().parent, *search_dirs) if d is not None]
    found: dict[str, Path] = {}
    pending = list(REMOTE_CODE_ENTRY_FILES)
    while pending:
        name = pending.pop()
        if name in found:
            continue
        source = next((d / name for d in dirs if (d / name).is_file()), None)
        if source is None:
            if name != "processing_bagel.py":
                logger.warning("Remote-code module %s not found in %s; the saved directory will lack it.", name,
                               ", ".join(map(str, dirs)))
            continue
        found[name] = source
        pending += [f"{module}.py" for module in _relative_imports(source)]
    return found


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_bagel_pretrained(model, save_directory, is_main_process, state_dict, safe_serialization, push_to_hub):
    from safetensors.torch import save_file

    if push_to_hub:
        raise NotImplementedError(
            "push_to_hub is not supported by BAGEL's save_pretrained: save to a directory, then upload it with "
            "huggingface_hub.upload_folder(repo_id=..., folder_path=save_directory)."
        )
    if not safe_serialization:
        raise ValueError("BAGEL checkpoints are safetensors only (ema.safetensors / ae.safetensors): "
                         "use safe_serialization=True.")
    if not is_main_process:
        return
    directory = Path(save_directory)
    if directory.is_file():
        raise NotADirectoryError(f"save_directory {directory} is a file; pass a directory.")
    directory.mkdir(parents=True, exist_ok=True)

    state = model.state_dict() if state_dict is None else state_dict
    ema, vae, other = {}, {}, []
    for key, tensor in state.items():
        if key.startswith("model."):
            ema[key] = tensor
        elif key.startswith("vae."):
            vae[key[len("vae."):]] = tensor
        else:
            other.append(key)
    if other:
        raise ValueError(f"state_dict keys outside model.* / vae.* cannot be saved in the BAGEL layout: "
                         f"{_format_keys(other)}.")
    if not ema:
        raise ValueError("state_dict has no model.* tensors to write to ema.safetensors.")

    def to_file(tensors: dict) -> dict:
        out = {}
        for key, tensor in tensors.items():
            if tensor.is_meta:
                raise ValueError(f"{key} is on the meta device (never loaded); it cannot be saved.")
            out[key] = tensor.detach().to("cpu").contiguous()
        return out

    sources = remote_code_files(getattr(model, "_bagel_checkpoint_dir", None), model.config._name_or_path or None)
    config = copy.deepcopy(model.config)
    auto_map = dict(AUTO_MAP)
    if "processing_bagel.py" not in sources:
        auto_map.pop("AutoProcessor")
    config.auto_map = auto_map
    config.architectures = [type(model).__name__]
    config.dtype = next((t.dtype for t in ema.values() if t.is_floating_point()), None)
    for sub in (config.text_config, config.vision_config):
        if sub is not None:
            sub.dtype = config.dtype
    config._name_or_path = ""
    (directory / CONFIG_NAME).write_text(config.to_json_string(use_diff=False), encoding="utf-8")
    for name, data in config.released_sidecar_configs().items():
        data.pop("_name_or_path", None)
        _write_json(directory / name, data)

    metadata = {"format": "pt"}
    save_file(to_file(BagelStateDictAdapter(config).to_hf(ema)), str(directory / WEIGHTS_NAME), metadata=metadata)
    if vae:
        save_file(to_file(vae), str(directory / VAE_WEIGHTS_NAME), metadata=metadata)
    for name, source in sources.items():
        target = directory / name
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
    processor = getattr(model, "processor", None)
    if processor is not None:  # tokenizer files + processor_config.json, so the directory is complete
        processor.save_pretrained(str(directory))
