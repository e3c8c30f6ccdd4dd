"""Probing and decoding videos with decord.

A clip is `num_frames` frames at a target frame rate, picked by *timestamps* (the frame shown at
each target time), so variable-frame-rate files and any source rate come out right; a longer
video gives a window whose start is random (training) or fixed at the beginning (validation).
Frames are resized to cover the target size and centre-cropped, and stay uint8 [T, H, W, 3]
(a quarter of fp32's bytes through the DataLoader's queues) until the training step turns them
into the VAE's [-1, 1] float input on the device.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from radial_lora.data.sprite_world import is_world


class BadVideo(Exception):
    """A video that cannot be used; `reason` is one of data/policy.py's reasons."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class VideoInfo:
    """What probing a video tells: enough to choose its bucket."""

    num_frames: int
    width: int
    height: int
    span: float
    """Seconds from the first frame's timestamp to the last frame's."""
    fps: float
    """Average frame rate (num_frames - 1) / span, or the container's rate for a one-frame video."""


def _open(path: str, num_threads: int = 1, **kwargs):
    import decord

    if not os.path.exists(path):
        raise BadVideo("missing_file", path)
    if os.path.getsize(path) == 0:
        raise BadVideo("empty_file", path)
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads, **kwargs)
    except Exception as err:  # decord raises its own DECORDError, RuntimeError, ...
        raise _rejected("unreadable", path, err) from None
    if len(reader) == 0:
        raise BadVideo("unreadable", f"{path}: no frames")
    return reader


def _rejected(reason: str, path: str, err: Exception) -> BadVideo:
    """`reason` for `path`, with the first line of decord's error."""
    return BadVideo(reason, f"{path}: {str(err).splitlines()[0] if str(err) else type(err).__name__}")


def frame_starts(reader) -> np.ndarray:
    """Start timestamp (seconds) of every frame."""
    return np.asarray(reader.get_frame_timestamp(np.arange(len(reader))), dtype=np.float64).reshape(-1, 2)[:, 0]


def probe(path: str, decode_check: bool = True) -> VideoInfo:
    """Open `path` and read its frame count, size and timing; with `decode_check`, also decode its
    first and last frame (a truncated file usually opens but fails there). Raises BadVideo."""
    reader = _open(path)
    n = len(reader)
    try:
        first = reader[0].shape
        if decode_check and n > 1:
            reader[n - 1].asnumpy()
    except BadVideo:
        raise
    except Exception as err:
        raise _rejected("truncated", path, err) from None
    starts = frame_starts(reader)
    span = float(starts[-1] - starts[0]) if n > 1 else 0.0
    fps = (n - 1) / span if span > 0 else float(reader.get_avg_fps() or 0.0)
    return VideoInfo(num_frames=n, width=int(first[1]), height=int(first[0]), span=span, fps=fps)


def clip_span(num_frames: int, fps: float | None, info: VideoInfo) -> float:
    """Seconds of source a clip of `num_frames` covers (fps None: the source's own frames)."""
    rate = fps if fps else info.fps
    return (num_frames - 1) / rate if rate > 0 else math.inf


def fits(num_frames: int, fps: float | None, info: VideoInfo) -> bool:
    """Whether the video is long enough for a clip of `num_frames` at `fps`."""
    if fps is None:
        return info.num_frames >= num_frames
    # Half a source frame of slack: timestamps are rounded by the container.
    half_frame = 0.5 / info.fps if info.fps > 0 else 0.0
    return clip_span(num_frames, fps, info) <= info.span + half_frame


def clip_indices(starts: np.ndarray, num_frames: int, fps: float | None, rng: np.random.Generator | None) -> np.ndarray:
    """Source frame indices of one clip (rng None: the window at the start of the video).

    With a target `fps`, frame k is the one on screen at time t0 + k / fps (the last frame whose
    start is <= that time); without, `num_frames` consecutive source frames.
    """
    n = len(starts)
    if fps is None:
        if n < num_frames:
            raise BadVideo("too_short", f"{n} frames, the clip needs {num_frames}")
        first = 0 if rng is None else int(rng.integers(0, n - num_frames + 1))
        return np.arange(first, first + num_frames)
    span = (num_frames - 1) / fps
    slack = (starts[-1] - starts[0]) - span
    half_frame = 0.5 * (starts[-1] - starts[0]) / max(n - 1, 1)
    if slack < -half_frame:
        raise BadVideo("too_short", f"{starts[-1] - starts[0]:.2f}s of video, the clip needs {span:.2f}s")
    t0 = starts[0] + (0.0 if rng is None or slack <= 0 else float(rng.uniform(0.0, slack)))
    times = t0 + np.arange(num_frames) / fps
    # Containers round time stamps (WebM/MKV to milliseconds): a frame starting up to 2 ms (and
    # under a quarter of a typical frame gap) after a target time counts as on screen at it.
    tolerance = min(0.002, 0.25 * float(np.median(np.diff(starts)))) if n > 1 else 0.0
    idx = np.searchsorted(starts, times + tolerance, side="right") - 1
    return np.clip(idx, 0, n - 1)


def resize_center_crop(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 [T, h, w, 3] -> uint8 [T, height, width, 3]: scale to cover the target, crop the centre.

    Frames that already have the covering size (decord scaled them) are only cropped.
    """
    _, h, w, _ = frames.shape
    rh, rw = cover_size(h, w, height, width)
    if (rh, rw) != (h, w):
        x = F.interpolate(
            frames.permute(0, 3, 1, 2).float(), size=(rh, rw), mode="bilinear", antialias=True, align_corners=False
        )
        frames = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    top, left = (rh - height) // 2, (rw - width) // 2
    return frames[:, top : top + height, left : left + width].contiguous()


def cover_size(src_height: int, src_width: int, height: int, width: int) -> tuple[int, int]:
    """The smallest (h, w) with the source's aspect ratio that covers (height, width)."""
    scale = max(height / src_height, width / src_width)
    return max(height, math.ceil(src_height * scale)), max(width, math.ceil(src_width * scale))


def decode_clip(
    path: str,
    num_frames: int,
    height: int,
    width: int,
    fps: float | None = None,
    rng: np.random.Generator | None = None,
    num_threads: int = 1,
    source_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Decode one clip of `path`: uint8 [num_frames, height, width, 3]. Raises BadVideo.

    With the source's (height, width) known, decord scales frames while decoding (FFmpeg's
    scaler, in uint8) to the size that covers the target, and only the crop is left: much
    cheaper than resizing full-size frames afterwards (measured: docs/benchmarks/data.md).
    """
    if is_world(path):  # a procedural clip: rendered, not decoded
        from radial_lora.data.sprite_world import render_world_clip

        return render_world_clip(path, num_frames, rng)
    scaled = {}
    if source_size is not None and min(source_size) > 0 and tuple(source_size) != (height, width):
        rh, rw = cover_size(*source_size, height, width)
        if (tuple(source_size), rh, rw) not in _UNSCALABLE:
            scaled = {"height": rh, "width": rw}
    reader = _open(path, num_threads=num_threads, **scaled)
    indices = clip_indices(frame_starts(reader), num_frames, fps, rng)
    # Decode each distinct frame once (a low-fps source repeats frames at a higher target fps).
    unique, inverse = np.unique(indices, return_inverse=True)
    try:
        frames = reader.get_batch(unique.tolist()).asnumpy()
    except Exception as err:
        if not (scaled and "DECORDArrayCopyFromTo" in str(err)):
            raise _rejected("truncated", path, err) from None
        # decord 0.6's scaler returns rows padded past the width for some sizes (a 64x64 source
        # to width 48, 16, 24 or 72, for one) and then fails its own copy: the file is fine.
        # Decode the same frames at the source size and resize here, for this size from now on.
        _UNSCALABLE.add((tuple(source_size), scaled["height"], scaled["width"]))
        try:
            frames = _open(path, num_threads=num_threads).get_batch(unique.tolist()).asnumpy()
        except Exception as err:
            raise _rejected("truncated", path, err) from None
    return resize_center_crop(torch.from_numpy(frames)[torch.from_numpy(inverse)], height, width)


# (source size, scaled height, scaled width) that decord's scaler cannot produce (decode_clip).
_UNSCALABLE: set[tuple[tuple[int, int], int, int]] = set()


def to_vae_input(frames: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> [B, 3, T, H, W] in [-1, 1], the layout and range of Wan's VAE."""
    x = frames.to(device, non_blocking=True).permute(0, 4, 1, 2, 3)
    return (x.to(dtype) / 127.5 - 1.0).contiguous()
