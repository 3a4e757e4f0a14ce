"""Fused elementwise kernels in Triton, on CUDA where Triton is installed (it ships with torch's
CUDA builds); plain torch ops everywhere else.

- `silu_mul`: SwiGLU's `silu(gate) * up`. Eager torch makes three passes over the (tokens,
  intermediate) activations forward (silu, mul) and three backward (two muls and silu's
  backward), and keeps silu(gate) for the backward. The kernels read gate and up once and write
  the output once; the backward reads grad, gate and up and writes both gradients. The MLP
  activations are the largest tensors of a BAGEL layer, so this is a few percent of a training
  step and of an image-generation step.
- `rms_norm_rotary`: the q/k RMSNorm and the rotary embedding after it, one pass over q or k
  each way instead of four (norm, and rotary's product, half swap and multiply-add), reading q
  and k straight out of the fused q/k/v projection's output.
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
    """silu(gate) * up, elementwise, for gate and up of one shape and dtype."""
    if triton is not None and gate.is_cuda and gate.dtype == up.dtype and gate.shape == up.shape:
        return _SiluMul.apply(gate, up)
    return F.silu(gate) * up


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


def fuses_rms_norm_rotary(x: torch.Tensor) -> bool:
    """Whether `rms_norm_rotary` can take x (N, heads, dim): CUDA with Triton, each head's
    values contiguous and the heads back to back (tokens may be strided), dim a power of two."""
    dim = x.shape[-1]
    return triton is not None and x.is_cuda and x.stride(2) == 1 and x.stride(1) == dim and dim & (dim - 1) == 0


def rms_norm_rotary(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                    signed_sin: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """RMSNorm over the last dim of x (N, heads, dim) with `weight` (dim,), then the rotary
    embedding with cos and signed_sin (N, dim) as `rotary_cos_sin` makes them; in float32, rounded
    once to x's dtype. Returns a new contiguous (N, heads, dim). Only where `fuses_rms_norm_rotary`."""
    return _RMSNormRotary.apply(x, weight, eps, cos.contiguous(), signed_sin.contiguous())


class _RMSNormRotary(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps, cos, signed_sin):
        n, heads, dim = x.shape
        out = x.new_empty(x.shape)
        grid = (triton.cdiv(n * heads, _ROWS),)
        _rms_norm_rotary_forward[grid](x, weight, cos, signed_sin, out, n * heads, heads, x.stride(0), eps,
                                       HALF=dim // 2, ROWS=_ROWS)  # fmt: skip
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
        _rms_norm_rotary_backward[(programs,)](grad, x, weight, cos, signed_sin, grad_x, grad_weight, n * heads, heads,
                                               x.stride(0), ctx.eps, HALF=dim // 2, ROWS=_ROWS)  # fmt: skip
        return grad_x, grad_weight.sum(0).to(weight.dtype), None, None, None


if triton is not None:

    @triton.jit
    def _rows_of(num_rows, heads, token_stride, HALF: tl.constexpr, ROWS: tl.constexpr):
        """Offsets of a program's (token, head) rows: into x (first half), into the (N, 2*HALF)
        cos / sin tables (first half), and the row mask."""
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        token, head = rows // heads, rows % heads
        cols = tl.arange(0, HALF)
        x_offsets = (token * token_stride + head * 2 * HALF)[:, None] + cols[None, :]
        table_offsets = (token * 2 * HALF)[:, None] + cols[None, :]
        return x_offsets, table_offsets, (rows < num_rows)[:, None]

    @triton.jit
    def _rms_norm_rotary_forward(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, num_rows, heads, token_stride, eps,
                                 HALF: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        x_off, t_off, mask = _rows_of(num_rows, heads, token_stride, HALF, ROWS)
        x1 = tl.load(x_ptr + x_off, mask=mask).to(tl.float32)
        x2 = tl.load(x_ptr + x_off + HALF, mask=mask).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        cols = tl.arange(0, HALF)[None, :]
        n1 = x1 * rstd * tl.load(w_ptr + cols).to(tl.float32)
        n2 = x2 * rstd * tl.load(w_ptr + HALF + cols).to(tl.float32)
        cos1, cos2 = tl.load(cos_ptr + t_off, mask=mask).to(tl.float32), tl.load(cos_ptr + t_off + HALF, mask=mask).to(tl.float32)
        sin1, sin2 = tl.load(sin_ptr + t_off, mask=mask).to(tl.float32), tl.load(sin_ptr + t_off + HALF, mask=mask).to(tl.float32)
        # out = n*cos + swap_halves(n)*signed_sin, written contiguously (rows of 2*HALF)
        out_off = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None] * (2 * HALF) + cols
        dtype = out_ptr.dtype.element_ty
        tl.store(out_ptr + out_off, (n1 * cos1 + n2 * sin1).to(dtype), mask=mask)
        tl.store(out_ptr + out_off + HALF, (n2 * cos2 + n1 * sin2).to(dtype), mask=mask)

    @triton.jit
    def _rms_norm_rotary_backward(grad_ptr, x_ptr, w_ptr, cos_ptr, sin_ptr, grad_x_ptr, grad_w_ptr, num_rows, heads,
                                  token_stride, eps, HALF: tl.constexpr, ROWS: tl.constexpr):  # fmt: skip
        x_off, t_off, mask = _rows_of(num_rows, heads, token_stride, HALF, ROWS)
        cols = tl.arange(0, HALF)[None, :]
        g_off = (tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS))[:, None] * (2 * HALF) + cols
        g1 = tl.load(grad_ptr + g_off, mask=mask).to(tl.float32)
        g2 = tl.load(grad_ptr + g_off + HALF, mask=mask).to(tl.float32)
        cos1, cos2 = tl.load(cos_ptr + t_off, mask=mask).to(tl.float32), tl.load(cos_ptr + t_off + HALF, mask=mask).to(tl.float32)
        sin1, sin2 = tl.load(sin_ptr + t_off, mask=mask).to(tl.float32), tl.load(sin_ptr + t_off + HALF, mask=mask).to(tl.float32)
        # the rotation's transpose: d n1 = g1*cos1 + g2*sin2, d n2 = g2*cos2 + g1*sin1
        dn1, dn2 = g1 * cos1 + g2 * sin2, g2 * cos2 + g1 * sin1
        x1 = tl.load(x_ptr + x_off, mask=mask).to(tl.float32)
        x2 = tl.load(x_ptr + x_off + HALF, mask=mask).to(tl.float32)
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
        xhat1, xhat2 = x1 * rstd, x2 * rstd
        dxhat1 = dn1 * tl.load(w_ptr + cols).to(tl.float32)
        dxhat2 = dn2 * tl.load(w_ptr + HALF + cols).to(tl.float32)
        mean = ((tl.sum(dxhat1 * xhat1, 1) + tl.sum(dxhat2 * xhat2, 1)) / (2 * HALF))[:, None]
        dtype = grad_x_ptr.dtype.element_ty
        tl.store(grad_x_ptr + g_off, (rstd * (dxhat1 - xhat1 * mean)).to(dtype), mask=mask)
        tl.store(grad_x_ptr + g_off + HALF, (rstd * (dxhat2 - xhat2 * mean)).to(dtype), mask=mask)
        w_row = tl.program_id(0).to(tl.int64) * (2 * HALF) + tl.arange(0, HALF)
        tl.store(grad_w_ptr + w_row, tl.sum(dn1 * xhat1, 0))  # masked rows hold zeros
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
