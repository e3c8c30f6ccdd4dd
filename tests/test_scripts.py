"""The benchmark scripts still run (smoke tests at toy sizes on CPU; their real runs are on GPUs)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def test_train_step_benchmark_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/bench_train_step.py"), "--preset", "tiny", "--device", "cpu",
         "--backends", "dense", "reference", "triton-fused", "--frames", "9", "--height", "64", "--width", "64", "--block-size", "16",
         "--steps", "1", "--warmup", "1", "--keep-attention", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("train_step_cpu_*_keep1.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["backend"], r["tokens"]) for r in rows] == [("dense", 48), ("reference", 48), ("triton-fused", 48)]
    assert all(r["step_s"] > 0 for r in rows)


def test_train_step_benchmark_with_sequence_parallelism(tmp_path):
    """The benchmark under torchrun: one clip's tokens split over 2 processes (gloo on CPU)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         str(REPO / "scripts/bench_train_step.py"), "--preset", "tiny", "--device", "cpu", "--backends", "dense",
         "--frames", "9", "--height", "64", "--width", "64", "--block-size", "16", "--steps", "1", "--warmup", "1",
         "--sequence-parallel", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("train_step_cpu_*_sp2.json")  # written once, by rank 0
    rows = json.loads(result.read_text())["rows"]
    assert [(r["backend"], r["tokens"], r["sequence_parallel"]) for r in rows] == [("dense", 48, 2)]
