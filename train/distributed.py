"""How a run spreads over processes: the Accelerator, and DeepSpeed ZeRO through it.

`trainer.strategy`: `single` and `ddp` are plain accelerate (one process, or data parallel over
the processes torchrun / `accelerate launch` started); `zero2` / `zero3` add DeepSpeed ZeRO stage
2 (optimizer state and gradients sharded) or 3 (parameters too), with the DeepSpeed JSON
generated here from the Hydra config. Its batch sizes are explicit: accelerate's "auto" values
miscount processes when DeepSpeed runs on CPU ("train_batch_size is not equal to
micro_batch_per_gpu * gradient_acc_step * world_size").

Without a GPU, processes train on CPU over gloo (the tests' 2-process runs).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from radial_lora.configs.schema import Config, ConfigError, Precision, Strategy

ZERO_STAGES = {Strategy.zero2: 2, Strategy.zero3: 3}


def world_size() -> int:
    """Processes of this run, as the launcher (torchrun, accelerate launch, SLURM + either) says."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def deepspeed_config(cfg: Config, processes: int) -> dict:
    """The DeepSpeed JSON for `cfg` (ZeRO stage from trainer.strategy), explicit batch sizes."""
    trainer, stage = cfg.trainer, ZERO_STAGES[cfg.trainer.strategy]
    zero: dict = {
        "stage": stage,
        "overlap_comm": torch.cuda.is_available(),
        "contiguous_gradients": True,
        "reduce_bucket_size": 5e8,
    }
    if trainer.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # The LoRA export gathers just the adapters (train/distributed.py: gathered); never the model.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if trainer.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": trainer.gradient_accumulation_steps,
        "train_batch_size": cfg.data.batch_size * trainer.gradient_accumulation_steps * processes,
        "gradient_clipping": cfg.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": trainer.mixed_precision == Precision.bf16},
        "fp16": {"enabled": trainer.mixed_precision == Precision.fp16, "auto_cast": False},
        "zero_allow_untested_optimizer": True,  # torch's AdamW, which accelerate hands over
        "steps_per_print": 2**31 - 1,  # our loop logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


def make_accelerator(cfg: Config, run_dir: Path):
    """The run's Accelerator (with a DeepSpeed plugin for zero2 / zero3)."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    from radial_lora.train.tracking import wandb_mode

    plugin, on_cpu, handlers = None, not torch.cuda.is_available(), []
    if cfg.trainer.strategy in ZERO_STAGES:
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world_size()), zero3_init_flag=False)
    if on_cpu and world_size() > 1:
        # Without a GPU, processes started by torchrun / accelerate launch talk over gloo.
        # accelerate's `cpu=True` would switch DeepSpeed off, so it is left False under ZeRO.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        cpu=on_cpu and plugin is None,
        kwargs_handlers=handlers,
        mixed_precision=cfg.trainer.mixed_precision.value,
        gradient_accumulation_steps=cfg.trainer.gradient_accumulation_steps,
        deepspeed_plugin=plugin,
        log_with=None if wandb_mode(cfg.logger) == "disabled" else "wandb",
        project_dir=str(run_dir),
    )
    if plugin is not None:
        # accelerate registers the DeepSpeed config with transformers, whose from_pretrained then
        # builds models inside ZeRO-3's zero.Init. Loading must not partition the frozen text
        # encoder (it runs outside DeepSpeed), and rank 0 loads first while the others wait, which
        # zero.Init's collectives would deadlock. The transformer is partitioned by the engine.
        from transformers.integrations import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    return accelerator


def sequence_parallel_group(size: int):
    """(group, data-parallel rank, data-parallel size) for groups of `size` consecutive ranks (one
    node's GPUs, where the all-to-alls are fast); group None when size is 1. Every process calls
    this: creating a group is a collective."""
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if size == 1:
        return None, rank, world
    if world % size:
        raise ConfigError(f"trainer.sequence_parallel={size} must divide the number of processes ({world})")
    mine = None
    for first in range(0, world, size):
        group = dist.new_group(list(range(first, first + size)))
        if first <= rank < first + size:
            mine = group
    return mine, rank // size, world // size


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    """The dtype the forward and backward compute in under mixed precision; None without it."""
    return {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}.get(cfg.trainer.mixed_precision)


def model_input_dtype(cfg: Config, accelerator, storage: torch.dtype) -> torch.dtype:
    """The dtype the transformer's inputs must have: DeepSpeed's bf16 / fp16 modes cast the whole
    module (our fp32 LoRA weights included, with fp32 master copies in the optimizer)."""
    compute = autocast_dtype(cfg)
    return compute if uses_deepspeed(accelerator) and compute is not None else storage


def gathered(accelerator, params):
    """A context in which ZeRO-3's partitioned `params` are whole on every process (a collective:
    every process must enter it); a no-op otherwise."""
    if uses_deepspeed(accelerator) and accelerator.state.deepspeed_plugin.zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def checkpoint_kwargs(accelerator) -> tuple[dict, dict]:
    """Extra (save_state, load_state) arguments: DeepSpeed checkpoints only the trainable weights
    (the frozen ones come from the pretrained model) and loads them non-strictly."""
    if uses_deepspeed(accelerator):
        return {"exclude_frozen_parameters": True}, {"load_module_strict": False}
    return {}, {}
