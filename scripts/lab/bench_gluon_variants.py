"""Time the Hopper Gluon kernels directly, one variant against another, at the wan_4x shape.

    python scripts/lab/bench_gluon_variants.py                                  # launch order A/B
    python scripts/lab/bench_gluon_variants.py --set FUSED_TILE.STAGES=2,3      # and a tile knob

What kernels/gluon_kernels.py's choices rest on: each kernel (forward, one-kernel backward,
dK/dV, dQ) launched in mask-block order and in the heavy-first order compact_mask gives it, and,
with --set, each value of a knob of FORWARD_TILE / DKDV_TILE / DQ_TILE / FUSED_TILE (heavy-first). First
every variant is checked against the fp32 PyTorch reference under the tolerance rule (2x the bf16
reference's own error) at two small shapes; then each is timed (median of ~1.5 s of CUDA-event
timed runs) at 126,360 tokens (Wan2.1 480p, 321 frames) x 12 heads x 128, bf16, radial masks at
decay 1.0 and 0.2. TFLOP/s count computed blocks only: forward 4*S^2*D*H*density, backward 2.5x.
The backward kernels get the forward's lse and delta = rowsum(dO * O); the one-kernel backward's
time includes zeroing its fp32 dQ buffer and the copy out of it. Needs an sm_90 GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
import triton

from radial_lora.kernels import gluon_kernels as ga
from radial_lora.kernels.compact_mask import compact_mask
from radial_lora.kernels.radial_mask import radial_block_mask
from radial_lora.kernels.reference import block_sparse_attention_reference
from radial_lora.kernels.sparse_attention import LOG2E

KERNEL_TILE = {"forward": "FORWARD_TILE", "fused": "FUSED_TILE", "dkdv": "DKDV_TILE", "dq": "DQ_TILE"}
# gluon_kernels.only_tile's name for each kernel
TILE_KERNEL = {"forward": "fwd", "fused": "fused", "dkdv": "dkdv", "dq": "dq"}


def run(kernel: str, inputs, indices, heavy_first: bool):
    """One kernel's outputs: (out,) / (dq, dk, dv) / (dk, dv) / (dq,)."""
    q, k, v, d_out, lse, delta = inputs
    kv_count, kv_index, kv_order, q_count, q_index, q_order = indices
    if not heavy_first:
        kv_order = q_order = torch.arange(len(kv_count), device=q.device, dtype=torch.int32)
    scale = q.shape[-1] ** -0.5
    by_key, by_query = (q_count, q_index, q_order), (kv_count, kv_index, kv_order)
    if kernel == "forward":
        return ga.hopper_forward(q, k, v, *by_query, 128, scale * LOG2E)[:1]
    if kernel == "fused":
        return ga.hopper_fused_backward(q, k, v, d_out, lse, delta, *by_key, 128, scale * LOG2E, scale)
    if kernel == "dkdv":
        return ga.hopper_dkdv(q, k, v, d_out, lse, delta, *by_key, 128, scale * LOG2E, scale)
    return (ga.hopper_dq(q, k, v, d_out, lse, delta, *by_query, 128, scale * LOG2E, scale),)


def prepare(q, k, v, d_out, mask):
    """The backward kernels' inputs (the forward's lse, delta) and the mask's index lists."""
    indices = compact_mask(mask)
    scale = q.shape[-1] ** -0.5
    out, lse = ga.hopper_forward(q, k, v, *indices[:3], 128, scale * LOG2E)
    delta = (out.float() * d_out.float()).sum(-1)
    return (q, k, v, d_out, lse, delta), indices


def check(variants) -> bool:
    """Every variant within the tolerance rule at two small shapes (one with an empty mask row and
    column and a partial last block)."""
    ok = True
    for frames, tokens, heads, dim, decay, empty in ((7, 1560, 2, 128, 1.0, False), (5, 777, 3, 64, 0.2, True)):
        mask = radial_block_mask(frames, tokens, decay=decay, device="cuda")
        if empty:
            mask[1], mask[:, 2] = False, False
        seq = frames * tokens
        q, k, v, d_out = (torch.randn(1, heads, seq, dim, device="cuda") for _ in range(4))
        expected = []
        for dtype in (torch.float32, torch.bfloat16):
            x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            out = block_sparse_attention_reference(*x, mask, block_size=128)
            out.backward(d_out.to(dtype))
            expected.append(
                {"out": out.float(), "dq": x[0].grad.float(), "dk": x[1].grad.float(), "dv": x[2].grad.float()}
            )
        budget = {name: 2 * (expected[1][name] - ref).abs().max().item() for name, ref in expected[0].items()}
        inputs, indices = prepare(*(t.bfloat16() for t in (q, k, v, d_out)), mask)
        names = {"forward": ("out",), "fused": ("dq", "dk", "dv"), "dkdv": ("dk", "dv"), "dq": ("dq",)}
        for label, kernel, heavy_first, knob in variants:
            with knob_set(knob):
                got = run(kernel, inputs, indices, heavy_first)
            errors = {n: (g.float() - expected[0][n]).abs().max().item() for n, g in zip(names[kernel], got)}
            bad = [n for n, e in errors.items() if not e <= budget[n]]
            ok &= not bad
            print(
                f"check S={seq} D={dim} decay {decay}{' empty row/col' if empty else ''} {label}: "
                + " ".join(f"{n} {e:.1e}/{budget[n]:.1e}" for n, e in errors.items())
                + (f"  FAIL {bad}" if bad else "  ok"),
                flush=True,
            )
    return ok


def knob_set(knob):
    """A context that sets one tile knob (("FUSED_TILE", "STAGES", 3)) and puts it back; None: none."""
    if knob is None:
        return contextlib.nullcontext()
    table, key, value = knob
    kernel = next(k for k, t in KERNEL_TILE.items() if t == table)
    return ga.only_tile(TILE_KERNEL[kernel], **{key: value})


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", choices=list(KERNEL_TILE), default=list(KERNEL_TILE))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="TABLE.KEY=V1,V2",
        help="also time each value of a tile knob (heavy-first order)",
    )
    parser.add_argument("--decays", type=float, nargs="+", default=[1.0, 0.2])
    args = parser.parse_args()

    variants = []  # (label, kernel, heavy_first, knob)
    for kernel in args.kernels:
        variants += [
            (f"{kernel:8s} block order", kernel, False, None),
            (f"{kernel:8s} heavy first", kernel, True, None),
        ]
    for spec in args.set:
        name, values = spec.split("=")
        table, key = name.split(".")
        kernel = next(k for k, t in KERNEL_TILE.items() if t == table)
        for value in values.split(","):
            variants.append((f"{kernel:8s} heavy first {key}={value}", kernel, True, (table, key, int(value))))

    print(torch.cuda.get_device_name(), f"torch {torch.__version__}, triton {triton.__version__}", flush=True)
    if not check(variants):
        sys.exit("a variant failed its check; not timing")
    frames, tokens, heads, dim = 81, 1560, 12, 128
    seq = frames * tokens
    q, k, v, d_out = (torch.randn(1, heads, seq, dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for decay in args.decays:
        mask = radial_block_mask(frames, tokens, decay=decay, device="cuda")
        density = mask.float().mean().item()
        inputs, indices = prepare(q, k, v, d_out, mask)
        for label, kernel, heavy_first, knob in variants:
            with knob_set(knob):
                ms = triton.testing.do_bench(
                    lambda: run(kernel, inputs, indices, heavy_first), warmup=300, rep=1500, return_mode="median"
                )
            products = {"forward": 1.0, "fused": 2.5, "dkdv": 2.0, "dq": 1.5}[kernel]  # forward's FLOPs x
            tflops = products * 4 * seq * seq * dim * heads * density / ms / 1e9
            print(f"decay {decay} density {density:.3f} {label:40s} {ms:8.2f} ms {tflops:6.1f} TFLOP/s", flush=True)


if __name__ == "__main__":
    main()
