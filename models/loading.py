"""Load a diffusers-format video model by name, with each component in its configured dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from train.config import ModelConfig

# Small random models built on the spot (models/tiny_wan.py): model id -> preset.
TINY_MODELS = {"tiny-wan": "tiny", "tiny-wan-gpu": "gpu"}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name) -> torch.dtype:
    """torch dtype for a config dtype name (an enum member or its string value)."""
    return _DTYPES[getattr(name, "value", name)]


def model_source(cfg: ModelConfig) -> str:
    """The folder or hub id that `from_pretrained` reads; builds the tiny demo model if needed."""
    if cfg.id in TINY_MODELS:
        if not cfg.path:
            raise ValueError(f"model.path must name a folder for model.id={cfg.id} (it is built there)")
        from models.tiny_wan import build_tiny_wan

        return str(build_tiny_wan(cfg.path, preset=TINY_MODELS[cfg.id]))
    if cfg.path:
        if not Path(cfg.path, "model_index.json").exists():
            raise FileNotFoundError(f"model.path={cfg.path} is not a diffusers model folder (no model_index.json)")
        return cfg.path
    return cfg.id


def load_pipeline(cfg: ModelConfig, transformer: bool = True):
    """A `WanPipeline` with the transformer, VAE and text encoder in their configured dtypes.

    Loading the whole pipeline (rather than each class by hand) keeps training on exactly the
    path users take for inference, and gives us its `encode_prompt`. `transformer=False` leaves
    the transformer out (encoding-only work such as the latent cache).
    """
    from diffusers import WanPipeline

    dtypes = {
        "transformer": torch_dtype(cfg.transformer_dtype),
        "vae": torch_dtype(cfg.vae_dtype),
        "text_encoder": torch_dtype(cfg.text_encoder_dtype),
        "default": torch.float32,
    }
    skip = {} if transformer else {"transformer": None}
    return WanPipeline.from_pretrained(model_source(cfg), dtype=dtypes, **skip)
