"""Clips and captions, and the order they are read in.

`VideoCaptionDataset` maps a key (index, epoch) to one decoded clip and its caption; the window
inside a long video is drawn from a generator seeded by (seed, epoch, index), so it is the same
whichever DataLoader worker decodes it and whenever the run is resumed.

`ClipBatchSampler` yields an endless, deterministic stream of batches of keys: a permutation per
epoch from (seed, epoch), split into disjoint shards per rank, every rank getting the same number
of batches. It starts at any batch number, which is how a resumed run picks up the data order.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data.video import check_num_frames, decode_clip

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v")


def find_videos(root: str | Path) -> list[tuple[Path, str]]:
    """(video, caption) pairs under `root` (recursive): each video with a same-named .txt beside it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root={root} is not a folder")
    items = []
    for video in sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES):
        caption_file = video.with_suffix(".txt")
        if not caption_file.exists():
            raise FileNotFoundError(f"{video} has no caption file {caption_file.name} beside it")
        items.append((video, caption_file.read_text(encoding="utf-8").strip()))
    if not items:
        raise FileNotFoundError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) under data.root={root}")
    return items


class VideoCaptionDataset(torch.utils.data.Dataset):
    """A folder of videos with captions; `dataset[(index, epoch)]` decodes one training clip."""

    def __init__(
        self,
        root: str | Path,
        num_frames: int,
        height: int,
        width: int,
        frame_stride: int = 1,
        seed: int = 0,
        decode_threads: int = 1,
    ):
        check_num_frames(num_frames)
        self.items = find_videos(root)
        self.num_frames, self.height, self.width = num_frames, height, width
        self.frame_stride, self.seed, self.decode_threads = frame_stride, seed, decode_threads

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        video, caption = self.items[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        frames = decode_clip(
            str(video), self.num_frames, self.height, self.width, self.frame_stride, rng, self.decode_threads
        )
        return {"frames": frames, "caption": caption}


def collate(samples: list[dict]) -> dict:
    """Stack clips (uint8 [B, T, H, W, 3]) and list captions."""
    return {
        "frames": torch.stack([s["frames"] for s in samples]),
        "captions": [s["caption"] for s in samples],
    }


class ClipBatchSampler:
    """Endless batches of (index, epoch) keys for one rank, starting at batch `start`."""

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0):
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        # Whole batches per rank per epoch; the tail that would leave ranks unequal is dropped
        # (a different tail each epoch, since the permutation changes).
        self.batches_per_epoch = num_items // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{num_items} clips cannot fill one batch of {batch_size} on each of {world_size} processes"
            )

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of one epoch."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        per_rank = self.batches_per_epoch * self.batch_size
        mine = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return [
            [(int(i), epoch) for i in mine[b * self.batch_size : (b + 1) * self.batch_size]]
            for b in range(self.batches_per_epoch)
        ]

    def __iter__(self):
        epoch, offset = divmod(self.start, self.batches_per_epoch)
        while True:
            yield from self.epoch_batches(epoch)[offset:]
            epoch, offset = epoch + 1, 0
