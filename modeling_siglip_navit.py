"""SigLIP vision tower in NaViT form: variable-resolution images packed into one sequence.

Images arrive as pre-flattened 14x14 patches, (N, 3*P*P) in (py, px, channel) order, packed
image after image; `cu_seqlens` says where each image starts. Attention is bidirectional within an
image and never across images. Parameter names equal the released checkpoint under
`vit_model.vision_model.`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from transformers import SiglipVisionConfig
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention_bagel import AttentionPlan
from .kernels_bagel import apply_rotary
from .layers_bagel import Linear, rotary_cos_sin
from .ops_bagel import attention_implementation, layer_attention, linears, packed_attention


def conv_to_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d patch kernel (out, C, P, P) -> Linear weight (out, P*P*C) in (py, px, channel) order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


class SiglipRotary2D(nn.Module):
    """2-D RoPE for `rope=True`: row frequencies on the first half of each head, column on the second."""

    def __init__(self, head_dim: int, max_num_patch_per_side: int, theta: float = 10000.0):
        super().__init__()
        self.half = head_dim // 2
        self.side = max_num_patch_per_side
        self.theta = theta

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = position_ids // self.side, position_ids % self.side
        cos_r, sin_r = rotary_cos_sin(rows, self.half, self.theta)
        cos_c, sin_c = rotary_cos_sin(cols, self.half, self.theta)
        return torch.cat((cos_r, cos_c), -1), torch.cat((sin_r, sin_c), -1)


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    first = apply_rotary(x[..., :half], cos[:, :half], sin[:, :half])
    second = apply_rotary(x[..., half:], cos[:, half:], sin[:, half:])
    return torch.cat((first, second), dim=-1)


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.num_patches_per_side = config.image_size // config.patch_size
        # Built as SigLIP's conv so a stock SigLIP checkpoint loads; BAGEL converts it to a Linear
        # over pre-flattened patches (`convert_conv2d_to_linear`) before use.
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        if not config.rope:
            self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)

    def convert_conv2d_to_linear(self) -> None:
        """Replace the conv patch embedding by the equivalent Linear on flattened patches."""
        conv = self.patch_embedding
        if not isinstance(conv, nn.Conv2d):
            return
        linear = Linear(
            conv.in_channels * conv.kernel_size[0] ** 2,
            conv.out_channels,
            device=conv.weight.device,
            dtype=conv.weight.dtype,
        )
        if not conv.weight.is_meta:
            with torch.no_grad():
                linear.weight.copy_(conv_to_linear_weight(conv.weight))
                linear.bias.copy_(conv.bias)
        self.patch_embedding = linear

    def forward(self, packed_pixel_values: torch.Tensor, packed_flattened_position_ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.patch_embedding, nn.Conv2d):
            raise RuntimeError("Call convert_conv2d_to_linear() before feeding flattened patches.")
        expected = self.patch_embedding.in_features
        if packed_pixel_values.dim() != 2 or packed_pixel_values.shape[1] != expected:
            raise ValueError(
                f"packed_pixel_values must be (num_patches, {expected}) flattened patches, "
                f"got {tuple(packed_pixel_values.shape)}."
            )
        # The bias's dtype: a quantized weight's (int8 / packed 4-bit) is not the compute dtype.
        embeddings = self.patch_embedding(packed_pixel_values.to(self.patch_embedding.bias.dtype))
        if not self.config.rope:
            embeddings = embeddings + self.position_embedding(packed_flattened_position_ids)
        return embeddings


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        self.q_proj = Linear(config.hidden_size, config.hidden_size)
        self.k_proj = Linear(config.hidden_size, config.hidden_size)
        self.v_proj = Linear(config.hidden_size, config.hidden_size)
        self.out_proj = Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, plan: AttentionPlan, rotary=None) -> torch.Tensor:
        shape = (x.shape[0], self.num_heads, self.head_dim)
        q, k, v = (t.view(shape) for t in linears(x, (self.q_proj, self.k_proj, self.v_proj)))
        if rotary is not None:
            q, k = apply_rotary_2d(q, *rotary), apply_rotary_2d(k, *rotary)
        return self.out_proj(packed_attention(q, k, v, plan).reshape(x.shape))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.act = ACT2FN[config.hidden_act]
        self.fc1 = Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(GradientCheckpointingLayer):
    """Pre-norm ViT layer, recomputed in the backward under `gradient_checkpointing_enable()`."""

    def __init__(self, config: SiglipVisionConfig, attn_config=None):
        super().__init__()
        self.attn_config = config if attn_config is None else attn_config  # whose `_attn_implementation` runs
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor, plan: AttentionPlan, rotary=None) -> torch.Tensor:
        with layer_attention(self.attn_config):  # the recomputation runs outside the model's forward
            x = x + self.self_attn(self.layer_norm1(x), plan, rotary)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig, attn_config=None):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config, attn_config) for _ in range(config.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: SiglipVisionConfig, attn_config=None):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config, attn_config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = SiglipRotary2D(head_dim, self.embeddings.num_patches_per_side) if config.rope else None


class SiglipVisionModel(nn.Module):
    """Packed NaViT SigLIP: (N, 3*P*P) patches of several images -> (N, hidden) features."""

    def __init__(self, config: SiglipVisionConfig, attn_config=None):
        """`attn_config`: the config whose `_attn_implementation` the attention runs, read at each
        forward (BAGEL's config; default: `config`)."""
        super().__init__()
        self.config = config
        self.attn_config = config if attn_config is None else attn_config
        self.vision_model = SiglipVisionTransformer(config, self.attn_config)

    def forward(
        self,
        packed_pixel_values: torch.Tensor,
        packed_flattened_position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        """`cu_seqlens` (num_images + 1,) are cumulative patch counts. Offsets on the host are
        checked. For offsets on the GPU, `max_seqlen` is an upper bound on the longest image: with
        it the offsets are used as given and nothing waits for the GPU (the caller checks them);
        without it they are read back and checked."""
        tower = self.vision_model
        if packed_flattened_position_ids.shape[0] != packed_pixel_values.shape[0]:
            raise ValueError("packed_flattened_position_ids needs one position per packed patch.")
        if max_seqlen is not None and cu_seqlens.device.type != "cpu":
            plan = AttentionPlan.from_offsets(cu_seqlens.int(), max_seqlen)
        else:
            lengths = torch.diff(cu_seqlens.to("cpu", torch.long)).tolist()
            if (cu_seqlens[0] != 0) or sum(lengths) != packed_pixel_values.shape[0]:
                raise ValueError(
                    f"cu_seqlens {cu_seqlens.tolist()} does not cover the {packed_pixel_values.shape[0]} packed "
                    "patches: "
                    "it must start at 0 and end at the number of patches."
                )
            plan = AttentionPlan.segments(lengths)
        rotary = tower.rotary(packed_flattened_position_ids) if tower.rotary is not None else None
        x = tower.embeddings(packed_pixel_values, packed_flattened_position_ids)
        with attention_implementation(self.attn_config):
            for layer in tower.encoder.layers:
                x = layer(x, plan, rotary)
        return tower.post_layernorm(x)
