"""Checkpoints of a run and its final save.

During the run: torch DCP (sharded, every rank writes its own part) of the trained weights,
optimizer (with the names of the weights that have optimizer state: one never given a gradient has
none), scheduler, EMA, data position and RNG states, written to `step_N.partial` and renamed to
`step_N` once complete; resuming gives the same next losses. At the end: the weights (EMA ones
where kept) gathered on rank 0 in the released layout (`save_pretrained`: loads with
`from_pretrained`); LoRA runs also write the PEFT adapter.

`BAGEL_FINETUNE_EXIT_AT=step:K` (or `save:K`) exits every rank hard after step K (or while step
K's checkpoint is written, before it is published): the tests' kill.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..loading_bagel import load_processor
from ..modeling_bagel import BagelForUnifiedMultimodal
from .optim import EMA

# Frozen weights are not saved: they come from the model checkpoint. (Loading is not strict for
# them; a trained weight missing from a DCP checkpoint fails in `dcp.load` already.)
DCP_OPTIONS = StateDictOptions(ignore_frozen_params=True)
DCP_LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def training_state(model, optimizer, scheduler, ema: EMA | None, dataset, step: int) -> dict:
    model_sd, optim_sd = get_state_dict(model, optimizer, options=DCP_OPTIONS)
    rank = dist.get_rank()
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    # A weight no pack has given a gradient yet has no AdamW state, while a fresh optimizer gets
    # one for every weight (`get_state_dict` steps it once with zero gradients): which have one.
    stepped = [name for name, p in model.named_parameters() if optimizer.state.get(p)]
    return {
        "model": model_sd,
        "optim": optim_sd,
        "ema": ema.shadow if ema else {},
        "trainer": {"step": step, "scheduler": scheduler.state_dict()},
        "stepped": _blob(stepped),
        # Each rank's own, as one opaque blob: DCP matches nested entries against the structure of
        # the state it loads into, which for the data (waiting samples, workers) is not known ahead.
        f"rank{rank}": _blob({"rng": rng, "data": dataset.state_dict()}),
    }


def _blob(obj) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _unblob(obj):
    return torch.load(obj, weights_only=False) if isinstance(obj, io.BytesIO) else obj  # DCP hands blobs back loaded


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:08d}"


def save_checkpoint(out_dir: Path, step: int, state: dict) -> None:
    """Every rank writes its part to `step_N.partial`; rank 0 then renames it `step_N` (atomic), so
    a run killed while writing leaves only a `.partial` directory, which is never resumed from."""
    path = checkpoint_path(out_dir, step)
    partial = path.with_name(path.name + ".partial")
    if dist.get_rank() == 0 and partial.exists():
        shutil.rmtree(partial)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(partial))
    dist.barrier()
    exit_if_asked("save", step)
    if dist.get_rank() == 0:
        if path.exists():  # a checkpoint of a run whose later steps are redone
            shutil.rmtree(path)
        os.replace(partial, path)
    dist.barrier()


def load_checkpoint(path: Path, model, optimizer, scheduler, ema: EMA | None, dataset) -> tuple[int, dict]:
    """Restore what `training_state` saved but the RNG states; returns the step to continue from
    and this rank's RNG states (`set_rng_state`, once the data iterator exists)."""
    stepped = {"stepped": _blob(None)}
    dcp.load(stepped, checkpoint_id=str(path))
    stepped = set(_unblob(stepped["stepped"]))
    state = training_state(model, optimizer, scheduler, ema, dataset, 0)
    # (the states `get_state_dict` made for every weight are replaced by the loaded ones, these only)
    state["optim"]["state"] = {name: v for name, v in state["optim"]["state"].items() if name in stepped}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=DCP_LOAD_OPTIONS
    )
    scheduler.load_state_dict(state["trainer"]["scheduler"])
    mine = _unblob(state[f"rank{dist.get_rank()}"])
    dataset.load_state_dict(mine["data"])
    return int(state["trainer"]["step"]), mine["rng"]


def resume_from(path: Path, model, optimizer, scheduler, ema: EMA | None, dataset) -> tuple[int, dict]:
    """`load_checkpoint`, or a clear exit (one message, from rank 0) saying how to go on."""
    try:
        return load_checkpoint(path, model, optimizer, scheduler, ema, dataset)
    except (Exception, dcp.api.CheckpointException) as error:  # (DCP's is a BaseException)
        detail = [line for line in str(error).splitlines() if line.strip()][-1:] or [type(error).__name__]
        raise SystemExit(
            f"Cannot resume from {path}: {detail[0][:500]}\nIt was written by a run with other "
            "settings (ranks, num_workers, data sources, freeze / LoRA switches) or is damaged. Rerun with that "
            "run's settings, or start afresh: resume=false (deletes out_dir's checkpoints and log) or another "
            "out_dir."
            if dist.get_rank() == 0
            else 1  # one message, not one per rank
        ) from error


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"])


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The last published checkpoint (`step_N`, not `step_N.partial`)."""
    done = sorted(p for p in (out_dir / "checkpoints").glob("step_*") if p.name[5:].isdigit() and p.is_dir())
    return done[-1] if done else None


def prepare_out_dir(out_dir: Path, resume: bool) -> Path | None:
    """Rank 0 clears what a killed or restarted run left; returns the checkpoint to resume from."""
    if dist.get_rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for partial in (out_dir / "checkpoints").glob("step_*.partial"):  # a write that was killed
            shutil.rmtree(partial)
        if not resume and (latest_checkpoint(out_dir) or (out_dir / "log.jsonl").exists()):
            print(f"resume=false: deleting {out_dir}/checkpoints and log.jsonl, starting at step 0.", file=sys.stderr)
            shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
            (out_dir / "log.jsonl").unlink(missing_ok=True)
    dist.barrier()
    return latest_checkpoint(out_dir)


def exit_if_asked(where: str, step: int) -> None:
    """The tests' kill: `BAGEL_FINETUNE_EXIT_AT=step:K` after step K, `save:K` while K's checkpoint
    is written (after DCP's files, before it is published)."""
    if os.environ.get("BAGEL_FINETUNE_EXIT_AT") == f"{where}:{step}":
        sys.stderr.flush()
        os._exit(17)


def save_final(model, lora, ema: EMA | None, cfg: dict, checkpoint_dir: Path | None, freeze_und: bool) -> None:
    """Gather the weights (EMA ones where kept) on rank 0 and write the released layout to
    out_dir/final; with LoRA, the adapter to out_dir/adapter and the merged model to final."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ema is not None:  # every rank takes part in each gather
        gathered = {name: shadow.full_tensor().cpu() for name, shadow in ema.shadow.items()}
        full.update(gathered if dist.get_rank() == 0 else {})
    if dist.get_rank() != 0:
        return
    out = Path(cfg["out_dir"])
    dtype = getattr(torch, cfg["save_dtype"])
    full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
    config = model.config
    config.text_config.freeze_und = freeze_und  # the switch of this run, not of the saved model
    with torch.device("meta"):
        fresh = BagelForUnifiedMultimodal(config)
    if lora is not None:
        from peft import get_peft_model

        adapted = get_peft_model(fresh, lora)
        fresh.load_state_dict(full, assign=True)
        adapted.save_pretrained(str(out / "adapter"))
        fresh = adapted.merge_and_unload()
    else:
        fresh.load_state_dict(full, assign=True)
    fresh.processor = load_processor(checkpoint_dir, config)  # saved with it: `final` is complete
    fresh.save_pretrained(str(out / "final"))
