"""The model's own kernels: fused elementwise kernels in Triton (CUDA, where Triton is installed: it
ships with torch's CUDA builds) and two autograd functions in torch. Which of them runs where is
decided in `ops_bagel`, not here.

- `silu_mul`: SwiGLU's `silu(gate) * up`. Eager torch makes three passes over the (tokens,
  intermediate) activations forward (silu, mul) and three backward (two muls and silu's
  backward), and keeps silu(gate) for the backward. The kernels read gate and up once and write
  the output once; the backward reads grad, gate and up and writes both gradients. The MLP
  activations are the largest tensors of a BAGEL layer, so this is a few percent of a training
  step and of an image-generation step.
- `rms_norm_rotary`: the q/k RMSNorm and the rotary embedding after it, one pass over q or k
  each way instead of four (norm, and rotary's product, half swap and multiply-add), reading q
  and k where the projection wrote them (strided rows when q/k/v come out of one GEMM).
- `decode_attention`: one new query per sequence against a preallocated KV cache (the decode
  step), the new key and value written into it on the way, the keys split across the GPU
  (flash-decoding) and the query heads of one KV head together. torch's varlen flash kernel
  does the same in two kernels, but its combine kernel takes 13 us of its 21 us a layer on an
  H200 (`bench/decode_kernels.py`).
- `gemv` and `rms_norm`: the decode step's projections and norms for a few rows.
  The step reads every weight once, so it is bound by HBM bandwidth and kernel count: the GEMV
  streams whole weight rows without split-K and takes SwiGLU's gate and up in one pass; for one
  row it also folds in the RMSNorm before q/k/v and before the MLP (with the residual add before
  that), and the residual add after the MLP rides in the down projection's GEMV. Other norms are
  one kernel with the residual add, not torch's two.
- `apply_rotary` (any device): the rotary embedding with a backward of three kernels, not five.
- `stacked_linear`: Linears of one input as one GEMM with float32 weight gradients (training
  float32 master weights under CUDA autocast).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

_BLOCK = 2048
_ROWS = 16  # (token, head) rows of one rms_norm_rotary program


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, elementwise, for gate and up of one shape and dtype. Only where
    `ops_bagel.fuses_silu_mul`."""
    return _SiluMul.apply(gate, up)


class _SiluMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        _silu_mul_forward[(triton.cdiv(n, _BLOCK),)](gate, up, out, n, BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad = grad.contiguous()
        grad_gate, grad_up = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _silu_mul_backward[(triton.cdiv(n, _BLOCK),)](grad, gate, up, grad_gate, grad_up, n, BLOCK=_BLOCK)
        return grad_gate, grad_up


def rms_norm_rotary(
    x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, signed_sin: torch.Tensor
) -> torch.Tensor:
    """RMSNorm over the last dim of x (N, heads, dim) with `weight` (dim,), then the rotary
    embedding with cos and signed_sin (N, dim) as `rotary_cos_sin` makes them; in float32, rounded
    once to x's dtype. Returns a new contiguous (N, heads, dim). Only where `ops_bagel.fuses_rms_norm_rotary`."""
    return _RMSNormRotary.apply(x, weight, eps, cos.contiguous(), signed_sin.contiguous())


class _RMSNormRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, cos, signed_sin):
        n, heads, dim = x.shape
        out = x.new_empty(x.shape)
        grid = (triton.cdiv(n * heads, _ROWS),)
        _rms_norm_rotary_forward[grid](
            x, weight, cos, signed_sin, out, n * heads, heads, x.stride(0), eps, HALF=dim // 2, ROWS=_ROWS
        )
        ctx.save_for_backward(x, weight, cos, signed_sin)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, cos, signed_sin = ctx.saved_tensors
        n, heads, dim = x.shape
        grad = grad.contiguous()
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        programs = triton.cdiv(n * heads, _ROWS)
        grad_weight = torch.empty(programs, dim, dtype=torch.float32, device=x.device)  # summed below
        _rms_norm_rotary_backward[(programs,)](
            grad,
            x,
            weight,
            cos,
            signed_sin,
            grad_x,
            grad_weight,
            n * heads,
            heads,
            x.stride(0),
            ctx.eps,
            HALF=dim // 2,
            ROWS=_ROWS,
        )
        return grad_x, grad_weight.sum(0).to(weight.dtype), None, None, None


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    used: torch.Tensor,
    capacity: int,
) -> torch.Tensor:
    """The decode step's cache write and attention, one new token per sequence: k, v (B, kv_heads,
    dim) are written into row `used[b] - 1` of sequence b's slot of the cache `keys`, `values`
    (B * capacity, kv_heads, dim; rows [b * capacity, (b + 1) * capacity)), then q (B, heads,
    dim) attends over the slot's first `used[b]` rows (1 <= used[b] <= capacity, unchecked: int32
    on the GPU, so a CUDA graph replays it as the cache grows); query head h reads kv head
    h // (heads // kv_heads). -> softmax(q k^T / sqrt(dim)) v (B, heads, dim) in q's dtype. The split
    holding the new row writes it (two index_copy kernels fewer a layer). Only where
    `ops_bagel.fuses_decode_attention`."""
    batch, heads, dim = q.shape
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    split = _decode_split(batch * kv_heads, capacity, q.device)
    splits = triton.cdiv(capacity, split)
    partial = torch.empty(batch, heads, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(batch, heads, splits, dtype=torch.float32, device=q.device)
    k, v = k.contiguous(), v.contiguous()
    _decode_attention_splits[(batch * kv_heads, splits)](
        q,
        k,
        v,
        keys,
        values,
        used,
        partial,
        lse,
        capacity,
        keys.stride(0),
        dim**-0.5,
        KV_HEADS=kv_heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        DIM=dim,
        SPLIT=split,
        BLOCK_N=_DECODE_BLOCK_N,
    )
    out = torch.empty_like(q)
    _decode_attention_combine[(batch * heads,)](
        partial, lse, out, splits, DIM=dim, SPLITS_PAD=triton.next_power_of_2(splits)
    )
    return out


_DECODE_BLOCK_N = 64  # keys per inner step of a split


DECODE_ROWS = 16  # the few-row (decoding) kernels below take at most this many rows


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    up_weight: torch.Tensor | None = None,
    norm: tuple[torch.Tensor, float] | None = None,
    residual: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    config: tuple[int, int, int, int] | None = None,
):
    """x @ weight.T (+ bias) for a few rows (decoding): x (M, K), weight (N, K) -> (M, N) in x's
    dtype, float32 accumulation.
    - `up_weight` (N, K): SwiGLU's silu(x @ weight.T) * (x @ up_weight.T), both weights in one pass.
    - `norm` (weight (K,), eps), one row: of RMSNorm(x) instead of x. Every program reads all of x
      anyway, so it sums x's squares on the way and scales its outputs by 1 / rms: no norm kernel.
      (With 16 rows the fold made the decode step slower: `ops_bagel.folds_norm`.)
    - `residual` (1, K): of s = residual + x (rounded to x's dtype, as the eager add); returns
      (s, result), s written by the first program.
    - `add` (M, N): add + the result, rounded as eager's two ops (the product, then the sum): the
      decoder's residual add after the MLP's down projection, no kernel of its own.
    Each program streams a few whole weight rows (no split-K, so no second reduction kernel): one
    row of x is a multiply and a row sum, more use tensor cores. cuBLAS's GEMVs reach 2.3-4.2
    TB/s on an H200 at these shapes, these 3.1-4.5 (`bench/decode_kernels.py --gemv`, which sweeps
    `config`: block_n, block_k, warps, stages). Only where `ops_bagel.fuses_decoding`."""
    rows, k = x.shape
    n = weight.shape[0]
    if (
        rows > DECODE_ROWS
        or (rows > 1 and (norm is not None or residual is not None))
        or (bias is not None and up_weight is not None)
        or (add is not None and (add.shape != (rows, n) or add.dtype != x.dtype or not add.is_contiguous()))
    ):
        raise ValueError(
            f"gemv takes at most {DECODE_ROWS} rows, one with a norm or residual, no bias with up_weight, "
            f"`add` contiguous, of the output's shape {(rows, n)} and x's dtype {x.dtype}; got {rows} rows, "
            f"norm={norm is not None}, residual={residual is not None}, bias={bias is not None}, "
            f"up_weight={up_weight is not None}, "
            f"add={None if add is None else (tuple(add.shape), add.dtype, add.is_contiguous())}."
        )
    block_n, block_k, num_warps, num_stages = config or _GEMV_CONFIGS[up_weight is not None, rows > 1, norm is not None]
    out = x.new_empty(rows, n)
    total = torch.empty_like(x) if residual is not None else out
    norm_weight, eps = norm if norm is not None else (weight, 0.0)
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        up_weight if up_weight is not None else weight,
        bias if bias is not None else weight,
        norm_weight,
        residual if residual is not None else x,
        total,
        add if add is not None else out,
        out,
        rows,
        n,
        k,
        eps,
        HAS_BIAS=bias is not None,
        GATED=up_weight is not None,
        NORM=norm is not None,
        RESIDUAL=residual is not None,
        ADD=add is not None,
        BLOCK_M=1 if rows == 1 else 16,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out if residual is None else (total, out)


# (gated, more than one row, norm folded in) -> (block_n, block_k, warps, stages): the sweep's
# fastest on an H200 (`bench/decode_kernels.py --gemv`), except gated with 16 rows, where the
# sweep's (32, 512, 4, 3) was 1.5 us faster alone but (32, 256, 4, 3) is the one measured in
# `bench/chat.py --batch 16`. The folded gate/up reads x, the residual and the norm weight in
# every program: wider programs (16 weight rows, not 4) read them fewer times, 66.8 us against
# 70.1; folded q/k/v keep the plain one-row config (0.1 us from the best).
_GEMV_CONFIGS = {
    (False, False, False): (4, 512, 4, 3),
    (True, False, False): (4, 256, 4, 3),
    (False, True, False): (32, 512, 4, 3),
    (True, True, False): (32, 256, 4, 3),
    (False, False, True): (4, 512, 4, 3),
    (True, False, True): (16, 256, 8, 1),
}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """RMSNorm of x (rows, dim) with `weight` (dim,), in float32, rounded once to x's dtype; with
    `residual`, of s = residual + x (rounded to x's dtype, as the eager add), returning (s, norm).
    One program per row, one kernel for the decoder's residual add and the norm after it: torch's
    norm takes 5.3 us at one row on an H200, most of it launch latency. Only where `ops_bagel.fuses_decoding`."""
    rows, dim = x.shape
    out = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else out
    _rms_norm_kernel[(rows,)](
        x,
        residual if residual is not None else x,
        weight,
        total,
        out,
        dim,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=triton.next_power_of_2(dim),
    )
    return out if residual is None else (total, out)


def _decode_split(programs_per_split: int, capacity: int, device: torch.device) -> int:
    """Keys per split: enough splits for about two programs per SM, at least 2 inner steps each."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    splits = max(1, 2 * sms // programs_per_split)
    return max(2 * _DECODE_BLOCK_N, triton.cdiv(triton.cdiv(capacity, splits), _DECODE_BLOCK_N) * _DECODE_BLOCK_N)


# Autograd functions in torch: fewer kernels than autograd's own backward, or a gradient in another dtype.


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


def stacked_linear(x: torch.Tensor, layers: tuple[torch.nn.Linear, ...]) -> torch.Tensor:
    """x through the layers' weights stacked row-wise, in autocast's dtype, float32 gradients for
    float32 weights (the master-weight path: `ops_bagel.trains_master_weights`)."""
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
        return F.linear(x, weight, bias)

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


if triton is not None:

    @triton.jit
    def _rows_of(num_rows, heads, token_stride, HALF: tl.constexpr, ROWS: tl.constexpr):
        """Offsets of a program's (token, head) rows, first halves: into x (tokens `token_stride`
        apart), into a contiguous (rows, 2*HALF) tensor, and into the (N, 2*HALF) cos / sin
        tables; and the row mask."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        token, head = rows // heads, rows % heads
        cols = tl.arange(0, HALF)[None, :]
        x_offsets = (token * token_stride + head * 2 * HALF)[:, None] + cols
        return (
            x_offsets,
            rows[:, None] * (2 * HALF) + cols,
            token[:, None] * (2 * HALF) + cols,
            (rows < num_rows)[:, None],
        )

    @triton.jit
    def _halves(ptr, offsets, mask, HALF: tl.constexpr):
        """Both halves of each row, in float32."""
        return tl.load(ptr + offsets, mask=mask).to(tl.float32), tl.load(ptr + offsets + HALF, mask=mask).to(tl.float32)

    @triton.jit
    def _normalized(x_ptr, x_off, mask, eps, HALF: tl.constexpr):
        """x's rows divided by their root mean square: both halves, and the 1/rms (ROWS, 1)."""
        x1, x2 = _halves(x_ptr, x_off, mask, HALF)
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        return x1 * rstd, x2 * rstd, rstd

    @triton.jit
    def _rms_norm_rotary_forward(
        x_ptr,
        w_ptr,
        cos_ptr,
        sin_ptr,
        out_ptr,
        num_rows,
        heads,
        token_stride,
        eps,
        HALF: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        x_off, row_off, t_off, mask = _rows_of(num_rows, heads, token_stride, HALF, ROWS)
        xhat1, xhat2, _ = _normalized(x_ptr, x_off, mask, eps, HALF)
        w1, w2 = _halves(w_ptr, tl.arange(0, HALF)[None, :], None, HALF)
        n1, n2 = xhat1 * w1, xhat2 * w2
        cos1, cos2 = _halves(cos_ptr, t_off, mask, HALF)
        sin1, sin2 = _halves(sin_ptr, t_off, mask, HALF)
        # out = n*cos + swap_halves(n)*signed_sin, written contiguously
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + row_off, (n1 * cos1 + n2 * sin1).to(dtype), mask=mask)
        tl.store(out_ptr + row_off + HALF, (n2 * cos2 + n1 * sin2).to(dtype), mask=mask)

    @triton.jit
    def _rms_norm_rotary_backward(
        grad_ptr,
        x_ptr,
        w_ptr,
        cos_ptr,
        sin_ptr,
        grad_x_ptr,
        grad_w_ptr,
        num_rows,
        heads,
        token_stride,
        eps,
        HALF: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        x_off, row_off, t_off, mask = _rows_of(num_rows, heads, token_stride, HALF, ROWS)
        g1, g2 = _halves(grad_ptr, row_off, mask, HALF)
        cos1, cos2 = _halves(cos_ptr, t_off, mask, HALF)
        sin1, sin2 = _halves(sin_ptr, t_off, mask, HALF)
        # the rotation's transpose: d n1 = g1*cos1 + g2*sin2, d n2 = g2*cos2 + g1*sin1
        dn1, dn2 = g1 * cos1 + g2 * sin2, g2 * cos2 + g1 * sin1
        xhat1, xhat2, rstd = _normalized(x_ptr, x_off, mask, eps, HALF)
        w1, w2 = _halves(w_ptr, tl.arange(0, HALF)[None, :], None, HALF)
        dxhat1, dxhat2 = dn1 * w1, dn2 * w2
        mean = ((tl.sum(dxhat1 * xhat1, 1) + tl.sum(dxhat2 * xhat2, 1)) / (2 * HALF))[:, None]
        dtype = grad_x_ptr.dtype.element_ty
        tl.store(grad_x_ptr + row_off, (rstd * (dxhat1 - xhat1 * mean)).to(dtype), mask=mask)
        tl.store(grad_x_ptr + row_off + HALF, (rstd * (dxhat2 - xhat2 * mean)).to(dtype), mask=mask)
        # this program's share of the weight gradient (masked rows add zeros), summed by the caller
        w_row = tl.program_id(0).to(tl.int64) * (2 * HALF) + tl.arange(0, HALF)
        tl.store(grad_w_ptr + w_row, tl.sum(dn1 * xhat1, 0))
        tl.store(grad_w_ptr + w_row + HALF, tl.sum(dn2 * xhat2, 0))

    @triton.jit
    def _silu_mul_forward(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        gate = tl.load(gate_ptr + offsets, mask=mask).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask).to(tl.float32)
        # silu rounded to the input dtype before the product, as eager torch does
        silu = (gate * tl.sigmoid(gate)).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + offsets, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_backward(grad_ptr, gate_ptr, up_ptr, grad_gate_ptr, grad_up_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
        gate = tl.load(gate_ptr + offsets, mask=mask).to(tl.float32)
        up = tl.load(up_ptr + offsets, mask=mask).to(tl.float32)
        sigmoid = tl.sigmoid(gate)
        silu = gate * sigmoid
        tl.store(grad_up_ptr + offsets, (grad * silu).to(grad_up_ptr.dtype.element_ty), mask=mask)
        d_silu = sigmoid * (1 + gate * (1 - sigmoid))
        tl.store(grad_gate_ptr + offsets, (grad * up * d_silu).to(grad_gate_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _decode_attention_splits(
        q_ptr,
        new_k_ptr,
        new_v_ptr,
        k_ptr,
        v_ptr,
        used_ptr,
        partial_ptr,
        lse_ptr,
        capacity,
        row_stride,
        scale,
        KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        GROUP_PAD: tl.constexpr,
        DIM: tl.constexpr,
        SPLIT: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One (sequence, kv head, split of the keys): the new key / value written if the new row
        is in this split, then the split's attention output for the kv head's query heads,
        normalised, and its log-sum-exp (-inf for a split past the keys)."""
        seq, kv_head = tl.program_id(0) // KV_HEADS, tl.program_id(0) % KV_HEADS
        split, splits = tl.program_id(1), tl.num_programs(1)
        rows = tl.arange(0, GROUP_PAD)
        dims = tl.arange(0, DIM)
        start = split * SPLIT
        used = tl.load(used_ptr + seq)
        end = tl.minimum(start + SPLIT, used)
        if (used - 1 >= start) & (used - 1 < end):
            new = tl.program_id(0).to(tl.int64) * DIM + dims  # (sequence, kv head) of k / v
            row = (seq * capacity + used - 1).to(tl.int64) * row_stride + kv_head * DIM + dims
            tl.store(k_ptr + row, tl.load(new_k_ptr + new))
            tl.store(v_ptr + row, tl.load(new_v_ptr + new))
        tl.debug_barrier()  # the row written above is read below, by other threads of the program
        head = kv_head * GROUP + rows
        q_rows = (seq * KV_HEADS * GROUP + head).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * DIM + dims[None, :], mask=(rows < GROUP)[:, None], other=0.0)
        best = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        total = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, DIM], tl.float32)
        for first in range(start, end, BLOCK_N):
            keys = first + tl.arange(0, BLOCK_N)
            valid = keys < end
            offsets = ((seq * capacity + keys).to(tl.int64) * row_stride + kv_head * DIM)[:, None] + dims[None, :]
            k = tl.load(k_ptr + offsets, mask=valid[:, None], other=0.0)
            scores = tl.where(valid[None, :], tl.dot(q, tl.trans(k)) * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))  # finite: the step's first key is valid
            p = tl.exp(scores - new_best[:, None])
            rescale = tl.exp(best - new_best)
            v = tl.load(v_ptr + offsets, mask=valid[:, None], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v)
            total = total * rescale + tl.sum(p, 1)
            best = new_best
        slot = q_rows * splits + split  # (sequence, head, split) of the outputs
        lse = tl.where(total > 0, best + tl.log(total), float("-inf"))
        tl.store(lse_ptr + slot, lse, mask=rows < GROUP)
        out = acc / tl.maximum(total, 1e-30)[:, None]
        tl.store(partial_ptr + slot[:, None] * DIM + dims[None, :], out, mask=(rows < GROUP)[:, None])

    @triton.jit
    def _decode_attention_combine(partial_ptr, lse_ptr, out_ptr, splits, DIM: tl.constexpr, SPLITS_PAD: tl.constexpr):
        """One (sequence, head): the splits' outputs weighted by their share of the softmax."""
        row = tl.program_id(0).to(tl.int64)
        parts = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, DIM)
        lse = tl.load(lse_ptr + row * splits + parts, mask=parts < splits, other=float("-inf"))
        weights = tl.exp(lse - tl.max(lse, 0))  # split 0 always has a key: the max is finite
        outs = tl.load(
            partial_ptr + (row * splits + parts)[:, None] * DIM + dims[None, :],
            mask=(parts < splits)[:, None],
            other=0.0,
        )
        out = tl.sum(outs * weights[:, None], 0) / tl.sum(weights, 0)
        tl.store(out_ptr + row * DIM + dims, out.to(out_ptr.dtype.element_ty))

    @triton.jit
    def _gemv_kernel(
        x_ptr,
        w_ptr,
        up_ptr,
        b_ptr,
        g_ptr,
        res_ptr,
        total_ptr,
        add_ptr,
        out_ptr,
        rows,
        n,
        k,
        eps,
        HAS_BIAS: tl.constexpr,
        GATED: tl.constexpr,
        NORM: tl.constexpr,
        RESIDUAL: tl.constexpr,
        ADD: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
        m = tl.arange(0, BLOCK_M)
        dtype = out_ptr.dtype.element_ty
        # One row of x: products summed elementwise, one cross-thread reduction after the loop.
        if BLOCK_M == 1:
            acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros_like(acc)
        squares = tl.zeros([BLOCK_M, BLOCK_K], tl.float32)  # of x, for the norm
        for start in range(0, k, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            w_offsets, w_mask = cols[:, None] * k + ks[None, :], (cols[:, None] < n) & (ks[None, :] < k)
            x_offsets, x_mask = m[:, None] * k + ks[None, :], (m[:, None] < rows) & (ks[None, :] < k)
            x = tl.load(x_ptr + x_offsets, mask=x_mask, other=0.0, eviction_policy="evict_last")
            if RESIDUAL:
                x = (x.to(tl.float32) + tl.load(res_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)).to(dtype)
                if tl.program_id(0) == 0:
                    tl.store(total_ptr + x_offsets, x, mask=x_mask)
            if NORM:  # one row: x * norm weight here, in float32 (it may pass fp16's range), / rms after the loop
                squares += x.to(tl.float32) * x.to(tl.float32)
                x = x.to(tl.float32) * tl.load(g_ptr + ks, mask=ks < k, other=0.0).to(tl.float32)[None, :]
            w = tl.load(w_ptr + w_offsets, mask=w_mask, other=0.0, eviction_policy="evict_first")
            acc = _gemv_step(acc, x, w, BLOCK_M == 1)
            if GATED:
                up = tl.load(up_ptr + w_offsets, mask=w_mask, other=0.0, eviction_policy="evict_first")
                acc_up = _gemv_step(acc_up, x, up, BLOCK_M == 1)
        if BLOCK_M == 1:
            acc = tl.sum(acc, 1)[None, :]
            acc_up = tl.sum(acc_up, 1)[None, :]
        if NORM:
            rstd = tl.rsqrt(tl.sum(squares, 1) / k + eps)[:, None]
            acc *= rstd
            acc_up *= rstd
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=cols < n, other=0.0).to(tl.float32)[None, :]
        if GATED:  # rounded where eager rounds: each projection, then silu before the product
            gate, up = acc.to(dtype).to(tl.float32), acc_up.to(dtype).to(tl.float32)
            acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up
        out_offsets, out_mask = m[:, None] * n + cols[None, :], (m[:, None] < rows) & (cols[None, :] < n)
        if ADD:  # rounded where eager rounds: the product, then the sum
            acc = acc.to(dtype).to(tl.float32) + tl.load(add_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_offsets, acc.to(dtype), mask=out_mask)

    @triton.jit
    def _gemv_step(acc, x, w, ONE_ROW: tl.constexpr):
        """acc + one K block's products: elementwise for one row of x (1, BLOCK_K), else a dot."""
        if ONE_ROW:
            acc += w.to(tl.float32) * x.to(tl.float32)
        else:
            acc += tl.dot(x, tl.trans(w))
        return acc

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, total_ptr, out_ptr, dim, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr
    ):
        offsets = tl.program_id(0).to(tl.int64) * dim + tl.arange(0, BLOCK)
        mask = tl.arange(0, BLOCK) < dim
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        if HAS_RESIDUAL:
            x = (x + tl.load(res_ptr + offsets, mask=mask, other=0.0).to(tl.float32)).to(dtype)
            tl.store(total_ptr + offsets, x, mask=mask)
            x = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, 0) / dim + eps)
        w = tl.load(w_ptr + tl.arange(0, BLOCK), mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offsets, (x * rstd * w).to(dtype), mask=mask)
