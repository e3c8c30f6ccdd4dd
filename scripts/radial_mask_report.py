"""Radial Attention mask report: the density table for Wan's shapes and a picture of one mask.

    python -m scripts.radial_mask_report                 # table to stdout, PNG to docs/
    python -m scripts.radial_mask_report --png out.png --frames 21 --tokens-per-frame 1560 --decay 1.0

Densities are exact (computed from the mask); build times depend on the machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from radial_lora.kernels.radial_mask import block_density, radial_block_mask

# Wan2.1: the VAE compresses time 4x (after the first frame) and space 8x, patches are 2x2.
WAN_SHAPES = {"480p (480x832)": 30 * 52, "720p (720x1280)": 45 * 80}
VIDEO_FRAMES = (81, 161, 321)


def latent_frames(video_frames: int) -> int:
    return (video_frames - 1) // 4 + 1


def density_table(decays=(1.0, 0.2), block_size: int = 128) -> str:
    """Markdown: density (kept / total blocks) per Wan shape, video length and decay."""
    head = (
        "| resolution | video frames | latent frames F | tokens S | "
        + " | ".join(f"density, decay {d}" for d in decays)
        + " | mask build (s) |"
    )
    rows = [head, "|" + "---|" * (5 + len(decays))]
    for name, s in WAN_SHAPES.items():
        for frames in VIDEO_FRAMES:
            f = latent_frames(frames)
            start = time.perf_counter()
            densities = [block_density(radial_block_mask(f, s, block_size=block_size, decay=d)) for d in decays]
            seconds = (time.perf_counter() - start) / len(decays)
            cells = " | ".join(f"{x:.3f}" for x in densities)
            rows.append(f"| {name} | {frames} | {f} | {f * s:,} | {cells} | {seconds:.2f} |")
    return "\n".join(rows)


def plot_mask(path: str | Path, frames: int, tokens_per_frame: int, decay: float, block_size: int = 128) -> Path:
    """Write a PNG of the block mask, its parameters and density in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mask = radial_block_mask(frames, tokens_per_frame, block_size=block_size, decay=decay)
    fig, ax = plt.subplots(figsize=(7, 7), dpi=120)
    ax.imshow(mask.numpy(), cmap="Greys", interpolation="nearest")
    ax.set_title(
        f"Radial mask: F={frames} frames x s={tokens_per_frame} tokens, block {block_size}, decay {decay}\n"
        f"{mask.shape[0]}x{mask.shape[1]} blocks, density {block_density(mask):.3f}",
        fontsize=10,
    )
    ax.set_xlabel("key block")
    ax.set_ylabel("query block")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--png", default="docs/radial_mask_wan480p_21frames.png")
    parser.add_argument("--frames", type=int, default=21, help="latent frames F")
    parser.add_argument("--tokens-per-frame", type=int, default=1560)
    parser.add_argument("--decay", type=float, default=1.0)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    print(density_table(block_size=args.block_size))
    print(f"wrote {plot_mask(args.png, args.frames, args.tokens_per_frame, args.decay, args.block_size)}")


if __name__ == "__main__":
    main()
