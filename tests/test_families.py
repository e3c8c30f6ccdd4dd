"""The attention seam per model family (models/families/): HunyuanVideo's joint text+video
attention through our processor equals diffusers' own in dense mode; in radial mode the mask
covers the video, the text's rows and columns are dense and the prompt's padding gets no
attention; unknown transformer classes fail in one line."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radial_lora.configs.schema import AttentionConfig, ConfigError
from radial_lora.kernels.radial_mask import radial_block_mask, token_mask
from radial_lora.models.attention import describe, set_self_attention
from radial_lora.models.families import family_of

FRAMES, SIDE, TEXT = 8, 8, 6  # latent frames, tokens a side (latent 16x16, patch 2), text tokens
PER_FRAME = SIDE * SIDE
RADIAL = dict(block_size=16, decay=0.2)


def tiny_hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
        pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), guidance_embeds=False,
    ).eval()  # fmt: skip


def inputs(lengths=(6, 3), seed=1):
    g = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    mask = torch.arange(TEXT)[None] < torch.tensor(lengths)[:, None]
    return dict(
        hidden_states=torch.randn(batch, 4, FRAMES, SIDE * 2, SIDE * 2, generator=g),
        timestep=torch.tensor([700.0] * batch),
        encoder_hidden_states=torch.randn(batch, TEXT, 16, generator=g),
        encoder_attention_mask=mask.long(),
        pooled_projections=torch.randn(batch, 8, generator=g),
        return_dict=False,
    )


def test_hunyuan_dense_matches_the_stock_processor():
    model, x = tiny_hunyuan(), inputs()
    with torch.no_grad():
        stock = model(**x)[0]
        set_self_attention(model, AttentionConfig(backend="dense"))
        ours = model(**x)[0]
    assert family_of(model).name == "hunyuan_video"
    assert describe(model) == "self-attention: 2 layers dense"
    assert torch.allclose(ours, stock, atol=1e-6, rtol=0)


def test_hunyuan_radial_keeps_text_dense_and_padding_unseen():
    model, x = tiny_hunyuan(), inputs()
    routing = set_self_attention(model, AttentionConfig(backend="reference", **RADIAL))
    with torch.no_grad():
        out = model(**x)[0]
        # The padding of the shorter prompt (sample 1) changes nothing anywhere.
        other = dict(x, encoder_hidden_states=x["encoder_hidden_states"].clone())
        other["encoder_hidden_states"][1, 3:] = torch.randn(TEXT - 3, 16)
        assert torch.equal(model(**other)[0], out)
    assert routing.text_tokens == [6, 3] and set(routing.masks) == {6, 3}
    assert routing.calls == {"radial": 2 * 2 * 2, "dense": 0}  # 2 forwards x 2 layers x 2 samples
    mask = routing.masks[3]
    video_blocks = FRAMES * PER_FRAME // RADIAL["block_size"]
    assert mask.shape == (video_blocks + 1, video_blocks + 1) and mask[-1].all() and mask[:, -1].all()
    assert not mask[:video_blocks, :video_blocks].all(), "the video part is sparse"


def test_joint_attention_against_an_explicit_token_mask():
    """The processor's attention call on its own: for each sample, the valid rows equal dense
    attention under the radial token mask with the text dense and the padding masked out; the
    padding rows attend densely to the valid tokens."""
    model = tiny_hunyuan()
    routing = set_self_attention(model, AttentionConfig(backend="reference", **RADIAL))
    processor = family_of(model).self_attention(model)[0].processor
    video, lengths = FRAMES * PER_FRAME, [6, 2]
    routing.video_shape, routing.text_tokens, routing.masks = (FRAMES, PER_FRAME), lengths, {}
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, video + TEXT, 16, generator=g) for _ in range(3))
    key_mask = torch.arange(video + TEXT)[None] < (video + torch.tensor(lengths))[:, None]
    out = processor.attend_joint(q, k, v, key_mask)
    for i, n in enumerate(video + torch.tensor(lengths)):
        n = int(n)
        allowed = torch.zeros(video + TEXT, video + TEXT, dtype=torch.bool)
        allowed[:n, :n] = token_mask(radial_block_mask(FRAMES, PER_FRAME, text_tokens=n - video, **RADIAL), n, 16)
        allowed[n:, :n] = True
        want = F.scaled_dot_product_attention(q[i], k[i], v[i], attn_mask=allowed)
        assert torch.allclose(out[i], want, atol=1e-5), i
        # text rows and columns: every valid token sees every prompt token and the reverse
        assert allowed[:n, video:n].all() and allowed[video:n, :n].all()


def test_an_unknown_transformer_class_fails_in_one_line():
    with pytest.raises(ConfigError, match=r"Linear: no attention adapter .* \(supported: WanTransformer3DModel"):
        family_of(torch.nn.Linear(2, 2))


def test_the_energy_probe_says_it_is_built_for_wan():
    from radial_lora.models.attention_probe import Recorder, install_probe

    with pytest.raises(ConfigError, match="energy probe is built for Wan's self-attention, not hunyuan_video"):
        install_probe(
            tiny_hunyuan(), AttentionConfig(backend="dense"), Recorder(queries=4, seed=0, masks={}, block_size=16)
        )
