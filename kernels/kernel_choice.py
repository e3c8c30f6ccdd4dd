"""Which kernels the triton attention backend runs: Gluon (Hopper) or Triton, and TMA or pointer
loads, for one call. The choice is `attention.kernels` of the run's config, recorded with it, and
reaches the op as an argument (kernels/sparse_attention.py): nothing here is process state.

    gluon  which kernels run in Gluon (kernels/gluon_kernels.py: warp-specialized, Hopper only)
           instead of Triton (kernels/triton_kernels.py), and whether they must:
      auto        (the default) wherever they can run (sm_90, bf16/fp16, head dim 64 or 128, mask
                  block 128, TMA-readable layouts): the Gluon forward and the one-kernel Gluon
                  backward (dK/dV and dQ together, dQ summed by TMA reduce-adds in varying order:
                  not bitwise reproducible, 1-4% faster than the split pair on an H100,
                  docs/benchmarks/attention.md), or, while torch.use_deterministic_algorithms is
                  on, the split pair (Gluon dK/dV and dQ: every output written once); Triton
                  elsewhere
      auto_split  the split pair always; auto_fwd  the Gluon forward only
      all (forward and the split pair), fwd, fwd_dkdv, fwd_dq, fused (forward and the one-kernel
                  backward): those kernels, raising where they cannot run
      none        Triton throughout
    tma    which Triton kernels stream their tiles through Hopper's tensor memory accelerator
           (sm_90+, where the layout allows): backward (the default: on an H100 the backward
           2-4% faster, the forward no faster, docs/radial_attention.md), all or none.

Only the Gluon route imports Gluon: Triton's CPU interpreter, which cannot run it, never does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from radial_lora.kernels.launch import INTERPRET, set_tma_allocator, tma_layout_ok

GLUON_CHOICES = {
    "auto": (frozenset({"fwd", "fused", "dkdv", "dq"}), False),
    "auto_split": (frozenset({"fwd", "dkdv", "dq"}), False),
    "auto_fwd": (frozenset({"fwd"}), False),
    "all": (frozenset({"fwd", "dkdv", "dq"}), True),
    "fwd": (frozenset({"fwd"}), True),
    "fwd_dkdv": (frozenset({"fwd", "dkdv"}), True),
    "fwd_dq": (frozenset({"fwd", "dq"}), True),
    "fused": (frozenset({"fwd", "fused"}), True),
    "none": (frozenset(), False),
}
TMA_CHOICES = {"all": frozenset({"fwd", "dkdv", "dq"}), "backward": frozenset({"dkdv", "dq"}), "none": frozenset()}
NEEDS_GPU = "the triton attention backend needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU)"


@dataclass(frozen=True)
class KernelChoice:
    """The kernels of one call: `gluon` a key of GLUON_CHOICES, `tma` a key of TMA_CHOICES."""

    gluon: str = "auto"
    tma: str = "backward"

    def __post_init__(self):
        if self.gluon not in GLUON_CHOICES:
            raise ValueError(f"attention.kernels.gluon={self.gluon!r}: expected one of {', '.join(GLUON_CHOICES)}")
        if self.tma not in TMA_CHOICES:
            raise ValueError(f"attention.kernels.tma={self.tma!r}: expected one of {', '.join(TMA_CHOICES)}")


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Whether the device has Hopper's tensor memory accelerator (compute capability 9.0 or later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def tma_ok(kernel: str, tma: str, *tensors: torch.Tensor) -> bool:
    """Whether Triton's `kernel` ("fwd", "dkdv" or "dq") reads these [B, H, S, D] tensors through TMA:
    chosen for it (`tma`), a GPU that has TMA (sm_90+; the interpreter emulates it), and a layout the
    tensor memory accelerator accepts (launch.tma_layout_ok). Otherwise it uses pointer loads."""
    if kernel not in TMA_CHOICES[tma] or not (INTERPRET or _has_tma(tensors[0].device)):
        return False
    if not tma_layout_ok(*tensors):
        return False
    set_tma_allocator()
    return True


def use_gluon(kernel: str, gluon: str, block_size: int, *tensors: torch.Tensor) -> bool:
    """Whether `kernel` ("fwd", "dkdv", "dq" or "fused") runs in Gluon here under the choice `gluon`;
    a Gluon kernel that was required ("all", "fwd", ...) but cannot run raises."""
    kernels, required = GLUON_CHOICES[gluon]
    if kernel not in kernels or (INTERPRET and not required):
        return False
    if kernel == "fused" and torch.are_deterministic_algorithms_enabled():
        if required:
            raise RuntimeError(
                f"attention.kernels.gluon={gluon}: the one-kernel backward sums dQ in varying order, "
                "and torch.use_deterministic_algorithms is on (gluon=all is deterministic)"
            )
        return False  # auto: the split pair
    if not INTERPRET:
        from radial_lora.kernels import gluon_kernels

        if gluon_kernels.supported(block_size, *tensors):
            return True
    if not required:
        return False
    raise RuntimeError(
        f"attention.kernels.gluon={gluon} needs an sm_90 GPU, bf16/fp16 q/k/v with head dim 64 or 128 "
        "in TMA-readable layouts, and mask block 128"
    )


def kernel_plan(choice: KernelChoice, device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> str:
    """Which kernels the op runs for [B, H, S, head_dim] inputs of this device and dtype (in layouts
    TMA reads), in words, for a run's log: the automatic choice said once at the start, and kernels
    that cannot run here (no GPU, a required Gluon kernel) refused there rather than in the first
    step."""
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(NEEDS_GPU)
    probe = torch.empty(1, 1, block_size, head_dim, device=device, dtype=dtype)
    names = {"fwd": "forward", "dkdv": "dK/dV", "dq": "dQ"}
    if use_gluon("fused", choice.gluon, block_size, probe):  # it replaces the dK/dV and dQ kernels
        names = {"fwd": "forward", "fused": "dK/dV+dQ in one kernel"}
    gluon = [name for kernel, name in names.items() if use_gluon(kernel, choice.gluon, block_size, probe)]
    triton_side = [name for name in names.values() if name not in gluon]
    where = " (Triton's CPU interpreter)" if INTERPRET else ""
    parts = ([f"Gluon {', '.join(gluon)}"] if gluon else []) + (
        [f"Triton {', '.join(triton_side)}{where}"] if triton_side else []
    )
    return f"{'; '.join(parts)} (gluon={choice.gluon}, tma={choice.tma})"
