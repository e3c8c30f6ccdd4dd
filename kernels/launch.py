"""What the launchers of the Triton and Gluon attention kernels share."""

from __future__ import annotations

import os

import torch
import triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Batch, head and sequence strides of a [B, H, S, D] tensor (the kernels take D's as 1)."""
    return t.stride(0), t.stride(1), t.stride(2)


def _tma_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Scratch memory for the descriptors the kernels make (Triton asks its allocator for it)."""
    return torch.empty(size, device="cpu" if INTERPRET else "cuda", dtype=torch.int8)


def set_tma_allocator() -> None:
    """Give Triton the allocator that kernels making TMA descriptors in-kernel need.

    Triton keeps its allocator in a context variable, which a new thread starts without, and
    autograd runs the backward on a thread of its own: so every launch that needs it sets it (a
    cheap variable store), not once per process."""
    triton.set_allocator(_tma_scratch)
