"""A/B of the GPU benchmarks: the same commands in two checkouts, alternating, in one device call.

A refactor is "behaviour unchanged" only if it is also no slower. This runs each benchmark in the
`--before` checkout (a revision exported with `git archive`) and in this one (or `--after`), one
after the other, `--rounds` times, and reports each workload's headline number per side, their
ratio, and whether the later checkout is within `--tolerance` of the earlier. Exits 1 if any
workload is slower than that.

    git archive 11eb9e3 | (mkdir -p .before && tar -x -C .before)   # `.before/` is git-ignored
    python bench/ab.py --before .before          # on the GPU, with `.before` carried along

Each benchmark prints JSON lines (`bench/common.py: report`); the headline number of each is
below, with whether larger is better.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# name -> (arguments after `python`, JSON key of the headline number, larger is better)
WORKLOADS = {
    "t2i 1024² 50 steps": (["bench/t2i.py"], "seconds", False),
    "chat 1 request": (["bench/chat.py", "--batch", "1"], "tokens_per_s", True),
    "chat 16 requests": (["bench/chat.py", "--batch", "16"], "tokens_per_s", True),
    "train step (8 layers)": (["bench/train_step.py", "--steps", "40"], "seconds", False),
}


def run_once(tree: Path, args: list[str], key: str) -> float:
    """The headline number of one benchmark run in `tree` (its last JSON line that has `key`)."""
    done = subprocess.run([sys.executable, *args], cwd=tree, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {tree} (rc {done.returncode}):\n{done.stderr[-4000:]}")
    values = [json.loads(line)[key] for line in done.stdout.splitlines() if line.startswith("{") and key in line]
    if not values:
        raise RuntimeError(f"{' '.join(args)} in {tree} printed no {key!r}:\n{done.stdout[-2000:]}")
    return float(values[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", type=Path, required=True, help="a checkout of the earlier revision")
    parser.add_argument("--after", type=Path, default=REPO_ROOT, help="the later checkout (default: this one)")
    parser.add_argument("--rounds", type=int, default=1, help="A/B pairs per workload (the median is kept)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="how much slower still counts as equal")
    parser.add_argument("--only", nargs="*", default=None, help=f"a subset of: {', '.join(WORKLOADS)}")
    args = parser.parse_args()
    before, after = args.before.resolve(), args.after.resolve()
    for flag, tree in (("--before", before), ("--after", after)):
        if not (tree / "modeling_bagel.py").is_file():
            parser.error(f"{flag} {tree} is not a checkout of this repository (no modeling_bagel.py)")
    names = args.only or list(WORKLOADS)
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"--only: unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    slower = []
    for name in names:
        bench_args, key, larger_is_better = WORKLOADS[name]
        a, b = [], []
        for _ in range(args.rounds):
            a.append(run_once(before, bench_args, key))
            b.append(run_once(after, bench_args, key))
        a_mid, b_mid = statistics.median(a), statistics.median(b)
        speed = b_mid / a_mid if larger_is_better else a_mid / b_mid  # > 1: this checkout is faster
        ok = speed >= 1 - args.tolerance
        slower += [] if ok else [name]
        print(
            json.dumps(
                {"workload": name, "key": key, "before": a, "after": b, "speed_after_over_before": round(speed, 4)}
                | {"within_tolerance": ok}
            ),
            flush=True,
        )
    if slower:
        print(f"slower than {args.before} by more than {args.tolerance:.0%}: {', '.join(slower)}", file=sys.stderr)
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
