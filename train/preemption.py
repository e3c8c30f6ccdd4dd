"""Stopping cleanly when asked: SIGINT (Ctrl-C), SIGTERM (Slurm's `scancel` and time limit,
systemd, Kubernetes) and SIGUSR1 (Slurm's warning before a time limit or preemption,
`#SBATCH --signal=USR1@120`).

The handler only records the signal. Every optimizer step sums the flag over the processes in
its one collective (train/loop.py, step_checks), since the signal may reach processes at
different moments, so they all stop after the same step, save a checkpoint and exit together
(`should_stop()` asks the same before the first step). Under scripts/slurm/train.sbatch, rank 0 then leaves a note in
RADIAL_LORA_PREEMPTED_FILE and the batch script requeues the job, which resumes from that
checkpoint (train.resume=auto): no step is lost or repeated. A second Ctrl-C aborts at once,
without saving.

The handlers are installed by the entry point before anything slow is imported, so a signal
during start-up is recorded too (the run then stops before its first step).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)
PREEMPTED_FILE_ENV = "RADIAL_LORA_PREEMPTED_FILE"


class StopSignals:
    """Records SIGINT / SIGUSR1 / SIGTERM from the moment it is created (main thread only)."""

    def __init__(self):
        self.received: str | None = None
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == "SIGINT":
            os.write(2, b"\nsecond Ctrl-C: aborting without saving\n")
            os._exit(130)
        if self.received is None:
            self.received = signal.Signals(signum).name
            if signum == signal.SIGINT and sys.stderr.isatty():
                os.write(2, b"\nCtrl-C: finishing this step and saving a checkpoint (Ctrl-C again aborts)\n")

    def should_stop(self, accelerator) -> bool:
        """Whether any process got a stop signal (a collective: call it on every process)."""
        import torch

        flag = torch.tensor([1 if self.received else 0], device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item())


@functools.cache
def stop_signals() -> StopSignals:
    """The process's one StopSignals, installed on first use (the entry point calls this first)."""
    return StopSignals()


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore the stop signals. Slurm, systemd and a terminal
    signal the whole process group; PyTorch's workers would die of SIGTERM (its worker handler
    re-raises it) and fail the next batch before the checkpoint. The training process alone
    decides when to stop; its workers end when it shuts the loader down or exits."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def note_preemption(step: int, why: str) -> None:
    """Tell the batch script (if it asked, through the environment) that the run stopped early."""
    path = os.environ.get(PREEMPTED_FILE_ENV)
    if path:
        with open(path, "w") as f:
            f.write(f"{why} at step {step}\n")
