"""Wan (2.1 and 2.2, text- and image-to-video): diffusers' `WanTransformer3DModel`.

Self-attention is each block's `attn1` over the video tokens alone (the text, and for image-to-video
the CLIP image tokens, enter through the cross-attention `attn2`, which keeps its stock processor).
Latent patches are (1, 2, 2) in the published models (the pixel-space experiment model: (1, 4, 4)).
"""

from __future__ import annotations

import torch

from radial_lora.models.attention import RadialSelfAttention
from radial_lora.models.families import Family


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs; x [B, S, H, D], cos/sin [1, S, 1, D] (fp32/64)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSelfAttnProcessor(RadialSelfAttention):
    """Self-attention of one `WanAttention` module (block `layer`), as diffusers' `WanAttnProcessor`
    does it for attn1, with our attention call."""

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

        sp = self.routing.sp  # sequence parallel: this process holds a slice of the tokens
        if sp is not None:
            query, key, value = sp.to_heads(query), sp.to_heads(key), sp.to_heads(value)
        out = self.attend(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)
        if sp is not None:
            out = sp.to_tokens(out)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class Wan(Family):
    name = "wan"

    def processor(self, layer, routing):
        return WanSelfAttnProcessor(layer, routing)

    def self_attention(self, transformer):
        return [block.attn1 for block in transformer.blocks]

    def blocks(self, transformer):
        return list(transformer.blocks)

    def patch_size(self, config):
        return tuple(config.patch_size)


FAMILY = Wan()
