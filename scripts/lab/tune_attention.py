"""Time every launch configuration of our attention kernels one at a time, on one GPU.

    python scripts/lab/tune_attention.py                          # Wan2.1-1.3B, 480p, 321 frames
    python scripts/lab/tune_attention.py --frames 21 --heads 40   # another shape
    python scripts/lab/tune_attention.py --out docs/benchmarks/records    # also write a markdown + JSON record

The autotuner keeps only its winner; this shows the whole field, which is what the kernel's
config lists (`kernels/triton_kernels.py`) are cut from, and what to rerun on a new card.
Each kernel gets each candidate tile alone while the other kernels keep one fixed tile, so a
forward row is the forward kernel's time and a backward row is the whole backward (delta, dK/dV
and dQ kernels) with only the named kernel's tile changed. Both load modes (pointer and TMA)
are timed. The Gluon kernels (kernels/gluon_kernels.py, Hopper only, TMA only) have fixed tiles
rather than an autotuner: `--kernels gluon gluon_dkdv gluon_dq` times their candidates the same
way, the values to put in gluon_kernels.FORWARD_TILE / DKDV_TILE / DQ_TILE. Radial mask, bf16, batch 1,
head dim 128; times are medians of CUDA-event runs.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import sys

import torch
import triton

from radial_lora.kernels import gluon_kernels, triton_kernels
from radial_lora.kernels.kernel_choice import KernelChoice
from radial_lora.kernels.radial_mask import block_density, radial_block_mask
from radial_lora.kernels.sparse_attention import block_sparse_attention
from radial_lora.scripts.report import write_report

# (BLOCK_M, BLOCK_N, warps, stages): the tiles that fit Hopper's registers and shared memory at
# head dim 128 (scripts/lab/kernel_sass.py shows which spill), around the current winners.
CANDIDATES = {
    "fwd": [
        (128, 64, 8, 3),
        (128, 64, 8, 4),
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (128, 32, 8, 4),
        (64, 64, 4, 3),
        (64, 128, 4, 3),
        (128, 64, 4, 3),
    ],
    "dkdv": [
        (64, 64, 4, 2),
        (64, 64, 4, 3),
        (32, 128, 8, 2),
        (32, 128, 8, 3),
        (32, 64, 4, 3),
        (32, 64, 4, 4),
        (64, 128, 8, 2),
        (16, 128, 8, 4),
    ],
    "dq": [
        (128, 128, 8, 2),
        (128, 128, 8, 3),
        (128, 64, 8, 2),
        (128, 64, 8, 3),
        (128, 32, 8, 3),
        (64, 64, 4, 2),
        (64, 128, 4, 2),
    ],
}
# The Gluon kernels (12 warps: a loading warpgroup and two computing ones): forward and dQ (128
# query rows, key tile, stages) and dK/dV (query tile, 128 keys, stages).
CANDIDATES["gluon"] = [(128, 128, 12, 3), (128, 128, 12, 2), (128, 64, 12, 4), (128, 64, 12, 3)]
CANDIDATES["gluon_dq"] = [(128, 64, 12, 4), (128, 64, 12, 3), (128, 128, 12, 2)]
CANDIDATES["gluon_dkdv"] = [(64, 128, 12, 2), (64, 128, 12, 3), (32, 128, 12, 2), (32, 128, 12, 3), (32, 128, 12, 4)]
KERNELS = tuple(triton_kernels.AUTOTUNED)  # fwd, dkdv, dq
# Each Gluon kernel: its name for gluon_kernels.only_tile, the tile side it sweeps (the other is
# the 128-row mask block), and the attention.kernels.gluon choice that runs it alone.
GLUON = {
    "gluon": ("fwd", "BLOCK_N", "fwd"),
    "gluon_dkdv": ("dkdv", "BLOCK_M", "fwd_dkdv"),
    "gluon_dq": ("dq", "BLOCK_N", "fwd_dq"),
}
# While one kernel is swept the others run these (the 2026-11-26 H100 winners).
FIXED = {"fwd": (128, 64, 8, 3), "dkdv": (64, 64, 4, 2), "dq": (128, 128, 8, 2)}


def use(kernel_name: str, tile):
    """A context in which the named kernel runs exactly this tile."""
    m, n, warps, stages = tile
    if kernel_name in GLUON:  # the Hopper kernels: fixed tiles (3 warpgroups), no autotuner
        kernel, side, _ = GLUON[kernel_name]
        return gluon_kernels.only_tile(kernel, **{side: m if side == "BLOCK_M" else n, "STAGES": stages})
    return triton_kernels.only_tile(kernel_name, tile)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=81, help="latent frames (81: 321 video frames)")
    parser.add_argument("--tokens-per-frame", type=int, default=30 * 52, help="1560: 480x832")
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--decay", type=float, default=1.0)
    parser.add_argument("--kernels", nargs="+", choices=[*KERNELS, *GLUON], default=[*KERNELS, *GLUON])
    parser.add_argument("--out", help="write attention_tuning_<card>_<date>.md/.json here")
    args = parser.parse_args()

    seq = args.frames * args.tokens_per_frame
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v, d_out = (
        torch.randn(1, args.heads, seq, 128, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_()
    mask = radial_block_mask(args.frames, args.tokens_per_frame, block_size=128, decay=args.decay, device="cuda")
    density = block_density(mask)
    flops = 4 * seq * seq * 128 * args.heads * density
    print(
        f"{torch.cuda.get_device_name()}: {seq} tokens x {args.heads} heads, decay {args.decay}, density {density:.3f}",
        flush=True,
    )

    rows = []
    for name in args.kernels:
        for tile in CANDIDATES[name]:
            for tma in (True,) if name in GLUON else (False, True):  # Gluon: TMA loads only
                tiles = contextlib.ExitStack()
                for other, fixed in FIXED.items():
                    tiles.enter_context(use(other, tile if other == name else fixed))
                if name in GLUON:
                    tiles.enter_context(use(name, tile))
                # Gluon rows run that Gluon kernel only; the others Triton throughout.
                choice = KernelChoice(gluon=GLUON[name][2] if name in GLUON else "none", tma="all" if tma else "none")
                with tiles:
                    try:
                        out = block_sparse_attention(q, k, v, mask, kernels=choice)
                        if name in ("fwd", "gluon"):  # the forward alone; other rows the whole backward
                            ms = triton.testing.do_bench(
                                lambda: block_sparse_attention(q, k, v, mask, kernels=choice),
                                warmup=25,
                                rep=250,
                                return_mode="median",
                            )
                            tflops = flops / ms / 1e9
                        else:
                            ms = triton.testing.do_bench(
                                lambda: torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True),
                                warmup=25,
                                rep=250,
                                return_mode="median",
                            )
                            tflops = 2.5 * flops / ms / 1e9
                        error = ""
                    except Exception as e:  # a tile that fails to compile or launch is a result too
                        ms, tflops, error = (
                            float("nan"),
                            float("nan"),
                            f"{type(e).__name__}: {str(e).splitlines()[0][:120]}",
                        )
                row = dict(
                    kernel=name,
                    block_m=tile[0],
                    block_n=tile[1],
                    warps=tile[2],
                    stages=tile[3],
                    loads="TMA" if tma else "pointer",
                    ms=round(ms, 3),
                    tflops=round(tflops, 1),
                    error=error,
                )
                rows.append(row)
                print(
                    f"{name:5s} {tile[0]:4d}x{tile[1]:<4d} w{tile[2]} s{tile[3]} {row['loads']:7s} "
                    f"{ms:8.2f} ms {tflops:6.1f} TF/s {error}",
                    flush=True,
                )

    meta = dict(
        card=torch.cuda.get_device_name(),
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        triton=triton.__version__,
        tokens=seq,
        heads=args.heads,
        decay=args.decay,
        density=round(density, 4),
        command="python " + " ".join(sys.argv),
    )
    lines = [
        f"# Kernel tile sweep: {meta['card']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}; {seq:,} tokens x {args.heads} heads x 128, bf16, radial "
        f"decay {args.decay} (density {density:.3f}). Command: `{meta['command']}`. fwd rows: the forward kernel; "
        f"dkdv/dq rows: the whole backward with that kernel's tile changed (others: {FIXED}); gluon rows: the "
        f"warp-specialized Hopper forward alone (12 warps: a loading warpgroup and two computing ones); gluon_dkdv "
        f"rows: the whole backward with the Gluon dK/dV kernel at that tile (query rows x 128 keys) and the Triton dQ; "
        f"gluon_dq rows: the whole backward with the Gluon dQ kernel at that tile (128 queries x key tile) and the "
        f"Triton dK/dV.",
        "",
        "| kernel | tile (M x N) | warps | stages | loads | ms | effective TFLOP/s | error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['kernel']} | {r['block_m']}x{r['block_n']} | {r['warps']} | {r['stages']} | {r['loads']} "
            f"| {r['ms']:.2f} | {r['tflops']:.0f} | {r['error']} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        stem = f"attention_tuning_{meta['card'].replace(' ', '_')}_{meta['date']}"
        write_report(args.out, stem, meta, rows, text)


if __name__ == "__main__":
    main()
