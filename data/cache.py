"""The latent and text cache: VAE posteriors and prompt embeddings, encoded once.

Layout of a cache folder (written by `python -m scripts.precompute`):
  index.json                      {"meta": {...}, "entries": {video: {...}}, "failed": {video: reason}}
  shard_r{rank}_{n:04d}.safetensors  tensors "{key}.latent_params" [2C, T', H', W'] (the VAE
                                     posterior's mean and log-variance) and "{key}.text" [L, D]
                                     (the prompt embedding without its zero padding); for an
                                     image-to-video model also "{key}.condition" [C, T', H', W']
                                     (the latent of the first frame, then gray) and, for Wan2.1's,
                                     "{key}.image_embeds" [N, D] (the first frame's CLIP embedding)

`meta` records what the cache depends on (model, sampling parameters, text length, dtype); a
cache built for anything else is refused with a message saying what differs. Each entry records
the video's size and modification time, bucket and caption: a clip whose file or caption changed
since is refused too, rather than trained on stale latents. Storing the posterior (not a sample)
keeps the per-step sampling of the latent exactly as on-the-fly encoding does it.

A cached clip is always the window at the start of its video (the validation window): random
windows need the pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

from radial_lora.data.catalog import Clip

CACHE_VERSION = 1
INDEX = "index.json"


def cache_meta(
    model_id: str, model_path: str | None, fps, frames, sizes, too_short: str, max_text_tokens: int, dtype: str
) -> dict:
    """What a cache's contents depend on; two caches with equal meta are interchangeable."""
    return {
        "version": CACHE_VERSION,
        "model": model_id,
        "model_path": str(Path(model_path).resolve()) if model_path else None,
        "fps": fps,
        "frames": sorted(frames, reverse=True),
        "sizes": [list(s) for s in sizes],
        "too_short": too_short,
        "window": "start",
        "max_text_tokens": max_text_tokens,
        "dtype": dtype,
    }


def entry_key(clip: Clip) -> dict:
    """The fields of a clip a cache entry must match."""
    return {"size": clip.size, "mtime_ns": clip.mtime_ns, "bucket": list(clip.bucket), "caption": clip.caption}


class LatentCache:
    """Read side of a cache folder, checked against the run's meta."""

    def __init__(self, root: str | Path, expected_meta: dict):
        self.root = Path(root)
        index_file = self.root / INDEX
        if not index_file.exists():
            raise FileNotFoundError(f"data.cache={root} has no {INDEX}: build it with `python -m scripts.precompute`")
        index = json.loads(index_file.read_text())
        differs = {k: (index["meta"].get(k), v) for k, v in expected_meta.items() if index["meta"].get(k) != v}
        if differs:
            what = "; ".join(f"{k}: cache has {a!r}, run wants {b!r}" for k, (a, b) in differs.items())
            raise ValueError(
                f"data.cache={root} was built for other settings ({what}); rebuild it with "
                "`python -m scripts.precompute` or point data.cache elsewhere"
            )
        self.meta, self.entries, self.failed = index["meta"], index["entries"], index.get("failed", {})
        self.text_tokens = expected_meta["max_text_tokens"]
        self._files: dict[str, object] = {}

    def usable(self, clips: list[Clip]) -> tuple[list[Clip], dict[str, str]]:
        """(clips to train on, {video: reason} of clips that failed to encode when the cache was built).

        Raises ValueError if any clip is missing from the cache or changed since it was built.
        """
        kept, failed, stale = [], {}, []
        for clip in clips:
            if clip.video in self.failed:
                failed[clip.video] = self.failed[clip.video]
            elif clip.video not in self.entries or any(
                self.entries[clip.video][k] != v for k, v in entry_key(clip).items()
            ):
                stale.append(clip.video)
            else:
                kept.append(clip)
        if stale:
            raise ValueError(
                f"{len(stale)} clips are not in data.cache={self.root} or changed since it was built "
                f"(e.g. {stale[0]}); run `python -m scripts.precompute` again"
            )
        return kept, failed

    def load(self, clip: Clip) -> dict:
        """{"latent_params": [2C, T', H', W'], "text": [max_text_tokens, D]} of one clip, and its
        "condition" / "image_embeds" where the cache holds them (an image-to-video model)."""
        from safetensors import safe_open

        entry = self.entries[clip.video]
        shard = entry["shard"]
        if shard not in self._files:  # kept open per process (DataLoader workers each get their own)
            self._files[shard] = safe_open(str(self.root / shard), "pt")
        f = self._files[shard]
        text = f.get_tensor(f"{entry['key']}.text")
        padded = text.new_zeros(self.text_tokens, text.shape[1])
        padded[: text.shape[0]] = text
        sample = {"latent_params": f.get_tensor(f"{entry['key']}.latent_params"), "text": padded}
        for name in entry.get("image", ()):  # an image-to-video model's first-frame inputs
            sample[name] = f.get_tensor(f"{entry['key']}.{name}")
        return sample

    def __getstate__(self):  # open file handles don't cross into worker processes
        state = dict(self.__dict__)
        state["_files"] = {}
        return state
