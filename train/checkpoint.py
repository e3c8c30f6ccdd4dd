"""Resumable checkpoints: `{run_dir}/checkpoints/step_{N:06d}/`.

Each holds what accelerate's `save_state` writes (optimizer and RNG states, which it loads back
with `torch.load(weights_only=True)`: tensors and plain data only), the trainable (LoRA) parameters
(`trainable.safetensors` in fp32, written by the save hook below instead of the whole model; under
DeepSpeed its own checkpoint of the trainable weights and sharded optimizer), `train_state.json`
(the step counters and the LR scheduler's state, as JSON), the run's `config.yaml` and
`choices.yaml`, a diffusers-format LoRA export, and `checkpoint.json`.

Nothing in a checkpoint is unpickled with code execution: accelerate loads objects registered with
`register_for_checkpointing` with `weights_only=False`, so none are registered; a file that holds
more than tensors and plain data is refused, in one line. A checkpoint is written under a temporary
name and renamed when complete, so a run killed mid-save never leaves one that `resume=latest`
would pick.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import re
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from radial_lora.configs.schema import ConfigError
from radial_lora.models.lora import load_trainable_state_dict, trainable_state_dict
from radial_lora.train.run_config import CHOICES, RUN_CONFIG

TRAINABLE_FILE = "trainable.safetensors"
MARKER_FILE = "checkpoint.json"
TRAIN_STATE_FILE = "train_state.json"
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


def load_checkpoint(accelerator, checkpoint: Path, **load_kwargs) -> dict:
    """Load a checkpoint's optimizer, RNG and LoRA state into the run; returns its train state
    ({"train_state": ..., "lr_scheduler": ...}). Raises ConfigError for a file that would need code
    to be run to load it."""
    import tempfile

    import torch

    checkpoint = Path(checkpoint)
    pickled = sorted(checkpoint.glob("custom_checkpoint_*.pkl"))
    try:
        check_plain_data(checkpoint, skip=pickled)
        if not pickled:
            accelerator.load_state(str(checkpoint), **load_kwargs)
        else:
            # accelerate would unpickle these with weights_only=False (or refuse the folder, with
            # nothing registered): it reads a view of the checkpoint without them instead.
            with tempfile.TemporaryDirectory(prefix="checkpoint-view.") as view:
                for entry in checkpoint.iterdir():
                    if entry not in pickled:
                        os.symlink(entry.resolve(), Path(view, entry.name))
                accelerator.load_state(view, **load_kwargs)
        path = Path(checkpoint, TRAIN_STATE_FILE)
        if path.is_file():
            return json.loads(path.read_text())
        # Written by versions that let accelerate pickle these two: plain dicts, which a
        # weights_only load reads without running anything.
        scheduler, state = (
            torch.load(Path(checkpoint, f"custom_checkpoint_{i}.pkl"), weights_only=True) for i in (0, 1)
        )
        return {"train_state": state, "lr_scheduler": scheduler}
    except pickle.UnpicklingError as err:
        why = str(err).strip().splitlines()[-1][:200]
        raise ConfigError(
            f"{checkpoint}: refused to load a file that holds more than tensors and plain data "
            f"(loading it could run code): {why}"
        ) from None


PICKLE_SUFFIXES = (".pkl", ".bin", ".pt", ".pth")
# Python objects a checkpoint's pickles may name beyond tensors and containers: numpy arrays in
# accelerate's RNG state (its own TORCH_SAFE_GLOBALS) and plain DeepSpeed data classes in ZeRO-2/3
# optimizer states. Constructing these runs no code of the file's choosing. A checkpoint naming
# anything else is refused with the name, to be added here once checked.
EXTRA_SAFE_GLOBALS = {
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "numpy.core.multiarray._reconstruct",  # numpy < 2's name of the same function
}


def check_plain_data(checkpoint: Path, skip=()) -> None:
    """Read the globals every pickle-format file of a checkpoint would import, without unpickling it
    (torch.serialization.get_unsafe_globals_in_checkpoint), and raise pickle.UnpicklingError for one
    that names anything beyond what PyTorch's weights_only loader allows and EXTRA_SAFE_GLOBALS.
    This runs before any loader: accelerate's, which would skip a bad RNG file with a log line, and
    DeepSpeed's, which unpickles its ZeRO files with weights_only=False."""
    import torch
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    allowed = EXTRA_SAFE_GLOBALS | {f"{g.__module__}.{g.__qualname__}" for g in TORCH_SAFE_GLOBALS}
    for path in sorted(Path(checkpoint).rglob("*")):
        if path.suffix in PICKLE_SUFFIXES and path.is_file() and path not in skip:
            try:
                named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
            except Exception as err:  # not a torch.save file at all
                raise pickle.UnpicklingError(f"{path.name}: unreadable ({type(err).__name__})") from None
            if named - allowed:
                raise pickle.UnpicklingError(f"{path.name} names {sorted(named - allowed)[0]}")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir, "checkpoints")
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to resume from, or None to start fresh.

    `latest` picks the newest complete checkpoint of this run and refuses when there is none;
    `auto` (what scripts/slurm/train.sbatch passes) picks it too, or starts fresh when there is none.
    A fresh start in a run directory that already holds checkpoints is refused rather than silently
    mixing runs.
    """
    existing = checkpoint_dirs(run_dir)
    if resume is None:
        if existing:
            raise ConfigError(
                f"{run_dir} already holds checkpoints (newest {existing[-1].name}): pass train.resume=latest "
                "to continue that run, or name=NEW for a new run"
            )
        return None
    if resume in ("latest", "auto"):
        if not existing and resume == "latest":
            raise ConfigError(
                f"train.resume=latest: {run_dir} holds no checkpoint to resume. Leave train.resume out to start "
                "this run fresh (or train.resume=auto: resume if there is one, else start fresh)"
            )
        return existing[-1] if existing else None
    path = Path(resume)
    if not Path(path, MARKER_FILE).exists():
        raise ConfigError(f"train.resume={resume} is not a checkpoint folder (no {MARKER_FILE})")
    return path


def checkpoint_step(checkpoint: Path) -> int:
    """The optimizer step a complete checkpoint was saved at."""
    return int(json.loads(Path(checkpoint, MARKER_FILE).read_text())["step"])


def check_same_base_model(checkpoint: Path, fingerprint: str | None, model_source: str) -> None:
    """Refuse to resume onto other base weights than the checkpoint was trained on (its LoRA and
    optimizer state mean nothing there). Checkpoints without a fingerprint pass."""
    saved = json.loads(Path(checkpoint, MARKER_FILE).read_text()).get("model_fingerprint")
    if saved is not None and fingerprint is not None and saved != fingerprint:
        raise ConfigError(
            f"{model_source}: the base model's weights differ from those {checkpoint.name} was trained "
            f"on (fingerprint {fingerprint}, checkpoint {saved}); resume on the same weights, or start "
            "a new run (name=NEW)"
        )


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    keep_last: int,
    train_state: dict,
    export=None,
    config: dict | None = None,
    choices: dict | None = None,
    model_fingerprint: str | None = None,
    **save_kwargs,
) -> Path:
    """Save a checkpoint for `step` atomically and delete all but the newest `keep_last` (0: keep all).

    `export(folder)`, if given, writes extra files (the LoRA export) into the checkpoint before it
    is renamed into place; every process calls it. `train_state` (counters and the LR scheduler's
    state, JSON-able) goes into train_state.json. `config` (the run's resolved config) and
    `choices` (its config group options) are saved beside the state as `config.yaml` and
    `choices.yaml`: a resumed run continues from them (train/run_config.py).
    `save_kwargs` go to accelerate's save_state.
    """
    final = Path(run_dir, "checkpoints", f"step_{step:06d}")
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    error: OSError | None = None
    try:  # a full disk or a permission error: every process learns of it below, none waits forever
        accelerator.save_state(str(tmp), **save_kwargs)
        if export is not None:
            export(tmp)
        if accelerator.is_main_process:
            if config is not None:
                OmegaConf.save(OmegaConf.create(config), Path(tmp, RUN_CONFIG))
            if choices is not None:
                OmegaConf.save(OmegaConf.create(choices), Path(tmp, CHOICES))
            Path(tmp, TRAIN_STATE_FILE).write_text(json.dumps(train_state, indent=1))
            Path(tmp, MARKER_FILE).write_text(json.dumps({"step": step, "model_fingerprint": model_fingerprint}))
            _fsync_tree(tmp)  # on disk before the name says it is complete (a power cut, a node loss)
    except (OSError, SafetensorError) as err:
        error = io_error(err)
    except RuntimeError as err:  # torch.save's zip writer reports a full disk as a position mismatch
        if "unexpected pos" not in str(err) and shutil.disk_usage(tmp.parent).free > 2**20:
            raise
        error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))
    raise_if_any_failed(accelerator, error, f"checkpoint {final.name}", run_dir, tmp)
    if accelerator.is_main_process:
        try:
            if final.exists():  # the same step saved again (a stop signal at a checkpoint step)
                _delete(final)
            tmp.rename(final)
            _fsync_dir(final.parent)
        except OSError as err:
            error = err
    raise_if_any_failed(accelerator, error, f"checkpoint {final.name}", run_dir, tmp)  # a failed rename
    if accelerator.is_main_process:
        try:
            for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
                _delete(old)
            for leftover in final.parent.glob(f"*{_DELETING}"):  # from a run killed mid-rotation
                shutil.rmtree(leftover)
        except OSError as err:  # the new checkpoint is complete: training goes on, the user is told
            message = (
                f"warning: could not delete an old checkpoint: {err.strerror or err} ({err.filename}); "
                f"{final.name} is complete, training goes on"
            )
            print(message, file=sys.stderr, flush=True)
            logging.getLogger("radial_lora.run").warning(message)  # train.log
    accelerator.wait_for_everyone()
    return final


_SAFETENSORS_IO = re.compile(r'I/O error: (.*?) \(os error (\d+)\)(?: at path "(.*)")?')


def io_error(err: Exception) -> OSError:
    """The OSError behind a failed write: `err` itself, or the one safetensors reports only as text
    (`I/O error: No space left on device (os error 28) at path "..."`); re-raises anything else."""
    if isinstance(err, OSError):
        return err
    if found := _SAFETENSORS_IO.search(str(err)):
        return OSError(int(found.group(2)), found.group(1), found.group(3))
    raise err


class CheckpointWriteError(RuntimeError):
    """A checkpoint (or the final LoRA) could not be written: full disk, permissions, I/O."""


def write_error(what: str, err: OSError, run_dir: Path) -> CheckpointWriteError:
    """The one-line error for a failed write, naming the path, the cause and what is left."""
    where = err.filename or run_dir
    kept = checkpoint_dirs(run_dir)
    left = (
        (f"the newest complete checkpoint, {kept[-1].name}, is intact: fix that and continue with train.resume=latest")
        if kept
        else "no checkpoint was saved yet"
    )
    return CheckpointWriteError(f"could not write {what}: {err.strerror or err} ({where}); {left}")


def raise_if_any_failed(
    accelerator, error: OSError | None, what: str, run_dir: Path, partial: Path | None = None
) -> None:
    """A collective: every process raises if any failed to write its part of `what` (its own
    error, or word of another's), after the partial folder is removed, so the space is given back.
    No process is left waiting in a later collective for one that gave up."""
    import torch

    failed = torch.tensor([1 if error is not None else 0], device=accelerator.device)
    if accelerator.reduce(failed, reduction="sum").item() == 0:
        return
    if accelerator.is_main_process and partial is not None:
        shutil.rmtree(partial, ignore_errors=True)
    if error is None:
        error = OSError(0, "another process failed to write its part", str(partial or run_dir))
    raise write_error(what, error, run_dir)


_DELETING = ".deleting"


def _delete(checkpoint: Path) -> None:
    """Rename aside, then delete: a kill mid-delete leaves `step_N.deleting`, which no resume picks,
    never a half-deleted `step_N`."""
    aside = checkpoint.with_name(checkpoint.name + _DELETING)
    shutil.rmtree(aside, ignore_errors=True)
    checkpoint.rename(aside)
    _fsync_dir(checkpoint.parent)
    shutil.rmtree(aside)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """fsync every file under `folder`, then the folders themselves."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            _fsync_dir(path)
    _fsync_dir(folder)
