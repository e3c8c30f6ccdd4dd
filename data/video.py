"""Decoding clips with decord: a window of 4n+1 frames, resized and centre-cropped, kept uint8.

Frames stay uint8 [T, H, W, 3] (a quarter of fp32's bytes through the DataLoader's queues) until
the training step turns them into the VAE's [-1, 1] float input on the device.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def check_num_frames(num_frames: int) -> None:
    """Wan's VAE keeps the first frame and compresses the rest 4x in time: clips are 4n+1 frames."""
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"data.num_frames={num_frames} must be 4n+1 (e.g. 17, 33, 81)")


def clip_window(num_source_frames: int, num_frames: int, stride: int, rng: np.random.Generator | None) -> list[int]:
    """Source frame indices of one clip: `num_frames` frames `stride` apart.

    A random start (from `rng`) when the video is longer than the clip, the first frames when
    `rng` is None. Raises if the video is too short.
    """
    span = (num_frames - 1) * stride + 1
    if num_source_frames < span:
        raise ValueError(f"video has {num_source_frames} frames, the clip needs {span}")
    start = 0 if rng is None else int(rng.integers(0, num_source_frames - span + 1))
    return list(range(start, start + span, stride))


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, h, w, 3] -> uint8 [T, height, width, 3]: scale to cover the target, crop the centre."""
    t, h, w, _ = frames.shape
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        rh, rw = max(height, math.ceil(h * scale)), max(width, math.ceil(w * scale))
        x = frames.permute(0, 3, 1, 2).float()
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (rh - height) // 2, (rw - width) // 2
        x = x[:, :, top : top + height, left : left + width]
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return frames.contiguous()


def decode_clip(
    path: str,
    num_frames: int,
    height: int,
    width: int,
    stride: int = 1,
    rng: np.random.Generator | None = None,
    num_threads: int = 1,
) -> torch.Tensor:
    """Decode one clip of `path` with decord: uint8 [num_frames, height, width, 3]."""
    import decord

    reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    indices = clip_window(len(reader), num_frames, stride, rng)
    frames = torch.from_numpy(reader.get_batch(indices).asnumpy())
    return resize_center_crop(frames, height, width)


def to_vae_input(frames: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> [B, 3, T, H, W] in [-1, 1], the layout and range of Wan's VAE."""
    x = frames.to(device, non_blocking=True).permute(0, 4, 1, 2, 3)
    return (x.to(dtype) / 127.5 - 1.0).contiguous()
