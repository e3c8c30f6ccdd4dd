"""`python -m data.inspect PATH_OR_METADATA [--json]`: which clips are usable, and why not the rest.

PATH_OR_METADATA is a folder of videos with .txt captions, a metadata.csv or a metadata.jsonl.
Every entry goes through the same checks as training (data/policy.py); the report lists usable
clips per bucket and rejects by reason. Exit status 0, or 1 when nothing is usable.
"""

from __future__ import annotations

import argparse
import json
import sys

from radial_lora.data.catalog import build_catalog
from radial_lora.data.policy import REASONS


def parse_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="folder of videos + .txt captions, metadata.csv or metadata.jsonl")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a report")
    parser.add_argument("--fps", type=float, default=16.0, help="target frame rate (default 16, Wan's); 0: native")
    parser.add_argument("--frames", type=int, nargs="+", default=[81], help="clip lengths, 4n+1 (default 81)")
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(480, 832)], help="HxW buckets (480x832)")
    parser.add_argument("--too-short", choices=["shorter", "skip"], default="shorter")
    args = parser.parse_args(argv)
    try:
        catalog = build_catalog([args.path], fps=args.fps or None, frames=args.frames, sizes=args.sizes,
                                too_short=args.too_short)  # fmt: skip
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    usable = len(catalog.clips)
    if args.json:
        print(json.dumps({"usable": usable, "rejected": dict(catalog.counts), "files": catalog.rejected}, indent=1))
    else:
        print(f"{usable} usable clips in {args.path}")
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
