"""Fine-tune BAGEL with torch FSDP2: full, GEN-only, frozen-tower or LoRA runs, resumable.

    torchrun --nproc_per_node 8 examples/finetune.py my_run.yaml out_dir=runs/full
    torchrun --nproc_per_node 1 examples/finetune.py my_run.yaml out_dir=runs/lora lora_rank=64

One config file (a copy of examples/finetune.yaml, its data filled in); any key can be overridden
as `key=value` (YAML values); the whole is checked before anything is built (`--help` lists the
keys). Without torchrun it runs as one process. Needs torch >= 2.7 (`fully_shard` with
`ignored_params`). Outputs in `out_dir`: log.jsonl, checkpoints/step_N (resumed from when the same
command runs again), final/ (the released layout) and, for LoRA, adapter/.

This script is the driver: argument parsing -> config -> build -> loop. The components are the
package `training/` of this checkout (imported as `bagel_remote.training`; the final save copies
the remote code): config (the schema), loader (packs), model (FSDP2, LoRA, freezing), optim,
step (the loss over all ranks), checkpoint (DCP, the final save), progress (log.jsonl).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from repo_package import import_repo  # noqa: E402

import_repo()  # this checkout, as the package `bagel_remote` (its modules import each other relatively)
from bagel_remote.training.config import ConfigError, help_text, load_config  # noqa: E402

if __name__ == "__main__" and {"-h", "--help"} & set(sys.argv[1:]):  # before torch is imported: at once
    print(help_text())
    sys.exit(0)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from bagel_remote.loading_bagel import config_from_directory, resolve_checkpoint_dir  # noqa: E402
from bagel_remote.training import checkpoint  # noqa: E402
from bagel_remote.training.distributed import init_distributed, rank_zero_first  # noqa: E402
from bagel_remote.training.loader import build_dataset  # noqa: E402
from bagel_remote.training.model import build_model  # noqa: E402
from bagel_remote.training.optim import EMA, build_optimizer, build_scheduler  # noqa: E402
from bagel_remote.training.packing import encode_pack  # noqa: E402
from bagel_remote.training.progress import TrainingLog  # noqa: E402
from bagel_remote.training.step import train_step  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(help_text())
        return
    try:
        train(load_config(argv))
    except ConfigError as error:  # a setting that cannot run: its message, no traceback
        raise SystemExit(str(error)) from None


def train(cfg: dict) -> None:
    """One run of a validated config, on this process's rank."""
    if not cfg["data"]:
        raise ConfigError("Set data=: a file of packs, or {sources: [...], ...} (see --help, examples/finetune.yaml).")

    # Build: the process group, the checkpoint (rank 0 downloads first), data, model, optimizer.
    rank, world, device = init_distributed()
    mesh = init_device_mesh(device.type, (world,))
    out_dir = Path(cfg["out_dir"])
    checkpoint_dir = rank_zero_first(lambda: resolve_checkpoint_dir(cfg["model"], "", {}, None))
    config = config_from_directory(checkpoint_dir)
    freeze_und = config.text_config.freeze_und
    dataset = build_dataset(cfg, config, checkpoint_dir, rank, world)  # data errors before the model is built
    torch.manual_seed(cfg["seed"])  # the same random init (LoRA, missing weights) on every rank
    model, lora = build_model(cfg, checkpoint_dir, config, device, mesh)
    trained = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(trained.values())
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer)
    ema = EMA(trained, cfg["ema_decay"]) if cfg["ema_decay"] else None
    torch.manual_seed(cfg["seed"] + rank)  # noise and timesteps differ between ranks

    # Resume from the last checkpoint of out_dir, unless resume=false.
    step, rng = 0, None
    last = checkpoint.prepare_out_dir(out_dir, cfg["resume"])
    if last is not None:
        step, rng = checkpoint.resume_from(last, model, optimizer, scheduler, ema, dataset)
    log = TrainingLog(out_dir, step, cfg["max_steps"], cfg["log_every"], rank)
    log.announce(params, world, last)
    packs = iter(dataset)  # a StatefulDataLoader draws its base seed from the global generator here,
    if rng is not None:  # so the saved RNG states are restored after it
        checkpoint.set_rng_state(rng)

    # Loop: a pack, a step, a log line; a checkpoint every save_every steps and at the end.
    while step < cfg["max_steps"]:
        start = time.perf_counter()
        batch = encode_pack(model, next(packs), device)  # on the device, images VAE-encoded
        metrics = train_step(model, batch, cfg, optimizer, scheduler, params, ema)
        step += 1
        log.record(step, metrics, time.perf_counter() - start)
        if step % cfg["save_every"] == 0 or step == cfg["max_steps"]:
            state = checkpoint.training_state(model, optimizer, scheduler, ema, dataset, step)
            checkpoint.save_checkpoint(out_dir, step, state)
        checkpoint.exit_if_asked("step", step)
    log.close()
    checkpoint.save_final(model, lora, ema, cfg, checkpoint_dir, freeze_und)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
