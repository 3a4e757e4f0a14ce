"""Run under torchrun by tests/test_finetune_runs.py: each rank takes its own pack of a file of
packs (rank r: pack r) and, for full, GEN-only and LoRA fine-tuning, builds the trainer's
FSDP2 model (training/model.py) from a checkpoint, runs its `forward_backward` and saves (rank 0) the trained weights
before the step, the gathered gradients and the metrics; then three more whole training steps,
on rotated packs (rank r: pack r + 1, r + 2) and on pack 0 everywhere, whose metrics it saves too.

    torchrun --nproc_per_node N tests/finetune_ranks.py CHECKPOINT PACKS.pt OUT.pt
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from repo_package import import_repo  # noqa: E402

import_repo()
from bagel_remote.loading_bagel import config_from_directory  # noqa: E402
from bagel_remote.training.config import load_config  # noqa: E402
from bagel_remote.training.distributed import init_distributed  # noqa: E402
from bagel_remote.training.model import build_model  # noqa: E402
from bagel_remote.training.optim import build_optimizer, build_scheduler  # noqa: E402
from bagel_remote.training.step import forward_backward, train_step  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402

MODES = {"full": [], "gen": ["freeze_und=true"], "lora": ["lora_rank=4", "lora_alpha=8"]}


def full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def main(checkpoint: str, packs_path: str, out_path: str) -> None:
    rank, world, device = init_distributed()
    mesh = init_device_mesh(device.type, (world,))
    packs = torch.load(packs_path, weights_only=False)
    results = {}
    for mode, overrides in MODES.items():
        cfg = load_config([f"model={checkpoint}", "activation_checkpointing=false", "lr=1e-3", *overrides])
        config = config_from_directory(Path(checkpoint))  # build_model sets freeze_und on it: one each
        torch.manual_seed(0)
        model, _ = build_model(cfg, Path(checkpoint), config, device, mesh)
        trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
        start = {name: full(p.detach()).clone() for name, p in trained.items()}
        torch.manual_seed(1 + rank)
        metrics = forward_backward(model, packs[rank % len(packs)], cfg)
        grads = {name: None if p.grad is None else full(p.grad).clone() for name, p in trained.items()}
        optimizer = build_optimizer(cfg, list(trained.values()))
        scheduler = build_scheduler(cfg, optimizer)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        # rotated packs, then pack 0 on every rank (2 ranks: understanding; 4: text only): for GEN-only
        # training a step where no rank has anything to generate, so nothing gets a gradient
        order = [(rank + 1) % len(packs), (rank + 2) % len(packs), 0]
        steps = [train_step(model, packs[i], cfg, optimizer, scheduler, list(trained.values()), None) for i in order]
        results[mode] = {"start": start, "grads": grads, "metrics": metrics, "steps": steps}
        del model, optimizer
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
