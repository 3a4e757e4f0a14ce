"""Layers the whole model shares (both towers, the VAE and generation): `Linear`, whose forward is
`ops_bagel.linear` (the float32 master-weight training path, the CPU and decoding paths), and the
rotary tables.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .ops_bagel import linear


def rotary_cos_sin(positions: torch.Tensor, dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (N,) -> cos, signed sin (N, dim) in float32: the frequencies repeat over both
    halves, and the sin's first half is negated, which is what `kernels_bagel.apply_rotary` takes."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((-freqs.sin(), freqs.sin()), dim=-1)


class Linear(nn.Linear):
    """nn.Linear whose kernel `ops_bagel.linear` picks: (1) when float32 weights are trained under
    CUDA autocast, one GEMM writes the float32 weight gradient directly (autocast would give a bf16
    gradient and cast it, an extra kernel per weight and a rounding); (2) bf16/fp16 weights on the
    CPU are computed in float32; (3) a few rows in inference on CUDA (decoding) take our Triton GEMV.
    Kernels that read a layer's weights in its place (`ops_bagel.plain_linears`) check that its
    forward is this one."""

    forward = linear
