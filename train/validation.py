"""What a run shows while it trains: the held-out loss per clip length, and sample videos.

Held-out loss: the clips `data.val_clips` set apart (data/setup.py split_held_out) are encoded once
at start; each validation scores every one at the fixed noise levels `validation.sigmas` with fixed
noise (seeded per clip and level) and the posterior mean as x0, so the number moves only because
the LoRA does. Every process scores every clip, in the same order: under ZeRO-3 and sequence
parallelism each forward needs all processes, and the held-out set is small.

Sample videos: rank 0 renders `validation.samples` videos through models/generation.py (the
code `scripts.generate` runs) at the run's longest length with the generation attention rule, and
writes them to `samples/step_NNNNNN/` in the run folder and to W&B.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from radial_lora.configs.schema import Config, ConfigError, Strategy
from radial_lora.data.dataset import ClipDataset, collate
from radial_lora.data.video import BadVideo
from radial_lora.models.generation import generate_video
from radial_lora.train.step import (
    cached_first_frame_inputs,
    encode_captions,
    first_frame_inputs,
    flow_matching_loss,
    posterior_params,
)


@dataclass
class HeldOutClip:
    """One held-out clip, encoded: what its loss needs (on CPU between validations)."""

    video: str
    frames: int
    caption: str
    x0: torch.Tensor
    """[1, C, T', H', W'] normalized posterior mean"""
    text: torch.Tensor
    """[1, L, D] caption embedding"""
    image: dict = field(default_factory=dict)
    """An image-to-video model's first-frame inputs (train/step.py first_frame_inputs), else {}."""
    first_frame: np.ndarray | None = None
    """uint8 [H, W, 3]: the clip's first frame, which an image-to-video model's samples start from
    (None from a latent cache, which keeps no pixels)."""


def check_validation(cfg: Config, text_encoder_loaded: bool) -> str | None:
    """Refuse, in one line, sample videos the run cannot render; returns a line for the log when
    validation is on with nothing to validate (no prompts, no held-out clips)."""
    v = cfg.validation
    if v.every == 0:
        return None
    if not v.prompts and cfg.data.val_clips == 0:
        return (
            f"validation: every {v.every} steps, but no prompts (validation.prompts) and no held-out clips "
            "(data.val_clips): nothing to validate"
        )
    if v.samples == 0:
        return None
    if not text_encoder_loaded:
        raise ConfigError(
            "validation sample videos need the text encoder, which a latent cache (data.cache) leaves unloaded: "
            "set validation.samples=0 (the held-out loss still runs) or train without data.cache"
        )
    if cfg.trainer.strategy == Strategy.zero3 or cfg.trainer.sequence_parallel > 1:
        raise ConfigError(
            "validation sample videos render on rank 0 alone, which ZeRO-3 (sharded weights) and sequence "
            "parallelism cannot: set validation.samples=0 (the held-out loss still runs) and render with "
            "scripts.generate from a checkpoint"
        )
    return None


def latent_mean(vae, params: torch.Tensor) -> torch.Tensor:
    """The posterior's mean, normalized as training normalizes its samples (fp32)."""
    mean = params.to(vae.device).float().chunk(2, dim=1)[0]
    shift = torch.tensor(vae.config.latents_mean, device=mean.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=mean.device).view(1, -1, 1, 1, 1)
    return (mean - shift) / std


@torch.no_grad()
def encode_held_out(pipe, clips, cfg: Config, cache, device, say) -> list[HeldOutClip]:
    """Decode and encode the held-out clips once (clips that fail to decode are left out, said)."""
    dataset = ClipDataset(clips, fps=cfg.data.fps, seed=cfg.train.seed, random_window=False, cache=cache)
    held = []
    for i, clip in enumerate(clips):
        try:
            batch = collate([{**dataset.load(i, 0), "skipped": []}])
        except BadVideo as bad:
            say(f"validation: held-out clip {clip.video} left out: {bad.reason}")
            continue
        first = None
        if "latent_params" in batch:
            params, text = batch["latent_params"], batch["text"]
            image = cached_first_frame_inputs(batch, "cpu")
        else:
            params = posterior_params(pipe.vae, batch["frames"])
            text = encode_captions(pipe, batch["captions"], cfg.model.max_text_tokens, device)
            image = first_frame_inputs(pipe, pipe.transformer, batch["frames"], device)
            first = batch["frames"][0, 0].numpy()
        image = {k: v.cpu() if v is not None else None for k, v in image.items()}
        mean = latent_mean(pipe.vae, params).cpu()
        held.append(HeldOutClip(clip.video, clip.bucket[0], clip.caption, mean, text.cpu(), image, first))
    return held


@torch.no_grad()
def held_out_losses(transformer, held: list[HeldOutClip], sigmas: list[float], seed: int, dtype, device) -> dict:
    """{"val/loss_{F}f": mean flow-matching loss of the F-frame held-out clips over `sigmas`}."""
    sums: dict[int, list[float]] = {}
    for i, clip in enumerate(held):
        x0 = clip.x0.to(device)
        for j, sigma in enumerate(sigmas):
            g = torch.Generator(device).manual_seed(int(np.random.SeedSequence([seed, i, j]).generate_state(1)[0]))
            noise = torch.randn(x0.shape, generator=g, device=device)
            s = torch.full((1,), sigma, device=device)
            image = {k: v.to(device) if v is not None else None for k, v in clip.image.items()}
            loss = flow_matching_loss(transformer, x0, clip.text.to(device), s, noise, dtype, **image)
            sums.setdefault(clip.frames, []).append(float(loss))
    return {f"val/loss_{frames}f": sum(v) / len(v) for frames, v in sorted(sums.items())}


def sample_prompts(cfg: Config, held: list[HeldOutClip]) -> list[str]:
    """The sample videos' prompts: validation.prompts, else the held-out clips' captions."""
    prompts = list(cfg.validation.prompts) or [clip.caption for clip in held]
    return prompts[: cfg.validation.samples]


def sample_images(pipe, held: list[HeldOutClip], count: int) -> list:
    """The images an image-to-video model's samples start from: the held-out clips' first frames
    in turn (PIL images); Nones for a model that takes no image."""
    from PIL import Image

    from radial_lora.models.image_conditioning import takes_first_frame

    if not takes_first_frame(pipe):
        return [None] * count
    frames = [clip.first_frame for clip in held if clip.first_frame is not None]
    return [Image.fromarray(frames[i % len(frames)]) for i in range(count)] if frames else [None] * count


def check_image_samples(cfg: Config, pipe) -> None:
    """An image-to-video model's sample videos start from held-out clips' first frames: refuse
    samples without held-out clips, in one line."""
    from radial_lora.models.image_conditioning import takes_first_frame

    v = cfg.validation
    if v.every and v.samples and takes_first_frame(pipe) and cfg.data.val_clips == 0:
        raise ConfigError(
            "validation.samples: an image-to-video model's samples start from the first frames of held-out "
            "clips; set data.val_clips >= 1, or validation.samples=0"
        )


def render_samples(
    pipe, cfg: Config, prompts: list[str], folder: Path, device, images: list | None = None
) -> list[tuple[str, Path]]:
    """Render each prompt (seed validation.seed + i; for an image-to-video model from images[i])
    into folder/sample_{i}.mp4; [(prompt, path)]."""
    from radial_lora.data.demo_videos import write_mp4

    v = cfg.validation
    frames = v.frames or max(cfg.data.frames)
    height, width = v.size or cfg.data.sizes[0]
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, prompt in enumerate(prompts):
        video = generate_video(
            pipe,
            prompt,
            frames=frames,
            height=height,
            width=width,
            steps=v.steps,
            guidance=v.guidance,
            seed=v.seed + i,
            negative_prompt=v.negative_prompt,
            max_text_tokens=cfg.model.max_text_tokens,
            device=device,
            image=images[i] if images else None,
        )
        path = folder / f"sample_{i}.mp4"
        write_mp4(path, video, fps=cfg.data.fps or 16.0)
        written.append((prompt, path))
    return written


def validate_run(run, held: list[HeldOutClip]) -> dict:
    """One validation of `run` (train/loop.py's Run) at its current step: held-out losses on
    every process, sample videos on rank 0; returns the metrics logged (W&B videos included)."""
    cfg, accelerator, step = run.cfg, run.accelerator, run.state.step
    device = accelerator.device
    metrics: dict = {}
    run.transformer.eval()
    try:
        if held:
            start = time.perf_counter()
            metrics |= held_out_losses(
                run.transformer, held, list(cfg.validation.sigmas), cfg.train.seed, run.model_dtype, device
            )
            metrics["val/loss_time_s"] = time.perf_counter() - start
        prompts = sample_prompts(cfg, held)
        if prompts and run.main:
            start = time.perf_counter()
            run.pipe.set_progress_bar_config(disable=True)
            folder = run.run_dir / "samples" / f"step_{step:06d}"
            images = sample_images(run.pipe, held, len(prompts))
            written = render_samples(run.pipe, cfg, prompts, folder, device, images)
            metrics["val/samples_time_s"] = time.perf_counter() - start
            metrics |= wandb_videos(accelerator, written, cfg.data.fps or 16.0)
            run.say(f"validation: {len(written)} samples in {folder} ({metrics['val/samples_time_s']:.1f} s)")
        accelerator.wait_for_everyone()  # the others wait while rank 0 renders
    finally:
        run.transformer.train()
    if held:
        run.say(
            "validation: "
            + ", ".join(f"{k[4:]} {v:.4g}" for k, v in metrics.items() if k.startswith("val/loss_") and k.endswith("f"))
        )
    accelerator.log(metrics, step=step)
    return metrics


def wandb_videos(accelerator, written: list[tuple[str, Path]], fps: float) -> dict:
    """W&B videos of the written mp4s, if a W&B tracker is running (else nothing)."""
    if not any(getattr(t, "name", None) == "wandb" for t in accelerator.trackers):
        return {}
    import wandb

    return {
        f"samples/{i}": wandb.Video(str(path), caption=prompt, format="mp4") for i, (prompt, path) in enumerate(written)
    }
