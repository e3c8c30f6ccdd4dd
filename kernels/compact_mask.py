"""The block mask in the form the attention kernels read: per mask row, the kept key blocks; per
mask column, the query blocks that keep it; and the order the kernels launch their programs in.

  block mask  [NB, NB] bool, NB = ceil(S / MASK_BLOCK), one for all batches and heads
  kv_count [NB] int32, kv_index [NB, W] int32   kept key blocks of each query block, ascending
  q_count  [NB] int32, q_index  [NB, W'] int32  query blocks that keep each key block (the transpose)
  kv_order, q_order [NB] int32                  mask rows / columns by kept count, most first
"""

from __future__ import annotations

import torch

from radial_lora.kernels.mask_cache import derived


def compact_mask(block_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(kv_count, kv_index, kv_order, q_count, q_index, q_order) of a bool block mask, int32 on its
    device (cached).

    Indices are ascending (kept blocks first, by a stable sort), padded to the widest row. An order
    lists the rows by kept count, most first: every kernel launches its programs in it, so
    the longest start first and the grid's last wave is short ones. A radial mask keeps its first
    frame's blocks for every row (the attention sink): at the wan_4x shape those key blocks have
    5.3x the mean count, and in block order they start late enough in the last head to leave the
    GPU waiting on them (a list-scheduling model of 132 SMs, scripts/lab/launch_order_model.py: 5.3-6.6%
    over the ideal makespan in block order, 0.1-0.6% in this order; measured:
    docs/radial_attention.md, what we tried).
    """

    def build():
        def rows(mask):
            count = mask.sum(-1, dtype=torch.int32)
            width = max(int(count.max()) if count.numel() else 0, 1)
            index = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :width]
            heavy_first = torch.argsort(count, descending=True, stable=True)
            return count.contiguous(), index.to(torch.int32).contiguous(), heavy_first.to(torch.int32).contiguous()

        return (*rows(block_mask), *rows(block_mask.t()))

    return derived(block_mask, "triton_compact", build)
