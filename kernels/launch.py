"""What the launchers of the Triton and Gluon attention kernels share."""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and sequence strides of a [B, H, S, D] tensor (the kernels take D's as 1)."""
    return t.stride(0), t.stride(1), t.stride(2)


def tma_layout_ok(*tensors: torch.Tensor) -> bool:
    """Whether the tensor memory accelerator can read these [B, H, S, D] tensors: unit head-dim
    stride, 16-byte aligned start of every (b, h) matrix, row strides a multiple of 16 bytes.

    Judged from the storage offset, not the address: torch's allocators align every storage to at
    least 64 bytes, and torch.compile traces with fake tensors, which have no address."""
    for t in tensors:
        unit = 16 // t.element_size()
        if t.stride(-1) != 1 or t.storage_offset() % unit or any(stride % unit for stride in t.stride()[:3]):
            return False
    return True


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Scratch memory for the descriptors the kernels make (Triton asks its allocator for it)."""
    return torch.empty(size, device="cpu" if INTERPRET else "cuda", dtype=torch.int8)


def set_tma_allocator() -> None:
    """Give Triton the allocator that kernels making TMA descriptors in-kernel need.

    Triton keeps its allocator in a context variable, which a new thread starts without, and
    autograd runs the backward on a thread of its own: so every launch that needs it sets it (a
    cheap variable store), not once per process."""
    triton.set_allocator(_tma_scratch)
