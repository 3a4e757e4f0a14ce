"""Layers the whole model shares (both towers, the VAE and generation): `Linear` with its float32
master-weight training path and its CPU and decoding paths, `parallel_linears` (q/k/v from one
input, parallel branches of a captured decode graph under `graph_branches`), rotary embeddings, and
`computes_in_float32`.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch
import torch.nn as nn

from .kernels_bagel import folds_norm, fuses_decoding, gemv


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
    if (
        norm is not None
        and plain
        and folds_norm(x, norm.weight, *(p for layer in layers for p in (layer.weight, layer.bias)))
    ):
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
