"""Real Wan2.1 architectures with random weights (`model.init=random`).

For speed and memory work where no weights can be downloaded (a cluster node that reaches no model hub): the
transformer has the published architecture of the named checkpoint, the VAE is Wan's
(AutoencoderKLWan's defaults are Wan2.1's), the text encoder is UMT5-XXL's encoder. Only the
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
TRANSFORMERS = {
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers": dict(_WAN21_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": dict(_WAN21_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40),
}
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
):
    """A WanPipeline with `model_id`'s architecture and random weights, built on `device`
    (without the transformer or the text encoder when they are not wanted)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from radial_lora.models.tiny_wan import _build_tokenizer

    if model_id not in TRANSFORMERS:
        raise ValueError(f"model.init=random knows {', '.join(TRANSFORMERS)}; not {model_id!r}")
    torch.manual_seed(seed)
    model = build_transformer(TRANSFORMERS[model_id], dtypes["transformer"], device) if transformer else None
    with torch.device(device):
        with default_dtype(dtypes["vae"]):
            vae = AutoencoderKLWan()
        encoder = None
        if text_encoder:
            with default_dtype(dtypes["text_encoder"]):
                encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).eval()
    return WanPipeline(
        tokenizer=_build_tokenizer(),
        text_encoder=encoder,
        vae=vae.eval(),
        transformer=model,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
