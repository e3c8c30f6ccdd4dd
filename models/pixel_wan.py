"""A pixel-space Wan2.1: the real `WanTransformer3DModel` over RGB frames, with an identity "VAE".

For experiments whose outputs must be checked pixel by pixel against a simulator (the
length-extension experiment, docs/length_extension.md): no learned autoencoder stands between the
model and the frames, so nothing downloaded is needed and nothing is lost in decoding. The
transformer patches 4x4 RGB pixels into a token (64x64 frames: 256 tokens a frame), the
"latents" are the frames in [-1, 1], one latent frame a video frame.

The folder is a `WanPipeline` like any other (the tiny UMT5 text encoder of models/tiny_wan.py,
whose one constant caption conditions nothing), so training, validation samples and
`scripts.generate` load and run it unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_utils import ModelMixin

# Transformer sizes. `sprites`: the length-extension experiment's base model (about 20M
# parameters: 8 layers of 6 heads x 64); `toy`: the same shape at CPU-test size.
PRESETS = {
    "sprites": dict(num_attention_heads=6, attention_head_dim=64, ffn_dim=1536, num_layers=8, freq_dim=256),
    "toy": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, freq_dim=32),
}
PATCH = (1, 4, 4)


class IdentityAutoencoder(ModelMixin, ConfigMixin):
    """The frames are the latents: `encode` returns a posterior with the frames as its mean and a
    negligible variance (std e^-15), `decode` returns its input. It has the config fields the Wan
    pipeline and the trainer read (z_dim, latents_mean/std, the scale factors, all trivial)."""

    @register_to_config
    def __init__(
        self,
        z_dim: int = 3,
        latents_mean: list[float] = (0.0, 0.0, 0.0),
        latents_std: list[float] = (1.0, 1.0, 1.0),
        scale_factor_temporal: int = 1,
        scale_factor_spatial: int = 1,
    ):
        super().__init__()
        # A parameter so the module has a device and a dtype (the trainer and pipeline ask for them).
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def encode(self, x: torch.Tensor, return_dict: bool = True):
        """[B, C, T, H, W] in [-1, 1] -> a posterior over the same tensor."""
        params = torch.cat([x, torch.full_like(x, -30.0)], dim=1)
        posterior = DiagonalGaussianDistribution(params)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True):
        """The latents are the frames (clamped to the pixel range)."""
        video = z.clamp(-1, 1)
        return DecoderOutput(sample=video) if return_dict else (video,)


def _components(seed: int, preset: str) -> dict:
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    from radial_lora.models.tiny_wan import TEXT_DIM, tiny_text_encoder

    torch.manual_seed(seed)
    tokenizer, text_encoder = tiny_text_encoder()
    transformer = WanTransformer3DModel(
        patch_size=PATCH,
        in_channels=3,
        out_channels=3,
        text_dim=TEXT_DIM,
        rope_max_seq_len=1024,
        qk_norm="rms_norm_across_heads",
        cross_attn_norm=True,
        **PRESETS[preset],
    )
    return dict(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=IdentityAutoencoder(),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
    )


def build_pixel_wan(path: str | os.PathLike, seed: int = 0, preset: str = "sprites") -> Path:
    """Write a random-init pixel-space WanPipeline folder to `path` (once: an existing one is kept)."""
    from radial_lora.models.tiny_wan import write_pipeline_once

    return write_pipeline_once(path, lambda: _components(seed, preset))
