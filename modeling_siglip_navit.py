"""SigLIP vision tower in NaViT form: variable-resolution images packed into one sequence.

Images arrive as pre-flattened 14x14 patches, (N, 3*P*P) in (py, px, channel) order, packed
image after image; `cu_seqlens` says where each image starts. Attention is bidirectional within an
image and never across images. Parameter names equal the released checkpoint under
`vit_model.vision_model.`.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn as nn
from transformers import SiglipVisionConfig
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention_bagel import AttentionPlan, packed_attention
from .kernels_bagel import folds_norm, fuses_decoding, gemv


def conv_to_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    """Conv2d patch kernel (out, C, P, P) -> Linear weight (out, P*P*C) in (py, px, channel) order."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def rotary_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (N,) -> cos, signed sin (N, dim) in float32: the frequencies repeat over both
    halves, and the sin's first half is negated, which is what `apply_rotary` takes."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (N, heads, dim) in x's dtype, as the reference's Qwen2 does; cos and
    signed_sin (N, dim) come from `rotary_cos_sin`. Equal to x*cos + rotate_half(x)*sin."""
    return _Rotary.apply(x, cos.to(x.dtype)[:, None], signed_sin.to(x.dtype)[:, None])


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((x[..., half:], x[..., :half]), dim=-1)


class _Rotary(torch.autograd.Function):
    """x*cos + swap_halves(x)*signed_sin: rotate_half(x)*sin is x's halves swapped times the signed
    sin. The gradient is the inverse rotation, grad*cos - swap_halves(grad)*signed_sin (the
    signed sin's halves are each other's negatives): three kernels each way, where autograd's
    own backward takes five, one of them a slow roll."""

    @staticmethod
    def forward(ctx, x, cos, signed_sin):
        ctx.save_for_backward(cos, signed_sin)
        return torch.addcmul(x * cos, _swap_halves(x), signed_sin)

    @staticmethod
    def backward(ctx, grad):
        cos, signed_sin = ctx.saved_tensors
        return torch.addcmul(grad * cos, _swap_halves(grad), signed_sin, value=-1), None, None


# `mm` with a float32 output from bf16/fp16 inputs (CUDA, torch >= 2.8).
_MM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _trains_master_weights(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Float32 weights trained under CUDA autocast (the usual mixed precision)."""
    return (
        _MM_HAS_OUT_DTYPE
        and x.is_cuda
        and weight.dtype == torch.float32
        and weight.requires_grad
        and torch.is_grad_enabled()
        and torch.is_autocast_enabled("cuda")
    )


def computes_in_float32(weight: torch.Tensor) -> bool:
    """bf16/fp16 weights on the CPU, which are computed in float32: CPUs without native bf16
    (AVX2) have no fast low-precision kernels, and a bf16 matmul there runs ~180x, a bf16 conv2d
    (aten's slow_conv2d) ~700x slower than in float32. The weights stay stored in low precision."""
    return weight.device.type == "cpu" and weight.dtype in (torch.bfloat16, torch.float16)


class Linear(nn.Linear):
    """nn.Linear, except (1) when float32 weights are trained under CUDA autocast: autocast would
    give the weight a bf16 gradient and then cast it to float32, an extra kernel per weight and a
    rounding; here one GEMM writes the float32 gradient directly (the forward is autocast's);
    (2) with bf16/fp16 weights on the CPU, computed in float32 (`computes_in_float32`); (3) for a
    few rows in inference on CUDA (decoding), our Triton GEMV (`kernels_bagel.gemv`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _trains_master_weights(x, self.weight):
            return _stacked_linear(x, (self,))
        if computes_in_float32(self.weight):
            bias = None if self.bias is None else self.bias.float()
            return nn.functional.linear(x.float(), self.weight.float(), bias).to(x.dtype)
        if fuses_decoding(x, self.weight, self.bias):
            return gemv(x, self.weight, self.bias)  # a few rows (decoding): faster than cuBLAS's GEMVs
        return super().forward(x)


def parallel_linears(x: torch.Tensor, layers: tuple[Linear, ...], norm: nn.Module | None = None):
    """`tuple(layer(norm(x)) for layer in layers)` for Linears of one input (q/k/v); `norm` an
    RMSNorm (`weight`, `variance_epsilon`) or None. When float32 master weights are trained, it is
    one GEMM each way: the weights are cast into one bf16 matrix (the cast autocast makes anyway),
    x is cast and saved once, and x's gradient needs no sum. (Gate/up stay two GEMMs: one 2 x
    18944-row matrix measured slower on an H100.) Decoding one row, the norm rides in each GEMV;
    while a decode graph is captured (`graph_branches`), the layers are parallel branches of it."""
    plain = all(type(layer) is Linear for layer in layers)
    branches = layers
    if norm is not None and plain and folds_norm(x, norm.weight, *(p for l in layers for p in (l.weight, l.bias))):
        folded = (norm.weight, norm.variance_epsilon)
        branches = tuple(functools.partial(_normed_gemv, layer=layer, norm=folded) for layer in layers)
    elif norm is not None:
        x = norm(x)
    branch_streams = getattr(_CAPTURE, "branch_streams", ())
    if x.is_cuda and 0 < len(branches) - 1 <= len(branch_streams):
        return _graph_branches(x, branches, branch_streams)
    # A layer that is not our plain Linear (a PEFT LoRA wrapper, say) runs its own forward: the
    # stacked GEMM reads `.weight` alone and would skip whatever the wrapper adds.
    if branches is not layers or not plain or not _trains_master_weights(x, layers[0].weight):
        return tuple(branch(x) for branch in branches)
    return _stacked_linear(x, layers).split([layer.out_features for layer in layers], dim=-1)


def _normed_gemv(x: torch.Tensor, layer: Linear, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    return gemv(x, layer.weight, layer.bias, norm=norm)


_CAPTURE = threading.local()  # .branch_streams: set by `graph_branches` in the thread capturing


@contextlib.contextmanager
def graph_branches(streams: tuple[torch.cuda.Stream, ...]):
    """Within it, `parallel_linears` runs its layers as parallel branches of the CUDA graph this
    thread captures, the first on the capturing stream and the others on `streams`."""
    _CAPTURE.branch_streams = streams
    try:
        yield
    finally:
        _CAPTURE.branch_streams = ()


def _graph_branches(x: torch.Tensor, layers: tuple[nn.Module, ...], streams) -> tuple[torch.Tensor, ...]:
    """The layers side by side in the graph being captured (the decode step). With a few rows the
    small k and v GEMVs are latency-bound (8 us each for 3.7 MB on an H200, against 10.5 us for
    q's 26 MB, `bench/decode_kernels.py`); beside q the three take about as long as q alone, as
    one stacked GEMM would, without a stacked copy of the weights."""
    main = torch.cuda.current_stream(x.device)
    outputs = [None] * len(layers)
    for i, (layer, stream) in enumerate(zip(layers[1:], streams), start=1):
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            outputs[i] = layer(x)
        outputs[i].record_stream(main)  # read on the main stream after the join
    outputs[0] = layers[0](x)
    for stream in streams[: len(layers) - 1]:
        main.wait_stream(stream)
    return tuple(outputs)


def _stacked_linear(x: torch.Tensor, layers: tuple[Linear, ...]) -> torch.Tensor:
    """x through the layers' weights stacked row-wise, in autocast's dtype (master-weight path)."""
    params = [layer.weight for layer in layers] + [layer.bias for layer in layers]
    return _MasterWeightLinear.apply(x, torch.get_autocast_dtype("cuda"), len(layers), *params)


def _cast_stacked(parts, dtype: torch.dtype) -> torch.Tensor:
    """torch.cat(parts) in `dtype`, with one cast kernel per part and no float32 copy."""
    out = parts[0].new_empty((sum(p.shape[0] for p in parts), *parts[0].shape[1:]), dtype=dtype)
    for piece, part in zip(out.split([p.shape[0] for p in parts]), parts):
        piece.copy_(part)
    return out


class _MasterWeightLinear(torch.autograd.Function):
    """x @ [w_1; ...; w_n].T + [b_1, ..., b_n] in `dtype`, float32 gradients for the weights and
    biases (all biases or none)."""

    @staticmethod
    def forward(ctx, x, dtype, n, *params):
        weights, biases = params[:n], params[n:]
        weight = _cast_stacked(weights, dtype)
        bias = None if biases[0] is None else _cast_stacked(biases, dtype)
        x = x.to(dtype)
        ctx.save_for_backward(x, weight)
        ctx.rows, ctx.has_bias = [w.shape[0] for w in weights], bias is not None
        return nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        if x.numel():
            grad_w = torch.mm(grad_2d.t(), x.reshape(-1, x.shape[-1]), out_dtype=torch.float32).split(ctx.rows)
        else:  # zero rows (a side run empty in training, `always_run`): a product over nothing is zero
            grad_w = weight.new_zeros(weight.shape, dtype=torch.float32).split(ctx.rows)
        grad_b = grad_2d.sum(0, dtype=torch.float32).split(ctx.rows) if ctx.has_bias else (None,) * len(ctx.rows)
        return grad_x, None, None, *grad_w, *grad_b


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
        linear = Linear(conv.in_channels * conv.kernel_size[0] ** 2, conv.out_channels, device=conv.weight.device,
                        dtype=conv.weight.dtype)
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
        q, k, v = (t.view(shape) for t in parallel_linears(x, (self.q_proj, self.k_proj, self.v_proj)))
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

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x: torch.Tensor, plan: AttentionPlan, rotary=None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), plan, rotary)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))


class SiglipVisionTransformer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        head_dim = config.hidden_size // config.num_attention_heads
        self.rotary = SiglipRotary2D(head_dim, self.embeddings.num_patches_per_side) if config.rope else None


class SiglipVisionModel(nn.Module):
    """Packed NaViT SigLIP: (N, 3*P*P) patches of several images -> (N, hidden) features."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.vision_model = SiglipVisionTransformer(config)

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
                    f"cu_seqlens {cu_seqlens.tolist()} does not cover the {packed_pixel_values.shape[0]} packed patches: "
                    "it must start at 0 and end at the number of patches."
                )
            plan = AttentionPlan.segments(lengths)
        rotary = tower.rotary(packed_flattened_position_ids) if tower.rotary is not None else None
        x = tower.embeddings(packed_pixel_values, packed_flattened_position_ids)
        for layer in tower.encoder.layers:
            x = layer(x, plan, rotary)
        return tower.post_layernorm(x)
