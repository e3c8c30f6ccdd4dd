"""One training step's maths: encoding a batch and Wan's flow-matching loss.

Flow matching (rectified flow), as Wan is trained: for clean latents x0 and noise eps at level
sigma in [0, 1], x_t = (1 - sigma) * x0 + sigma * eps; the transformer, given x_t and timestep
1000 * sigma, predicts the velocity eps - x0.
"""

from __future__ import annotations

import numpy as np
import torch

from radial_lora.configs.schema import TimestepConfig, TimestepSampling
from radial_lora.data.video import to_vae_input


def sample_generator(seed: int, batch_number: int, sample: int, device) -> torch.Generator:
    """The generator of one sample's randomness (its latent sample, noise level and noise).

    Seeded from (seed, micro-batch number, the sample's place in the global batch) rather than
    carried along: a resumed run draws exactly what an uninterrupted one would, and a sample gets
    the same draws whether 1 process runs the global batch or N processes split it.
    """
    entropy = np.random.SeedSequence([seed, batch_number, sample]).generate_state(2, np.uint64)[0]
    return torch.Generator(device).manual_seed(int(entropy) & (2**63 - 1))


MAX_DRAWS = 10_000


def sample_sigmas(cfg: TimestepConfig, batch_size: int, generator: torch.Generator, device) -> torch.Tensor:
    """Noise levels [B] in (0, 1) drawn per `cfg.sampling` (uniform, logit-normal or shifted), cut
    to [cfg.min_sigma, cfg.max_sigma): draws outside are drawn again from the same generator (the
    scheme's distribution restricted to the range, exactly; a resumed run draws the same)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    scheme = "logit_normal" if cfg.sampling == TimestepSampling.logit_normal else "uniform"

    def draw(n: int) -> torch.Tensor:
        u = compute_density_for_timestep_sampling(
            scheme, n, cfg.logit_mean, cfg.logit_std, device=device, generator=generator
        )
        if cfg.sampling == TimestepSampling.shifted:
            # The time shift of SD3/Wan sampling: pushes sigma towards 1 (noisier) for shift > 1.
            u = cfg.shift * u / (1 + (cfg.shift - 1) * u)
        return u

    sigmas = draw(batch_size)
    if cfg.min_sigma <= 0 and cfg.max_sigma >= 1:
        return sigmas
    for _ in range(MAX_DRAWS):
        outside = (sigmas < cfg.min_sigma) | (sigmas >= cfg.max_sigma)
        if not bool(outside.any()):
            return sigmas
        sigmas = torch.where(outside, draw(batch_size), sigmas)
    raise ValueError(
        f"train.timesteps: {MAX_DRAWS} draws of {cfg.sampling.value} found no noise level in "
        f"[{cfg.min_sigma}, {cfg.max_sigma})"
    )


@torch.no_grad()
def posterior_params(vae, frames: torch.Tensor) -> torch.Tensor:
    """uint8 frames [B, T, H, W, 3] -> the VAE posterior's mean and log-variance [B, 2C, 1 + (T-1)/4, H/8, W/8]."""
    x = to_vae_input(frames, vae.device, vae.dtype)
    return vae.encode(x).latent_dist.parameters


@torch.no_grad()
def sample_latents(vae, params: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A sample of the posterior (not its mean), normalized by the per-channel latents_mean/std the
    pipeline undoes before decoding; fp32. The same for freshly encoded and cached posteriors."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    latents = DiagonalGaussianDistribution(params.to(vae.device)).sample(generator=generator).float()
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
    return (latents - mean) / std


@torch.no_grad()
def noisy_inputs(vae, params: torch.Tensor, generators: list[torch.Generator], cfg: TimestepConfig, device):
    """(clean latents x0, noise levels sigma, noise eps) for a batch of posteriors, each sample
    drawn from its own generator, in that order."""
    latents, sigmas, noise = [], [], []
    for j, gen in enumerate(generators):
        x0 = sample_latents(vae, params[j : j + 1], gen)
        latents.append(x0)
        sigmas.append(sample_sigmas(cfg, 1, gen, device))
        noise.append(torch.randn(x0.shape, generator=gen, device=device))
    return torch.cat(latents), torch.cat(sigmas), torch.cat(noise)


@torch.no_grad()
def encode_captions(pipe, captions: list[str], max_tokens: int, device) -> torch.Tensor:
    """Text embeddings [B, max_tokens, text_dim] through the pipeline's own prompt encoding."""
    embeds, _ = pipe.encode_prompt(
        captions, do_classifier_free_guidance=False, max_sequence_length=max_tokens, device=device
    )
    return embeds


@torch.no_grad()
def first_frame_inputs(pipe, transformer, frames: torch.Tensor, device) -> dict:
    """What an image-to-video Wan takes beyond the noisy latents (models/image_conditioning.py),
    from uint8 clips [B, T, H, W, 3]: {"condition": [B, 4 + z, T', H', W'] (the mask, then the
    latent of the first frame followed by gray), "image_embeds": [B, N, D] CLIP embedding of the
    first frame, or None for a model without one}; {} for a model that takes no image.
    `transformer` None (encoding without it, scripts/precompute.py): the CLIP embedding is made
    when the pipeline has an image encoder."""
    from radial_lora.models import image_conditioning as image

    if not image.takes_first_frame(pipe):
        return {}
    first = to_vae_input(frames[:, :1], pipe.vae.device, pipe.vae.dtype)
    embeds = None
    if image.needs_image_embeds(transformer) if transformer is not None else pipe.image_encoder is not None:
        embeds = image.image_embeds(pipe, list(frames[:, 0].cpu().numpy()), device)
    latents = image.condition_latents(pipe.vae, first, frames.shape[1]).to(device)
    return {"condition": image.with_mask(latents), "image_embeds": embeds}


def cached_first_frame_inputs(batch: dict, device) -> dict:
    """first_frame_inputs from a latent cache's batch (its condition latents [B, z, T', H', W'] and
    CLIP embeddings, scripts/precompute.py); {} when the cache holds none (a model without an image)."""
    from radial_lora.models.image_conditioning import with_mask

    if "condition" not in batch:
        return {}
    embeds = batch.get("image_embeds")
    return {
        "condition": with_mask(batch["condition"].to(device).float()),
        "image_embeds": embeds.to(device).float() if embeds is not None else None,
    }


def conditioned_frames(generators: list[torch.Generator], frames: int, probability: float, device) -> torch.Tensor:
    """[B] how many leading latent frames each sample is given clean (train.condition_frames):
    `frames` with `probability`, else 0, drawn from each sample's own generator (after its latent,
    noise level and noise), so a resumed run conditions the same samples."""
    if frames == 0:
        return torch.zeros(len(generators), dtype=torch.long, device=device)
    draws = torch.cat([torch.rand(1, generator=g, device=device) for g in generators])
    return (draws < probability).long() * frames


def token_timesteps(timestep: torch.Tensor, clean: torch.Tensor, latent_shape, patch_size) -> torch.Tensor:
    """[B, S] per-token timesteps (as Wan2.2's TI2V model takes them): each sample's `timestep`
    [B], 0 on the tokens of its given latent frames, `clean` [B, T] bool."""
    _, _, _, H, W = latent_shape
    p_t, p_h, p_w = patch_size
    per_frame = torch.where(clean[:, ::p_t], torch.zeros_like(timestep)[:, None], timestep[:, None])
    return per_frame.repeat_interleave((H // p_h) * (W // p_w), dim=1)


def flow_matching_loss(
    transformer,
    latents: torch.Tensor,
    text_embeds: torch.Tensor,
    sigmas: torch.Tensor,
    noise: torch.Tensor,
    dtype: torch.dtype,
    clean_frames: torch.Tensor | None = None,
    condition: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between the predicted and the true velocity (eps - x0), in fp32.

    `dtype` is the transformer's storage dtype, which its inputs are cast to. `clean_frames` [B]
    (optional): each sample's first N latent frames are given clean, their tokens get timestep 0
    (a per-token timestep [B, S], as Wan2.2's TI2V model takes it), and the loss leaves them out.
    `condition` [B, 4 + z, T, H, W] (an image-to-video Wan, first_frame_inputs): concatenated to
    the noisy latents' channels, as the pipeline feeds it; the loss leaves the first latent frame
    out (the given image). `image_embeds` [B, N, D]: the CLIP embedding Wan2.1-I2V reads.
    """
    s = sigmas.view(-1, 1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    timestep = sigmas * 1000
    weight = None
    if clean_frames is not None and bool((clean_frames > 0).any()):
        T = latents.shape[2]
        clean = torch.arange(T, device=latents.device)[None] < clean_frames.to(latents.device)[:, None]  # [B, T]
        noisy = torch.where(clean[:, None, :, None, None], latents, noisy)
        patch = getattr(transformer, "module", transformer).config.patch_size
        timestep = token_timesteps(timestep, clean, latents.shape, patch)
        weight = (~clean).float()[:, None, :, None, None].expand_as(latents)
    extra = {}
    if condition is not None:
        noisy = torch.cat([noisy, condition.to(noisy.device, noisy.dtype)], dim=1)
        weight = torch.ones_like(latents) if weight is None else weight.clone()
        weight[:, :, 0] = 0
    if image_embeds is not None:
        extra["encoder_hidden_states_image"] = image_embeds.to(dtype)
    pred = transformer(
        hidden_states=noisy.to(dtype),
        timestep=timestep,
        encoder_hidden_states=text_embeds.to(dtype),
        return_dict=False,
        **extra,
    )[0]
    error = (pred.float() - (noise - latents).float()) ** 2
    if weight is None:
        return error.mean()
    return (error * weight).sum() / weight.sum().clamp(min=1)
