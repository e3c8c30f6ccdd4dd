"""Several processes on CPU (gloo): DDP and DeepSpeed ZeRO through accelerate, both launchers."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from radial_lora.configs.schema import Config, DataConfig, OptimConfig, Precision, Strategy, TrainerConfig
from radial_lora.train.distributed import deepspeed_config

pytestmark = pytest.mark.slow
COMMON = [
    "data.frames=[17]",
    "data.sizes=[[32,32]]",
    "train.steps=4",
    "train.checkpoint_every=2",
    "trainer.mixed_precision=no",
    "optim.warmup_steps=1",
]


def test_deepspeed_config_has_explicit_batch_sizes():
    cfg = Config(
        data=DataConfig(batch_size=2),
        optim=OptimConfig(max_grad_norm=0.5),
        trainer=TrainerConfig(
            strategy=Strategy.zero3, mixed_precision=Precision.bf16, gradient_accumulation_steps=4, offload_params=True
        ),
    )
    ds = deepspeed_config(cfg, processes=16)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (
        2,
        4,
        128,
    )
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert "'auto'" not in str(ds)  # no value left for accelerate to guess


def launch(launcher: list[str], cwd, *overrides, model_dir, videos_dir, env=None):
    full_env = {**os.environ, "WANDB_MODE": "offline", **(env or {})}
    proc = subprocess.run(
        [
            *launcher,
            "-m",
            "radial_lora.train",
            f"model.path={model_dir}",
            f"data.root={videos_dir}",
            "data.num_workers=1",
            *COMMON,
            *overrides,
        ],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def lora(cwd, name):
    return load_file(cwd / "outputs" / name / "lora" / "pytorch_lora_weights.safetensors")


def assert_same_lora(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_model_dir, demo_videos_dir):
    """The reference: one process, batch 2 (the global batch of the 2-process runs below)."""
    cwd = tmp_path_factory.mktemp("single")
    launch(
        [sys.executable], cwd, "name=single", "data.batch_size=2", model_dir=tiny_model_dir, videos_dir=demo_videos_dir
    )
    return lora(cwd, "single")


def test_zero2_over_two_processes_matches_one_process(single_run, tmp_path, tiny_model_dir, demo_videos_dir):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = launch(
        torchrun,
        tmp_path,
        "name=z2",
        "trainer=zero2",
        "trainer.mixed_precision=no",
        "data.batch_size=1",
        model_dir=tiny_model_dir,
        videos_dir=demo_videos_dir,
    )
    assert_same_lora(lora(tmp_path, "z2"), single_run)
    # One run directory, written by rank 0 only: one export line, one W&B run, a DeepSpeed checkpoint.
    assert proc.stdout.count("LoRA exported to") == 1
    assert len(glob.glob(str(tmp_path / "outputs/z2/wandb/offline-run-*"))) == 1
    assert (tmp_path / "outputs/z2/checkpoints/step_000004/pytorch_model").is_dir()
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["z2"]


def test_zero3_resumes_and_gathers_the_lora(single_run, tmp_path, tiny_model_dir, demo_videos_dir):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    args = ("name=z3", "trainer=zero3", "trainer.mixed_precision=no", "data.batch_size=1")
    launch(torchrun, tmp_path, *args, "train.stop_after_step=2", model_dir=tiny_model_dir, videos_dir=demo_videos_dir)
    proc = launch(
        torchrun, tmp_path, *args, "train.resume=latest", model_dir=tiny_model_dir, videos_dir=demo_videos_dir
    )
    assert "Resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert_same_lora(lora(tmp_path, "z3"), single_run)


def test_accelerate_launch_ddp_matches_one_process(single_run, tmp_path, tiny_model_dir, demo_videos_dir):
    accelerate = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    launch(
        accelerate,
        tmp_path,
        "name=ddp",
        "trainer=ddp",
        "trainer.mixed_precision=no",
        "data.batch_size=1",
        model_dir=tiny_model_dir,
        videos_dir=demo_videos_dir,
    )
    assert_same_lora(lora(tmp_path, "ddp"), single_run)


@pytest.fixture(scope="module")
def one_process_48(tmp_path_factory, tiny_model_dir, demo_videos_dir):
    """The reference for sequence parallelism: one process, batch 1, 48x48 clips, checkpointing."""
    cwd = tmp_path_factory.mktemp("one48")
    launch([sys.executable], cwd, "name=one", *SP_ARGS, model_dir=tiny_model_dir, videos_dir=demo_videos_dir)
    return lora(cwd, "one")


SP_ARGS = ("data.sizes=[[48,48]]", "data.batch_size=1", "model.gradient_checkpointing=true")


@pytest.mark.parametrize(
    "strategy",
    [
        ("trainer=zero3",),
        ("trainer=ddp", "model.compile_blocks=true", "model.compile_backend=aot_eager"),
        ("trainer=zero3", "model.compile_blocks=true", "model.compile_backend=aot_eager"),  # as wan14b_4x runs
    ],
    ids=["zero3", "ddp-compiled", "zero3-compiled"],
)
def test_sequence_parallel_matches_one_process(one_process_48, tmp_path, tiny_model_dir, demo_videos_dir, strategy):
    """trainer.sequence_parallel=2: both processes share each clip, its tokens split between them
    (all-to-all around attention), with gradient checkpointing, under ZeRO-3 or DDP, eager or with
    compiled blocks. 48x48 clips give 45 tokens, so the split pads one; the LoRA equals one process's."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = launch(
        torchrun,
        tmp_path,
        "name=sp",
        *strategy,
        "trainer.mixed_precision=no",
        "trainer.sequence_parallel=2",
        *SP_ARGS,
        model_dir=tiny_model_dir,
        videos_dir=demo_videos_dir,
    )
    assert "tokens of each clip split over 2 processes, 1 clips per step" in proc.stdout
    assert_same_lora(lora(tmp_path, "sp"), one_process_48)


def test_sequence_parallel_must_divide_the_heads(tmp_path, tiny_model_dir, demo_videos_dir):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    full_env = {**os.environ, "WANDB_MODE": "disabled"}
    proc = subprocess.run(
        [
            *torchrun,
            "-m",
            "radial_lora.train",
            f"model.path={tiny_model_dir}",
            f"data.root={demo_videos_dir}",
            *COMMON,
            "trainer=ddp",
            "trainer.sequence_parallel=3",
        ],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0
    assert "error: trainer.sequence_parallel=3 must divide the number of processes (2)" in proc.stderr
