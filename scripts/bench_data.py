"""Data loading benchmark: decoding wan_4x clips (321 frames at 480x832, 16 fps) on this machine's CPU.

    python scripts/bench_data.py                       # writes docs/benchmarks/records/data_<N>-cores_<date>.{md,json}
    python scripts/bench_data.py --workers 0 1 2 --clips 8

Sources are generated H.264 files (moving patterns, x264 'veryfast'): 480x832 at 16 fps (already
the training size and rate) and 720x1280 at 30 fps (decoded, resampled to 16 fps by timestamps,
resized and cropped). Each is timed through the training path: ClipDataset + DataLoader workers,
batch 1, random windows. The cache path is timed the same way on a synthetic cache holding
wan_4x-sized entries (bf16 posterior 32x81x60x104 and a 512x4096 text embedding).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from radial_lora.data.cache import LatentCache
from radial_lora.data.catalog import build_catalog
from radial_lora.data.dataset import BucketBatchSampler, ClipDataset, collate
from radial_lora.data.demo_videos import render_clip, write_mp4
from radial_lora.scripts.report import RECORDS, record_stem, write_report

FRAMES, HEIGHT, WIDTH, FPS = 321, 480, 832, 16.0


def make_sources(root: Path, count: int) -> dict[str, Path]:
    """Folders of H.264 sources of two kinds, `count` videos each (made once)."""
    kinds = {"480x832@16fps": (480, 832, 16.0, 330), "720x1280@30fps": (720, 1280, 30.0, 630)}
    out = {}
    for name, (h, w, fps, n) in kinds.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = folder / f"v{i}.mp4"
            if not path.exists():
                square = render_clip("checkerboard", (200, 60, 30), (20, 20, 90), (1, 1), n, max(h, w), 3.0 + i)
                write_mp4(path, np.ascontiguousarray(square[:, :h, :w]), fps)
                path.with_suffix(".txt").write_text("a checkerboard moving diagonally")
        out[name] = folder
    return out


def time_loader(dataset, buckets, workers: int, batches: int) -> float:
    """Seconds per clip through a DataLoader with `workers` workers (after the first batch)."""
    sampler = BucketBatchSampler(buckets, 1, seed=0)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers, prefetch_factor=2 if workers else None
    )
    it = iter(loader)
    next(it)  # worker start-up and first decode stay out of the rate
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - start) / batches


def synthetic_cache(root: Path, count: int) -> tuple[LatentCache, list]:
    from safetensors.torch import save_file

    from radial_lora.data.catalog import Clip

    clips, entries, tensors = [], {}, {}
    for i in range(count):
        clip = Clip(f"/v{i}.mp4", "caption", (FRAMES, HEIGHT, WIDTH), 0, 1, 1)
        clips.append(clip)
        tensors[f"k{i}.latent_params"] = torch.randn(32, 81, 60, 104).bfloat16()
        tensors[f"k{i}.text"] = torch.randn(120, 4096).bfloat16()
        entries[clip.video] = {
            "size": 1,
            "mtime_ns": 1,
            "bucket": list(clip.bucket),
            "caption": "caption",
            "shard": "shard.safetensors",
            "key": f"k{i}",
        }
    save_file(tensors, str(root / "shard.safetensors"))
    meta = {"max_text_tokens": 512}
    (root / "index.json").write_text(json.dumps({"meta": meta, "entries": entries}))
    return LatentCache(root, meta), clips


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=RECORDS)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--clips", type=int, default=6, help="clips timed per setting")
    parser.add_argument("--videos", type=int, default=3, help="source videos per kind")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_data"))
    args = parser.parse_args()
    work = Path(args.work)
    sources = make_sources(work, args.videos)
    rows = []
    for kind, folder in sources.items():
        catalog = build_catalog([str(folder)], fps=FPS, frames=[FRAMES], sizes=[(HEIGHT, WIDTH)])
        dataset = ClipDataset(catalog.clips, fps=FPS, seed=0)
        for workers in args.workers:
            seconds = time_loader(dataset, [c.bucket for c in catalog.clips], workers, args.clips)
            rows.append(
                {
                    "source": kind,
                    "workers": workers,
                    "s_per_clip": round(seconds, 3),
                    "clips_per_s": round(1 / seconds, 3),
                    "frames_per_s": round(FRAMES / seconds, 1),
                }
            )
            print(rows[-1], flush=True)
    cache_dir = work / "cache"
    cache_dir.mkdir(exist_ok=True)
    cache, clips = synthetic_cache(cache_dir, 4)
    dataset = ClipDataset(clips, fps=FPS, cache=cache, random_window=False)
    for workers in args.workers:
        seconds = time_loader(dataset, [c.bucket for c in clips], workers, args.clips)
        rows.append(
            {
                "source": "cache (bf16, 32 MB/clip)",
                "workers": workers,
                "s_per_clip": round(seconds, 4),
                "clips_per_s": round(1 / seconds, 2),
                "frames_per_s": round(FRAMES / seconds, 1),
            }
        )
        print(rows[-1], flush=True)

    meta = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "command": "python " + " ".join(sys.argv),
    }
    lines = [
        f"# Data loading: {meta['cores']} CPU cores ({meta['cpu']}), {meta['date']}",
        "",
        f"Command: `{meta['command']}`. Clips of {FRAMES} frames at {HEIGHT}x{WIDTH}, {FPS:g} fps, batch 1.",
        "",
        "| source | DataLoader workers | s / clip | clips / s | frames / s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['source']} | {r['workers']} | {r['s_per_clip']} | {r['clips_per_s']} | {r['frames_per_s']} |"
        )
    write_report(args.out, record_stem("data", f"{meta['cores']}-cores", meta["date"]), meta, rows, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
