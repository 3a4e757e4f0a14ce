"""BAGEL: a Qwen2 Mixture-of-Transformers decoder with a SigLIP understanding tower and a
flow-matching generation head over FLUX-VAE latents.

Every layer of the decoder has understanding (UND) weights and, in stage 2, `*_moe_gen`
generation (GEN) siblings. Text and ViT tokens go through UND weights, VAE-latent tokens through
GEN weights, and all tokens share one packed attention. Everything works on packed sequences:
(N, hidden) tensors holding several samples back to back, with no padding.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.activations import ACT2FN

from .attention_bagel import AttentionPlan, TokenRoute, packed_attention
from .autoencoder_bagel import BagelAutoEncoder, patchify_latent
from .configuration_bagel import BagelConfig, normalize_stage, rope_theta
from .generation_bagel import BagelGenerationMixin, shift_timesteps
from .modeling_siglip_navit import SiglipVisionModel, apply_rotary, rotary_cos_sin

# ----------------------------------------------------------------------------------------------
# Qwen2 Mixture-of-Transformers decoder
# ----------------------------------------------------------------------------------------------


class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x32.to(x.dtype)


class Qwen2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


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
        _with_gen_sibling(self, "q_proj", lambda: nn.Linear(hidden, q_dim, bias=True), mot)
        _with_gen_sibling(self, "k_proj", lambda: nn.Linear(hidden, kv_dim, bias=True), mot)
        _with_gen_sibling(self, "v_proj", lambda: nn.Linear(hidden, kv_dim, bias=True), mot)
        _with_gen_sibling(self, "o_proj", lambda: nn.Linear(q_dim, hidden, bias=False), mot)
        norm = (lambda: Qwen2RMSNorm(self.head_dim, config.rms_norm_eps)) if config.qk_norm else nn.Identity
        _with_gen_sibling(self, "q_norm", norm, mot)
        _with_gen_sibling(self, "k_norm", norm, mot)

    def _routed(self, name: str, x: torch.Tensor, route: TokenRoute) -> torch.Tensor:
        return route(x, getattr(self, name), getattr(self, name + "_moe_gen", None))

    def forward(self, x, rotary, plan: AttentionPlan, route: TokenRoute, cache=None) -> torch.Tensor:
        n = x.shape[0]
        q = self._routed("q_proj", x, route).view(n, self.num_heads, self.head_dim)
        k = self._routed("k_proj", x, route).view(n, self.num_kv_heads, self.head_dim)
        v = self._routed("v_proj", x, route).view(n, self.num_kv_heads, self.head_dim)
        # Norms compute in float32; under autocast their output can come back wider than v.
        q = apply_rotary(self._routed("q_norm", q, route), *rotary).to(v.dtype)
        k = apply_rotary(self._routed("k_norm", k, route), *rotary).to(v.dtype)
        if cache is not None:  # keys/values of the cached context, merged with these tokens' own
            k, v = cache.keys_values(self.layer_idx, k, v)
        out = packed_attention(q, k, v, plan).reshape(n, self.num_heads * self.head_dim)
        return self._routed("o_proj", out, route)


class Qwen2MoTDecoderLayer(nn.Module):
    """Pre-norm decoder layer; in MoT form (stage 2) every weight has a `_moe_gen` twin."""

    def __init__(self, config, layer_idx: int, mot: bool):
        super().__init__()
        self.self_attn = Qwen2MoTAttention(config, layer_idx, mot)
        _with_gen_sibling(self, "mlp", lambda: Qwen2MLP(config), mot)
        _with_gen_sibling(self, "input_layernorm", lambda: Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps), mot)
        _with_gen_sibling(
            self, "post_attention_layernorm", lambda: Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps), mot
        )

    def _routed(self, name: str, x: torch.Tensor, route: TokenRoute) -> torch.Tensor:
        return route(x, getattr(self, name), getattr(self, name + "_moe_gen", None))

    def forward(self, x, rotary, plan: AttentionPlan, route: TokenRoute, cache=None) -> torch.Tensor:
        x = x + self.self_attn(self._routed("input_layernorm", x, route), rotary, plan, route, cache)
        return x + self._routed("mlp", self._routed("post_attention_layernorm", x, route), route)


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
        final norm of each token's side."""
        rotary = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta)
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, rotary, plan, route, cache)
        return route(x, self.norm, getattr(self, "norm_moe_gen", None))


class Qwen2ForCausalLM(nn.Module):
    """Container matching the checkpoint's `language_model.{model,lm_head}` names."""

    def __init__(self, config):
        super().__init__()
        self.model = Qwen2MoTModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)


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
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
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
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.act = ACT2FN[act]
        self.fc2 = nn.Linear(out_dim, out_dim)

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
            self.vae2llm = nn.Linear(patch_dim, text.hidden_size)
            self.llm2vae = nn.Linear(text.hidden_size, patch_dim)
            self.latent_pos_embed = PositionEmbedding2D(config.max_latent_size, text.hidden_size)

    def embed_vit_tokens(
        self, pixel_values: torch.Tensor, position_ids: torch.Tensor, seqlens: torch.Tensor
    ) -> torch.Tensor:
        """Packed patches (N, 3*P*P) of images with `seqlens` patches each -> (N, hidden)."""
        if not self.config.visual_und:
            raise ValueError("This model was built with visual_und=False and has no ViT tower.")
        seqlens = torch.as_tensor(seqlens, device=pixel_values.device)
        cu_seqlens = F.pad(seqlens.cumsum(0), (1, 0)).int()
        features = self.vit_model(pixel_values, position_ids, cu_seqlens)
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
    supports_gradient_checkpointing = False
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
        _check_packed_inputs(
            sequence_length, sample_lens, packed_position_ids, packed_text_ids, packed_text_indexes,
            packed_vit_token_indexes, packed_vae_token_indexes,
        )  # fmt: skip
        split_lens = split_lens if split_lens is not None else list(sample_lens)
        attn_modes = attn_modes if attn_modes is not None else ["causal"] * len(split_lens)
        device = packed_text_ids.device
        embeds = self.get_input_embeddings()(packed_text_ids)
        sequence = embeds.new_zeros(sequence_length, embeds.shape[1])
        sequence = sequence.index_copy(0, packed_text_indexes, embeds)

        if packed_vit_tokens is not None:
            if vit_token_seqlens is None or packed_vit_position_ids is None or packed_vit_token_indexes is None:
                raise ValueError(
                    "packed_vit_tokens needs vit_token_seqlens, packed_vit_position_ids and packed_vit_token_indexes."
                )
            vit = model.embed_vit_tokens(packed_vit_tokens, packed_vit_position_ids, vit_token_seqlens)
            sequence = sequence.index_copy(0, packed_vit_token_indexes, vit.to(sequence.dtype))

        gen_index, noise, clean, timesteps = None, None, None, None
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
            latents = model.embed_latent_tokens(x_t, timesteps, packed_latent_position_ids)
            sequence = sequence.index_copy(0, packed_vae_token_indexes, latents.to(sequence.dtype))
            gen_index = packed_vae_token_indexes

        plan = AttentionPlan.from_splits(split_lens, attn_modes, sample_lens, device)
        route = TokenRoute(sequence_length, gen_index, freeze_und=self.config.text_config.freeze_und)
        hidden = model.language_model.model(sequence, packed_position_ids, plan, route)

        outputs: dict[str, torch.Tensor | None] = {"ce": None, "mse": None}
        if ce_loss_indexes is not None:
            if packed_label_ids is None:
                raise ValueError("ce_loss_indexes was given without packed_label_ids.")
            logits = self.get_output_embeddings()(hidden[ce_loss_indexes])
            outputs["ce"] = F.cross_entropy(logits.float(), packed_label_ids, reduction="none")
        if mse_loss_indexes is not None and clean is not None:
            prediction = model.llm2vae(hidden[mse_loss_indexes])
            target = (noise - clean)[timesteps > 0]
            if target.shape[0] != prediction.shape[0]:
                raise ValueError(
                    f"mse_loss_indexes selects {prediction.shape[0]} tokens but {target.shape[0]} latent tokens are "
                    "noised (timestep > 0)."
                )
            outputs["mse"] = (prediction.float() - target.float()) ** 2
        if output_hidden_states:
            outputs["last_hidden_state"] = hidden
        return outputs


def _check_packed_inputs(
    sequence_length, sample_lens, position_ids, text_ids, text_indexes, vit_indexes, vae_indexes
) -> None:
    """Clear errors for packed inputs whose lengths do not add up."""
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
    counts = {"text": text_indexes.shape[0]}
    counts["vit"] = 0 if vit_indexes is None else vit_indexes.shape[0]
    counts["vae"] = 0 if vae_indexes is None else vae_indexes.shape[0]
    if sum(counts.values()) != sequence_length:
        raise ValueError(
            f"The token indexes cover {sum(counts.values())} positions ({counts}) but sequence_length is "
            f"{sequence_length}: every packed position must be exactly one text, ViT or VAE token."
        )
