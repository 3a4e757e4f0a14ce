"""What updates the trained weights: AdamW (torch's or torchao's 8-bit), the learning-rate
schedule (linear warm-up, cosine decay) and the EMA of the weights."""

from __future__ import annotations

import math

import torch

from .config import ConfigError


def build_optimizer(cfg: dict, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW over the trained weights, by `optimizer`:
    - `adamw`: torch's, fused on CUDA (one kernel, in place: the default multi-tensor version
      makes temporaries as large as all the trained weights, 26 GB for GEN-only's 6.5B);
      float32 states, 8 bytes per trained weight.
    - `adamw8bit`: torchao's `AdamW8bit`, block-wise 8-bit states (2 bytes per weight; weights
      under 4096 values keep float32 states), which GEN-only training needs to fit one 141 GB GPU
      (float32 master weights + gradients + states: 6.5B x 16 bytes = 105 GB before activations;
      8-bit states: 65 GB). Chosen over bitsandbytes' AdamW8bit because torchao's takes FSDP2's
      DTensor parameters and keeps its states sharded like them (bitsandbytes' kernels need plain
      tensors: bitsandbytes-foundation/bitsandbytes#1633); gradients stay float32 and global-norm
      clipping works as with `adamw`. Its step is compiled (torch.compile) on first use."""
    kwargs = dict(lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"], weight_decay=cfg["weight_decay"])
    if cfg["optimizer"] == "adamw":
        fused = bool(params) and all(p.device.type == "cuda" for p in params)
        return torch.optim.AdamW(params, fused=fused or None, **kwargs)
    if cfg["optimizer"] == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as err:
            raise ConfigError(
                "optimizer=adamw8bit needs torchao's 8-bit AdamW: pip install torchao (or use optimizer=adamw)."
            ) from err
        return AdamW8bit(params, **kwargs)
    raise ConfigError(f"optimizer={cfg['optimizer']!r}: use adamw or adamw8bit.")


def warmup_cosine(cfg: dict):
    """lr factor at a step: linear warm-up, then cosine down to `min_lr_ratio`."""
    warmup, total, floor = cfg["warmup_steps"], cfg["max_steps"], cfg["min_lr_ratio"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_scheduler(cfg: dict, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """`warmup_cosine` as the optimizer's scheduler."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg))


class EMA:
    """Exponential moving average of the trained weights, sharded like them (DTensors)."""

    def __init__(self, params: dict[str, torch.nn.Parameter], decay: float):
        self.decay = decay
        self.params = params
        self.shadow = {name: p.detach().clone() for name, p in params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1 - self.decay)
