"""Which kernel runs: the one place that decides, and the ops the model's forwards call.

Each op takes the modules (or tensors) it works on, picks a kernel by the predicates below and
carries its own fallback, so the forwards read as plain math. The kernels are in `kernels_bagel`
(Triton, two torch autograd functions) and `attention_bagel` (attention over segments).

op                kernel, the first that applies              when
----------------  ------------------------------------------  -----------------------------------------
linear            `stacked_linear` (float32 weight grads)     `trains_master_weights`
                  float32 compute of bf16/fp16 weights        `computes_in_float32`
                  Triton `gemv`                               `fuses_decoding`
                  `F.linear`                                  otherwise
linears (q/k/v)   one `gemv` a layer, the RMSNorm folded in   `folds_norm`, `plain_linears`, `unhooked`
                  branches of the captured decode graph       CUDA, under `graph_branches`
                  one `stacked_linear`                        `trains_master_weights`, `plain_linears`
                  each layer's own forward                    otherwise
rms_norm          Triton `rms_norm_kernel`, add included      `fuses_decoding`
                  `F.rms_norm`, CUDA autocast off             otherwise
norm_rotary       Triton `rms_norm_rotary`                    `fuses_rms_norm_rotary`, an RMSNorm whose
                                                              weight is on x's device, `unhooked`
                  norm(x), then `apply_rotary`                otherwise
gated_mlp         one `gemv` for gate and up, silu included   silu, `fuses_decoding`, plain, `unhooked`
                  gate(x), up(x), Triton `silu_mul`           silu, `fuses_silu_mul`
                  gate(x), up(x), act(gate) * up              otherwise
mlp_residual      gate/up `gemv` with the norm and add folded `folds_norm`, plain, `unhooked`
                  down `gemv` with the residual add           `fuses_decoding`, plain, `unhooked`
                  residual + mlp(norm(residual + x))          otherwise
packed_attention  `eager_per_segment`                         `attn_implementation="eager"`
                  cuDNN first, one segment at a time          `prefers_cudnn` (CUDA, bf16/fp16)
                  flash-attn's varlen kernel, else torch's    CUDA, bf16/fp16, flash-attn / torch 2.10+
                  `sdpa_per_segment`                          otherwise
decode_attention  matmul-softmax over the cache               `attn_implementation="eager"`
                  Triton `decode_attention_kernel`            `fuses_decode_attention`
                  torch's varlen kernel                       `has_varlen_kernel`
                  SDPA with a mask                            otherwise
forward_in_       the module with float32 weights (the VAE)   `computes_in_float32`
  float32_on_cpu  the module as it is                         otherwise
decode step       captured as a CUDA graph and replayed       `capturable` (the language model)
                  eager                                       otherwise

What the predicates read: the device and dtype of inputs and weights, autograd
(`torch.is_grad_enabled`, `requires_grad`), CUDA autocast, what kind of weight a layer holds
(`weight_kind`: plain, bitsandbytes 4/8-bit, torchao, other tensor subclasses such as DTensor),
whether a layer's forward is our `linear` (`plain_linears`: not a PEFT wrapper, whose forward adds
its own part), forward hooks on modules a kernel would not call (`unhooked`, which lets through
accelerate's hooks that only move inputs; its offloading keeps weights off x's device as well),
whether a decode graph is being captured (`graph_branches`), and the model's `attn_implementation`
(`attention_implementation`). Under a `quantization_config` the model is built with plain
`nn.Linear` layers (`modeling_bagel._plain_linears`: quantizers take only those), whose weights the
quantizer replaces: none of these ops' kernels reads them.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .attention_bagel import eager_attention, eager_per_segment, sdpa_per_segment, take, varlen_kernel
from .kernels_bagel import DECODE_ROWS, apply_rotary, gemv, rms_norm_rotary, silu_mul, stacked_linear, triton
from .kernels_bagel import decode_attention as decode_attention_kernel
from .kernels_bagel import rms_norm as rms_norm_kernel

try:  # optional
    from flash_attn import flash_attn_varlen_func
except ImportError:  # pragma: no cover - depends on the machine
    flash_attn_varlen_func = None

try:  # torch >= 2.10 has a varlen flash kernel for users (`varlen_kernel` calls the op under it)
    import torch.nn.attention.varlen  # noqa: F401

    _TORCH_HAS_VARLEN = True
except ImportError:
    _TORCH_HAS_VARLEN = False

# `mm` with a float32 output from bf16/fp16 inputs (CUDA, torch >= 2.8).
_MM_HAS_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()
_SDPA_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch >= 2.6
_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]

# ----------------------------------------------------------------------------------------------
# What the policy reads
# ----------------------------------------------------------------------------------------------


def weight_kind(weight: torch.Tensor) -> str:
    """What a weight is, by its type and attributes: "plain" (a floating-point torch.Tensor or
    Parameter), "bnb-4bit" (bitsandbytes' Params4bit: it has a `quant_state`), "bnb-8bit"
    (Int8Params: `SCB`), "torchao" (a torchao tensor subclass) or "other" (integer Parameters,
    DTensors, other subclasses). Kernels that read a weight's storage take "plain" ones only."""
    kind = type(weight)
    if kind in (torch.Tensor, nn.Parameter):
        return "plain" if weight.dtype.is_floating_point else "other"
    if isinstance(weight, nn.Parameter) and hasattr(weight, "quant_state"):
        return "bnb-4bit"
    if isinstance(weight, nn.Parameter) and hasattr(weight, "SCB"):
        return "bnb-8bit"
    torchao_utils = sys.modules.get("torchao.utils")  # no torchao tensor exists unless it is imported
    base = getattr(torchao_utils, "TorchAOBaseTensor", None)
    if base is not None and isinstance(weight, base):
        return "torchao"
    return "other"


def capturable_weight(weight: torch.Tensor) -> bool:
    """Whether a decoder weight's forward can be captured in a CUDA graph: a plain weight, a
    bitsandbytes 4-bit weight (its GEMV and dequantisation are kernels on the current stream) or a
    torchao tensor (int8 weight-only, float8: scaling, dequantisation and GEMMs all on the GPU).
    Not bitsandbytes 8-bit: LLM.int8() looks for outlier columns on the host."""
    return weight_kind(weight) in ("plain", "bnb-4bit", "torchao")


def capturable(module: nn.Module, device: torch.device) -> bool:
    """Whether `module`'s forward may be captured as a CUDA graph on `device` (the decode step's
    language model): a CUDA device, every weight on it and `capturable_weight`, and no accelerate
    hook (offloading moves weights during the forward)."""
    return (
        device.type == "cuda"
        and all(p.device == device and capturable_weight(p) for p in module.parameters())
        and not any(hasattr(m, "_hf_hook") for m in module.modules())
    )


def plain_linears(*layers: nn.Module) -> bool:
    """Layers whose forward is exactly `linear` (our Linear), so that a kernel may read their
    `.weight` and `.bias` in their place: not a PEFT wrapper, whose forward adds its own part."""
    return all(getattr(type(layer), "forward", None) is linear for layer in layers)


def unhooked(*modules: nn.Module) -> bool:
    """No forward hooks (torch's, or accelerate's `_hf_hook`) on modules a fused kernel would not
    call: where one has them, the module is called and its hooks fire. Except accelerate's hooks
    that only move inputs (`moves_inputs_only`): a `device_map` over several GPUs puts one on every
    submodule, and the kernels' own checks already want x and the weights on one device."""
    for module in modules:
        if module._forward_hooks or module._forward_pre_hooks:
            return False
        hook = vars(module).get("_hf_hook")
        if hook is not None and not moves_inputs_only(hook):
            return False
    return True


def moves_inputs_only(hook) -> bool:
    """Whether an accelerate hook (None: no hook) does nothing but move a module's inputs to its
    execution device: `AlignDevicesHook`s (a `SequentialHook` of them too) that neither load
    offloaded weights nor move outputs back. A kernel that reads the weights where they are, with
    x on their device, may stand in for the module's call."""
    if hook is None:
        return True
    align = getattr(sys.modules.get("accelerate.hooks"), "AlignDevicesHook", None)
    return all(
        type(each) is align and not each.offload and not each.io_same_device for each in getattr(hook, "hooks", (hook,))
    )


def trains_master_weights(x: torch.Tensor, weight: torch.Tensor) -> bool:
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


def fuses_decoding(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether the few-row kernels (`gemv`, `rms_norm_kernel`) can take x (rows, features) with
    `weights` (None skipped): inference (no autograd) on CUDA with Triton, at most `DECODE_ROWS`
    contiguous rows, and plain (not quantized, not offloaded) weights of x's dtype on x's device.
    Reentrant activation checkpointing (not transformers' default) runs its first forward without
    autograd, so a side of at most 16 tokens would take these kernels there and torch's in the
    recomputation: equal to rounding, not bit for bit."""
    return (
        triton is not None
        and x.is_cuda
        and not torch.is_grad_enabled()
        and x.dim() == 2
        and x.shape[0] <= DECODE_ROWS
        and x.is_contiguous()
        and x.dtype in (torch.bfloat16, torch.float16)
        and all(
            weight_kind(w) == "plain" and w.dtype == x.dtype and w.device == x.device and w.is_contiguous()
            for w in weights
            if w is not None
        )
    )


def folds_norm(x: torch.Tensor, *weights: torch.Tensor | None) -> bool:
    """Whether `gemv` should take the RMSNorm before it (`norm`, `residual`): `fuses_decoding` and
    one row. With 16 rows the norm's elementwise work inside the tensor-core loop made the decode
    step slower, not faster (16 requests: 1492 tokens/s folded, 2674 with the norm kernel, H200),
    so more rows keep the separate `rms_norm_kernel`."""
    return x.shape[0] == 1 and fuses_decoding(x, *weights)


def fuses_rms_norm_rotary(x: torch.Tensor) -> bool:
    """Whether `rms_norm_rotary` can take x (N, heads, dim): CUDA with Triton, each head's
    values contiguous and the heads back to back (tokens may be strided), dim a power of two."""
    dim = x.shape[-1]
    return (
        triton is not None
        and x.is_cuda
        and x.shape[0] > 0
        and x.stride(2) == 1
        and x.stride(1) == dim
        and dim & (dim - 1) == 0
    )  # zero rows (a GEN side run empty in training): torch's ops


def fuses_silu_mul(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether `silu_mul` can take gate and up: CUDA with Triton, one shape and dtype, not empty."""
    return (
        triton is not None and gate.is_cuda and gate.dtype == up.dtype and gate.shape == up.shape and gate.numel() > 0
    )


def fuses_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """Whether `decode_attention_kernel` can take q (B, heads, dim) against keys and values (rows,
    kv_heads, dim) laid out alike: Triton on CUDA, bf16/fp16 all (float32 would take TF32 dots),
    dim a power of two of at least 16, whole groups of heads."""
    heads, dim = q.shape[1:]
    return (
        triton is not None
        and q.is_cuda
        and q.dtype in (torch.bfloat16, torch.float16)
        and keys.dtype == values.dtype == q.dtype
        and dim >= 16
        and dim & (dim - 1) == 0
        and heads % keys.shape[1] == 0
        and q.is_contiguous()
        and keys.stride()[1:] == (dim, 1)
        and values.stride() == keys.stride()
    )


def has_varlen_kernel(x: torch.Tensor) -> bool:
    """Whether torch's own varlen kernel can run on x (CUDA, bf16/fp16, torch >= 2.10)."""
    return x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and _TORCH_HAS_VARLEN


def prefers_cudnn(q: torch.Tensor, group) -> bool:
    """Inference over at most 4 full-attention segments of 1024+ queries each (in training, and
    for many short segments, one varlen call is faster)."""
    return (
        not (torch.is_grad_enabled() and q.requires_grad)
        and not group.causal
        and _SDPA_HAS_PRIORITY
        and group.q_lens is not None  # lengths on the host (not `from_offsets`)
        and len(group.q_lens) <= 4
        and min(group.q_lens) >= 1024
    )


# ----------------------------------------------------------------------------------------------
# attn_implementation
# ----------------------------------------------------------------------------------------------

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")
_ATTENTION = contextvars.ContextVar("bagel_attention_implementation", default="sdpa")


def check_attention_implementation(value: str | None) -> str:
    """`attn_implementation` as the model runs it: "sdpa" (None too: the default) or "eager";
    anything else is refused by name."""
    if value is None:
        return "sdpa"
    if value not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation={value!r} is not supported by BAGEL: use 'sdpa' (the default: a varlen "
            "flash kernel where one is available, else torch's scaled_dot_product_attention) or 'eager' (plain "
            "matmul-softmax attention, no fused kernel), e.g. from_pretrained(..., attn_implementation='eager') "
            "or model.set_attn_implementation('eager')."
        )
    return value


@contextlib.contextmanager
def attention_implementation(config):
    """Within it, this thread's attention ops run `config._attn_implementation` (checked)."""
    token = _ATTENTION.set(check_attention_implementation(getattr(config, "_attn_implementation", None)))
    try:
        yield
    finally:
        _ATTENTION.reset(token)


def layer_attention(config):
    """`attention_implementation(config)` around one checkpointable layer's forward while autograd
    is on: activation checkpointing recomputes the layer in the backward, outside the model's
    forward and its setting. Without autograd nothing is recomputed and the model's forward has set
    it already: a null context."""
    return attention_implementation(config) if torch.is_grad_enabled() else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------


def linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x @ layer.weight.T + layer.bias: `Linear.forward`."""
    weight, bias = layer.weight, layer.bias
    if trains_master_weights(x, weight):
        return stacked_linear(x, (layer,))
    if computes_in_float32(weight):
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)
    if fuses_decoding(x, weight, bias):
        return gemv(x, weight, bias)  # a few rows (decoding): faster than cuBLAS's GEMVs
    return F.linear(x, weight, bias)


def forward_in_float32_on_cpu(module: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """module(x) in `weight`'s dtype: with all its parameters in float32 where `computes_in_float32`
    (the VAE's convolutions), else as it is."""
    if not computes_in_float32(weight):
        return module(x)
    weights = {name: p.float() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, weights, (x.float(),)).to(weight.dtype)


def linears(x: torch.Tensor, layers: tuple[nn.Module, ...], norm: nn.Module | None = None):
    """`tuple(layer(norm(x)) for layer in layers)` for Linears of one input (q/k/v); `norm` an
    RMSNorm (`weight`, `variance_epsilon`) or None. When float32 master weights are trained, it is
    one GEMM each way: the weights are cast into one bf16 matrix (the cast autocast makes anyway),
    x is cast and saved once, and x's gradient needs no sum. (Gate/up stay two GEMMs: one 2 x
    18944-row matrix measured slower on an H100.) Decoding one row, the norm rides in each GEMV;
    while a decode graph is captured (`graph_branches`), the layers are parallel branches of it."""
    plain = plain_linears(*layers)
    branches = layers
    if (
        norm is not None
        and plain
        and folds_norm(x, norm.weight, *(p for layer in layers for p in (layer.weight, layer.bias)))
        and unhooked(norm, *layers)
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
    if branches is not layers or not plain or not trains_master_weights(x, layers[0].weight):
        return tuple(branch(x) for branch in branches)
    return stacked_linear(x, layers).split([layer.out_features for layer in layers], dim=-1)


def _normed_gemv(x: torch.Tensor, layer: nn.Linear, norm: tuple[torch.Tensor, float]) -> torch.Tensor:
    return gemv(x, layer.weight, layer.bias, norm=norm)


_CAPTURE = threading.local()  # .branch_streams: set by `graph_branches` in the thread capturing


@contextlib.contextmanager
def graph_branches(streams: tuple[torch.cuda.Stream, ...]):
    """Within it, `linears` runs its layers as parallel branches of the CUDA graph this thread
    captures, the first on the capturing stream and the others on `streams`."""
    _CAPTURE.branch_streams = streams
    try:
        yield
    finally:
        _CAPTURE.branch_streams = ()


def _graph_branches(x: torch.Tensor, layers: tuple, streams) -> tuple[torch.Tensor, ...]:
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


def rms_norm(norm: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None):
    """norm(x) for an RMSNorm (`weight`, `variance_epsilon`); with `residual`, (s, norm(s)) for
    s = residual + x (the decoder's residual add)."""
    weight, eps = norm.weight, norm.variance_epsilon
    if fuses_decoding(x, weight, residual) and (residual is None or residual.shape == x.shape):
        return rms_norm_kernel(x, weight, eps, residual)  # one Triton kernel, add included
    if residual is not None:
        x = residual + x
    # One fused kernel that normalises in float32, as the reference does, and returns x's
    # dtype. CUDA autocast is off around it: it would widen bf16 input to float32 and back
    # (q/k where the fused norm + rotary kernel cannot run).
    with torch.autocast("cuda", enabled=False) if x.is_cuda else contextlib.nullcontext():
        normed = F.rms_norm(x, weight.shape, weight.to(x.dtype), eps)
    return normed if residual is None else (x, normed)


def norm_rotary(x: torch.Tensor, norm: nn.Module, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary(norm(x), cos, signed_sin) for x (N, heads, dim) and a q/k norm (an RMSNorm or
    nn.Identity). The Triton kernel reads the norm weight directly: not when an offloading hook
    keeps it elsewhere until norm(x) is called."""
    if (
        getattr(norm, "variance_epsilon", None) is not None
        and norm.weight.device == x.device
        and fuses_rms_norm_rotary(x)
        and unhooked(norm)
    ):
        return rms_norm_rotary(x, norm.weight, norm.variance_epsilon, cos, signed_sin)
    return apply_rotary(norm(x), cos, signed_sin)


def gated_mlp(mlp: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """act(gate_proj(x)) * up_proj(x) of a SwiGLU MLP (`gate_proj`, `up_proj`, `act_fn`,
    `fused_silu`: its activation is silu)."""
    gate, up = mlp.gate_proj, mlp.up_proj
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        # One cast of x for both projections, not one each (their input gradients add in bf16).
        x = x.to(torch.get_autocast_dtype("cuda"))
    if mlp.fused_silu and _bias_free(gate, up) and fuses_decoding(x, gate.weight, up.weight) and unhooked(gate, up):
        return gemv(x, gate.weight, up_weight=up.weight)  # one pass, silu too
    gate_out, up_out = gate(x), up(x)
    if mlp.fused_silu:
        return silu_mul(gate_out, up_out) if fuses_silu_mul(gate_out, up_out) else F.silu(gate_out) * up_out
    return mlp.act_fn(gate_out) * up_out


def mlp_residual(mlp: nn.Module, x: torch.Tensor, norm: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """s + mlp(norm(s)) for s = residual + x, in inference: the decoder layer after attention.
    Decoding, the adds ride in kernels: the second in the down GEMV, the first in the norm's
    kernel or, for one row, in the gate/up GEMV with the norm folded in (`folds_norm`)."""
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    if (
        mlp.fused_silu
        and _bias_free(gate, up)
        and folds_norm(x, gate.weight, up.weight, norm.weight, residual)
        and unhooked(mlp, norm, gate, up)
    ):
        total, h = gemv(
            x, gate.weight, up_weight=up.weight, norm=(norm.weight, norm.variance_epsilon), residual=residual
        )
    else:
        total, normed = norm(x, residual=residual)  # modules called, for offloading hooks
        if not (fuses_decoding(normed, down.weight, total) and unhooked(mlp)):
            return total + mlp(normed)
        h = gated_mlp(mlp, normed)
    if _bias_free(down) and fuses_decoding(h, down.weight, total) and unhooked(down):  # h may be in autocast's dtype
        return gemv(h, down.weight, add=total)
    return total + down(h)


def _bias_free(*layers: nn.Module) -> bool:
    """Our own Linears without bias (what `gemv`'s gated and `add` forms take)."""
    return plain_linears(*layers) and all(layer.bias is None for layer in layers)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan) -> torch.Tensor:
    """Attention of q (Nq, H, D) over k, v (Nk, H_kv, D), H % H_kv == 0, as an `AttentionPlan`
    says -> (Nq, H, D), by this thread's `attn_implementation`."""
    if len(plan.groups) == 1 and plan.groups[0].q_index is None:
        group = plan.groups[0]
        return _segment_attention(q, take(k, group.k_index), take(v, group.k_index), group)
    out = q.new_empty(q.shape)
    for group in plan.groups:
        k_g, v_g = take(k, group.k_index), take(v, group.k_index)
        out = out.index_copy(0, group.q_index, _segment_attention(q[group.q_index], k_g, v_g, group))
    return out


def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group) -> torch.Tensor:
    """One kernel call over a group's segments; q, k, v already in segment order."""
    if _ATTENTION.get() == "eager":
        return eager_per_segment(q, k, v, group)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if prefers_cudnn(q, group):
            with sdpa_kernel(_CUDNN_FIRST, set_priority=True):  # falls back in this order
                return sdpa_per_segment(q, k, v, group)
        cu_q, cu_k = group.cu_seqlens(q.device)
        if flash_attn_varlen_func is not None:
            return flash_attn_varlen_func(q, k, v, cu_q, cu_k, group.max_q, group.max_k, causal=group.causal)
        if _TORCH_HAS_VARLEN:
            return varlen_kernel(q, k, v, cu_q, cu_k, group.max_q, group.max_k, group.causal)
    return sdpa_per_segment(q, k, v, group)


def decode_attention(cache, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The decode step's attention over a `DecodeCache`: k, v (B, H_kv, D), one new token per
    sequence, written into layer `layer_idx`'s cache, then q (B, H, D) attends each sequence's
    cached prefix and new token -> (B, H, D)."""
    keys, values = cache.keys[layer_idx].flatten(0, 1), cache.values[layer_idx].flatten(0, 1)
    eager = _ATTENTION.get() == "eager"
    if not eager and fuses_decode_attention(q, keys, values):  # writes k and v into the cache too
        return decode_attention_kernel(q, k, v, keys, values, cache.used_keys, cache.capacity)
    keys.index_copy_(0, cache.rows_to_write(), k)
    values.index_copy_(0, cache.rows_to_write(), v)
    if not eager and has_varlen_kernel(keys):
        cu_q, cu_k, used = cache.cu_queries, cache.cu_keys, cache.used_keys
        return varlen_kernel(q, keys, values, cu_q, cu_k, 1, cache.capacity, False, used)
    # GQA without copying the cache: the query heads sharing a kv head act as its query rows.
    batch, heads, dim = q.shape
    kv_heads = keys.shape[1]
    grouped = q.view(batch, kv_heads, heads // kv_heads, dim)
    k_all = cache.keys[layer_idx].transpose(1, 2)
    v_all = cache.values[layer_idx].transpose(1, 2)
    if eager:
        out = eager_attention(grouped, k_all, v_all, cache.sdpa_mask() == 0)
    else:
        out = F.scaled_dot_product_attention(grouped, k_all, v_all, attn_mask=cache.sdpa_mask())
    return out.reshape(batch, heads, dim)
