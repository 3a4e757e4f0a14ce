"""One training step over all ranks: the loss of one process on every rank's pack, then the
clipped optimizer step.

Ranks with different packs (text only, images to understand only, latents only, no CE, no MSE):
before the forward one all-reduce (on the host) adds up every rank's token counts; a part that
some rank's pack has (ViT, GEN path, lm head, llm2vae) then runs on every rank, on zero tokens
where its pack has none (`always_run` of the forward), so every FSDP all-gather and reduce-scatter
happens on every rank; parts no rank needs are skipped by all.

Loss (the reference's trainer): CE = sum(ce * weight) / sum(weights) and MSE = per-token mean over
channels, summed / number of MSE tokens, both over all ranks (the all-reduced counts); loss =
ce_weight * CE + mse_weight * MSE. N ranks on N packs give one process's loss and gradients on the
same N packs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .distributed import host_group
from .optim import EMA

PARTS = {"vit": "vit_tokens", "gen": "vae_tokens", "ce": "ce_tokens", "mse": "mse_tokens"}  # forward part -> count
COUNTS = ("tokens", "text_tokens", "vit_tokens", "vae_tokens", "ce_tokens", "mse_tokens")


def pack_counts(batch: dict) -> list[int]:
    """This pack's tokens by kind (`COUNTS`), from its tensors' shapes."""
    rows = lambda key: 0 if batch.get(key) is None else batch[key].shape[0]  # noqa: E731
    return [
        batch["sequence_length"],
        rows("packed_text_ids"),
        rows("packed_vit_tokens"),
        rows("packed_vae_token_indexes"),
        rows("ce_loss_indexes"),
        rows("mse_loss_indexes"),
    ]


def forward_backward(model, batch: dict, cfg: dict) -> dict[str, float]:
    """Forward and backward of this rank's pack, so that the gradients (after FSDP's average over
    ranks) are those of one process on all ranks' packs; returns the global loss, CE, MSE and
    token counts. Every part some rank needs runs on every rank (see the module docstring)."""
    world = dist.get_world_size()
    totals = torch.tensor(pack_counts(batch), dtype=torch.float64)
    dist.all_reduce(totals, group=host_group())
    counts = dict(zip(COUNTS, (int(n) for n in totals.tolist())))
    weights = batch.get("ce_loss_weights") if batch.get("ce_loss_indexes") is not None else None
    zero = batch["packed_position_ids"].new_zeros((), dtype=torch.float32)
    ce_den = zero + (weights.sum() if weights is not None else pack_counts(batch)[4])
    dist.all_reduce(ce_den)  # all ranks' CE weights (the CE normaliser): queued on the device, no wait
    out = model(**batch, always_run=[part for part, key in PARTS.items() if counts[key] > 0])
    ce, mse = out["ce"], out["mse"]
    if ce is not None and (weights is None or weights.shape != ce.shape):  # (absent, or CE run on zero tokens)
        weights = torch.ones_like(ce)
    ce_sum = (ce * weights).sum() if ce is not None else zero
    mse_sum = mse.mean(-1).sum() if mse is not None else zero
    ce_den, mse_den = ce_den.clamp_min(1e-12), max(counts["mse_tokens"], 1)
    loss = cfg["ce_weight"] * ce_sum / ce_den + cfg["mse_weight"] * mse_sum / mse_den
    if loss.requires_grad:  # the same on every rank (the same parts run); no: nothing trained gets a gradient
        (loss * world).backward()  # FSDP averages gradients over ranks
    sums = torch.stack([ce_sum.detach(), mse_sum.detach()]).double()
    dist.all_reduce(sums)
    metrics = {"ce": (sums[0] / ce_den).item(), "mse": sums[1].item() / mse_den}
    metrics["loss"] = cfg["ce_weight"] * metrics["ce"] + cfg["mse_weight"] * metrics["mse"]
    return {**metrics, **counts}


def train_step(model, batch: dict, cfg: dict, optimizer, scheduler, params: list, ema: EMA | None) -> dict:
    """Forward, backward, clipped AdamW step; returns the global metrics and the grad norm."""
    metrics = forward_backward(model, batch, cfg)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
    metrics["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    metrics["lr"] = float(scheduler.get_last_lr()[0])  # a tensor with torchao's optimizers
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema is not None:
        ema.update()
    return metrics
