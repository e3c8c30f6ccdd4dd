"""peft LoRA adapters on the transformer: adding them, their export (models/lora_files.py has the
formats) and starting them from an existing LoRA file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from radial_lora.configs.schema import ConfigError, LoraConfig
from radial_lora.models.lora_files import FILE_NAMES, Adapter, LoraFormat, LoraWeights, save_lora

LORA_WEIGHT_NAME = FILE_NAMES[LoraFormat.diffusers]


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


def lora_weights(transformer) -> LoraWeights:
    """The transformer's peft adapters as `LoraWeights` (diffusers module names, fp32 on CPU)."""
    from peft.tuners.lora import LoraLayer

    peft_config = transformer.peft_config["default"]
    if peft_config.rank_pattern or peft_config.alpha_pattern:
        raise NotImplementedError("export of LoRA with per-module rank/alpha patterns")
    weights = {}
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            weights[name] = Adapter(
                down=module.lora_A["default"].weight.detach().to("cpu", torch.float32),
                up=module.lora_B["default"].weight.detach().to("cpu", torch.float32),
                alpha=float(peft_config.lora_alpha),
            )
    return weights


def export_lora(
    transformer,
    directory: str | os.PathLike,
    formats=(LoraFormat.diffusers, LoraFormat.comfyui),
    info: dict[str, str] | None = None,
    is_main_process: bool = True,
) -> Path:
    """Write the adapters into `directory`, one file per format (lora_files.FILE_NAMES), each with
    `info` in its metadata; returns the diffusers file's path (the one `scripts.generate` loads)
    or, without diffusers among `formats`, the first one written.

    Every file applies exactly the trained delta in the tool it is for: `diffusers` folds alpha/r
    into B and says alpha = r; `comfyui` and `kohya` carry B as trained with `.alpha` tensors.
    """
    weights = lora_weights(transformer)
    rank = next(iter(weights.values())).rank
    info = {**(info or {}), "radial_lora.rank": str(rank)}
    written = []
    for fmt in formats:
        fmt = LoraFormat(fmt)
        path = Path(directory, FILE_NAMES[fmt])
        # alpha as each file states it: the diffusers file's B carries alpha/r (so alpha = r there).
        alpha = rank if fmt == LoraFormat.diffusers else next(iter(weights.values())).alpha
        meta = info | {"radial_lora.format": fmt.value, "radial_lora.alpha": f"{alpha:g}"}
        if is_main_process:
            save_lora(weights, path, fmt, meta)
        written.append(path.resolve())
    diffusers_file = Path(directory, FILE_NAMES[LoraFormat.diffusers]).resolve()
    return diffusers_file if diffusers_file in written else written[0]


MODEL_SHARD = "16MB"
"""Largest weight file of a full-model export: small files travel (and resume) more easily."""


def export_model(
    pipe, directory: str | os.PathLike, info: dict[str, str] | None = None, is_main_process: bool = True
) -> Path:
    """Write the whole pipeline (its trained transformer and the frozen rest) as a diffusers model
    folder that `model.path` loads, weights in shards of at most MODEL_SHARD; `info` goes into
    `training.json` beside it. Returns the folder."""
    directory = Path(directory)
    if is_main_process:
        pipe.save_pretrained(directory, max_shard_size=MODEL_SHARD, safe_serialization=True)
        (directory / "training.json").write_text(json.dumps(info or {}, indent=1) + "\n")
    return directory.resolve()


def init_lora_from(transformer, weights: LoraWeights, cfg: LoraConfig, source: str) -> None:
    """Set the transformer's adapters to `weights` (read from `source`, for messages), rescaled
    to the config's alpha so the model applies the same delta; refuses, in one line, a LoRA whose
    rank or adapted modules differ from what `cfg` put on the transformer."""
    from peft.tuners.lora import LoraLayer

    layers = {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}
    if weights.keys() != layers.keys():
        extra, missing = sorted(weights.keys() - layers.keys()), sorted(layers.keys() - weights.keys())
        raise ConfigError(
            f"lora.init_from={source}: its adapters are on {len(weights)} modules, lora.target_modules="
            f"{list(cfg.target_modules)} puts them on {len(layers)}"
            + (f"; only in the file: {extra[0]}" if extra else "")
            + (f"; only in the config: {missing[0]}" if missing else "")
        )
    ranks = sorted({a.rank for a in weights.values()})
    if ranks != [cfg.rank]:
        raise ConfigError(f"lora.init_from={source}: rank {', '.join(map(str, ranks))}, but lora.rank={cfg.rank}")
    scale = cfg.alpha / cfg.rank  # what the model multiplies B A by
    with torch.no_grad():
        for name, layer in layers.items():
            a = weights[name]
            down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            if down.shape != a.down.shape or up.shape != a.up.shape:
                raise ConfigError(
                    f"lora.init_from={source}: module {name} has down {tuple(a.down.shape)} / up {tuple(a.up.shape)}, "
                    f"the model's adapter {tuple(down.shape)} / {tuple(up.shape)} (another model size?)"
                )
            down.copy_(a.down)
            up.copy_(a.up * (a.scale / scale))
