"""Attention benchmark on one GPU: our radial kernels vs FlexAttention vs dense SDPA.

"ours" is what the op runs by default: on an H100/H200 the warp-specialized Gluon kernels
(kernels/gluon_kernels.py), the forward and the one-kernel backward (dQ summed by TMA
reduce-adds); "ours, split backward" the Gluon forward with the Gluon dK/dV and dQ kernels
(attention.kernels.gluon=auto_split, deterministic; what the default runs under
torch.use_deterministic_algorithms); "ours, gluon forward only" the Gluon forward with the Triton
backward (gluon=auto_fwd);
"ours, triton only" Triton kernels throughout.

    python scripts/bench_attention.py                      # all shapes, writes docs/benchmarks/records/
    python scripts/bench_attention.py --quick --out /tmp   # Wan2.1-1.3B at 321 frames only
    python scripts/bench_attention.py --models Wan2.1-14B --shapes "480p 321f"   # a subset

Shapes: Wan2.1-1.3B (12 heads x 128) and 14B (40 x 128); 480p at 21, 41 and 81 latent frames
(32,760, 63,960 and 126,360 tokens: 81, 161 and 321 video frames) and 720p at 21 (75,600). Radial masks at
decay 1.0 and 0.2 (the paper's Wan setting for its 1x-length runs). Batch 1, bf16, non-causal.

Effective TFLOP/s count computed blocks only: forward 4*S^2*D*H*density, backward 2.5x that
(density 1 for dense attention). Times are medians of triton.testing.do_bench (CUDA events),
about a second of repeats per number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from radial_lora.kernels.flex import block_sparse_attention_flex
from radial_lora.kernels.kernel_choice import KernelChoice
from radial_lora.kernels.radial_mask import block_density, radial_block_mask
from radial_lora.kernels.sparse_attention import block_sparse_attention
from radial_lora.scripts.report import RECORDS, record_stem, write_report

MODELS = {"Wan2.1-1.3B": 12, "Wan2.1-14B": 40}
SHAPES = [  # (name, latent frames, tokens per frame)
    ("480p 81f", 21, 30 * 52),
    ("480p 161f", 41, 30 * 52),
    ("480p 321f", 81, 30 * 52),
    ("720p 81f", 21, 45 * 80),
]
DECAYS = (1.0, 0.2)
BLOCK = 128
HEAD_DIM = 128


def time_fwd_bwd(fn, q, k, v, d_out):
    """(forward ms, backward ms): medians over CUDA-event timed runs, about a second of each. (A
    100 ms budget is one or two backward runs at 126k tokens, and the first row at each new mask
    then comes out 6-10 ms slower than the kernels timed directly.)"""
    fwd = triton.testing.do_bench(lambda: fn(q, k, v), warmup=200, rep=1000, return_mode="median")
    out = fn(q, k, v)
    bwd = triton.testing.do_bench(
        lambda: torch.autograd.grad(out, (q, k, v), d_out, retain_graph=True),
        warmup=200,
        rep=1000,
        return_mode="median",
    )
    return fwd, bwd


def sdpa_with(backend):
    def fn(q, k, v):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return fn


def bench_shape(model, heads, shape_name, frames, tokens_per_frame):
    seq = frames * tokens_per_frame
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v, d_out = (
        torch.randn(1, heads, seq, HEAD_DIM, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4)
    )
    for t in (q, k, v):
        t.requires_grad_()
    dense_flops = 4 * seq * seq * HEAD_DIM * heads
    rows = []

    def record(backend, decay, density, fwd, bwd):
        flops = dense_flops * density
        rows.append(
            dict(
                model=model,
                shape=shape_name,
                tokens=seq,
                heads=heads,
                backend=backend,
                decay=decay,
                density=round(density, 4),
                fwd_ms=round(fwd, 3),
                bwd_ms=round(bwd, 3),
                fwd_tflops=round(flops / fwd / 1e9, 1),
                bwd_tflops=round(2.5 * flops / bwd / 1e9, 1),
            )
        )
        print(
            f"{model:12s} {shape_name:10s} {backend:12s} decay {decay!s:4s} density {density:.3f} "
            f"fwd {fwd:8.2f} ms {rows[-1]['fwd_tflops']:6.1f} TF/s  bwd {bwd:8.2f} ms {rows[-1]['bwd_tflops']:6.1f} TF/s",
            flush=True,
        )

    for name, backend in (("sdpa cuDNN", SDPBackend.CUDNN_ATTENTION), ("sdpa flash", SDPBackend.FLASH_ATTENTION)):
        record(name, None, 1.0, *time_fwd_bwd(sdpa_with(backend), q, k, v, d_out))
    for decay in DECAYS:
        mask = radial_block_mask(frames, tokens_per_frame, block_size=BLOCK, decay=decay, device="cuda")
        density = block_density(mask)
        # The rows as the module docstring names them: the op's default, then other kernel choices.
        for name, gluon in (
            ("ours", "auto"),
            ("ours, split backward", "auto_split"),
            ("ours, gluon forward only", "auto_fwd"),
            ("ours, triton only", "none"),
        ):
            choice = KernelChoice(gluon=gluon)
            times = time_fwd_bwd(
                lambda q, k, v: block_sparse_attention(q, k, v, mask, block_size=BLOCK, kernels=choice), q, k, v, d_out
            )
            record(name, decay, density, *times)
        times = time_fwd_bwd(
            lambda q, k, v: block_sparse_attention_flex(q, k, v, mask, block_size=BLOCK), q, k, v, d_out
        )
        record("flex", decay, density, *times)
    return rows


def markdown(rows, meta):
    lines = [
        f"# Attention benchmark: {meta['card']}, {meta['date']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}; bf16, batch 1, head dim 128, "
        f"block {BLOCK}. Command: `{meta['command']}`.",
        "Effective TFLOP/s count computed blocks only (forward 4*S^2*D*H*density, backward 2.5x).",
        "",
        "| model | shape | tokens | backend | decay | density | fwd ms | fwd TFLOP/s | bwd ms | bwd TFLOP/s | fwd+bwd vs cuDNN |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dense = next(
            x for x in rows if x["model"] == r["model"] and x["shape"] == r["shape"] and x["backend"] == "sdpa cuDNN"
        )
        speedup = (dense["fwd_ms"] + dense["bwd_ms"]) / (r["fwd_ms"] + r["bwd_ms"])
        lines.append(
            f"| {r['model']} | {r['shape']} | {r['tokens']:,} | {r['backend']} | {r['decay'] if r['decay'] is not None else '-'} "
            f"| {r['density']:.3f} | {r['fwd_ms']:.2f} | {r['fwd_tflops']:.0f} | {r['bwd_ms']:.2f} | {r['bwd_tflops']:.0f} "
            f"| {speedup:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows, path):
    """Speedup of fwd+bwd over dense cuDNN against video length, one line per backend and decay
    at 480p, squares for 720p, Wan2.1-1.3B's heads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colours = {("ours", 1.0): "C0", ("ours", 0.2): "C1", ("flex", 1.0): "C2", ("flex", 0.2): "C3"}
    for resolution, style in (("480p", "-"), ("720p", "")):
        for backend in ("ours", "flex"):
            for decay in DECAYS:
                pts = []
                for r in rows:
                    if not (r["backend"] == backend and r["decay"] == decay and r["model"] == "Wan2.1-1.3B"):
                        continue
                    if not r["shape"].startswith(resolution):
                        continue
                    dense = next(
                        x
                        for x in rows
                        if x["model"] == r["model"] and x["shape"] == r["shape"] and x["backend"] == "sdpa cuDNN"
                    )
                    frames = int(r["shape"].split()[1].rstrip("f"))
                    pts.append((frames, (dense["fwd_ms"] + dense["bwd_ms"]) / (r["fwd_ms"] + r["bwd_ms"])))
                if pts:
                    pts.sort()
                    label = f"{backend}, decay {decay}" if resolution == "480p" else None
                    marker = "o" if resolution == "480p" else "s"
                    ax.plot(*zip(*pts), style, marker=marker, color=colours[backend, decay], label=label)
    ax.plot([], [], "s", color="gray", label="720p (squares; lines: 480p)")
    ax.set_xscale("log", base=2)
    ax.set_xticks([81, 161, 321], ["81 (1x)", "161 (2x)", "321 (4x)"])
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("video frames")
    ax.set_ylabel("fwd+bwd speedup over dense cuDNN")
    ax.set_title("Radial attention vs dense SDPA (Wan2.1-1.3B, 12 heads x 128)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=RECORDS)
    parser.add_argument("--quick", action="store_true", help="only Wan2.1-1.3B at 480p, 321 frames")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument(
        "--shapes", nargs="+", choices=[name for name, _, _ in SHAPES], default=[name for name, _, _ in SHAPES]
    )
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    meta = dict(
        card=torch.cuda.get_device_name(),
        date=datetime.date.today().isoformat(),
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        command="python " + " ".join(sys.argv),
    )
    rows = []
    for model, heads in MODELS.items():
        for shape_name, frames, tokens_per_frame in SHAPES:
            if args.quick and (model != "Wan2.1-1.3B" or shape_name != "480p 321f"):
                continue
            if model not in args.models or shape_name not in args.shapes:
                continue
            rows += bench_shape(model, heads, shape_name, frames, tokens_per_frame)
    stem = record_stem("attention", meta["card"], meta["date"], "quick" if args.quick else "all_shapes")
    out = write_report(args.out, stem, meta, rows, markdown(rows, meta))
    plot(rows, out / f"{stem}.png")
    from radial_lora.kernels import gluon_kernels, triton_kernels

    tuned = {
        name: {str(key): str(cfg) for key, cfg in kernel.cache.items()}
        for name, kernel in triton_kernels.AUTOTUNED.items()
    }
    tuned["gluon fwd"] = dict(gluon_kernels.FORWARD_TILE)  # fixed, not autotuned
    tuned["gluon dkdv"] = dict(gluon_kernels.DKDV_TILE)
    tuned["gluon dq"] = dict(gluon_kernels.DQ_TILE)
    tuned["gluon fused backward"] = dict(gluon_kernels.FUSED_TILE)
    (out / f"{stem}_tuned.json").write_text(json.dumps(tuned, indent=1))
    print(json.dumps(tuned, indent=1))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
