"""The attention seam: each Wan block's self-attention (attn1) runs through our processor.

The processor does what diffusers' `WanAttnProcessor` does for self-attention (projections,
RMS q/k norm, rotary embedding, output projection), but hands the attention itself to
`kernels.attention` with the configured backend. Cross-attention (attn2) keeps the stock processor.
The swap goes through diffusers' per-module `set_processor`, never a global patch.
"""

from __future__ import annotations

import torch

from kernels import attention


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs; x [B, S, H, D], cos/sin [1, S, 1, D] (fp32/64)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSelfAttnProcessor:
    """Self-attention of a `WanAttention` module with a selectable attention backend."""

    def __init__(self, backend: str = "sdpa"):
        self.backend = backend

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("WanSelfAttnProcessor is for self-attention (attn1) without a mask")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)

        # [B, S, H*D] -> [B, S, H, D]; rotary is applied in this layout as diffusers does.
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            query, key = apply_rotary(query, *rotary_emb), apply_rotary(key, *rotary_emb)

        out = attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), backend=self.backend)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def set_self_attention(transformer, backend: str) -> int:
    """Route every block's attn1 through `WanSelfAttnProcessor(backend)`; returns how many were set."""
    processor = WanSelfAttnProcessor(backend)
    for block in transformer.blocks:
        block.attn1.set_processor(processor)
    return len(transformer.blocks)
