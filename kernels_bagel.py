"""SwiGLU's `silu(gate) * up` as one Triton kernel each way, on CUDA where Triton is installed
(it ships with torch's CUDA builds); plain torch ops everywhere else.

Eager torch makes three passes over the (tokens, intermediate) activations forward (silu, mul)
and three backward (two muls and silu's backward), and keeps silu(gate) for the backward. The
kernels read gate and up once and write the output once; the backward reads grad, gate and up and
writes both gradients. The MLP activations are the largest tensors of a BAGEL layer, so this is
a few percent of a training step and of an image-generation step.
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


if triton is not None:

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
