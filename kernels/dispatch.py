"""One entry point, `attention(q, k, v, backend=..., block_mask=...)`, choosing the implementation.

Shapes: q, k, v [B, H, S, D] -> out [B, H, S, D]; block_mask bool [ceil(S/bs), ceil(S/bs)].
`dense` is exact full attention; the others compute only the kept blocks of `block_mask`.
A backend that cannot run on the given inputs raises; nothing falls back silently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radial_lora.kernels.flex import block_sparse_attention_flex, flex_block_mask
from radial_lora.kernels.reference import block_sparse_attention_reference


def block_sparse_attention_triton(q, k, v, block_mask, *, block_size=128, scale=None, kernels=None):
    """Our Triton/Gluon kernels (imported on first use: Triton is only needed when they are);
    `kernels` a kernel_choice.KernelChoice, None for its defaults."""
    from radial_lora.kernels.kernel_choice import KernelChoice
    from radial_lora.kernels.sparse_attention import block_sparse_attention

    return block_sparse_attention(
        q, k, v, block_mask, block_size=block_size, scale=scale, kernels=kernels or KernelChoice()
    )


SPARSE_BACKENDS = {
    "reference": block_sparse_attention_reference,
    "flex": block_sparse_attention_flex,
    "triton": block_sparse_attention_triton,
}
BACKENDS = ("dense", *SPARSE_BACKENDS)


def prepare_mask(backend: str, block_mask: torch.Tensor, seq_len: int, block_size: int) -> None:
    """Build (and cache with the mask) the form of `block_mask` that `backend`'s kernels read.

    Call it in eager code before a compiled region uses the mask: building the triton index lists
    needs the widest row's length (a `.item()`), which torch.compile cannot trace (a graph break at
    every block), while a cache hit traces into a plain tensor input.
    """
    if backend == "triton":
        from radial_lora.kernels.compact_mask import compact_mask

        compact_mask(block_mask)
    elif backend == "flex":
        flex_block_mask(block_mask, seq_len, block_size)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    backend: str = "dense",
    block_mask: torch.Tensor | None = None,
    block_size: int = 128,
    kernels=None,
) -> torch.Tensor:
    """Non-causal softmax(q k^T / sqrt(D)) v, dense or over the kept blocks of `block_mask`;
    `kernels` (a kernel_choice.KernelChoice) picks the triton backend's kernels."""
    if backend == "dense":
        # torch picks cuDNN / flash / memory-efficient / math by device and dtype.
        return F.scaled_dot_product_attention(q, k, v)
    if backend not in SPARSE_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if block_mask is None:
        raise ValueError(f"attention backend {backend!r} needs a block_mask")
    if backend == "triton":
        return block_sparse_attention_triton(q, k, v, block_mask, block_size=block_size, kernels=kernels)
    return SPARSE_BACKENDS[backend](q, k, v, block_mask, block_size=block_size)
