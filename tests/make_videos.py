"""Writes the data tests' corpus: real files of several codecs and shapes, and broken ones.

Run in its own process (`python tests/make_videos.py DIR`): decord bundles its own FFmpeg
libraries, and once it is loaded, PyAV's VP9 encoder can fail to open in the same process.

Every good clip's frames carry their own index in their brightness (frame i has value 8*i mod
256 in its top-left quarter), so a test can tell which source frames a decoded clip holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from radial_lora.data.demo_videos import write_mp4


def numbered_frames(count: int, height: int, width: int) -> np.ndarray:
    frames = np.zeros((count, height, width, 3), np.uint8)
    for i in range(count):
        frames[i, : height // 2, : width // 2] = (8 * i) % 256
        frames[i, height // 2 :, width // 2 :] = 200  # something for the codec to encode elsewhere
    return frames


def make(root: Path) -> dict:
    """Write the corpus; returns {name: what the tests expect of it}."""
    root.mkdir(parents=True, exist_ok=True)
    expect = {}

    def good(name, count, height, width, fps=16.0, codec="libx264", timestamps=None, caption="a test clip"):
        try:
            write_mp4(root / name, numbered_frames(count, height, width), fps, codec=codec, timestamps=timestamps)
        except Exception as err:  # an encoder this PyAV build lacks
            (root / name).unlink(missing_ok=True)
            expect[name] = {"skipped_encoder": str(err)}
            return
        if caption is not None:
            (root / name).with_suffix(".txt").write_text(caption)
        expect[name] = {"frames": count, "height": height, "width": width}

    good("h264.mp4", 40, 64, 96)
    good("mpeg4.mp4", 40, 64, 96, codec="mpeg4")
    good("vp9.webm", 40, 64, 96, codec="libvpx-vp9")
    good("portrait.mp4", 40, 112, 64)
    good("odd_size.mp4", 40, 50, 78)
    good("fps30.mp4", 75, 48, 64, fps=30.0)  # 2.5 s at 30 fps
    good("long.mp4", 400, 32, 48)
    good("short.mp4", 5, 64, 96)
    # Variable frame rate: 50 ms gaps with a 150 ms gap every third frame.
    vfr = np.cumsum([0.0] + [0.15 if i % 3 == 2 else 0.05 for i in range(49)]).tolist()
    good("vfr.mp4", 50, 64, 96, timestamps=vfr)
    expect["vfr.mp4"]["timestamps"] = vfr
    good("no_caption.mp4", 40, 64, 96, caption=None)
    good("empty_caption.mp4", 40, 64, 96, caption="   \n")
    good("latin1_caption.mp4", 40, 64, 96, caption=None)
    (root / "latin1_caption.txt").write_bytes("une vidéo".encode("latin-1"))

    (root / "zero.mp4").write_bytes(b"")
    (root / "zero.txt").write_text("zero bytes")
    (root / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    (root / "garbage.txt").write_text("random bytes")
    whole = (root / "h264.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])
    (root / "truncated.txt").write_text("the first half of a file")
    (root / "expect.json").write_text(json.dumps(expect, indent=1))
    return expect


if __name__ == "__main__":
    make(Path(sys.argv[1]))
