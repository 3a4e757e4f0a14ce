"""BAGEL: a Qwen2 Mixture-of-Transformers decoder with a SigLIP understanding tower and a
flow-matching generation head over FLUX-VAE latents.

Every layer of the decoder has understanding (UND) weights and, in stage 2, `*_moe_gen`
generation (GEN) siblings. Text and ViT tokens go through UND weights, VAE-latent tokens through
GEN weights, and all tokens share one packed attention. Everything works on packed sequences:
(N, hidden) tensors holding several samples back to back, with no padding.
"""

from __future__ import annotations

if not __package__:  # `import modeling_bagel` from a clone (no package for the relative imports)
    raise ImportError(
        "modeling_bagel.py is remote code whose modules import each other relatively, so it is not imported as a "
        "plain module. From a clone use transformers.dynamic_module_utils.get_class_from_dynamic_module("
        "'modeling_bagel.BagelForUnifiedMultimodal', 'path/to/the/clone'), or examples/quickstart.py --model "
        "(README: Use from a clone)."
    )

import math
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .imports_bagel import quiet_third_party_imports

with quiet_third_party_imports():  # transformers imports torchao where installed
    from transformers import PreTrainedModel
    from transformers.activations import ACT2FN
    from transformers.modeling_layers import GradientCheckpointingLayer

from .attention_bagel import AttentionPlan, TokenRoute, to_device
from .autoencoder_bagel import BagelAutoEncoder, patchify_latent
from .configuration_bagel import BagelConfig, rope_theta
from .contexts_bagel import KVCacheStep
from .generation_bagel import BagelGenerationMixin
from .guidance_bagel import shift_timesteps
from .layers_bagel import Linear, rotary_cos_sin
from .loading_bagel import (  # noqa: F401 - AUTO_MAP, remote_code_files: the loading API, importable from here
    AUTO_MAP,
    load_pretrained,
    remote_code_files,
    save_bagel_pretrained,
    unexpected_key_patterns,
)
from .modeling_siglip_navit import SiglipVisionModel
from .ops_bagel import (
    attention_implementation,
    check_attention_implementation,
    gated_mlp,
    layer_attention,
    linears,
    mlp_residual,
    norm_rotary,
    packed_attention,
    rms_norm,
)
from .validation_bagel import DeviceCheck, check_training_inputs, raise_failed

# isort: split
# Not used here: transformers before 5.15 copies a local directory's remote code only one relative
# import deep from the file it loads (the Hub path, and later versions, follow imports all the way),
# so every module the model reaches through another is imported here as well. tests/test_layout.py
# checks that none is missing.
from .decoding_bagel import DecodePool  # noqa: F401
from .generation_config_bagel import BagelGenerationConfig  # noqa: F401
from .kernels_bagel import silu_mul  # noqa: F401
from .parallel_bagel import BagelParallel  # noqa: F401
from .processing_bagel import BagelProcessor  # noqa: F401
from .state_dict_adapter import BagelStateDictAdapter  # noqa: F401
from .step_cache_bagel import AdaptiveTaylor  # noqa: F401

# ----------------------------------------------------------------------------------------------
# Qwen2 Mixture-of-Transformers decoder
# ----------------------------------------------------------------------------------------------


class Qwen2RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (s, norm(s)) for s = residual + x (the decoder's residual add)."""
        return rms_norm(self, x, residual)


class Qwen2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]
        self.fused_silu = config.hidden_act == "silu"  # Qwen2's: `ops_bagel.gated_mlp` may fuse it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(gated_mlp(self, x))

    def forward_residual(self, x: torch.Tensor, norm: Qwen2RMSNorm, residual: torch.Tensor) -> torch.Tensor:
        """s + MLP(norm(s)) for s = residual + x: the decoder layer after attention (decoding, the
        adds ride in kernels: `ops_bagel.mlp_residual`)."""
        return mlp_residual(self, x, norm, residual)


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

    def project(self, x: torch.Tensor, norm: nn.Module, rotary, side: str):
        """q (n, heads, head_dim), k, v (n, kv_heads, head_dim) of norm(x) (the layer's input norm)
        through one side's weights (`side` "" for UND, "_moe_gen" for GEN), q and k normalised and
        rotated (`rotary`: cos and signed sin (n, head_dim) of x's tokens)."""
        n = x.shape[0]
        layers = tuple(getattr(self, name + side) for name in ("q_proj", "k_proj", "v_proj"))
        q, k, v = linears(x, layers, norm)
        q = norm_rotary(q.view(n, self.num_heads, self.head_dim), getattr(self, "q_norm" + side), *rotary)
        k = norm_rotary(k.view(n, self.num_kv_heads, self.head_dim), getattr(self, "k_norm" + side), *rotary)
        return q, k, v.view(n, self.num_kv_heads, self.head_dim)

    def forward(self, q, k, v, plan: AttentionPlan, route: TokenRoute, cache=None) -> torch.Tensor:
        """Attention of the projected tokens, all in route order -> (n, heads * head_dim), before
        the output projection."""
        if cache is None:  # the plan is in route order (Qwen2MoTModel.forward)
            return packed_attention(q, k, v, plan).flatten(1)
        # attention over the cached context too, which is kept in packed order
        return route.sort(
            cache.attend(self.layer_idx, route.unsort(q), route.unsort(k), route.unsort(v), plan)
        ).flatten(1)


class Qwen2MoTDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer; in MoT form (stage 2) every weight has a `_moe_gen` twin. Tokens
    are routed block by block (norm + projections, output projection, norm + MLP): one
    concatenation per output instead of one per op. `model.gradient_checkpointing_enable()`
    recomputes it in the backward (transformers' `GradientCheckpointingLayer`); its forward is
    deterministic given its arguments (the plan and route are read, never changed), so the
    recomputation gives the same values."""

    def __init__(self, config, layer_idx: int, mot: bool, attn_config=None):
        """`attn_config`: the config whose `_attn_implementation` the attention runs (default: `config`)."""
        super().__init__()
        self.mot = mot
        self.attn_config = config if attn_config is None else attn_config
        self.self_attn = Qwen2MoTAttention(config, layer_idx, mot)
        _with_gen_sibling(self, "mlp", lambda: Qwen2MLP(config), mot)
        _with_gen_sibling(self, "input_layernorm", lambda: Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps), mot)
        _with_gen_sibling(
            self, "post_attention_layernorm", lambda: Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps), mot
        )

    def _qkv(self, inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor], side: str):
        x, *rotary = inputs
        return self.self_attn.project(x, getattr(self, "input_layernorm" + side), rotary, side)

    def _out(self, x: torch.Tensor, side: str) -> torch.Tensor:
        return getattr(self.self_attn, "o_proj" + side)(x)

    def _mlp(self, x: torch.Tensor, side: str) -> torch.Tensor:
        return getattr(self, "mlp" + side)(getattr(self, "post_attention_layernorm" + side)(x))

    def _routed(self, block: Callable, x: torch.Tensor, route: TokenRoute):
        gen = (lambda part: block(part, "_moe_gen")) if self.mot else None
        return route(x, lambda part: block(part, ""), gen)

    def forward(self, x, rotary, plan: AttentionPlan, route: TokenRoute, cache=None) -> torch.Tensor:
        with layer_attention(self.attn_config):  # the recomputation runs outside the model's forward
            q, k, v = self._routed(self._qkv, (x, *rotary), route)
            attn = self._routed(self._out, self.self_attn(q, k, v, plan, route, cache), route)
        if route.und_only:  # one block over all tokens: the residual adds may ride in the MLP's kernels
            return self.mlp.forward_residual(attn, self.post_attention_layernorm, x)
        x = x + attn  # outside the route: one concatenation per output
        return x + self._routed(self._mlp, x, route)


class Qwen2MoTModel(nn.Module):
    def __init__(self, config, attn_config=None):
        """`attn_config`: the config whose `_attn_implementation` the attention runs, read at each
        forward (the model's BagelConfig, which `attn_implementation` and `set_attn_implementation`
        set; default: `config`)."""
        super().__init__()
        self.config = config
        self.attn_config = config if attn_config is None else attn_config
        mot = config.layer_module == "Qwen2MoTDecoderLayer"
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rope_theta = rope_theta(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen2MoTDecoderLayer(config, i, mot, self.attn_config) for i in range(config.num_hidden_layers)
        )
        _with_gen_sibling(self, "norm", lambda: Qwen2RMSNorm(config.hidden_size, config.rms_norm_eps), mot)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        position_ids: torch.Tensor,
        plan: AttentionPlan,
        route: TokenRoute,
        cache: KVCacheStep | None = None,
        final_norm: bool = True,
    ) -> torch.Tensor:
        """inputs_embeds (N, hidden), position_ids (N,) -> last hidden state (N, hidden), after the
        final norm of each token's side (before it with `final_norm=False`: what a step cache
        keeps, step_cache_bagel.py). The layers see the tokens in route order. `cache`: the KV
        cache's step (a `KVCacheStep`), whose `attend(layer_idx, q, k, v, plan)` each layer's attention calls."""
        cos, sin = rotary_cos_sin(route.sort(position_ids), self.head_dim, self.rope_theta)
        rotary = cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)
        x = route.sort(inputs_embeds)
        if cache is None and route.inverse is not None:
            plan = plan.in_storage_order(route.inverse)
        with attention_implementation(self.attn_config):
            for layer in self.layers:
                x = layer(x, rotary, plan, route, cache)
        if not final_norm:
            return route.unsort(x)
        return route.unsort(route(x, self.norm, getattr(self, "norm_moe_gen", None)))


class Qwen2ForCausalLM(nn.Module):
    """Container matching the checkpoint's `language_model.{model,lm_head}` names."""

    def __init__(self, config, attn_config=None):
        super().__init__()
        self.model = Qwen2MoTModel(config, attn_config)
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
        self.language_model = Qwen2ForCausalLM(text, attn_config=config)
        if config.visual_und:
            if config.vision_config is None:
                raise ValueError("visual_und=True needs a vit_config / vision_config for the ViT tower.")
            self.vit_model = SiglipVisionModel(config.vision_config, attn_config=config)
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
        self,
        pixel_values: torch.Tensor,
        position_ids: torch.Tensor,
        seqlens: torch.Tensor | list[int],
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


def _prepare_config_for_stage(config: BagelConfig) -> None:
    """Make `visual_gen`, the decoder layer kind and the reference overrides agree with the stage
    before modules are built (idempotent)."""
    config.apply_reference_overrides()


def _plain_linears(model: nn.Module) -> None:
    """Turn our `Linear` layers into plain `nn.Linear` (same parameters): transformers' quantizers
    replace only modules whose type is exactly `nn.Linear` (bitsandbytes checks `type(m) is
    nn.Linear`), and our subclass only adds the float32-master-weight training path, which
    quantized weights never take. transformers sets `config.quantization_config` before it builds
    the model, so this runs before the quantizer looks for layers."""
    for module in model.modules():
        if type(module) is Linear:
            module.__class__ = nn.Linear


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
    # attn_implementation: "sdpa" (the default: a varlen flash kernel where available, else SDPA) or
    # "eager"; the attention ops read it at each forward (`ops_bagel.attention_implementation`).
    _supports_sdpa = True

    def _check_and_adjust_attn_implementation(self, attn_implementation, *args, **kwargs):
        # transformers accepts any registered kernel (flash_attention_*, flex_attention, paged|..., Hub
        # kernels); this model runs only its own two, so the others are refused here, by name.
        check_attention_implementation(attn_implementation)
        return super()._check_and_adjust_attn_implementation(attn_implementation, *args, **kwargs)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        # transformers guesses from the module's source, which has no AttentionInterface: the ops
        # read the config's `_attn_implementation` at each forward, so setting it works.
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # torch.nn.init functions, which transformers 5 guards: a tensor loaded from the checkpoint
        # keeps its value when a sibling of the same module is initialised.
        std = self.config.text_config.initializer_range
        if isinstance(module, PositionEmbedding2D):
            if not getattr(module.pos_embed, "_is_hf_initialized", False):
                module.reset_table()
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, 0.0, std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif isinstance(module, Qwen2RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        # The flow-matching head starts at zero so stage 2 begins with no velocity prediction.
        if getattr(self.model, "llm2vae", None) is module:
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)


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
        if getattr(config, "quantization_config", None) is not None:
            _plain_linears(self)
        self.post_init()
        # Per instance (transformers reads the instance's): what this config leaves unread.
        self._keys_to_ignore_on_load_unexpected = unexpected_key_patterns(config)

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
        always_run: tuple[str, ...] | list[str] | set[str] = (),
        **unused: Any,
    ) -> dict[str, torch.Tensor | None]:
        """Packed training forward (the reference's), returning unreduced losses.

        Returns {"ce": (num_ce_tokens,) or None, "mse": (num_noised_tokens, p*p*C) or None}, plus
        "last_hidden_state" (sequence_length, hidden) when `output_hidden_states`. `packed_noise`
        (num_vae_tokens, p*p*C) fixes the flow-matching noise; by default it is drawn with randn.
        `ce_loss_weights` is accepted for collator compatibility; weighting is the trainer's job.

        `always_run` names parts that run even when the pack has nothing for them, so that their
        weights get zero gradients rather than none and data-parallel ranks with different packs
        make the same FSDP collectives: "vit" (the ViT and connector, on a one-patch black image
        whose output enters times zero), "gen" (the GEN weights, the latent embedders, on zero
        tokens), "ce" (the lm head on zero tokens: "ce" is then (0,)), "mse" (llm2vae likewise).
        The outputs are those of the pack alone.
        """
        # docs/training.md, "Training inputs": wrong keywords, types and shapes raise here; the
        # checks of values join the forward's own, read in one host sync below.
        checks = check_training_inputs(self, {k: v for k, v in locals().items() if k != "self"})
        always_run = set(always_run)
        if not always_run <= {"vit", "gen", "ce", "mse"}:
            raise ValueError(f"always_run={sorted(always_run)}: use parts among 'vit', 'gen', 'ce', 'mse'.")
        model = self.model
        split_lens = split_lens if split_lens is not None else list(sample_lens)
        attn_modes = attn_modes if attn_modes is not None else ["causal"] * len(split_lens)
        # Nothing here waits for the GPU before the ViT is queued (its kernels are too short to keep
        # the GPU busy on their own). The checks of values are read later, in one sync before the
        # index_copy: the lookups before it take clamped ids and positions, so that a bad value
        # raises its message there rather than a device-side assert (or an IndexError on the CPU).
        plan = AttentionPlan.from_splits(split_lens, attn_modes, sample_lens, packed_text_ids.device)
        checks.append(
            _token_coverage(sequence_length, packed_text_indexes, packed_vit_token_indexes, packed_vae_token_indexes)
        )
        checks += _images_in_image_splits(split_lens, attn_modes, packed_vit_token_indexes, packed_vae_token_indexes)
        embedding = self.get_input_embeddings()
        embeds = embedding(packed_text_ids.clamp(0, embedding.num_embeddings - 1))

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
            vit_positions = packed_vit_position_ids.clamp(0, self.config.vit_max_num_patch_per_side**2 - 1)
            vit = model.embed_vit_tokens(packed_vit_tokens, vit_positions, vit_token_seqlens, max_seqlen)
        elif "vit" in always_run and self.config.visual_und:
            # attention over zero tokens would leave the q/k/v weights out of the graph: one patch
            patch = embeds.new_zeros(1, 3 * self.config.vit_patch_size**2, dtype=torch.float32)
            dummy = model.embed_vit_tokens(patch, packed_text_ids.new_zeros(1), [1])
            embeds = embeds + 0 * dummy.sum().to(embeds.dtype)

        latents, target = None, None
        if padded_latent is not None:
            if not self.config.visual_gen:
                raise ValueError(
                    "padded_latent was given to a stage-1 (understanding-only) model; load it with stage=2."
                )
            if None in (
                patchified_vae_latent_shapes,
                packed_latent_position_ids,
                packed_vae_token_indexes,
                packed_timesteps,
            ):
                raise ValueError(
                    "padded_latent needs patchified_vae_latent_shapes, packed_latent_position_ids, "
                    "packed_vae_token_indexes and packed_timesteps."
                )
            p = self.config.latent_patch_size
            clean = torch.cat(
                [
                    patchify_latent(lat[:, : h * p, : w * p], p)
                    for lat, (h, w) in zip(padded_latent, patchified_vae_latent_shapes)
                ]
            )
            if clean.shape[0] != packed_vae_token_indexes.shape[0]:
                raise ValueError(
                    f"patchified_vae_latent_shapes give {clean.shape[0]} latent tokens but packed_vae_token_indexes "
                    f"has {packed_vae_token_indexes.shape[0]}."
                )
            noise = torch.randn_like(clean) if packed_noise is None else packed_noise.to(clean)
            if noise.shape != clean.shape:
                raise ValueError(f"packed_noise must have shape {tuple(clean.shape)}, got {tuple(noise.shape)}.")
            checks += _timestep_checks(
                split_lens, attn_modes, packed_vae_token_indexes, packed_timesteps, mse_loss_indexes
            )
            timesteps = shift_timesteps(torch.sigmoid(packed_timesteps.float()), self.config.timestep_shift)
            x_t = (1 - timesteps[:, None]) * clean + timesteps[:, None] * noise
            target = (noise - clean)[timesteps > 0]  # the velocity of noised tokens (this waits for the GPU)
            latent_positions = packed_latent_position_ids.clamp(0, self.config.max_latent_size**2 - 1)
            latents = model.embed_latent_tokens(x_t, timesteps, latent_positions)
        elif "gen" in always_run and self.config.visual_gen:
            empty = packed_text_ids.new_zeros(0)
            packed_vae_token_indexes = empty
            latents = model.embed_latent_tokens(embeds.new_zeros(0, model.vae2llm.in_features), empty.float(), empty)

        raise_failed(checks)  # before any index below is used
        sequence = embeds.new_zeros(sequence_length, embeds.shape[1]).index_copy(0, packed_text_indexes, embeds)
        if vit is not None:
            sequence = sequence.index_copy(0, packed_vit_token_indexes, vit.to(sequence.dtype))
        gen_index = None
        if latents is not None:
            sequence = sequence.index_copy(0, packed_vae_token_indexes, latents.to(sequence.dtype))
            gen_index = packed_vae_token_indexes

        route = TokenRoute(sequence_length, gen_index, self.config.text_config.freeze_und, run_gen="gen" in always_run)
        hidden = model.language_model.model(sequence, packed_position_ids, plan, route)

        outputs: dict[str, torch.Tensor | None] = {"ce": None, "mse": None}
        if "ce" in always_run and ce_loss_indexes is None:
            ce_loss_indexes = packed_label_ids = packed_text_ids.new_zeros(0)
        if "mse" in always_run and self.config.visual_gen and (mse_loss_indexes is None or target is None):
            mse_loss_indexes = packed_text_ids.new_zeros(0)
            target = hidden.new_zeros(0, model.llm2vae.out_features)
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
        stage: int | str | None = None,
        strict: bool = True,
        **kwargs: Any,
    ):
        """Load BAGEL from a directory or Hub repository in the released layout, through
        transformers' own `PreTrainedModel.from_pretrained` (`loading_bagel` says how).

        The directory holds `ema.safetensors` (every model weight, released key names), optionally
        `ae.safetensors` (the FLUX VAE) and either `config.json` or the released `llm_config.json` +
        `vit_config.json` (the reference's build-time overrides are then applied exactly once).
        A Hub id is fetched with `huggingface_hub.snapshot_download` (configs, tokenizer files,
        remote code, and only the weight files the stage needs); `revision`, `cache_dir`, `token`,
        `local_files_only` and `force_download` are passed through.

        Every argument of transformers' `from_pretrained` works as there: `dtype` ("auto" by
        default: the config's dtype, else the checkpoint's), `device_map` ("auto", "balanced", a
        dict over devices, "cpu", "disk"), `max_memory`, `offload_folder`, `quantization_config`
        (bitsandbytes 4/8-bit, torchao, ...; `loading_bagel.UNQUANTIZED_MODULES` stay unquantized
        unless the config names its own skip list), `output_loading_info`, `key_mapping`,
        `ignore_mismatched_sizes`, and config attributes as keyword overrides (`vit_rope=True`).

        Args:
            stage: 1 (understanding only: no GEN module is built and no GEN or VAE tensor is read)
                or 2 (joint, MoT). Defaults to the config's stage.
            strict: with True (default), checkpoint tensors the model has no place for and model
                weights the checkpoint lacks raise an error naming them; with False they are
                reported (`output_loading_info`) and the missing ones initialised by `_init_weights`.

        Shapes that disagree with the config raise an error naming them unless
        `ignore_mismatched_sizes=True`. A stage-2 checkpoint without `ae.safetensors` is refused
        (with `strict=False` the VAE stays randomly initialised and a warning is logged). When the
        directory has tokenizer files, `model.processor` is the checkpoint's `BagelProcessor` (used by
        `chat` / `generate_image` / `edit_image`), else None. `model.generation_config` holds the
        sampling defaults: the directory's `generation_config.json` over BAGEL's (generation_config_bagel.py).
        The model is returned in eval mode.
        """
        loaded = load_pretrained(
            super().from_pretrained,
            pretrained_model_name_or_path,
            model_args,
            stage=stage,
            strict=strict,
            kwargs=kwargs,
        )
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        for module in model.modules():  # transformers' loader makes every loaded parameter trainable
            if isinstance(module, PositionEmbedding2D):
                module.pos_embed.requires_grad_(False)
        return loaded

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
        * `model.safetensors.index.json`: which file holds each tensor, so that transformers' own
          loader reads the directory;
        * `generation_config.json`: `model.generation_config` (the sampling defaults);
        * the remote-code modules (`configuration_bagel.py`, `modeling_bagel.py`,
          `processing_bagel.py` and every sibling module they import).

        When the model has a `processor` (loaded with it), its files (tokenizer, `processor_config.json`)
        are written too, so the directory is complete. The weights
        are single, unsharded files, as released. Only the main process writes
        (`is_main_process=False` returns at once). `safe_serialization=False` and `push_to_hub=True`
        are not supported; other transformers arguments (`max_shard_size`, ...) are ignored.
        """
        save_bagel_pretrained(self, save_directory, is_main_process, state_dict, safe_serialization, push_to_hub)


def _token_coverage(sequence_length, text_indexes, vit_indexes, vae_indexes) -> DeviceCheck:
    """Every packed position is exactly one text, ViT or VAE token: a check for `raise_failed`."""
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


def _split_of(split_lens: list[int], index: torch.Tensor) -> torch.Tensor:
    """The split each packed index falls in (clamped to the last: indexes are checked apart)."""
    ends = to_device(split_lens, index.device).cumsum(0)
    return torch.searchsorted(ends, index, right=True).clamp(max=len(split_lens) - 1)


def _images_in_image_splits(split_lens, attn_modes, *indexes: torch.Tensor | None) -> list[DeviceCheck]:
    """ViT and VAE tokens lie in `full` or `noise` splits (an image split), never in a `causal`
    one: a check for `raise_failed` (none without image tokens)."""
    message = (
        "An image token (packed_vit_token_indexes / packed_vae_token_indexes) lies in a `causal` split: "
        "split_lens and attn_modes must give every image its own `full` (or `noise`) split, "
        "[start] image tokens [end]."
    )
    given = [index for index in indexes if index is not None and index.numel()]
    if not given:
        return []
    image_index = torch.cat(given)
    causal = to_device([mode == "causal" for mode in attn_modes], image_index.device, torch.bool)
    return [((~causal[_split_of(split_lens, image_index)]).all(), message)]


def _timestep_checks(split_lens, attn_modes, vae_indexes, timesteps, mse_indexes) -> list[DeviceCheck]:
    """The pack's conventions for VAE tokens, as checks for `raise_failed`: those of `noise` splits
    have finite raw timesteps, one per image (the reference draws one per image), all others -inf
    (clean, t = 0); `mse_loss_indexes` are exactly the noised ones, in packed order (the order the
    MSE target is taken in)."""
    if timesteps.shape != vae_indexes.shape:
        raise ValueError(
            f"packed_timesteps has shape {tuple(timesteps.shape)}; it needs one raw timestep per VAE token "
            f"({tuple(vae_indexes.shape)}, as packed_vae_token_indexes)."
        )
    split = _split_of(split_lens, vae_indexes)
    noised = to_device([mode == "noise" for mode in attn_modes], vae_indexes.device, torch.bool)[split]
    clean = timesteps == float("-inf")
    value = torch.where(noised, timesteps.float(), 0.0).nan_to_num(0.0, 0.0, 0.0)
    low = value.new_full((len(split_lens),), math.inf).scatter_reduce(0, split, value, "amin")
    high = value.new_full((len(split_lens),), -math.inf).scatter_reduce(0, split, value, "amax")
    checks = [
        (
            (noised | clean).all(),
            "A VAE token outside a `noise` split has a finite timestep: clean images (`full` "
            "splits) take packed_timesteps = -inf (t = 0, no noise); only `noise` splits are noised.",
        ),
        (
            (~noised | ~(clean | timesteps.isnan())).all(),
            "A VAE token in a `noise` split has timestep -inf or NaN: "
            "noised images take a finite raw timestep (before the sigmoid), e.g. one torch.randn(()) per image; "
            "clean images go in `full` splits.",
        ),
        (
            (low[split] == high[split]).all(),
            "packed_timesteps differ within one noised image: every latent token of a `noise` split takes the "
            "same raw timestep (one torch.randn(()) per image, docs/training.md, 'Training inputs').",
        ),
    ]
    if mse_indexes is not None:
        n = mse_indexes.shape[0]
        slot = torch.where(noised, noised.long().cumsum(0) - 1, n).clamp(max=n)
        in_order = vae_indexes.new_full((n + 1,), -1).scatter(0, slot, vae_indexes)[:n]
        checks.append(
            (
                (noised.sum() == n) & (in_order == mse_indexes).all(),
                "mse_loss_indexes selects other "
                "positions than the noised VAE tokens: it must list exactly the VAE tokens of `noise` splits, "
                "in packed order.",
            )
        )
    return checks


def _vit_lengths_check(seqlens: torch.Tensor, num_tokens: int) -> DeviceCheck:
    """ViT lengths that cover the packed ViT tokens: a check for `raise_failed`."""
    message = f"vit_token_seqlens must give one length per image, adding up to the {num_tokens} packed ViT tokens."
    return (seqlens >= 0).all() & (seqlens.sum() == num_tokens), message
