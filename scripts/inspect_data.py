"""`python -m scripts.inspect_data [PATH] [OVERRIDES ...] [--run RUN] [--json]`: which clips are usable, and why not the rest.

PATH is a folder of videos with .txt captions, a metadata.csv or a metadata.jsonl. The clips are
checked with the data settings training will use: those of the Hydra overrides given (as for
`python -m train`, e.g. `+experiment=wan_4x`; the videos data group by default), or of a run
folder's saved config (`--run outputs/NAME`); --fps, --frames, --sizes and --too-short override
them. Without PATH the dataset of those settings (data.root / metadata / mix) is checked. Every
entry goes through the same checks as training (data/policy.py); the report lists usable clips per
bucket and rejects by reason. Exit status 0, or 1 when nothing is usable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from radial_lora.data.catalog import build_catalog
from radial_lora.data.policy import REASONS


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width)


def data_settings(overrides: list[str], run: Path | None):
    """The DataConfig training would use: a run's saved one, or the composed config's."""
    from omegaconf import OmegaConf

    from radial_lora.configs.schema import CONFIG_DIR, DataConfig, register_configs, typed_config

    if run is not None:
        saved = Path(run, "config.yaml")  # the run's config as first started (train/run_config.py)
        if not saved.is_file():
            raise FileNotFoundError(f"--run {run}: no config.yaml (not a training run's folder)")
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(saved).data))
    from hydra import compose, initialize_config_dir

    register_configs()
    if not any(o.lstrip("+").startswith("data=") for o in overrides):
        overrides = ["data=videos", *overrides]  # your videos' settings, not the demo's
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return typed_config(compose("train", overrides=overrides)).data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "args",
        nargs="*",
        metavar="PATH | OVERRIDE",
        help="the dataset (folder, metadata.csv or .jsonl) and/or Hydra overrides (key=value)",
    )
    parser.add_argument("--run", type=Path, help="a training run's folder: check with its saved data settings")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    parser.add_argument("--fps", type=float, help="target frame rate; 0: native (default: the config's)")
    parser.add_argument("--frames", type=int, nargs="+", help="clip lengths, 4n+1 (default: the config's)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", help="HxW buckets, e.g. 480x832 (default: the config's)")
    parser.add_argument("--too-short", choices=["shorter", "skip"])
    args = parser.parse_args(argv)
    overrides = [a for a in args.args if "=" in a]
    paths = [a for a in args.args if "=" not in a]
    if len(paths) > 1:
        parser.error(f"one dataset at a time, got {paths}")
    try:
        data = data_settings(overrides, args.run)
        sources = paths or [s.path for s in data.sources()]
        if not sources:
            parser.error("name a dataset: PATH, data.root=..., or --run RUN")
        fps = data.fps if args.fps is None else (args.fps or None)
        frames = args.frames or list(data.frames)
        sizes = args.sizes or [tuple(s) for s in data.sizes]
        too_short = args.too_short or data.too_short.value
        catalog = build_catalog(sources, fps=fps, frames=frames, sizes=sizes, too_short=too_short)
    except (FileNotFoundError, ValueError) as err:  # ConfigError is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 1
    usable = len(catalog.clips)
    settings = {"fps": fps, "frames": frames, "sizes": [list(s) for s in sizes], "too_short": too_short}
    if args.json:
        print(
            json.dumps(
                {"usable": usable, "settings": settings, "rejected": dict(catalog.counts), "files": catalog.rejected},
                indent=1,
            )
        )
    else:
        shown = " ".join(f"{h}x{w}" for h, w in sizes)
        print(
            f"{usable} usable clips in {', '.join(sources)} (fps {fps or 'native'}, frames {frames}, sizes {shown}, "
            f"too_short {too_short})"
        )
        for (f, h, w), n in catalog.bucket_counts().items():
            print(f"  {n:6d}  {f} frames at {h}x{w}")
        print(f"rejected: {catalog.counts.summary()}")
        for reason, n in catalog.counts.most_common():
            print(f"  {n:6d}  {reason}: {REASONS[reason]}")
        for path, reason in sorted(catalog.rejected.items()):
            print(f"  {reason:18s} {path}")
    return 0 if usable else 1


if __name__ == "__main__":
    sys.exit(main())
