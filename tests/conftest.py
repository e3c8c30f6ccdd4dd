"""Shared fixtures: the tiny model folder and the demo videos, built once per test session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Without a GPU, our Triton kernels run in Triton's CPU interpreter. It must be chosen before
# the kernels are defined (at import), hence here, before any test module imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def deterministic_restored():
    """For tests that turn on PyTorch's deterministic mode (as train.deterministic does): afterwards
    torch.use_deterministic_algorithms and CUBLAS_WORKSPACE_CONFIG are as they were before."""
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    yield
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    if cublas is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from radial_lora.models.tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan")


@pytest.fixture(scope="session")
def demo_videos_dir(tmp_path_factory) -> Path:
    from radial_lora.data.demo_videos import generate_demo_videos

    return generate_demo_videos(tmp_path_factory.mktemp("data") / "demo_videos")


# The demo data group's clip settings. Tests that train on the demo clips pass them as a user's
# folder (data.root=...), which selects the videos data group (Wan's 81 frames at 480p): these keep
# the clips' own small shape.
DEMO_DATA = ["data.frames=[33]", "data.sizes=[[64,64]]", "data.batch_size=2", "data.cache_dtype=float32"]


def run_train(
    cwd: Path, *overrides: str, env: dict | None = None, timeout: int = 600, module: str = "radial_lora.train"
) -> subprocess.CompletedProcess:
    """`python -m MODULE OVERRIDES` in `cwd`, the way a user runs it; returns the finished process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *overrides],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def train_cli(tmp_path, tiny_model_dir, demo_videos_dir):
    """Run the trainer on the session's tiny model and videos, in a fresh folder; fail loudly."""

    def run(*overrides: str, check: bool = True, env: dict | None = None, module: str = "radial_lora.train"):
        proc = run_train(
            tmp_path,
            f"model.path={tiny_model_dir}",
            f"data.root={demo_videos_dir}",
            *DEMO_DATA,
            "data.num_workers=1",
            *overrides,
            env=env,
            module=module,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"train exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    run.cwd = tmp_path
    return run
