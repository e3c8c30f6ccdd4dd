"""`python -m train [+experiment=NAME] [key=value ...]`: compose the config with Hydra and train.

With no experiment this runs the offline CPU demo (configs/train.yaml's defaults). The same entry
point is the console script `radial-lora-train` and `python -m radial_lora.train`.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

# Stop signals (Ctrl-C, SIGTERM, SIGUSR1) are recorded from here on, before anything slow is
# imported: one arriving during start-up ends the run cleanly at its first chance.
from radial_lora.train.preemption import stop_signals

stop_signals()

# Before anything touches CUDA: the allocator reads this once. Long clips in size buckets allocate
# blocks of changing sizes; without expandable segments the 14B's step at 4x on 2 H100s
# (scripts/bench_train_step.py) ran out of memory with 3.6 GB reserved but fragmented, and fit
# with them (docs/benchmarks/train_step.md). A user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from radial_lora.configs.schema import CONFIG_DIR, ConfigError, register_configs, typed_config, validate  # noqa: E402
from radial_lora.train.help import own_videos_overrides, print_help  # noqa: E402

register_configs()

# `kill -USR2 PID` prints every thread's stack to stderr and the run goes on: how to see where a
# stuck run waits (a collective one rank never joined, a compile, a data worker).
faulthandler.register(signal.SIGUSR2, all_threads=True)

# Errors that mean "the run was asked for something that cannot be": reported in one line, no
# traceback. Anything else is a bug and keeps its traceback.
# (The loop adds TrainingDiverged: a run that stopped on a non-finite loss, with nothing saved.)
USER_ERRORS = (ConfigError, FileNotFoundError, FileExistsError)
RANK0 = int(os.environ.get("RANK", "0")) == 0


def say(message: str) -> None:
    if RANK0:
        print(message, flush=True)


def resume_command(dict_cfg: DictConfig, stopped_by: str) -> str:
    """How to continue this run. Under scripts/slurm/train.sbatch (it sets the requeue-note
    variable) the job resumes by itself once requeued: the script requeues it after SIGUSR1; after
    SIGTERM (scancel, a time limit) Slurm has ended the script too, so the user requeues it."""
    job = os.environ.get("SLURM_JOB_ID")
    if job and os.environ.get("RADIAL_LORA_PREEMPTED_FILE"):
        if stopped_by == "SIGUSR1":
            return "the batch script requeues the job, which resumes from it (train.resume=auto)"
        return f"continue with: scontrol requeue {job} (the job resumes from it: train.resume=auto)"
    where = "" if dict_cfg.output_root == "outputs" else f" output_root={dict_cfg.output_root}"
    return f"continue with: python -m train name={dict_cfg.name}{where} train.resume=latest"


def close_progress_bars() -> None:
    """End the line of a progress bar an error interrupted, so the error is a line of its own
    (tqdm keeps every open bar in its class's `_instances`)."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def run(dict_cfg: DictConfig) -> None:
    """Resolve what to run (fresh, or the checkpoint's config plus the command line's changes),
    check it, keep a copy in the run folder, train, and say how it ended in the last line."""
    import logging
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    from radial_lora.train.checkpoint import CheckpointWriteError, checkpoint_step, resolve_resume, write_error
    from radial_lora.train.loop import TrainingDiverged, train
    from radial_lora.train.run_config import (
        CHOICES,
        RUN_CONFIG,
        group_choices,
        kernel_overrides,
        resume_config,
        resumed_choices,
        write_start,
    )

    log = logging.getLogger("radial_lora.run")
    overrides = list(HydraConfig.get().overrides.task)
    choices = group_choices(HydraConfig.get().runtime.choices)
    try:
        run_dir = Path(dict_cfg.output_root, dict_cfg.name).resolve()
        resume_from = resolve_resume(dict_cfg.train.resume, run_dir)
        effective, notes = dict_cfg, []
        if resume_from is None and dict_cfg.train.resume == "auto":
            notes.append(f"train.resume=auto: no checkpoint in {run_dir}, starting fresh")
        if resume_from is not None:
            # The checkpoint's own config (and group options), else the run's first one.
            saved_at = [d for d in (Path(resume_from), run_dir) if Path(d, RUN_CONFIG).is_file()]
            if saved_at:
                folder = saved_at[0]
                saved_choices = OmegaConf.load(folder / CHOICES) if (folder / CHOICES).is_file() else None
                effective, changes = resume_config(
                    OmegaConf.load(folder / RUN_CONFIG),
                    dict_cfg,
                    overrides,
                    checkpoint_step(resume_from),
                    saved_choices,
                )
                choices = resumed_choices(dict(saved_choices) if saved_choices else None, choices, overrides)
                notes.append(
                    f"resume: the run's config from {folder / RUN_CONFIG}"
                    + "".join(f"\n  changed on the command line: {c}" for c in changes)
                )
            else:
                notes.append(
                    f"resume: {resume_from} keeps no config (an older checkpoint): running the config as "
                    "composed from the command line"
                )
        effective, overridden = kernel_overrides(effective)
        notes.extend(overridden)
        cfg = typed_config(effective)
        validate(cfg)
        resolved = OmegaConf.to_container(effective, resolve=True, enum_to_str=True)
        if RANK0:
            try:
                write_start(run_dir, effective, overrides, choices, fresh=resume_from is None)
            except OSError as err:  # a full disk, a folder made read-only since the run began
                raise write_error("the run's config", err, run_dir) from None
        result = train(cfg, resolved, resume_from=resume_from, notes=notes, choices=choices)
    except (*USER_ERRORS, TrainingDiverged, CheckpointWriteError) as err:
        log.error("error: %s", err)
        close_progress_bars()
        sys.exit(f"error: {err}")
    if result.stopped_by is not None:
        from radial_lora.train.checkpoint import checkpoint_dirs

        if checkpoint_dirs(run_dir):
            where = f"checkpoint {result.checkpoint}" if result.checkpoint else "no new checkpoint"
            then = resume_command(dict_cfg, result.stopped_by)
        else:
            where, then = "nothing saved", "start it again with the same command"
        message = f"Interrupted by {result.stopped_by} at step {result.step} of {result.steps} ({where}); {then}"
        log.info(message)
        say(message)
        if result.stopped_by == "SIGINT":
            sys.exit(130)  # the shell's convention for Ctrl-C, so `train && next` does not go on
        return
    what = "Model" if cfg.train.mode.value == "full" else "LoRA"
    log.info("%s exported to %s", what, result.lora_file)
    say(f"{what} exported to {result.lora_file}")


def main() -> None:
    """The console entry point: our --help, the own-videos rule, then Hydra."""
    if any(a in ("--help", "-h") for a in sys.argv[1:]):
        print_help()
        return
    args, note = own_videos_overrides(sys.argv[1:])
    if note:
        say(note)
    sys.argv = [sys.argv[0], *args]
    run()


if __name__ == "__main__":
    main()
