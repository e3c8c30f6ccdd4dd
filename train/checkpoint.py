"""Resumable checkpoints: `{run_dir}/checkpoints/step_{N:06d}/`.

Each holds what accelerate's `save_state` writes (optimizer, RNG states, and the objects
registered with it: the LR scheduler and `TrainState`), the trainable (LoRA) parameters
(`trainable.safetensors` in fp32, written by the save hook below instead of the whole model; under
DeepSpeed its own checkpoint of the trainable weights and sharded optimizer), a diffusers-format
LoRA export, and `checkpoint.json`. A checkpoint is written under a temporary name and renamed
when complete, so a run killed mid-save never leaves one that `resume=latest` would pick.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from safetensors.torch import load_file, save_file

from radial_lora.models.lora import load_trainable_state_dict, trainable_state_dict
from radial_lora.train.config import ConfigError

TRAINABLE_FILE = "trainable.safetensors"
MARKER_FILE = "checkpoint.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """Counters a resumed run continues from (saved in every checkpoint)."""

    step: int = 0
    """Optimizer steps done."""
    batches_seen: int = 0
    """Micro-batches this rank has consumed: where the data order resumes."""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.batches_seen = state["step"], state["batches_seen"]


def install_hooks(accelerator) -> None:
    """Make `save_state`/`load_state` store only the trainable parameters of the model.

    accelerate would otherwise write the whole transformer (GBs of frozen weights) into every
    checkpoint; the frozen weights come from the pretrained model anyway.
    """

    def save_hook(models, weights, output_dir):
        # Under DeepSpeed accelerate hands no weights here: the engine saves its own checkpoint.
        if accelerator.is_main_process and weights:
            for model in models:
                state = {n: t.contiguous().cpu() for n, t in trainable_state_dict(model).items()}
                save_file(state, str(Path(output_dir, TRAINABLE_FILE)))
        weights.clear()  # accelerate saves nothing more for the models

    def load_hook(models, input_dir):
        if models:  # empty under DeepSpeed, whose engine loads its own checkpoint
            state = load_file(str(Path(input_dir, TRAINABLE_FILE)))
            while models:
                load_trainable_state_dict(models.pop(), state)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir, "checkpoints")
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start fresh.

    `latest` picks the newest complete checkpoint of this run (none: start fresh). A fresh start in
    a run directory that already holds checkpoints is refused rather than silently mixing runs.
    """
    existing = checkpoint_dirs(run_dir)
    if resume is None:
        if existing:
            raise ConfigError(
                f"{run_dir} already holds checkpoints (newest {existing[-1].name}): pass train.resume=latest "
                "to continue that run, or name=NEW for a new run"
            )
        return None
    if resume == "latest":
        return existing[-1] if existing else None
    path = Path(resume)
    if not Path(path, MARKER_FILE).exists():
        raise ConfigError(f"train.resume={resume} is not a checkpoint folder (no {MARKER_FILE})")
    return path


def save_checkpoint(accelerator, run_dir: Path, step: int, keep_last: int, export=None, **save_kwargs) -> Path:
    """Save a checkpoint for `step` atomically and delete all but the newest `keep_last` (0: keep all).

    `export(folder)`, if given, writes extra files (the LoRA export) into the checkpoint before it
    is renamed into place; every process calls it. `save_kwargs` go to accelerate's save_state.
    """
    final = Path(run_dir, "checkpoints", f"step_{step:06d}")
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), **save_kwargs)
    if export is not None:
        export(tmp)
    if accelerator.is_main_process:
        Path(tmp, MARKER_FILE).write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
