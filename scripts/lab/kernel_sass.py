"""Compile our attention kernels for Hopper (sm_90) offline and count what their SASS does.

    python scripts/lab/kernel_sass.py                        # every kernel, pointer and TMA loads
    python scripts/lab/kernel_sass.py --kernel fwd --block 128 64 --warps 8 --stages 3 --dump /tmp/fwd.sass

No GPU needed: Triton compiles for a `GPUTarget("cuda", 90, 32)` and its bundled `cuobjdump`
disassembles the cubin. Counts, per kernel and load mode: `HGMMA` (Hopper's asynchronous
tensor-core products), `UTMALDG` (tensor-memory-accelerator loads), `UTMAREDG` (its reduce-adds:
the fused backward's dQ), `LDGSTS` (cp.async loads),
`MUFU.EX2` (the softmax exponentials), `WARPGROUP.DEPBAR` (waits on the tensor cores; `DEPBAR.LE 1`
the waits that leave one product running: the pipelined schedules), `SYNCS`
(mbarrier operations), `STL`/`LDL` (register spills to local memory), registers per thread and
shared memory per program. Arguments are given
the divisibility-by-16 hints an aligned launch gets. The Triton installed here compiles, which may
be newer than the GPU image's: say which when quoting the numbers. Another Triton compiles the same
way without touching the environment, e.g. the GPU image's:
    pip install --no-deps --target /tmp/t36 triton==3.6.0
    PYTHONPATH=/tmp/t36 python scripts/lab/kernel_sass.py
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.experimental.gluon._runtime import GluonASTSource

from radial_lora.kernels import gluon_kernels as ga
from radial_lora.kernels import triton_kernels as tk

KERNELS = {
    "fwd": tk.forward_kernel,
    "dkdv": tk.dkdv_kernel,
    "dq": tk.dq_kernel,
    "gluon": ga.forward_kernel,
    "gluon_dkdv": ga.dkdv_kernel,
    "gluon_dq": ga.dq_kernel,
    "gluon_fused": ga.fused_backward_kernel,
}
# The tiles the H100 autotuning picked (kernels/triton_kernels.py): (BLOCK_M, BLOCK_N, warps, stages).
TUNED = {
    "fwd": (128, 128, 8, 3),
    "dkdv": (64, 64, 4, 2),
    "dq": (128, 128, 8, 2),
    "gluon": (128, ga.FORWARD_TILE["BLOCK_N"], 4, ga.FORWARD_TILE["STAGES"]),  # 4 warps + two 4-warp partitions
    "gluon_dkdv": (ga.DKDV_TILE["BLOCK_M"], 128, 4, ga.DKDV_TILE["STAGES"]),
    "gluon_dq": (128, ga.DQ_TILE["BLOCK_N"], 4, ga.DQ_TILE["STAGES"]),
    "gluon_fused": (ga.FUSED_TILE["BLOCK_M"], 128, 4, ga.FUSED_TILE["STAGES"]),
}
# SASS instructions counted (USETMAXREG: the register hand-over between warp-specialized partitions).
COUNTED = {
    "HGMMA": r"HGMMA",
    "UTMALDG": r"UTMALDG",
    "UTMAREDG": r"UTMAREDG",
    "LDGSTS": r"LDGSTS",
    "MUFU.EX2": r"MUFU\.EX2",
    "WARPGROUP.DEPBAR": r"WARPGROUP\.DEPBAR",
    "DEPBAR.LE 1": r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1",
    "SYNCS": r"SYNCS",
    "spill STL/LDL": r"\b(?:STL|LDL)\b",
    "USETMAXREG": r"USETMAXREG",
}


def signature(fn) -> tuple[dict, list[int]]:
    """Triton types of the kernel's arguments, and the positions that get the alignment hint."""
    types, aligned = {}, []
    for i, name in enumerate(fn.arg_names):
        if name in ("HEAD_DIM", "MASK_BLOCK", "BLOCK_M", "BLOCK_N", "TMA", "STAGES"):
            types[name] = "constexpr"
        elif name in ("LSE", "DELTA", "DQ_ACC"):
            types[name] = "*fp32"
        elif name.endswith(("_COUNT", "_INDEX", "ORDER")):
            types[name] = "*i32"
        elif name in ("qk_scale", "sm_scale"):
            types[name] = "fp32"
        elif name.startswith("stride_") or name in ("H", "S"):
            types[name] = "i32"
        else:  # Q, K, V, O, DO, DK, DV, DQ
            types[name] = "*bf16"
        if types[name].startswith("*") or (name.startswith("stride_") and name != "stride_index"):
            aligned.append(i)
    return types, aligned


def compile_sass(kernel: str, block, warps: int, stages: int, tma: bool) -> tuple[str, dict]:
    gluon = kernel.startswith("gluon")  # the warp-specialized Hopper kernels: TMA only, fixed tiles
    fn = KERNELS[kernel] if gluon else KERNELS[kernel].fn
    types, aligned = signature(fn)
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    if gluon:
        constants = {"HEAD_DIM": 128, "MASK_BLOCK": 128, "STAGES": stages}
        constants |= {"BLOCK_M": block[0]} if kernel in ("gluon_dkdv", "gluon_fused") else {"BLOCK_N": block[1]}
        source, options = GluonASTSource(fn, types, constants, attrs), {"num_warps": warps}
    else:
        constants = {"HEAD_DIM": 128, "MASK_BLOCK": 128, "BLOCK_M": block[0], "BLOCK_N": block[1], "TMA": tma}
        source, options = ASTSource(fn, types, constants, attrs), {"num_warps": warps, "num_stages": stages}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    tools = Path(triton.__file__).parent / "backends/nvidia/bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        sass = subprocess.run(
            [str(tools / "cuobjdump"), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
        usage = subprocess.run(
            [str(tools / "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    finally:
        os.unlink(f.name)
    counts = {name: len(re.findall(pattern, sass)) for name, pattern in COUNTED.items()}
    registers = re.search(r"REG:(\d+)", usage)
    counts["registers"] = int(registers.group(1)) if registers else None
    counts["shared_kb"] = compiled.metadata.shared // 1024
    return sass, counts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=list(KERNELS), nargs="+", default=list(KERNELS))
    parser.add_argument("--block", type=int, nargs=2, metavar=("BLOCK_M", "BLOCK_N"), help="default: the tuned tile")
    parser.add_argument("--warps", type=int)
    parser.add_argument("--stages", type=int)
    parser.add_argument("--dump", help="write the last compiled kernel's SASS here")
    args = parser.parse_args()
    print(f"triton {triton.__version__}, target sm_90, head dim 128, mask block 128, bf16")
    print("| kernel | tile (M x N, warps, stages) | loads | " + " | ".join([*COUNTED, "registers", "shared KB"]) + " |")
    print("|---" * (len(COUNTED) + 5) + "|")
    for kernel in args.kernel:
        m, n, warps, stages = TUNED[kernel]
        block, warps, stages = args.block or (m, n), args.warps or warps, args.stages or stages
        for tma in (True,) if kernel.startswith("gluon") else (False, True):
            sass, counts = compile_sass(kernel, block, warps, stages, tma)
            cells = " | ".join(str(counts[k]) for k in [*COUNTED, "registers", "shared_kb"])
            print(f"| {kernel} | {block[0]}x{block[1]}, {warps}, {stages} | {'TMA' if tma else 'pointer'} | {cells} |")
    if args.dump:
        Path(args.dump).write_text(sass)


if __name__ == "__main__":
    main()
