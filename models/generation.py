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
    image=None,
) -> np.ndarray:
    """uint8 frames [T, H, W, 3] of one video from `prompt`, seeded by `seed` (a generator on
    `device`, the pipeline's by default), with the transformer's attention under its generation
    rule (the first attention.dense_timesteps steps dense, as the paper generates).

    With `image` (a PIL image) the video starts from it. An image-to-video model (Wan2.1-I2V,
    Wan2.2-I2V-A14B: its pipeline is WanImageToVideoPipeline) needs one, and takes it as its
    first-frame condition (models/image_conditioning.py). A model that takes per-token timesteps
    (Wan2.2-TI2V-5B) takes one through WanImageToVideoPipeline on the same components, which holds
    the image's latent as the first latent frame at timestep 0, as training with
    train.condition_frames=1 gives it."""
    from radial_lora.models.image_conditioning import takes_first_frame

    check_video_shape(frames, height, width)
    device = torch.device(device) if device is not None else pipe._execution_device
    first_frame = takes_first_frame(pipe)
    if first_frame and image is None:
        raise ValueError("this is an image-to-video model: it generates from a first frame (give --image)")
    if image is not None:
        if not (first_frame or pipe.config.get("expand_timesteps", False)):
            raise ValueError(
                "image-to-video: this model has no image input (Wan2.1/2.2 I2V models have, and Wan2.2-TI2V-5B "
                "through its per-token timesteps)"
            )
        from diffusers import WanImageToVideoPipeline

        embeds, negative = pipe.encode_prompt(
            prompt, negative_prompt, do_classifier_free_guidance=guidance > 1.0,
            max_sequence_length=max_text_tokens, device=device,
        )  # fmt: skip
        if not first_frame:
            pipe = WanImageToVideoPipeline.from_pipe(pipe)
        prompts = {"image": image, "prompt_embeds": embeds, "negative_prompt_embeds": negative}
    else:
        prompts = {"prompt": prompt, "negative_prompt": negative_prompt}
    generator = torch.Generator(device).manual_seed(seed)
    # Wan's pipeline rounds num_frames to 4n+1 for its VAE's 4x temporal compression; a model
    # without one (models/pixel_wan.py, scale factor 1) would get a frame more: ask for one fewer.
    asked = frames - 1 if pipe.vae_scale_factor_temporal == 1 else frames
    with torch.inference_mode(), generation_rules(pipe.transformer):
        video = pipe(
            **prompts,
            num_frames=asked,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generator,
            output_type="np",
            **({} if image is not None else {"max_sequence_length": max_text_tokens}),
        ).frames
    return to_uint8(video)
