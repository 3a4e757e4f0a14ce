"""bench/ab.py, the A/B driver of the GPU benchmarks, on two fake checkouts whose benchmarks print
known numbers: the ratios, the verdict and the exit code (the benchmarks themselves need a GPU)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def fake_checkout(root: Path, seconds: float, tokens_per_s: float) -> Path:
    """A tree with modeling_bagel.py and benchmarks that print one JSON line each."""
    (root / "bench").mkdir(parents=True)
    (root / "modeling_bagel.py").write_text("")
    for name, line in (
        ("t2i.py", {"workload": "t2i", "seconds": seconds}),
        ("train_step.py", {"workload": "train_step", "seconds": seconds}),
        ("chat.py", {"workload": "chat", "tokens_per_s": tokens_per_s}),
    ):
        (root / "bench" / name).write_text(f"print('warming up')\nprint({json.dumps(json.dumps(line))})\n")
    return root


def run_ab(before: Path, after: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO_ROOT / "bench" / "ab.py"), "--before", str(before), "--after", str(after)]
    return subprocess.run([*command, *extra], capture_output=True, text=True)


def rows(done: subprocess.CompletedProcess) -> dict:
    return {row["workload"]: row for row in map(json.loads, done.stdout.splitlines())}


def test_equal_speed_passes_and_ratios_follow_the_direction_of_each_number(tmp_path):
    before = fake_checkout(tmp_path / "a", seconds=10.0, tokens_per_s=200.0)
    after = fake_checkout(tmp_path / "b", seconds=9.9, tokens_per_s=198.0)  # 1% faster t2i, 1% slower chat
    done = run_ab(before, after)
    assert done.returncode == 0, done.stderr
    table = rows(done)
    assert set(table) == {"t2i 1024² 50 steps", "chat 1 request", "chat 16 requests", "train step (8 layers)"}
    assert table["t2i 1024² 50 steps"]["speed_after_over_before"] == pytest.approx(10.0 / 9.9, abs=1e-4)
    assert table["chat 16 requests"]["speed_after_over_before"] == pytest.approx(0.99, abs=1e-4)
    assert all(row["within_tolerance"] for row in table.values())


def test_a_slower_workload_fails_with_its_name(tmp_path):
    before = fake_checkout(tmp_path / "a", seconds=10.0, tokens_per_s=200.0)
    after = fake_checkout(tmp_path / "b", seconds=10.0, tokens_per_s=190.0)  # chat 5% slower
    done = run_ab(before, after, "--only", "chat 1 request", "t2i 1024² 50 steps")
    assert done.returncode == 1
    table = rows(done)
    assert not table["chat 1 request"]["within_tolerance"] and table["t2i 1024² 50 steps"]["within_tolerance"]
    assert "chat 1 request" in done.stderr and "t2i" not in done.stderr


def test_bad_arguments_are_refused_by_name(tmp_path):
    good = fake_checkout(tmp_path / "a", seconds=1.0, tokens_per_s=1.0)
    done = run_ab(tmp_path, good)
    assert done.returncode == 2 and "--before" in done.stderr and "not a checkout" in done.stderr
    done = run_ab(good, good, "--only", "chat 3 requests")
    assert done.returncode == 2 and "--only" in done.stderr and "chat 3 requests" in done.stderr


def test_a_failing_benchmark_reports_its_stderr(tmp_path):
    before = fake_checkout(tmp_path / "a", seconds=1.0, tokens_per_s=1.0)
    after = fake_checkout(tmp_path / "b", seconds=1.0, tokens_per_s=1.0)
    (after / "bench" / "t2i.py").write_text("raise SystemExit('CUDA is needed')\n")
    done = run_ab(before, after, "--only", "t2i 1024² 50 steps")
    assert done.returncode != 0 and "CUDA is needed" in done.stderr
