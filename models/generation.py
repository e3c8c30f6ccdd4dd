"""Generating a video with the pipeline as trained: one function for `scripts.generate` and for
the sample videos a run renders while it trains (train/validation.py)."""

from __future__ import annotations

import numpy as np
import torch

from radial_lora.models.attention import generation_rules


def to_uint8(video) -> np.ndarray:
    """The pipeline's frames (float [T, H, W, 3] in [0, 1]) as uint8 [T, H, W, 3]."""
    frames = np.asarray(video[0] if isinstance(video, list | tuple) or np.ndim(video) == 5 else video)
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def check_video_shape(frames: int, height: int, width: int) -> None:
    """Wan's VAE: 4n+1 frames, and sides that are multiples of 16 (8x VAE, then 2x2 patches)."""
    if (frames - 1) % 4 or height % 16 or width % 16 or min(frames, height, width) < 1:
        raise ValueError(f"frames must be 4n+1 and height/width multiples of 16; got {frames}, {height}x{width}")


def generate_video(
    pipe,
    prompt: str,
    *,
    frames: int,
    height: int,
    width: int,
    steps: int,
    guidance: float,
    seed: int,
    max_text_tokens: int,
    negative_prompt: str = "",
    device: torch.device | str | None = None,
) -> np.ndarray:
    """uint8 frames [T, H, W, 3] of one video from `prompt`, seeded by `seed` (a generator on
    `device`, the pipeline's by default), with the transformer's attention under its generation
    rule (the first attention.dense_timesteps steps dense, as the paper generates)."""
    check_video_shape(frames, height, width)
    device = torch.device(device) if device is not None else pipe._execution_device
    generator = torch.Generator(device).manual_seed(seed)
    # Wan's pipeline rounds num_frames to 4n+1 for its VAE's 4x temporal compression; a model
    # without one (models/pixel_wan.py, scale factor 1) would get a frame more: ask for one fewer.
    asked = frames - 1 if pipe.vae_scale_factor_temporal == 1 else frames
    with torch.inference_mode(), generation_rules(pipe.transformer):
        video = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_frames=asked,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="np",
            max_sequence_length=max_text_tokens,
        ).frames
    return to_uint8(video)
