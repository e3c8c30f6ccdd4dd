"""A tiny, random-init Wan2.1 saved as a diffusers model folder.

The demo and the tests need a model without network access, so this builds the real diffusers and
transformers classes (WanTransformer3DModel, AutoencoderKLWan, UMT5EncoderModel, a T5 tokenizer)
at toy sizes and writes them with `save_pretrained`, laid out as a `WanPipeline` folder. Training
then loads it through the same `from_pretrained` calls a real checkpoint goes through.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

# Words of the demo captions (data/demo_videos.py draws from them) plus some filler: each is one
# token of the tiny tokenizer.
VOCAB_WORDS = (
    "a an the of and with on in to from moving slowly quickly left right up down diagonally "
    "red green blue yellow cyan magenta white orange purple pink gray black background "
    "square circle stripe stripes bar bars checkerboard gradient pattern dot dots ring "
    "video clip scene small large bright dark coloured colored over across frame"
).split()


def _build_tokenizer():
    """A small T5-style Unigram tokenizer (pad=0, eos=1, unk=2, "▁" word prefix, as in UMT5).

    Whole demo words score high; single letters and digits score low, so any other word still
    tokenizes (letter by letter) instead of collapsing to <unk>.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in sorted(set(VOCAB_WORDS))]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ".,;:!?'-"]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


# Transformer sizes. `tiny` is the CPU demo's. `gpu` has Wan2.1-1.3B's blocks (12 heads x 128,
# FFN 8960) but 10 of its 30 layers, with the tiny VAE and text encoder: a compute-bound model
# for multi-GPU scaling runs that builds in seconds (the real 1.3B: model.init=random, issue 7).
PRESETS = {
    "tiny": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, freq_dim=32),
    "gpu": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=10, freq_dim=256),
    "ti2v": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, freq_dim=32),
    "a14b": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, freq_dim=32),
    "i2v": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, freq_dim=32),
    "a14b_i2v": dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=2, freq_dim=32),
}
"""Transformer sizes. `ti2v` goes with a Wan2.2-style VAE (2x2 pixel patches, residual, 16x
spatial compression) and per-token timesteps, as Wan2.2-TI2V-5B has them; `a14b` is two such
transformers (Wan2.1's VAE), a high- and a low-noise expert switched at sigma 0.875, as in
Wan2.2-T2V-A14B. `i2v` is an image-to-video Wan2.1 (2z + 4 input channels: the first-frame
condition, models/image_conditioning.py; a small CLIP vision encoder whose embedding enters the
cross-attention), `a14b_i2v` Wan2.2-I2V-A14B's layout: two image-to-video experts without CLIP,
switched at sigma 0.9."""
IMAGE_TO_VIDEO = {"i2v", "a14b_i2v"}
TWO_EXPERTS = {"a14b": 0.875, "a14b_i2v": 0.9}
"""The two-expert presets and the noise level where they switch (the pipeline's boundary_ratio)."""


def tiny_image_encoder():
    """(image processor, image encoder): a 2-layer CLIP vision model on 32x32 crops (17 tokens of
    width 16) and the processor that resizes and normalizes images for it, as CLIP-ViT-H's does."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
            patch_size=8,
        )
    )  # fmt: skip
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return processor, encoder.eval()


TEXT_DIM = 32


def tiny_text_encoder():
    """(tokenizer, text encoder): a 2-layer UMT5 encoder of width TEXT_DIM over the tiny tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = _build_tokenizer()
    text_dim = TEXT_DIM
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=text_dim,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=32,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return tokenizer, text_encoder


def _build_components(seed: int, preset: str = "tiny") -> dict:
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    torch.manual_seed(seed)
    tokenizer, text_encoder = tiny_text_encoder()
    text_dim = TEXT_DIM
    z_dim = 8 if preset == "ti2v" else 4
    wan22 = dict(is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16)
    vae = AutoencoderKLWan(
        base_dim=16 if preset == "ti2v" else 8,
        decoder_base_dim=16 if preset == "ti2v" else None,
        z_dim=z_dim,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
        **(wan22 if preset == "ti2v" else {}),
    )
    arch = dict(
        patch_size=(1, 2, 2), in_channels=z_dim, out_channels=z_dim, text_dim=text_dim, rope_max_seq_len=1024,
        **PRESETS[preset],
    )  # fmt: skip
    components = {}
    if preset in IMAGE_TO_VIDEO:  # the first-frame condition's channels: a mask of 4, then a latent
        arch["in_channels"] = 2 * z_dim + 4
    if preset == "i2v":  # Wan2.1-I2V: the CLIP embedding through the cross-attention's added k/v
        components["image_processor"], components["image_encoder"] = tiny_image_encoder()
        inner = arch["num_attention_heads"] * arch["attention_head_dim"]
        arch |= dict(image_dim=components["image_encoder"].config.hidden_size, added_kv_proj_dim=inner)
    transformer = WanTransformer3DModel(**arch)
    # Wan's sampling scheduler in diffusers' examples; training draws its own sigmas.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    components |= dict(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    if preset in TWO_EXPERTS:
        return components | {"transformer_2": WanTransformer3DModel(**arch), "boundary_ratio": TWO_EXPERTS[preset]}
    return components | ({"expand_timesteps": True} if preset == "ti2v" else {})


def build_tiny_wan(path: str | os.PathLike, seed: int = 0, preset: str = "tiny") -> Path:
    """Write a small random WanPipeline folder (WanImageToVideoPipeline for the image-to-video
    presets) to `path` (once: an existing folder is kept)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    pipeline = WanImageToVideoPipeline if preset in IMAGE_TO_VIDEO else WanPipeline
    return write_pipeline_once(path, lambda: _build_components(seed, preset), pipeline)


def write_pipeline_once(path: str | os.PathLike, components, pipeline=None) -> Path:
    """Save `pipeline(**components())` (a WanPipeline by default) to `path` unless a model is
    there already.

    Built into a temporary sibling and renamed, so an interrupted build never leaves a half
    folder that later runs would try to load.
    """
    from diffusers import WanPipeline

    pipeline = pipeline or WanPipeline
    path = Path(path)
    if (path / "model_index.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    try:
        pipeline(**components()).save_pretrained(tmp)
        try:
            tmp.rename(path)
        except OSError:  # another process finished first: keep its copy
            if not (path / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
