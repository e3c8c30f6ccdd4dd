"""Sampling the length-extension experiment's models: the flow ODE by Euler steps, from fixed noise
per clip, optionally continuing given first frames (a conditional rollout: their tokens held clean
at timestep 0, as the model was trained with train.condition_frames).

The pipeline's own sampler (WanPipeline) cannot hold frames clean; this one is the same
arithmetic (x <- x + (sigma_next - sigma) * v over shifted sigmas from 1 to 0) with that one
addition, under the transformer's generation rule (its first attention.dense_timesteps steps
dense, models.attention.generation_rules).
"""

from __future__ import annotations

import numpy as np
import torch

from radial_lora.models.attention import generation_rules
from radial_lora.train.step import token_timesteps


def euler_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """[steps + 1] noise levels from 1 to 0, time-shifted like Wan's sampler (shift 1: uniform)."""
    u = torch.linspace(1.0, 0.0, steps + 1)
    return shift * u / (1 + (shift - 1) * u)


def clip_noise(seed: int, clips: list[int], shape: tuple, device) -> torch.Tensor:
    """[B, *shape] starting noise, one generator per evaluation clip: every arm starts clip i from
    the same noise, whatever the batch it is in."""
    out = []
    for i in clips:
        g = torch.Generator("cpu").manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
        out.append(torch.randn(shape, generator=g))
    return torch.stack(out).to(device)


@torch.no_grad()
def sample(
    transformer,
    text: torch.Tensor,
    noise: torch.Tensor,
    *,
    given: torch.Tensor | None = None,
    steps: int = 25,
    shift: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Videos [B, 3, T, H, W] in [-1, 1] from `noise` [B, 3, T, H, W]; `text` [B, L, D]. With
    `given` [B, 3, K, H, W] the first K frames are held at it and their tokens get timestep 0."""
    x = noise.float().clone()
    B, _, T = x.shape[:3]
    K = 0 if given is None else given.shape[2]
    clean = (torch.arange(T, device=x.device) < K).expand(B, T)  # [B, T]
    sigmas = euler_sigmas(steps, shift).tolist()
    with generation_rules(transformer):
        for sigma, nxt in zip(sigmas[:-1], sigmas[1:]):
            timestep = torch.full((B,), sigma * 1000, device=x.device)
            if K:
                x[:, :, :K] = given.float()
                timestep = token_timesteps(timestep, clean, x.shape, transformer.config.patch_size)
            v = transformer(
                hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=text.to(dtype), return_dict=False
            )[0].float()
            x = x + (nxt - sigma) * v
    if K:
        x[:, :, :K] = given.float()
    return x.clamp(-1, 1)


def apply_riflex(transformer, train_frames: int, target_frames: int) -> int:
    """RIFLEx (Zhao et al. 2025), training-free length extension: the temporal RoPE component whose
    period is closest to the training length is slowed so that one period spans the target length
    (0.9 of it, the paper's margin), and nothing else changes. Edits the transformer's rotary
    tables in place; returns the component's index."""
    rope = transformer.rope
    head_dim = transformer.config.attention_head_dim
    h_dim = w_dim = 2 * (head_dim // 6)
    t_dim = head_dim - h_dim - w_dim
    theta = getattr(rope, "theta", 10000.0)
    omega = 1.0 / (theta ** (torch.arange(0, t_dim, 2, dtype=torch.float64)[: t_dim // 2] / t_dim))
    periods = 2 * torch.pi / omega
    k = int(torch.argmin((periods - train_frames).abs()))
    slowed = 2 * torch.pi / (target_frames / 0.9)
    positions = torch.arange(rope.freqs_cos.shape[0], dtype=torch.float64)
    for table, fn in ((rope.freqs_cos, torch.cos), (rope.freqs_sin, torch.sin)):
        column = fn(positions * slowed).to(table.dtype).to(table.device)
        table[:, 2 * k] = column
        table[:, 2 * k + 1] = column
    return k
