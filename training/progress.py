"""What a run reports: one JSON line per logged step in `out_dir/log.jsonl` (rank 0), and a
progress bar. A resumed run drops the lines after its checkpoint before the steps are redone."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def continue_log(path: Path, step: int) -> None:
    """Keep log.jsonl's lines up to `step`: those after the checkpoint resumed from are redone
    (a line cut short by a kill is dropped too)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("step", 0) <= step:
            kept.append(line + "\n")
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(kept))
    os.replace(partial, path)


class TrainingLog:
    """log.jsonl and the progress bar of rank 0 (other ranks: nothing), from step `step` on."""

    SHOWN = ("loss", "ce", "mse", "tokens_per_s")

    def __init__(self, out_dir: Path, step: int, max_steps: int, log_every: int, rank: int):
        from tqdm import tqdm

        self.log_every, self.file = log_every, None
        if rank == 0:
            continue_log(out_dir / "log.jsonl", step)
            self.file = open(out_dir / "log.jsonl", "a")
        self.bar = tqdm(total=max_steps, initial=step, disable=rank != 0, dynamic_ncols=True)

    def announce(self, params: list, world: int, resumed_from: Path | None) -> None:
        """What trains, on how many ranks, and where from (stderr, rank 0)."""
        if self.file is None:
            return
        n_trained = sum(p.numel() for p in params)  # DTensor numel: the whole tensor
        print(
            f"{n_trained:,} trained parameters ({n_trained / 1e6:.2f}M) on {world} rank(s)"
            + (f"; resumed from {resumed_from} (step {self.bar.n})" if resumed_from else ""),
            file=sys.stderr,
        )

    def record(self, step: int, metrics: dict, seconds: float) -> None:
        """Step `step`'s metrics (one line every `log_every` steps), its tokens per second added."""
        metrics.update(step=step, tokens_per_s=metrics["tokens"] / seconds)
        if self.file is not None and step % self.log_every == 0:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in self.SHOWN})
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
