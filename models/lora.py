"""peft LoRA adapters on the transformer, and their export in diffusers' LoRA format."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from radial_lora.configs.schema import ConfigError, LoraConfig

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def add_lora(transformer, cfg: LoraConfig) -> list[torch.nn.Parameter]:
    """Freeze the transformer, add LoRA adapters per `cfg`, and return the trainable parameters.

    Adapters are kept in fp32 whatever the base weights' dtype: their updates are small relative
    to their values, and bf16 would round many of them away.
    """
    from peft import LoraConfig as PeftLoraConfig

    transformer.requires_grad_(False)
    transformer.add_adapter(
        PeftLoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(cfg.target_modules),
            init_lora_weights=True,
        )
    )
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(f"lora.target_modules={list(cfg.target_modules)} matched no module of the transformer")
    for p in trainable:
        p.data = p.data.float()
    return trainable


def check_targets_exist(target_modules: list[str]) -> None:
    """Each of lora.target_modules must match a module of Wan's transformer, checked at start on
    the architecture alone (a two-block WanTransformer3DModel on the meta device: every Wan2.1 size
    has the same module names), so a typo fails before any data is scanned or weights loaded
    rather than silently training fewer adapters."""
    from diffusers import WanTransformer3DModel
    from peft import LoraConfig as PeftLoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from radial_lora.models.tiny_wan import PRESETS

    with torch.device("meta"):
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=32, rope_max_seq_len=1024, **PRESETS["tiny"]
        )
    names = [name for name, _ in model.named_modules() if name]
    for target in target_modules:
        config = PeftLoraConfig(target_modules=[target])
        if not any(check_target_module_exists(config, name) for name in names):
            block = dict(model.blocks[0].named_modules())
            leaves = [n for n, m in block.items() if n and not list(m.children()) and "norm" not in n]
            raise ConfigError(
                f"lora.target_modules: {target!r} matches no module of Wan's transformer "
                f"(a block's layers: {', '.join(leaves)})"
            )


def check_lora_inside_blocks(transformer) -> None:
    """Sequence parallelism runs only the transformer blocks on a slice of the tokens; an adapter
    outside them would see the same tokens on every process of a group and be counted P times."""
    outside = sorted(n for n, p in transformer.named_parameters() if p.requires_grad and not n.startswith("blocks."))
    if outside:
        raise ConfigError(
            f"with trainer.sequence_parallel > 1, LoRA must stay inside the transformer blocks; "
            f"lora.target_modules also matched {outside[0]}"
        )


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that requires grad, by name: the exact training state of the adapters."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the model's trainable parameters; the two name sets must match exactly."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if params.keys() != state.keys():
        missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
        raise ValueError(
            f"checkpoint LoRA does not match the model: {len(missing)} missing (e.g. {sorted(missing)[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]}); were lora.* settings changed?"
        )
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(state[n])


def export_lora(transformer, directory: str | os.PathLike, is_main_process: bool = True) -> Path:
    """Write the adapters as `pytorch_lora_weights.safetensors` in diffusers' format.

    Goes through `WanPipeline.save_lora_weights`, so `WanPipeline.load_lora_weights` reads it with
    no conversion. The alpha/rank scale is folded into lora_B and the file says alpha = rank:
    loaders that ignore diffusers' metadata (ComfyUI assumes alpha = rank when no `.alpha` key is
    present) then apply the same scale as loaders that read it.
    """
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    peft_config = transformer.peft_config["default"]
    if peft_config.rank_pattern or peft_config.alpha_pattern:
        raise NotImplementedError("export of LoRA with per-module rank/alpha patterns")
    scale = peft_config.lora_alpha / peft_config.r
    state = {
        name: (w * scale if ".lora_B." in name else w).detach().to("cpu", torch.float32).contiguous()
        for name, w in get_peft_model_state_dict(transformer).items()
    }
    metadata = peft_config.to_dict()
    metadata["lora_alpha"] = peft_config.r
    directory = Path(directory)
    WanPipeline.save_lora_weights(
        directory,
        transformer_lora_layers=state,
        is_main_process=is_main_process,
        transformer_lora_adapter_metadata=metadata,
    )
    return (directory / LORA_WEIGHT_NAME).resolve()
