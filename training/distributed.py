"""The process group a run trains in, and a host-side group for the numbers every rank adds up."""

from __future__ import annotations

import os
import socket
import sys

import torch
import torch.distributed as dist

_HOST_GROUP = {}


def init_distributed() -> tuple[int, int, torch.device]:
    """The process group torchrun describes (NCCL on GPUs, gloo on CPU); without torchrun, a
    group of one process. Returns (rank, world size, this rank's device)."""
    if "RANK" not in os.environ:
        with socket.socket() as probe:  # a free port for the one-process group's store
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        print(
            "Not started by torchrun: training as one process (torchrun --nproc_per_node N examples/finetune.py "
            "... for N).",
            file=sys.stderr,
        )
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def host_group():
    """A gloo group for the host's numbers (the default group on CPU): with NCCL, adding up token
    counts on the GPU would make the host wait for the queued work before the forward."""
    if "group" not in _HOST_GROUP:  # made at the first step, by every rank alike
        _HOST_GROUP["group"] = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    return _HOST_GROUP["group"]


def rank_zero_first(fn):
    """`fn()` on rank 0, then on the other ranks (e.g. a Hub download, then from the cache)."""
    result = None
    for turn in (0, 1):
        if (dist.get_rank() == 0) == (turn == 0):
            result = fn()
        dist.barrier()
    return result
