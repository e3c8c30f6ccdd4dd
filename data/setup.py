"""From a run's config to its data: the catalog, the cache, the dataset and the batch sampler.

Shared by training (train/loop.py), `python -m scripts.precompute` and the tests, so they agree on
which clips exist and how they are cut.
"""

from __future__ import annotations

from pathlib import Path

from radial_lora.configs.schema import Config, ConfigError, DataConfig
from radial_lora.data.cache import LatentCache, cache_meta
from radial_lora.data.catalog import Catalog, build_catalog
from radial_lora.data.demo_videos import generate_demo_videos
from radial_lora.data.sources import describe_folder


def catalog_for(cfg: DataConfig, seed: int = 0) -> Catalog:
    """Every usable clip of the configured datasets (the demo's are generated first if asked)."""
    if cfg.demo:
        generate_demo_videos(cfg.root, seed=seed)
    try:
        return build_catalog(
            [s.path for s in cfg.sources()],
            fps=cfg.fps,
            frames=list(cfg.frames),
            sizes=[tuple(s) for s in cfg.sizes],
            too_short=cfg.too_short.value,
        )
    except ValueError as err:  # a world source with sizes it cannot render
        raise ConfigError(f"data: {err}") from None


def meta_for(cfg: Config) -> dict:
    """The cache meta this run needs."""
    d = cfg.data
    return cache_meta(
        cfg.model.id,
        cfg.model.path,
        d.fps,
        list(d.frames),
        [list(s) for s in d.sizes],
        d.too_short.value,
        cfg.model.max_text_tokens,
        d.cache_dtype.value,
    )


def usable_clips(cfg: Config, catalog: Catalog):
    """(clips, cache or None): the catalog's clips, restricted to what the cache holds if one is set.

    Clips that failed to encode when the cache was built are counted as rejects of the catalog.
    Raises ConfigError if nothing is left.
    """
    clips, cache = catalog.clips, None
    if cfg.data.cache:
        try:
            cache = LatentCache(cfg.data.cache, meta_for(cfg))
            clips, failed = cache.usable(catalog.clips)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        for video, reason in failed.items():
            catalog.rejected[video] = reason
            catalog.counts.add(reason)
    if not clips:
        sources = ", ".join(s.path for s in cfg.data.sources())
        if not catalog.rejected:  # not one video was found: say what is there instead
            found = "; ".join(
                f"{s.path}: {describe_folder(s.path)}" for s in cfg.data.sources() if not Path(s.path).is_file()
            )
            raise ConfigError(f"no videos in {sources}" + (f" ({found})" if found else ""))
        raise ConfigError(
            f"no usable clips in {sources} (rejected: {catalog.counts.summary()}); "
            f"`python -m scripts.inspect_data PATH` lists each file's problem"
        )
    return clips, cache


def split_held_out(clips: list, per_length: int, seed: int) -> tuple[list, list]:
    """(training clips, held-out clips): `per_length` clips of each clip length set apart, chosen
    by `seed` from the clips sorted by video path (the same choice on every process and at every
    resume), leaving at least one clip of each length for training."""
    import numpy as np

    if per_length == 0:
        return list(clips), []
    by_length: dict[int, list] = {}
    for clip in sorted(clips, key=lambda c: (c.video, c.bucket)):
        by_length.setdefault(clip.bucket[0], []).append(clip)
    held = []
    for frames, group in sorted(by_length.items()):
        rng = np.random.default_rng([seed, frames])
        n = min(per_length, len(group) - 1)
        held += [group[i] for i in sorted(rng.choice(len(group), size=n, replace=False))]
    chosen = {id(c) for c in held}
    return [c for c in clips if id(c) not in chosen], held
