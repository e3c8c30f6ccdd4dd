"""Stopping cleanly when the cluster asks: SIGUSR1 (Slurm's warning before the time limit or a
preemption, `#SBATCH --signal=USR1@120`) and SIGTERM.

The handler only records the signal. The training loop asks `should_stop()` after every
optimizer step; every process takes part (the flag is max-reduced, since the signal may reach
processes at different moments), so they all stop after the same step, save a checkpoint and
exit together. Under scripts/slurm/train.sbatch, rank 0 then leaves a note in
RADIAL_LORA_PREEMPTED_FILE and the batch script requeues the job, which resumes from that
checkpoint (train.resume=latest): no step is lost or repeated.
"""

from __future__ import annotations

import os
import signal
import threading

import torch

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_FILE_ENV = "RADIAL_LORA_PREEMPTED_FILE"


class StopSignals:
    """Records SIGUSR1 / SIGTERM from the moment it is created (main thread only)."""

    def __init__(self):
        self.received: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def should_stop(self, accelerator) -> bool:
        """Whether any process got a stop signal (a collective: call it on every process)."""
        flag = torch.tensor([1 if self.received else 0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())


def note_preemption(step: int, why: str) -> None:
    """Tell the batch script (if it asked, through the environment) that the run stopped early."""
    path = os.environ.get(PREEMPTED_FILE_ENV)
    if path:
        with open(path, "w") as f:
            f.write(f"{why} at step {step}\n")
