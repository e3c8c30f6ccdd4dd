"""Experiment tracking (W&B through accelerate's tracker) and the measurements it logs."""

from __future__ import annotations

import os
import resource
import uuid
from pathlib import Path

import torch

from radial_lora.configs.schema import LoggerConfig


def wandb_mode(cfg: LoggerConfig) -> str:
    """offline | online | disabled: WANDB_MODE from the environment if set, else `logger.mode`."""
    mode = os.environ.get("WANDB_MODE") or cfg.mode.value
    if mode == "dryrun":  # wandb's old name for offline
        mode = "offline"
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"WANDB_MODE={mode!r}: expected offline, online or disabled")
    return mode


def start_tracking(accelerator, cfg: LoggerConfig, name: str, run_dir: Path, config: dict) -> str:
    """Start the W&B run (main process) with the resolved config; returns the mode used.

    The W&B run id is kept in the run directory, so a resumed run logs into the same W&B run.
    """
    mode = wandb_mode(cfg)
    if mode == "disabled" or not accelerator.is_main_process:
        return mode
    id_file = Path(run_dir, "wandb_run_id")
    if not id_file.exists():
        id_file.write_text(uuid.uuid4().hex[:12])
    accelerator.init_trackers(
        cfg.project,
        config=config,
        init_kwargs={
            "wandb": {
                "mode": mode,
                "dir": str(run_dir),
                "name": name,
                "entity": cfg.entity,
                "id": id_file.read_text().strip(),
                "resume": "allow",
            }
        },
    )
    return mode


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory so far: allocated on the GPU, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
