"""Scoring one arm of the length-extension experiment on the held-out evaluation clips: the
held-out flow-matching loss at fixed noise, conditional rollouts against the simulator, and
unconditional samples, each turned into per-clip metrics (metrics.py). Every arm is scored on the
same clips from the same noise, so arms compare clip by clip (verdict.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from radial_lora.configs.schema import AttentionConfig
from radial_lora.data import sprite_world as world
from radial_lora.models.attention import set_self_attention
from radial_lora.scripts.length_extension import metrics as m
from radial_lora.scripts.length_extension.sample import apply_riflex, clip_noise, sample

EVAL_FIRST = 100_000
"""The experiment's clips start here in the evaluation stream (the loop's held-out clips, data.val_clips,
are among the first 4096)."""
TUNING_FIRST = 500_000
"""Clips for choosing the sampler and watching pretraining (the `check` phase): never scored."""
LOSS_SIGMAS = (0.25, 0.5, 0.75, 0.9)
GIVEN_FRAMES = 2
CAPTION = ""


@dataclass
class Arm:
    """One arm: a model folder, optionally a LoRA file on it, its attention, RIFLEx or not."""

    name: str
    model: str
    lora: str | None = None
    attention: dict = field(default_factory=dict)
    """AttentionConfig fields (backend, pattern, block_size, decay, dense_layers, dense_timesteps...)."""
    riflex: bool = False


def evaluation_clips(
    seed: int, conditional: int, unconditional: int, frames: int, hiding: bool = True, first: int = EVAL_FIRST
) -> tuple[list[int], list[int]]:
    """(conditional, unconditional) clip indices of the evaluation stream. Conditional clips each
    hold a bar and (with `hiding`) at least one complete passage behind it within `frames`, the
    first `conditional` such from `first` on; unconditional ones any clips after them."""
    chosen, index = [], first
    while len(chosen) < conditional:
        batch = list(range(index, index + 64))
        clips = world.render_clips(seed, "eval", batch, frames)
        passing = {e.clip for e in world.occlusions(clips)} if hiding else set(range(len(batch)))
        chosen += [batch[b] for b in range(len(batch)) if b in passing and clips.bar_left[b] >= 0]
        index += 64
        if index > first + 64 * 1000:
            raise ValueError(f"fewer than {conditional} clips of {frames} frames with a passage behind the bar")
    chosen = chosen[:conditional]
    start = max(chosen, default=first) + 1
    return chosen, list(range(start, start + unconditional))


def load_arm(arm: Arm, device, dtype=torch.bfloat16, train_frames: int | None = None, frames: int | None = None):
    """(transformer, text embedding [1, L, D]) of an arm, ready to sample: our attention per
    arm.attention, the LoRA loaded through diffusers, RIFLEx applied if asked."""
    from diffusers import WanPipeline

    import radial_lora.models.pixel_wan  # noqa: F401  the identity VAE's class, for from_pretrained

    pipe = WanPipeline.from_pretrained(arm.model, dtype=dtype)  # keeps Wan's fp32 modules in fp32
    transformer = pipe.transformer
    set_self_attention(transformer, AttentionConfig(**arm.attention), mode="generate")
    if arm.lora:
        pipe.load_lora_weights(str(Path(arm.lora).parent), weight_name=Path(arm.lora).name)
    if arm.riflex:
        apply_riflex(transformer, train_frames, frames)
    pipe.to(device)
    transformer.eval()
    text, _ = pipe.encode_prompt(CAPTION, do_classifier_free_guidance=False, max_sequence_length=8, device=device)
    return transformer, text


@torch.no_grad()
def heldout_loss(transformer, text, clips: world.Clips, seed: int, dtype, early_frames: int) -> dict[str, np.ndarray]:
    """Per clip: the flow-matching loss at LOSS_SIGMAS with fixed noise, over all frames and over
    frames before / from `early_frames` (positions seen in pretraining, and the new ones)."""
    x0 = clips.video().to(text.device)
    noise = clip_noise(seed + 1, list(range(x0.shape[0])), tuple(x0.shape[1:]), x0.device)
    per_frame = torch.zeros(x0.shape[0], x0.shape[2], device=x0.device)
    for sigma in LOSS_SIGMAS:
        s = torch.full((x0.shape[0],), sigma, device=x0.device)
        noisy = (1 - sigma) * x0 + sigma * noise
        pred = transformer(
            hidden_states=noisy.to(dtype),
            timestep=s * 1000,
            encoder_hidden_states=text.expand(x0.shape[0], -1, -1).to(dtype),
            return_dict=False,
        )[0].float()
        per_frame += ((pred - (noise - x0)) ** 2).mean(dim=(1, 3, 4)) / len(LOSS_SIGMAS)
    per_frame = per_frame.cpu()
    return {
        "heldout_loss": per_frame.mean(dim=1).numpy(),
        "heldout_loss_early": per_frame[:, :early_frames].mean(dim=1).numpy(),
        "heldout_loss_late": per_frame[:, early_frames:].mean(dim=1).numpy(),
    }


def _generate(transformer, text, clips: world.Clips, indices, seed, steps, shift, dtype, given: bool, batch: int):
    out = []
    for start in range(0, len(indices), batch):
        part = slice(start, start + batch)
        video = clips.video()[part].to(text.device)
        noise = clip_noise(seed, indices[part], tuple(video.shape[1:]), text.device)
        cond = video[:, :, :GIVEN_FRAMES] if given else None
        x = sample(
            transformer, text.expand(video.shape[0], -1, -1), noise, given=cond, steps=steps, shift=shift, dtype=dtype
        )
        out.append(x.permute(0, 2, 3, 4, 1).cpu())  # [B, T, H, W, 3]
    return torch.cat(out)


def score_arm(
    arm: Arm,
    *,
    seed: int,
    conditional: list[int],
    unconditional: list[int],
    frames: int,
    train_frames: int,
    steps: int = 25,
    shift: float = 1.0,
    batch: int = 16,
    device="cuda",
    dtype=torch.bfloat16,
) -> tuple[dict[str, np.ndarray], dict]:
    """(per-clip metrics, extras: recall by hidden duration, per-frame position error, sample
    videos as uint8) of one arm, sampled with `steps` Euler steps at time shift `shift`."""
    transformer, text = load_arm(arm, device, dtype, train_frames, frames)
    cond_clips = world.render_clips(seed, "eval", conditional, frames)
    uncond_clips = world.render_clips(seed, "eval", unconditional, frames)
    out = heldout_loss(transformer, text, cond_clips, seed, dtype, train_frames)
    rollouts = _generate(transformer, text, cond_clips, conditional, seed, steps, shift, dtype, True, batch)
    samples = _generate(transformer, text, uncond_clips, unconditional, seed, steps, shift, dtype, False, batch)

    truth, det = m.detect(cond_clips.frames), m.detect(rollouts)
    position, position_curve = m.position_error(det, truth, cond_clips)
    uncond_truth, uncond = m.detect(uncond_clips.frames), m.detect(samples)
    out |= {
        "position_error": position.numpy(),
        "physics_residual": m.physics_residual(det).numpy(),
        "identity_failure": m.identity_failures(det, cond_clips).float().numpy(),
        "speed_ratio": m.speed_ratio(det, truth).numpy(),
        "flicker": m.flicker(rollouts).numpy(),
        "off_palette": m.off_palette_rate(rollouts).numpy(),
        "psnr": m.psnr(rollouts, cond_clips.frames).numpy(),
        "ssim": m.ssim(rollouts, cond_clips.frames).numpy(),
        "uncond_physics_residual": m.physics_residual(uncond).numpy(),
        "uncond_identity_failure": m.identity_failures(uncond).float().numpy(),
        "uncond_speed_ratio": (m.mean_speed(uncond) / m.mean_speed(uncond_truth).nanmean()).numpy(),
        "uncond_flicker": m.flicker(samples).numpy(),
    }
    extras = {
        "recall": m.occlusion_recall(det, cond_clips, world.occlusions(cond_clips)),
        "position_curve": position_curve.tolist(),
        "rollouts": ((rollouts[:4] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy(),
        "samples": ((samples[:4] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy(),
    }
    return out, extras
