"""Plain PyTorch block-sparse attention: the truth the fast backends are tested against.

Shapes: q, k, v [B, H, S, D]; block_mask bool [ceil(S/bs), ceil(S/bs)] shared by batch and heads.
Token-exact: the block mask is expanded to an [S, S] token mask and attention is computed with an
explicit softmax (in fp32 unless asked otherwise), so memory is O(S^2): for tests and small S only. Query rows with no
kept key (an all-False block row) output zeros and get zero gradients, as the kernels do.
"""

from __future__ import annotations

import torch

from radial_lora.kernels.radial_mask import token_mask


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """softmax(q k^T * scale, masked to the kept blocks) v in q's dtype.

    Computed in at least fp32 (`upcast=True`, the truth; fp64 inputs stay fp64), or in the inputs'
    own precision (`upcast=False`: the error a plain PyTorch implementation makes at that
    precision, which the kernels' error is measured against).
    """
    seq_len, head_dim = q.shape[-2], q.shape[-1]
    expected = -(-seq_len // block_size)
    if block_mask.shape != (expected, expected):
        raise ValueError(f"block_mask {tuple(block_mask.shape)} does not fit S={seq_len} with block_size={block_size}")
    scale = head_dim**-0.5 if scale is None else scale
    out_dtype = q.dtype
    allowed = token_mask(block_mask.to(q.device), seq_len, block_size)
    has_key = allowed.any(-1, keepdim=True)
    dtype = torch.promote_types(q.dtype, torch.float32) if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    # Rows without keys: finite scores so softmax stays NaN-free, then zeroed.
    scores = torch.where(has_key, scores, torch.zeros((), device=q.device))
    probs = torch.softmax(scores, dim=-1) * has_key
    return (probs.to(dtype) @ v).to(out_dtype)
