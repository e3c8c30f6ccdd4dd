"""From a run's config to its trainable transformer: our self-attention, sequence parallelism,
LoRA (or every weight, train.mode=full), checkpointing and compilation, in the one order that works.

Shared by training (train/loop.py) and scripts/bench_train_step.py, so the benchmark times the
transformer exactly as training prepares it.
"""

from __future__ import annotations

import torch

from radial_lora.configs.schema import AttentionConfig, ConfigError, LoraConfig, ModelConfig, TrainMode
from radial_lora.models.attention import set_self_attention
from radial_lora.models.checkpointing import enable_checkpointing
from radial_lora.models.lora import add_lora, check_lora_inside_blocks
from radial_lora.models.sequence_parallel import enable_sequence_parallel


def prepare_transformer(
    transformer,
    model: ModelConfig,
    attention: AttentionConfig,
    lora: LoraConfig,
    sp_group=None,
    mode: TrainMode = TrainMode.lora,
) -> list[torch.nn.Parameter]:
    """Set `transformer` up for training in place; returns the trainable parameters: the LoRA
    adapters, or with `mode=full` every weight of the transformer (kept in fp32, like the adapters:
    the optimizer's updates would round away in bf16).

    The processors go in before LoRA (they read the adapted projections), sequence parallelism
    needs the processors' routing, and compilation comes last so its graphs include the adapters
    and the checkpointing.
    """
    routing = set_self_attention(transformer, attention, mode="train")
    if sp_group is not None:
        enable_sequence_parallel(transformer, routing, sp_group)
    if TrainMode(mode) == TrainMode.full:
        transformer.requires_grad_(True)
        params = list(transformer.parameters())
        for p in params:
            p.data = p.data.float()
    else:
        params = add_lora(transformer, lora)
        if sp_group is not None:
            check_lora_inside_blocks(transformer)
    compile_backend = model.compile_backend if model.compile_blocks else None
    if model.gradient_checkpointing:  # compiles the checkpointed blocks (models/checkpointing.py)
        enable_checkpointing(transformer, model.checkpoint_keep_attention, compile_backend)
    elif compile_backend is not None:
        transformer.compile_repeated_blocks(backend=compile_backend)
    return params


def check_rotary_covers(pipe, frames: list[int], sizes: list[list[int]]) -> None:
    """Refuse, in one line, sizes the VAE and patches do not divide (16 for Wan2.1, 32 for
    Wan2.2-TI2V-5B), and clips with more positions along time, height or width than the
    transformer's rotary table holds (`rope_max_seq_len`, 1024 for Wan2.1): diffusers would fail
    inside the first step with a bare reshape error."""
    config = pipe.transformer.config
    limit = config.rope_max_seq_len
    p_t, p_h, p_w = config.patch_size
    t, s = pipe.vae_scale_factor_temporal, pipe.vae_scale_factor_spatial
    if any(h % (s * p_h) or w % (s * p_w) for h, w in sizes):
        raise ConfigError(
            f"data.sizes={sizes}: this model needs heights and widths that are multiples of {s * p_h} "
            f"(its VAE compresses {s}x, then {p_h}x{p_w} patches)"
        )
    longest, tallest, widest = max(frames), max(h for h, _ in sizes), max(w for _, w in sizes)
    for key, value, positions in (
        ("data.frames", longest, ((longest - 1) // t + 1) // p_t),
        ("data.sizes height", tallest, tallest // s // p_h),
        ("data.sizes width", widest, widest // s // p_w),
    ):
        if positions > limit:
            raise ConfigError(
                f"{key} {value} gives {positions} rotary positions; the model's table holds {limit} "
                f"(rope_max_seq_len): use shorter or smaller clips"
            )
