"""Block-sparse attention with PyTorch FlexAttention, from the same block mask.

Shapes: q, k, v [B, H, S, D]; block_mask bool [ceil(S/bs), ceil(S/bs)].
Every kept block is passed as a *full* block (no mask_mod is evaluated inside it); FlexAttention
bounds-checks the partial last block itself from seq_lengths. Compiled with torch.compile, as
FlexAttention is meant to run (eager FlexAttention materializes the scores). Note that PyTorch
has no FlexAttention backward on CPU: there it is forward-only.
"""

from __future__ import annotations

import functools

import torch

from radial_lora.kernels.mask_cache import derived


def flex_block_mask(block_mask: torch.Tensor, seq_len: int, block_size: int):
    """FlexAttention's BlockMask for `block_mask` (cached with it)."""
    from torch.nn.attention.flex_attention import BlockMask

    def build():
        counts = block_mask.sum(-1, dtype=torch.int32)
        # Kept key blocks first, in increasing order (a stable sort of "not kept").
        indices = torch.argsort((~block_mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return BlockMask.from_kv_blocks(
            torch.zeros_like(counts)[None, None],
            indices[None, None],
            counts[None, None],
            indices[None, None],
            BLOCK_SIZE=block_size,
            seq_lengths=(seq_len, seq_len),
        )

    return derived(block_mask, ("flex", seq_len, block_size), build)


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def block_sparse_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
) -> torch.Tensor:
    """FlexAttention over the kept blocks of `block_mask` (compiled)."""
    mask = flex_block_mask(block_mask, q.shape[-2], block_size)
    return _compiled_flex_attention()(q, k, v, block_mask=mask, scale=scale)
