"""An exponential moving average of the trainable weights (train.ema_decay).

Diffusion models sample better from averaged weights than from the last step's: the average
smooths the step-to-step noise of a constant learning rate. diffusers' EMAModel does the
arithmetic; this wrapper gives it parameter names, so the average is saved in a checkpoint as
`ema.safetensors` (tensors only, like every checkpoint file) and loaded back by name, and swaps it
into the model for validation and export.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors.torch import save_file

EMA_FILE = "ema.safetensors"


class WeightAverage:
    """The EMA of `params` (named by `names`, in the same order); fp32 copies on their device."""

    def __init__(self, params: list[torch.nn.Parameter], names: list[str], decay: float):
        from diffusers.training_utils import EMAModel

        self.params, self.names = params, names
        self.ema = EMAModel(params, decay=decay)
        # fp32 whatever the weights' dtype: a 0.999 average of bf16 copies would round its updates away.
        self.ema.shadow_params = [p.detach().float().clone() for p in params]

    @property
    def steps(self) -> int:
        """Updates so far (the decay's warm-up counts them)."""
        return self.ema.optimization_step

    def update(self) -> None:
        """Fold the weights after an optimizer step into the average."""
        self.ema.step(self.params)

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged weights in the model for the duration (validation, export), the trained
        ones back afterwards."""
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)
            self.ema.temp_stored_params = None

    def save(self, folder: Path) -> None:
        """Write `ema.safetensors` into a checkpoint folder (call on the main process)."""
        state = {n: t.detach().contiguous().cpu() for n, t in zip(self.names, self.ema.shadow_params)}
        save_file(state, str(Path(folder, EMA_FILE)), metadata={"steps": str(self.steps)})

    def load(self, folder: Path) -> bool:
        """Read the average back from a checkpoint folder; False if it holds none (a checkpoint
        saved without train.ema_decay: the average then starts from the loaded weights)."""
        from safetensors import safe_open

        path = Path(folder, EMA_FILE)
        if not path.is_file():
            return False
        with safe_open(str(path), framework="pt") as f:
            saved = set(f.keys())
            missing = sorted(set(self.names) - saved)
            if missing or len(saved) != len(self.names):
                raise ValueError(f"{path}: does not match the trainable weights (missing {missing[:3]})")
            for shadow, name in zip(self.ema.shadow_params, self.names):
                shadow.copy_(f.get_tensor(name).to(shadow.device))
            self.ema.optimization_step = int(f.metadata()["steps"])
        return True
