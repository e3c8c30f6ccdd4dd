"""The demo dataset: small synthetic H.264 clips of moving coloured patterns, a caption beside each.

Generated once (deterministically from a seed) so the demo and the tests have real mp4 files to
decode with decord, with no download. Each clip's caption names what moves, its colour and its
direction, so a model could in principle learn the mapping.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "cyan": (40, 220, 220),
    "magenta": (220, 40, 200),
    "white": (245, 245, 245),
    "orange": (250, 150, 30),
}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (110, 110, 110), "purple": (60, 20, 80)}
SHAPES = ("square", "circle", "stripes", "checkerboard")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "diagonally": (1, 1)}


def render_clip(shape: str, colour, background, direction, num_frames: int, size: int, speed: float):
    """Frames [T, H, W, 3] uint8 of `shape` moving in `direction` by `speed` pixels per frame."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = direction
    frames = np.empty((num_frames, size, size, 3), np.uint8)
    for t in range(num_frames):
        # Positions wrap around the frame, so motion never stops at an edge.
        cx = (size / 2 + dx * speed * t) % size
        cy = (size / 2 + dy * speed * t) % size
        ox, oy = (xx - cx + size / 2) % size - size / 2, (yy - cy + size / 2) % size - size / 2
        if shape == "square":
            mask = (np.abs(ox) < size / 6) & (np.abs(oy) < size / 6)
        elif shape == "circle":
            mask = ox**2 + oy**2 < (size / 5) ** 2
        elif shape == "stripes":
            mask = ((xx - dx * speed * t + yy - dy * speed * t) // (size / 8)) % 2 == 0
        else:  # checkerboard
            mask = (((xx - dx * speed * t) // (size / 4)) + ((yy - dy * speed * t) // (size / 4))) % 2 == 0
        frames[t] = np.where(mask[..., None], np.array(colour, np.uint8), np.array(background, np.uint8))
    return frames


def write_mp4(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    codec: str = "libx264",
    timestamps: list[float] | None = None,
) -> None:
    """Encode uint8 frames [T, H, W, 3] into a video file with PyAV (yuv420p, widely decodable).

    The container follows the file name (.mp4, .webm, .mkv, ...). `timestamps` (seconds, one per
    frame) make a variable-frame-rate file; otherwise frames are 1/fps apart.
    """
    from fractions import Fraction

    import av

    with av.open(str(path), "w") as container:
        # Variable frame rate: millisecond time stamps (a 1/fps time base would round them).
        stream = container.add_stream(codec, rate=1000 if timestamps is not None else int(round(fps)))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if timestamps is not None:
            stream.time_base = Fraction(1, 1000)
        for i, frame in enumerate(frames):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            if timestamps is not None:
                video_frame.pts, video_frame.time_base = int(round(timestamps[i] * 1000)), Fraction(1, 1000)
            for packet in stream.encode(video_frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


MARKER = ".radial_lora_demo"
"""Written into every folder the generator made: the only folders it will ever reuse."""
_DEMO_FILE = re.compile(r"^clip_\d{3}\.(mp4|txt)$")


def _made_before_the_marker(root: Path) -> bool:
    """A demo folder written by a version without MARKER: nothing in it but clip_NNN.mp4/.txt."""
    names = [p.name for p in root.iterdir()] if root.is_dir() else []
    return any(n.endswith(".mp4") for n in names) and all(_DEMO_FILE.match(n) for n in names)


def generate_demo_videos(
    root: str | os.PathLike,
    num_clips: int = 24,
    size: int = 64,
    min_frames: int = 33,
    max_frames: int = 65,
    fps: float = 16.0,
    seed: int = 0,
) -> Path:
    """Write `num_clips` mp4 clips with `.txt` captions into a new folder `root`, once.

    A folder this generator made before (it holds MARKER) is reused as it is. Any other folder that
    exists and is not empty is refused, never written into, moved or deleted: it may hold someone's
    videos. The clips are written into a temporary sibling folder and renamed into place, so an
    interrupted generation never leaves a half dataset behind.
    """
    root = Path(root)
    if (root / MARKER).is_file() or _made_before_the_marker(root):
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(
            f"{root} exists and was not made by the demo generator: it is left untouched; "
            "generate the demo clips into a new folder"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    rng = np.random.default_rng(seed)
    colours, backgrounds, directions = list(COLOURS), list(BACKGROUNDS), list(DIRECTIONS)
    try:
        for i in range(num_clips):
            shape = SHAPES[i % len(SHAPES)]
            colour = colours[rng.integers(len(colours))]
            background = backgrounds[rng.integers(len(backgrounds))]
            direction = directions[rng.integers(len(directions))]
            num_frames = int(rng.integers(min_frames, max_frames + 1))
            speed = float(rng.uniform(0.5, 2.0))
            frames = render_clip(
                shape, COLOURS[colour], BACKGROUNDS[background], DIRECTIONS[direction], num_frames, size, speed
            )
            name = f"clip_{i:03d}"
            write_mp4(tmp / f"{name}.mp4", frames, fps)
            pace = "slowly" if speed < 1.0 else "quickly"
            caption = f"a {colour} {shape} moving {pace} {direction} on a {background} background"
            (tmp / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
        (tmp / MARKER).write_text(
            f"clips={num_clips} size={size} frames={min_frames}-{max_frames} fps={fps} seed={seed}\n"
        )
        try:
            tmp.rename(root)  # onto a missing or empty folder only: rename never replaces a non-empty one
        except OSError:
            if not (root / MARKER).is_file():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder (empty after the rename)
    return root
