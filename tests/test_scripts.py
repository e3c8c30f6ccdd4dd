"""The scripts run: the benchmarks (smoke tests at toy sizes on CPU; their real runs are on GPUs)
and video generation with a trained LoRA."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO


def test_train_step_benchmark_runs(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/bench_train_step.py"),
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--backends",
            "dense",
            "reference",
            "triton",
            "--frames",
            "9",
            "--height",
            "64",
            "--width",
            "64",
            "--block-size",
            "16",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--keep-attention",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("train_step_cpu_*_keep1.json")
    rows = json.loads(result.read_text())["rows"]
    assert [(r["backend"], r["tokens"]) for r in rows] == [("dense", 48), ("reference", 48), ("triton", 48)]
    assert all(r["step_s"] > 0 for r in rows)
    # The record is named by what it measured, and plots as the benchmark page shows it.
    assert result.name.startswith("train_step_cpu_") and result.name.endswith(
        "_tiny_9f_dense-reference-triton_eager_keep1.json"
    )
    png = tmp_path / "step.png"
    plot = [sys.executable, str(REPO / "scripts/plot_train_step.py"), str(result), "--out", str(png)]
    subprocess.run(plot, check=True, capture_output=True, timeout=120)
    assert png.stat().st_size > 10_000


def test_train_step_benchmark_with_sequence_parallelism(tmp_path):
    """The benchmark under torchrun: one clip's tokens split over 2 processes (gloo on CPU)."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(REPO / "scripts/bench_train_step.py"),
            "--preset",
            "tiny",
            "--device",
            "cpu",
            "--backends",
            "dense",
            "--frames",
            "9",
            "--height",
            "64",
            "--width",
            "64",
            "--block-size",
            "16",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--sequence-parallel",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result,) = tmp_path.glob("train_step_cpu_*_sp2.json")  # written once, by rank 0
    rows = json.loads(result.read_text())["rows"]
    assert [(r["backend"], r["tokens"], r["sequence_parallel"]) for r in rows] == [("dense", 48, 2)]


def test_generate_with_a_trained_lora(train_cli):
    """Train a few steps, then `python -m scripts.generate --run ...`: the run's model, attention and
    LoRA make an mp4 that decodes to the asked frames at the size the run's clips were trained at
    (the square clips took the square bucket, not the first one); the LoRA changes the video."""
    import decord

    train_cli(
        "data.frames=[9]",
        "data.sizes=[[48,32],[32,32]]",
        "data.batch_size=2",
        "train.steps=3",
        "train.checkpoint_every=0",
        "logger.mode=disabled",
        "optim.lr=1e-2",
        "name=g",
        # the run's own sample at its last step: the same prompt, seed and settings as below
        "validation.every=3",
        "validation.prompts=[a red square]",
        "validation.frames=13",
        "validation.size=[32,32]",
        "validation.steps=3",
    )
    videos = {}
    for name, extra in (("lora", []), ("base", ["--no-lora"])):
        out = train_cli.cwd / f"{name}.mp4"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "radial_lora.scripts.generate",
                "--run",
                "outputs/g",
                "--prompt",
                "a red square",
                "--frames",
                "13",
                "--steps",
                "3",
                "--device",
                "cpu",
                "--out",
                str(out),
                *extra,
            ],
            cwd=train_cli.cwd,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"video written to {out}" in proc.stdout
        assert ("LoRA: outputs/g/lora/pytorch_lora_weights.safetensors" in proc.stdout) == (name == "lora")
        assert "layers radial on reference" in proc.stdout  # the run's attention, not diffusers' default
        assert "size: 32x32 (the size of 24 of the run's clips), 13 frames" in proc.stdout
        reader = decord.VideoReader(str(out))
        videos[name] = reader.get_batch(list(range(len(reader)))).asnumpy()
        assert videos[name].shape == (13, 32, 32, 3)
    assert np.abs(videos["lora"].astype(int) - videos["base"].astype(int)).mean() > 0.5
    # The sample the run rendered while training comes from the same generation code: the same
    # video (the exported file's B carries alpha/r, hence not bit-equal: within a level or two).
    reader = decord.VideoReader(str(train_cli.cwd / "outputs/g/samples/step_000003/sample_0.mp4"))
    sample = reader.get_batch(list(range(len(reader)))).asnumpy()
    assert sample.shape == videos["lora"].shape
    assert np.abs(sample.astype(int) - videos["lora"].astype(int)).max() <= 2


def test_kernel_sass_report_shows_tma_loads_on_hopper():
    """scripts/lab/kernel_sass.py compiles the real forward kernels for sm_90 without a GPU: pointer loads
    become cp.async (LDGSTS), the TMA path real tensor-memory-accelerator loads; the Gluon forward
    and backward kernels compile with the installed Triton (the CPU machine's is newer than the GPU image's)
    into warp-specialized partitions that hand registers over (USETMAXREG), without spills (the
    fused backward aside), the forward and dQ with their pipelined waits."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    command = [
        sys.executable,
        str(REPO / "scripts/lab/kernel_sass.py"),
        "--kernel",
        "fwd",
        "gluon",
        "gluon_dkdv",
        "gluon_dq",
        "gluon_fused",
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| kernel"))
    names = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("fwd", "gluon", "gluon_dkdv", "gluon_dq", "gluon_fused"):
            rows[cells[0], cells[2]] = dict(zip(names, cells))
    pointer, tma, gluon = rows["fwd", "pointer"], rows["fwd", "TMA"], rows["gluon", "TMA"]
    assert int(pointer["LDGSTS"]) > 0 and int(pointer["UTMALDG"]) == 0
    assert int(tma["UTMALDG"]) > 0 and int(tma["HGMMA"]) == int(pointer["HGMMA"]) > 0
    assert int(gluon["USETMAXREG"]) > 0 and int(tma["USETMAXREG"]) == 0
    for row in (gluon, rows["gluon_dkdv", "TMA"], rows["gluon_dq", "TMA"]):
        assert int(row["USETMAXREG"]) > 0 and int(row["UTMALDG"]) > 0 and int(row["HGMMA"]) > 0
        assert int(row["spill STL/LDL"]) == 0
    # The forward and dQ kernels are pipelined: the wait for tile t's scores leaves tile t-1's last
    # product running (a wait for "at most one outstanding"; the unpipelined loops had none).
    assert int(gluon["DEPBAR.LE 1"]) > 0 and int(rows["gluon_dq", "TMA"]["DEPBAR.LE 1"]) > 0
    # The fused backward: dK/dV's 4 products and dQ's, with dQ added through TMA reduce-adds. (It
    # spills with every Triton so far: 12 instructions with 3.6, more with newer ones.)
    fused, dkdv = rows["gluon_fused", "TMA"], rows["gluon_dkdv", "TMA"]
    assert int(fused["UTMAREDG"]) > 0 and int(dkdv["UTMAREDG"]) == 0 and int(fused["HGMMA"]) > int(dkdv["HGMMA"])


@pytest.mark.gpu
def test_tile_sweep_times_every_candidate(tmp_path):
    """scripts/lab/tune_attention.py at a small shape: a row per dQ tile and load mode, all timed."""
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts/lab/tune_attention.py"),
            "--frames",
            "5",
            "--tokens-per-frame",
            "512",
            "--heads",
            "2",
            "--kernels",
            "dq",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from radial_lora.scripts.lab.tune_attention import CANDIDATES

    (record,) = tmp_path.glob("attention_tuning_*.json")
    rows = json.loads(record.read_text())["rows"]
    assert len(rows) == 2 * len(CANDIDATES["dq"])
    assert all(r["ms"] > 0 and not r["error"] for r in rows), [r for r in rows if r["error"]]


def test_launch_order_model_favours_heavy_first():
    """scripts/lab/launch_order_model.py: list scheduling of the wan_4x shape's programs on 132 SMs
    finishes sooner in compact_mask's heavy-first order than in block order, and never before the
    ideal (total work / SMs)."""
    from radial_lora.kernels.compact_mask import compact_mask
    from radial_lora.kernels.radial_mask import radial_block_mask
    from radial_lora.scripts.lab.launch_order_model import makespan

    _, _, _, q_count, _, q_order = compact_mask(radial_block_mask(81, 1560, decay=1.0))
    cost = [float(c) + 2 for c in q_count.tolist()]
    block_order = cost * 12
    heavy_first = [cost[i] for i in q_order.tolist()] * 12
    ideal = sum(cost) * 12 / 132
    assert ideal <= makespan(heavy_first, 132) < makespan(block_order, 132)
    assert makespan([1.0] * 4, 2) == 2.0 and makespan([3.0, 1.0, 1.0, 1.0], 2) == 3.0
