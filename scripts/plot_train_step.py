"""Plot LoRA step time against video length, one line per attention backend, from the JSON
records `scripts/bench_train_step.py` writes (several records may share one plot: every backend
ran in its own process so each compiles alone).

    python scripts/plot_train_step.py docs/benchmarks/records/train_step_*_2026-12-07_1.3b_*.json \
        --out docs/benchmarks/train_step_1.3b.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

LABELS = {"dense": "dense (SDPA, cuDNN)", "flex": "radial, FlexAttention", "triton": "radial, ours"}


def load_rows(paths: list[str]) -> tuple[list[dict], dict]:
    rows, meta = [], {}
    for path in paths:
        record = json.loads(Path(path).read_text())
        meta = meta or record["meta"]
        rows += record["rows"]
    return rows, meta


def plot(rows: list[dict], meta: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for index, backend in enumerate(sorted({r["backend"] for r in rows})):
        points = sorted((r["video_frames"], r["step_s"]) for r in rows if r["backend"] == backend)
        ax.plot(*zip(*points), marker="o", label=LABELS.get(backend, backend))
        for frames, seconds in points:
            ax.annotate(
                f"{seconds:.1f}", (frames, seconds), textcoords="offset points", xytext=(6, 8 - 9 * index), fontsize=8
            )
    frames = sorted({r["video_frames"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(frames, [f"{f}" for f in frames])
    ax.set_xlabel("video frames (480x832)")
    ax.set_ylabel("LoRA step (s)")
    model = rows[0]["model"].split("/")[-1]
    ax.set_title(f"{model} LoRA step, compiled blocks ({meta['device']}, {meta['date']})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="+", help="train_step_*.json records")
    parser.add_argument("--out", required=True, help="the PNG to write")
    args = parser.parse_args()
    rows, meta = load_rows(args.records)
    plot(rows, meta, Path(args.out))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
