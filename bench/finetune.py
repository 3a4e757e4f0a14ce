"""Fine-tuning steps of the full 28-layer stage-2 BAGEL (random weights) through the trainer's
(training/) own model setup (FSDP2, bf16 compute, float32 master weights for what trains, frozen weights in
bf16) and training step (loss reduction, clipping, AdamW), on packs of ~16k tokens: 12
text-to-image samples (30 text tokens + a 512x512 noised latent) and 2 understanding samples
(490x490 ViT image + 600 text tokens with CE). One JSON line per mode: tokens/s (per GPU), MFU
(model FLOPs, recomputation not counted: bench/common.train_flops), peak GB.

Modes: `lora` (rank 64 on UND and GEN projections, bf16 base, AdamW), `gen` (GEN-only:
`freeze_und`, torchao's 8-bit AdamW: float32 states do not fit one GPU), `full` (every weight,
AdamW; several GPUs), each with `+ac` for activation checkpointing of every layer or `+acF` of a
fraction F of the layers (finetune.py's `activation_checkpointing: F`).

    python bench/finetune.py                                  # one GPU: lora+ac0.25 lora+ac gen+ac0.5 gen+ac
    python bench/finetune.py --gpus 4 --modes full+ac         # relaunches itself under torchrun
"""

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist
from common import PEAK_BF16_FLOPS, Timer, full_size_config, report, train_flops
from repo_package import import_repo
from train_step import packed_batch

MODES = {"lora": {"lora_rank": 64}, "gen": {"freeze_und": True, "optimizer": "adamw8bit"}, "full": {}}


def parse_mode(mode: str) -> tuple[str, float]:
    """`lora+ac0.25` -> ("lora", 0.25); `+ac` alone is 1.0 (every layer), no `+ac` is 0.0."""
    kind, plus, ac = mode.partition("+")
    try:
        fraction = float(ac[2:] or 1) if ac.startswith("ac") else (0.0 if not plus else -1.0)
    except ValueError:
        fraction = -1.0
    if kind not in MODES or not 0.0 <= fraction <= 1.0:
        raise SystemExit(
            f"Unknown mode {mode!r}: one of {', '.join(MODES)}, each optionally with +ac "
            "(every layer) or +acF (a fraction F of the layers, e.g. lora+ac0.25)."
        )
    return kind, fraction


def run_mode(mode: str, steps: int, device, mesh) -> None:
    from bagel_remote.training.config import load_config
    from bagel_remote.training.model import build_model
    from bagel_remote.training.optim import build_optimizer, build_scheduler
    from bagel_remote.training.step import train_step

    kind, fraction = parse_mode(mode)
    cfg = load_config([])
    cfg.update(MODES[kind], activation_checkpointing=fraction, lora_alpha=64, lr=1e-5, max_steps=1000, warmup_steps=0)
    config = full_size_config()
    torch.manual_seed(0)
    model, _ = build_model(cfg, None, config, device, mesh)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer)
    batch = packed_batch(config, device=device, t2i_samples=12, und_samples=2, und_text=600)
    step = lambda: train_step(model, batch, cfg, optimizer, scheduler, params, None)  # noqa: E731
    result = dict(
        workload="finetune",
        mode=mode,
        gpus=dist.get_world_size(),
        tokens=batch["sequence_length"],
        optimizer=cfg["optimizer"],
        activation_checkpointing=fraction,
        trained_params=sum(p.numel() for p in params),
    )  # DTensor numel: the whole tensor
    try:
        for _ in range(2):  # warm-up: optimizer state (torchao compiles its step), allocator
            step()
        torch.cuda.reset_peak_memory_stats()
        with Timer() as t:
            for _ in range(steps):
                step()
        seconds = t.seconds / steps
        result.update(
            seconds=round(seconds, 4),
            tokens_per_s=round(batch["sequence_length"] / seconds),
            mfu=round(train_flops(config, batch, kind) / seconds / PEAK_BF16_FLOPS, 3),
        )
    except torch.OutOfMemoryError:
        result.update(error="out of memory")
    if dist.get_rank() == 0:
        report(**result)
    del model, optimizer, scheduler, params, step
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--modes", default="lora+ac0.25,lora+ac,gen+ac0.5,gen+ac", help="comma-separated, e.g. lora+ac0.25,gen+ac"
    )
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gpus", type=int, default=1, help="> 1: relaunch under torchrun with this many GPUs")
    args = parser.parse_args()
    if args.gpus > 1 and "LOCAL_RANK" not in os.environ:
        from torch.distributed.run import main as torchrun

        torchrun(["--standalone", f"--nproc_per_node={args.gpus}", __file__, *sys.argv[1:]])
        return
    for key, value in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "localhost"),
        ("MASTER_PORT", "29511"),
    ):
        os.environ.setdefault(key, value)
    import_repo()
    from bagel_remote.training.distributed import init_distributed
    from torch.distributed.device_mesh import init_device_mesh

    _, world, device = init_distributed()
    mesh = init_device_mesh("cuda", (world,))
    for mode in args.modes.split(","):
        run_mode(mode, args.steps, device, mesh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
