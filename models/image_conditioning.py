"""First-frame conditioning of Wan's image-to-video models (Wan2.1-I2V-14B, Wan2.2-I2V-A14B).

Their transformer takes 2z + 4 input channels (36 for Wan's 16-channel VAE): the noisy latents
(z), a 4-channel mask marking the latent frame that is given (the first: its 4 channels stand for
the first latent frame's pixel frames, of which only frame 0 exists), and the VAE latent of the
video [image, gray, gray, ...] (z). Wan2.1's also reads the CLIP image embedding of the image
(`image_dim` set) through its cross-attention. diffusers' WanImageToVideoPipeline.prepare_latents
builds the same inputs at generation; training builds them from each clip's first frame, so the
LoRA learns exactly the task the pipeline generates with. The loss leaves the first latent frame
out (train/step.py): it is given, not generated.

Wan2.2-TI2V-5B is not one of these: it conditions by per-token timesteps (train.condition_frames).
"""

from __future__ import annotations

import numpy as np
import torch

MASK_CHANNELS = 4
"""The given-frame mask's channels: the VAE's temporal compression (4 pixel frames a latent frame)."""


def takes_first_frame(pipe) -> bool:
    """The pipeline is an image-to-video Wan whose transformer takes the concatenated condition."""
    from diffusers import WanImageToVideoPipeline

    return isinstance(pipe, WanImageToVideoPipeline) and not pipe.config.get("expand_timesteps", False)


def needs_image_embeds(transformer) -> bool:
    """The transformer reads a CLIP image embedding (Wan2.1-I2V: `image_dim` in its config)."""
    return getattr(getattr(transformer, "module", transformer).config, "image_dim", None) is not None


@torch.no_grad()
def condition_latents(vae, first: torch.Tensor, frames: int) -> torch.Tensor:
    """First frames [B, 3, 1, H, W] in the VAE's layout and range ([-1, 1]) -> [B, z, T', H', W']
    fp32: the normalized latent (posterior mode) of each image followed by frames - 1 gray frames
    (0 in [-1, 1]), a clip of `frames` frames."""
    b, c, _, h, w = first.shape
    video = torch.cat([first, first.new_zeros(b, c, frames - 1, h, w)], dim=2)
    latent = vae.encode(video).latent_dist.mode().float()
    mean = torch.tensor(vae.config.latents_mean, device=latent.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=latent.device).view(1, -1, 1, 1, 1)
    return (latent - mean) / std


def with_mask(latents: torch.Tensor) -> torch.Tensor:
    """[B, z, T', H', W'] condition latents -> the transformer's extra input [B, 4 + z, T', H', W']:
    the mask (1 on the first latent frame, 0 elsewhere) before the latents, as the pipeline has it."""
    b, _, t, h, w = latents.shape
    mask = latents.new_zeros(b, MASK_CHANNELS, t, h, w)
    mask[:, :, 0] = 1
    return torch.cat([mask, latents], dim=1)


@torch.no_grad()
def image_embeds(pipe, images: list[np.ndarray], device) -> torch.Tensor:
    """uint8 images [H, W, 3] -> their CLIP embeddings [B, N, D] (the image encoder's
    second-to-last hidden states, through WanImageToVideoPipeline.encode_image)."""
    if pipe.image_encoder is None:
        raise ValueError("this model reads a CLIP image embedding, but its image encoder is not loaded")
    return pipe.encode_image(images, device).float()
