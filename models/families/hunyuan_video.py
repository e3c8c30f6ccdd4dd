"""HunyuanVideo: diffusers' `HunyuanVideoTransformer3DModel` (the paper's 4x model).

Its attention is joint: in the dual-stream blocks (`transformer_blocks`) video and text tokens have
their own projections and attend together; in the single-stream blocks
(`single_transformer_blocks`) they are one sequence. Either way the sequence is the video's F*s
tokens followed by the prompt's text tokens, padded to a fixed length; the padding must never get
attention. The radial mask covers the video; the text's rows and columns stay dense (every video
token sees the prompt, the prompt sees everything); no attention sink beyond that (the text is
the sink). Rotary embeddings apply to the video tokens only. The token refiner's text-only
attention keeps its stock processor.
"""

from __future__ import annotations

import torch

from radial_lora.models.attention import RadialSelfAttention
from radial_lora.models.families import Family


class HunyuanVideoSelfAttnProcessor(RadialSelfAttention):
    """Joint text+video attention of one HunyuanVideo block (dual- or single-stream), as diffusers'
    `HunyuanVideoAttnProcessor2_0` does it, with our attention call."""

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: torch.Tensor | None = None,
    ):
        from diffusers.models.embeddings import apply_rotary_emb

        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        text = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        video = hidden_states.shape[1] - (text if single_stream else 0)

        query, key, value = (
            proj(hidden_states).unflatten(2, (attn.heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # the video tokens only
            query = torch.cat(
                [apply_rotary_emb(query[:, :video], image_rotary_emb, sequence_dim=1), query[:, video:]], 1
            )
            key = torch.cat([apply_rotary_emb(key[:, :video], image_rotary_emb, sequence_dim=1), key[:, video:]], 1)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:  # dual-stream: the text's own projections
            projections = (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj)
            eq, ek, ev = (proj(encoder_hidden_states).unflatten(2, (attn.heads, -1)) for proj in projections)
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            query, key, value = torch.cat([query, eq], 1), torch.cat([key, ek], 1), torch.cat([value, ev], 1)

        tokens = query.shape[1]
        key_mask = (
            attention_mask.reshape(attention_mask.shape[0], tokens).bool()
            if attention_mask is not None
            else torch.ones(query.shape[0], tokens, dtype=torch.bool, device=query.device)
        )
        out = self.attend_joint(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), key_mask)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)

        if encoder_hidden_states is None:
            return out, None
        out, text_out = out[:, :-text], out[:, -text:]
        if getattr(attn, "to_out", None) is not None:
            out = attn.to_out[1](attn.to_out[0](out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return out, text_out


class HunyuanVideo(Family):
    name = "hunyuan_video"

    def processor(self, layer, routing):
        return HunyuanVideoSelfAttnProcessor(layer, routing)

    def self_attention(self, transformer):
        return [block.attn for block in self.blocks(transformer)]

    def blocks(self, transformer):
        return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]

    def patch_size(self, config):
        return (config.patch_size_t, config.patch_size, config.patch_size)

    def text_tokens(self, args, kwargs):
        mask = kwargs["encoder_attention_mask"] if "encoder_attention_mask" in kwargs else args[3]
        return [int(n) for n in mask.sum(dim=1).tolist()]


FAMILY = HunyuanVideo()
