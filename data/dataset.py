"""Clips in training order: the dataset, the bucketed batch sampler, the batch collation.

`ClipDataset` maps a key (index, epoch) to one decoded clip (or its cached latents) and its caption
(or cached text embedding). The window inside a long video is drawn from a generator seeded by
(seed, epoch, index), so it is the same whichever DataLoader worker decodes it and whenever the
run is resumed. A clip that fails to decode is replaced per the bad-input policy (data/policy.py).

`BucketBatchSampler` yields an endless, deterministic stream of batches of keys for one process:
per epoch, the clips (drawn per dataset by the mixing weights) are grouped by bucket, cut into
global batches of one bucket each, the batches shuffled, and each process takes its own slice of
every global batch: the same number of batches everywhere, no clip shared, and the same clips per
step whatever the number of processes. It starts at any batch number, which is how a resumed run picks up the data
order mid-epoch.
"""

from __future__ import annotations

import numpy as np
import torch

from radial_lora.data.catalog import Clip
from radial_lora.data.video import BadVideo, decode_clip

MAX_REPLACEMENTS = 16


class ClipDataset(torch.utils.data.Dataset):
    """`dataset[(index, epoch)]` -> {"frames" uint8 [T, H, W, 3] | "latent_params", "caption" | "text",
    "skipped": [(path, reason), ...]}."""

    def __init__(
        self,
        clips: list[Clip],
        *,
        fps: float | None,
        seed: int = 0,
        on_error: str = "skip",
        decode_threads: int = 1,
        random_window: bool = True,
        cache=None,
    ):
        self.clips, self.fps, self.seed, self.on_error = clips, fps, seed, on_error
        self.decode_threads, self.random_window, self.cache = decode_threads, random_window, cache
        members: dict = {}
        for i, clip in enumerate(clips):
            members.setdefault(clip.bucket, []).append(i)
        self._members = members
        self._position = {i: pos for ids in members.values() for pos, i in enumerate(ids)}

    def __len__(self) -> int:
        return len(self.clips)

    def load(self, index: int, epoch: int) -> dict:
        """One clip's tensors; raises BadVideo."""
        clip = self.clips[index]
        if self.cache is not None:
            return self.cache.load(clip)
        rng = np.random.default_rng([self.seed, epoch, index]) if self.random_window else None
        frames, height, width = clip.bucket
        pixels = decode_clip(
            clip.video, frames, height, width, self.fps, rng, self.decode_threads, source_size=clip.source_size
        )
        return {"frames": pixels, "caption": clip.caption}

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        bucket = self._members[self.clips[index].bucket]
        skipped = []
        for attempt in range(min(MAX_REPLACEMENTS, len(bucket))):
            # The next clips of the same bucket stand in for a broken one: the batch keeps its shape.
            candidate = bucket[(self._position[index] + attempt) % len(bucket)]
            try:
                sample = self.load(candidate, epoch)
            except BadVideo as bad:
                if self.on_error == "raise":
                    raise RuntimeError(f"{self.clips[candidate].video}: {bad} (data.on_error=raise)") from None
                skipped.append((self.clips[candidate].video, bad.reason))
                continue
            return {**sample, "skipped": skipped}
        raise RuntimeError(
            f"{len(skipped)} clips in a row failed to decode in bucket {self.clips[index].bucket}: {skipped[:3]}"
        )


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """torch.stack; in a DataLoader worker, straight into shared memory (as default_collate does),
    which saves a copy of every clip (hundreds of MB at wan_4x sizes) on its way to the trainer."""
    out = None
    if torch.utils.data.get_worker_info() is not None:
        numel = sum(t.numel() for t in tensors)
        storage = tensors[0].untyped_storage()._new_shared(numel * tensors[0].element_size(), device="cpu")
        out = tensors[0].new(storage).resize_(len(tensors), *tensors[0].shape)
    return torch.stack(tensors, out=out)


def collate(samples: list[dict]) -> dict:
    """Stack one bucket's samples; list captions and skipped inputs."""
    batch: dict = {"skipped": [s for sample in samples for s in sample["skipped"]]}
    for key in ("frames", "latent_params", "text", "condition", "image_embeds"):
        if key in samples[0]:
            batch[key] = _stack([s[key] for s in samples])
    if "caption" in samples[0]:
        batch["captions"] = [s["caption"] for s in samples]
    return batch


class BucketBatchSampler:
    """Endless batches of (index, epoch) keys for one process, starting at batch `start`."""

    def __init__(
        self,
        buckets: list,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        sources: list[int] | None = None,
        weights: list[float] | None = None,
    ):
        self.buckets, self.batch_size, self.seed = list(buckets), batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.sources = list(sources) if sources is not None else [0] * len(self.buckets)
        n_sources = max(self.sources, default=-1) + 1
        self.weights = list(weights) if weights is not None else [1.0] * n_sources
        if len(self.weights) != n_sources:
            raise ValueError(f"{len(self.weights)} mixing weights for {n_sources} datasets")
        if not self.epoch_batches(0):
            raise ValueError(
                f"no bucket holds enough clips for one batch of {batch_size} on each of {world_size} processes"
            )

    def _epoch_items(self, rng: np.random.Generator) -> np.ndarray:
        """Item indices of one epoch: every clip once, or per dataset by the mixing weights."""
        if len(self.weights) == 1:
            return rng.permutation(len(self.buckets))
        by_source = [np.flatnonzero(np.asarray(self.sources) == d) for d in range(len(self.weights))]
        total, wsum = len(self.buckets), sum(self.weights)
        picked = []
        for members, weight in zip(by_source, self.weights):
            want = int(round(total * weight / wsum))
            if len(members) == 0 or want == 0:
                continue
            rounds = -(-want // len(members))  # as many shuffled passes as the weight asks for
            picked.append(np.concatenate([rng.permutation(members) for _ in range(rounds)])[:want])
        return np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)

    def epoch_batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """This process's batches of one epoch.

        Global batches (batch_size x world_size clips of one bucket) are formed first, shuffled,
        and each process takes its slice of every one: the clips of step t are the same whatever
        the number of processes, and all processes work on one bucket (one shape) at a time.
        """
        rng = np.random.default_rng([self.seed, epoch])
        groups: dict = {}
        for i in self._epoch_items(rng):
            groups.setdefault(self.buckets[i], []).append(int(i))
        size = self.batch_size * self.world_size
        batches = []
        for bucket in sorted(groups):
            items = groups[bucket]
            batches += [items[b : b + size] for b in range(0, len(items) - size + 1, size)]
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        return [[(i, epoch) for i in batches[j][mine]] for j in rng.permutation(len(batches))]

    def __iter__(self):
        epoch, skip = 0, self.start
        while True:
            batches = self.epoch_batches(epoch)
            if skip >= len(batches):
                skip -= len(batches)
            else:
                yield from batches[skip:]
                skip = 0
            epoch += 1
