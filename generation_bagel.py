"""BAGEL inference: a packed KV cache, context building, text decoding and image generation."""

from __future__ import annotations

import torch


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The reference's timestep shift: s*t / (1 + (s-1)*t)."""
    return shift * t / (1 + (shift - 1) * t)


def latent_position_ids(h: int, w: int, max_latent_size: int, device=None) -> torch.Tensor:
    """Row-major ids into the latent position table for an h x w token grid."""
    rows = torch.arange(h, device=device)[:, None] * max_latent_size
    return (rows + torch.arange(w, device=device)[None, :]).reshape(-1)


class BagelGenerationMixin:
    """High-level inference API of `BagelForUnifiedMultimodal`."""
