"""Real Wan architectures with random weights (`model.init=random`).

For speed and memory work where no weights can be downloaded (a cluster node that reaches no model hub): the
transformer has the published architecture of the named checkpoint, the VAE is Wan's
(AutoencoderKLWan's defaults are Wan2.1's; Wan2.2-TI2V-5B has its own, 16x spatial compression
and 48 latent channels), the text encoder is UMT5-XXL's encoder. Only the
tokenizer is not the real one (google/umt5-xxl's vocabulary needs a download): the small local
one from models/tiny_wan.py stands in; with random weights the token ids mean nothing anyway.
Weights are created directly on the target device, in the configured dtypes.
"""

from __future__ import annotations

import torch

# transformer/config.json of the Diffusers-format checkpoints (Wan2.1 T2V).
_WAN21_COMMON = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
TI2V_5B = "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
T2V_A14B = "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
I2V_A14B = "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
I2V_14B = ("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers")
_WAN_14B = dict(_WAN21_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40)
# Image-to-video: 36 input channels (16 noisy, 4 of the given-frame mask, 16 of the first frame's
# latent: models/image_conditioning.py); Wan2.1's also reads CLIP-ViT-H's 1280-wide image tokens
# through added key/value projections of its cross-attention.
_I2V = dict(in_channels=36)
_CLIP_IMAGE = dict(image_dim=1280, added_kv_proj_dim=5120)
TRANSFORMERS = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": dict(_WAN21_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": _WAN_14B,
    T2V_A14B: _WAN_14B,  # each of its 2 experts
    TI2V_5B: dict(_WAN21_COMMON, in_channels=48, out_channels=48, num_attention_heads=24, ffn_dim=14336, num_layers=30),
    **{model: dict(_WAN_14B, **_I2V, **_CLIP_IMAGE) for model in I2V_14B},
    I2V_A14B: dict(_WAN_14B, **_I2V),  # each of its 2 experts
}
# image_encoder/config.json of Wan2.1-I2V-14B-*-Diffusers: CLIP-ViT-H/14's vision tower
# (laion/CLIP-ViT-H-14-laion2B-s32B-b79K), 257 tokens of 1280 from a 224x224 crop.
CLIP_VIT_H = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, image_size=224,
    patch_size=14, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5,
)  # fmt: skip
# vae/config.json of Wan2.2-TI2V-5B-Diffusers: the Wan2.2 VAE (2x2 pixel patches in, a residual
# encoder, 16x spatial and 4x temporal compression, 48 latent channels).
WAN22_VAE = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[
        -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
        0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
        -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
        -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
    ],
    latents_std=[
        0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
        0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
        0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
        0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
    ],
)  # fmt: skip
VAES = {TI2V_5B: WAN22_VAE}
"""The VAE by model id where it is not AutoencoderKLWan's default (Wan2.1's)."""
PIPELINE_OPTIONS = {
    TI2V_5B: dict(expand_timesteps=True),
    T2V_A14B: dict(boundary_ratio=0.875),
    I2V_A14B: dict(boundary_ratio=0.9),
}
"""The pipeline's options by model id: TI2V-5B takes per-token timesteps (its first frame can be
given); T2V-A14B switches from its high-noise expert to the low-noise one below sigma 0.875,
I2V-A14B below 0.9 (Wan2.2's published boundaries)."""
TWO_EXPERTS = {T2V_A14B, I2V_A14B}
IMAGE_TO_VIDEO = {*I2V_14B, I2V_A14B}
"""Models whose pipeline is WanImageToVideoPipeline."""
# google/umt5-xxl's encoder, as the Wan2.1 checkpoints ship it.
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    layer_norm_epsilon=1e-6,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


class default_dtype:
    """Create tensors in `dtype` inside the block (module constructors read the default)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __enter__(self):
        self.previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.previous)


def build_transformer(arch: dict, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """A WanTransformer3DModel of architecture `arch` with random weights, made on `device` in `dtype`."""
    from diffusers import WanTransformer3DModel

    with torch.device(device), default_dtype(dtype):
        return WanTransformer3DModel(**arch)


def random_pipeline(
    model_id: str,
    dtypes: dict,
    device: str | torch.device = "cpu",
    seed: int = 0,
    transformer: bool = True,
    text_encoder: bool = True,
    expert: str | None = None,
    both_experts: bool = False,
):
    """A WanPipeline with `model_id`'s architecture and random weights, built on `device`
    (without the transformer or the text encoder when they are not wanted). A two-expert model
    gets the one `expert` as its `transformer` (the only one a run trains), or with `both_experts`
    both (`transformer_2` the low-noise one), as generation uses them."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    from radial_lora.models.loading import check_expert
    from radial_lora.models.tiny_wan import _build_tokenizer

    if model_id not in TRANSFORMERS:
        raise ValueError(f"model.init=random knows {', '.join(TRANSFORMERS)}; not {model_id!r}")
    both = both_experts and model_id in TWO_EXPERTS
    if not both:
        check_expert(model_id, expert, model_id in TWO_EXPERTS)
    torch.manual_seed(seed)
    model = build_transformer(TRANSFORMERS[model_id], dtypes["transformer"], device) if transformer else None
    low_noise = (
        build_transformer(TRANSFORMERS[model_id], dtypes["transformer"], device) if transformer and both else None
    )
    with torch.device(device):
        with default_dtype(dtypes["vae"]):
            vae = AutoencoderKLWan(**VAES.get(model_id, {}))
        encoder = None
        if text_encoder:
            with default_dtype(dtypes["text_encoder"]):
                encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).eval()
        image = {}
        if model_id in IMAGE_TO_VIDEO:
            image["image_processor"] = CLIPImageProcessor()  # CLIP's 224 crop and normalization
            if text_encoder and TRANSFORMERS[model_id].get("image_dim"):  # fp32, as diffusers' examples load it
                image["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_H)).eval()
    pipeline = WanImageToVideoPipeline if model_id in IMAGE_TO_VIDEO else WanPipeline
    return pipeline(
        tokenizer=_build_tokenizer(),
        text_encoder=encoder,
        vae=vae.eval(),
        transformer=model,
        transformer_2=low_noise,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        **image,
        **PIPELINE_OPTIONS.get(model_id, {}),
    )
