"""The catalog: every usable clip of the configured datasets, with its bucket; the rest rejected.

Built the same way (deterministically) on every process before training, and by
`python -m scripts.inspect_data`. A bucket is (frames, height, width): the size is the configured one
closest in aspect ratio to the video; the frame count is the longest configured one the video
is long enough for at the target fps (`too_short=shorter`), or only the longest
(`too_short=skip`). Videos too short for every allowed length are rejected as `too_short`.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from radial_lora.data.policy import LISTING_PROBLEMS, RejectCounts
from radial_lora.data.sources import Entry, read_source
from radial_lora.data.sprite_world import is_world, world_clip_names
from radial_lora.data.video import BadVideo, VideoInfo, fits, probe

Bucket = tuple[int, int, int]  # (frames, height, width)


@dataclass(frozen=True)
class Clip:
    """A usable video: where it is, its caption and bucket, and what identifies its content."""

    video: str
    caption: str
    bucket: Bucket
    source: int
    """Index of the dataset it came from (for mixing weights)."""
    size: int
    mtime_ns: int
    source_size: tuple[int, int] = (0, 0)
    """The video's own (height, width)."""


@dataclass
class Catalog:
    clips: list[Clip]
    rejected: dict[str, str] = field(default_factory=dict)
    """path (or metadata line) -> reason."""
    counts: RejectCounts = field(default_factory=RejectCounts)

    def bucket_counts(self) -> dict[Bucket, int]:
        out: dict[Bucket, int] = {}
        for c in self.clips:
            out[c.bucket] = out.get(c.bucket, 0) + 1
        return dict(sorted(out.items(), reverse=True))


def choose_size(width: int, height: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The (height, width) of `sizes` closest to the video's aspect ratio (first on ties)."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def choose_frames(info: VideoInfo, fps: float | None, frames: list[int], too_short: str) -> int | None:
    """The clip length for this video, or None if it is too short for every allowed length."""
    allowed = sorted(frames, reverse=True)
    if too_short == "skip":
        allowed = allowed[:1]
    return next((f for f in allowed if fits(f, fps, info)), None)


def _check(entry: Entry, fps, frames, sizes, too_short, decode_check) -> tuple | str:
    """(bucket, size, mtime, source size) of a usable entry, or the reason it is rejected."""
    if entry.problem in LISTING_PROBLEMS:
        return entry.problem
    try:
        info = probe(entry.video, decode_check=decode_check)
    except BadVideo as bad:
        return bad.reason
    if entry.problem:  # caption problems count once the video itself is known to be fine
        return entry.problem
    num_frames = choose_frames(info, fps, frames, too_short)
    if num_frames is None:
        return "too_short"
    stat = os.stat(entry.video)
    bucket = (num_frames, *choose_size(info.width, info.height, sizes))
    return bucket, stat.st_size, stat.st_mtime_ns, (info.height, info.width)


def build_catalog(
    sources: list[str],
    *,
    fps: float | None,
    frames: list[int],
    sizes: list[tuple[int, int]],
    too_short: str = "shorter",
    decode_check: bool = True,
    threads: int | None = None,
) -> Catalog:
    """Read every source, probe every video (in threads), and sort entries into clips and rejects.
    A `world:` source (data/sprite_world.py) adds its rendered clips, nothing to probe."""
    worlds = [
        Clip(name, "", bucket, i, 0, 0, bucket[1:])
        for i, src in enumerate(sources)
        if is_world(src)
        for name, bucket in world_clip_names(src, frames, sizes)
    ]
    listed = [(i, e) for i, src in enumerate(sources) if not is_world(src) for e in read_source(src)]
    sizes = [tuple(s) for s in sizes]
    threads = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(lambda ie: _check(ie[1], fps, frames, sizes, too_short, decode_check), listed))
    catalog = Catalog(clips=worlds)
    for (source, entry), result in zip(listed, results):
        if isinstance(result, str):
            catalog.rejected[entry.video] = result
            catalog.counts.add(result)
        else:
            bucket, size, mtime, source_size = result
            catalog.clips.append(Clip(entry.video, entry.caption, bucket, source, size, mtime, source_size))
    return catalog
