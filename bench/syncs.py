"""Host syncs of one training step of bench/train_step.py's workload (2 LLM layers by default),
counted with torch's sync debug mode and listed by the lines that made them. A sync leaves the GPU
idle while the host queues what comes after it.

    python bench/syncs.py [--layers 2]
    cd <another checkout> && python <this checkout>/bench/syncs.py   # that checkout's code
"""

import argparse
import collections
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch

# The checkout under test is the working directory's (its bench/ helpers build its own model).
sys.path.insert(0, str(Path.cwd() / "bench"))
from common import build_model, full_size_config  # noqa: E402
from train_step import make_step, packed_batch  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = full_size_config(num_llm_layers=args.layers)
    model = build_model(config, dtype=torch.float32).train()
    step = make_step(model, packed_batch(config))
    step()
    step()
    torch.cuda.synchronize()

    where = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            return
        ours = [f for f in traceback.extract_stack()[:-1] if "site-packages" not in f.filename]
        ours = [f for f in ours if Path(f.filename).name not in ("syncs.py", "warnings.py")]
        where[" <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in reversed(ours[-3:]))] += 1

    shown = warnings.showwarning
    warnings.showwarning = record
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown
    print(f"{Path.cwd()}: {sum(where.values())} host syncs in one training step")
    for line, n in where.most_common():
        print(f"  {n:3d}  {line}")


if __name__ == "__main__":
    main()
