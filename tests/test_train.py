"""The trainer end to end, through its command line: the demo, resume, W&B, checkpoints."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_train
from safetensors.torch import load_file
from wandb_log import config as wandb_config
from wandb_log import history as wandb_history

pytestmark = pytest.mark.slow
FAST = ["data.frames=[9]", "data.sizes=[[32,32]]", "data.batch_size=2"]
METRICS = {"loss", "lr", "grad_norm", "step_time_s", "samples_per_s", "peak_memory_gb"}


def exported_path(stdout: str) -> Path:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("LoRA exported to "), last
    return Path(last.removeprefix("LoRA exported to "))


def test_readme_demo_command_runs_end_to_end(tmp_path):
    """`python -m train` with nothing prepared: generates data, builds the model, trains, exports."""
    from diffusers import WanPipeline

    proc = run_train(tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lora = exported_path(proc.stdout)
    assert "self-attention: 1 layers dense, 1 layers radial on reference" in proc.stdout
    assert lora.is_absolute() and lora == tmp_path / "outputs/tiny/lora/pytorch_lora_weights.safetensors"
    assert len(list((tmp_path / ".cache/demo_videos").glob("*.mp4"))) == 24

    run_dir = tmp_path / "outputs/tiny"
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_000100", "step_000150"]  # every 50 steps, the last 2 kept
    for c in ckpts:
        assert (run_dir / "checkpoints" / c / "pytorch_lora_weights.safetensors").exists()

    # W&B offline: the resolved config once, then the metrics of every step.
    (wandb_file,) = glob.glob(str(run_dir / "wandb/offline-run-*/run-*.wandb"))
    first, *rows = wandb_history(wandb_file)
    assert first["_step"] == 0 and first["data/clips"] == 22  # 24 videos, 2 held out (data.val_clips)
    assert len(rows) == 150 and METRICS <= rows[-1].keys()
    assert [r["_step"] for r in rows] == list(range(1, 151))
    losses = [r["loss"] for r in rows]
    assert sum(losses[-20:]) / 20 < 0.9 * sum(losses[:20]) / 20  # it learns something
    logged = wandb_config(wandb_file)
    assert logged["lora"]["rank"] == 16 and logged["model"]["id"] == "tiny-wan"

    # Validation every 50 steps: the held-out loss per length, and two sample videos (the held-out
    # clips' captions) as mp4s in the run folder and as W&B videos.
    import decord

    validated = [r for r in rows if "val/loss_33f" in r]
    assert [r["_step"] for r in validated] == [50, 100, 150]
    assert validated[-1]["val/loss_33f"] < validated[0]["val/loss_33f"]  # the held-out loss falls
    for r in validated:
        for i in range(2):
            mp4 = run_dir / f"samples/step_{r['_step']:06d}/sample_{i}.mp4"
            reader = decord.VideoReader(str(mp4))
            assert len(reader) == 33 and reader[0].shape == (64, 64, 3)
            assert r[f"samples/{i}/_type"] == "video-file" and r[f"samples/{i}/caption"].startswith("a ")
            assert Path(wandb_file).parent.joinpath("files", r[f"samples/{i}/path"]).stat().st_size > 1000

    pipe = WanPipeline.from_pretrained(tmp_path / ".cache/models/tiny-wan")
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())


def test_resume_continues_exactly(train_cli):
    """2N steps straight == N steps, stop, resume, N steps: same LoRA weights and step count."""
    common = [
        *FAST,
        "train.steps=6",
        "train.checkpoint_every=3",
        "trainer.gradient_accumulation_steps=2",
        "optim.scheduler=cosine",
        "optim.warmup_steps=2",
        "logger.mode=disabled",
    ]
    train_cli(*common, "name=straight")
    first = train_cli(*common, "name=split", "train.stop_after_step=3")
    assert "step_000003" in [p.name for p in (train_cli.cwd / "outputs/split/checkpoints").iterdir()]
    second = train_cli(*common, "name=split", "train.resume=latest")
    assert "Resumed from" in second.stdout + second.stderr and "at step 3" in second.stdout + second.stderr

    def final(name):
        ckpt = train_cli.cwd / f"outputs/{name}/checkpoints/step_000006"
        state = json.loads((ckpt / "train_state.json").read_text())["train_state"]
        return load_file(ckpt / "trainable.safetensors"), state

    (straight, s_state), (split, p_state) = final("straight"), final("split")
    assert s_state == p_state == {"step": 6, "batches_seen": 12}
    assert straight.keys() == split.keys()
    for k in straight:
        assert torch.equal(straight[k], split[k]), k
    assert exported_path(first.stdout).exists()


def test_fresh_start_over_existing_checkpoints_is_refused(train_cli):
    train_cli(*FAST, "train.steps=1", "logger.mode=disabled")
    proc = train_cli(*FAST, "train.steps=1", "logger.mode=disabled", check=False)
    assert proc.returncode != 0 and "train.resume=latest" in proc.stderr and "Traceback" not in proc.stderr


def test_wandb_mode_from_environment_wins(train_cli):
    train_cli(*FAST, "train.steps=2", "logger.mode=offline", env={"WANDB_MODE": "disabled"})
    assert not (train_cli.cwd / "outputs/tiny/wandb").exists()


def test_a_diverging_run_stops_before_saving(train_cli):
    """A learning rate that blows the LoRA up: the first non-finite step stops every process with a
    one-line error, before anything is saved, so the checkpoints from before it survive."""
    proc = train_cli(
        *FAST,
        "train.steps=6",
        "train.checkpoint_every=1",
        "train.keep_last=1",
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "logger.mode=disabled",
        "name=nan",
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    step = int(line.split("non-finite loss or gradient at step ")[1].split()[0])
    ckpts = sorted(p.name for p in (train_cli.cwd / "outputs/nan/checkpoints").iterdir())
    assert step >= 2 and ckpts == [f"step_{step - 1:06d}"] and f"Newest checkpoint: {ckpts[0]}" in line
    assert not (train_cli.cwd / "outputs/nan/lora").exists()  # no export of the broken weights


def test_sigusr2_prints_every_threads_stack_and_the_run_goes_on():
    """How a user sees where a stuck run waits: `kill -USR2 PID` (USR1 stops it cleanly)."""
    import subprocess
    import sys

    from conftest import REPO

    code = "import os, signal, radial_lora.train.__main__; os.kill(os.getpid(), signal.SIGUSR2); print('still running')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "still running" in proc.stdout, proc.stderr[-2000:]
    assert "Current thread" in proc.stderr and 'File "<string>", line 1' in proc.stderr


def test_train_deterministic_turns_on_pytorch_deterministic_mode(monkeypatch, deterministic_restored):
    """train.deterministic=true: the seed, PyTorch's deterministic algorithms (warn-only, so an op
    without a deterministic version cannot stop a run) and cuBLAS's workspace setting. (What the
    attention op then runs on Hopper: tests/test_gluon_kernels.py.)"""
    from radial_lora.configs.schema import TrainConfig
    from radial_lora.train.loop import seed_everything

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(TrainConfig(seed=3))
    assert torch.initial_seed() == 3 and not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    seed_everything(TrainConfig(seed=4, deterministic=True))
    assert torch.initial_seed() == 4 and torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
