"""Model families at the attention seam: one small adapter per diffusers transformer class.

An adapter says, for its family, which modules are the self-attention our processors replace (in
layer order), which processor class does it, the repeated blocks (for gradient checkpointing and
compiled blocks), the latent patch size (how a forward's input becomes F frames x s tokens a
frame), and how many text tokens each sample brings into a joint attention (none for Wan, whose
text enters by cross-attention; the valid prompt tokens for HunyuanVideo, whose text tokens follow
the video tokens in the same attention). The mask, the dispatch and the kernels see only F, s and
the text tokens: they stay model-agnostic.

Adding a family is one file here (a `Family` subclass) plus its name in FAMILY_MODULES, and
configs. Adapters are imported on first use, so this module imports nothing heavy.
"""

from __future__ import annotations

import importlib

import torch

from radial_lora.configs.schema import ConfigError

FAMILY_MODULES = {
    "WanTransformer3DModel": "radial_lora.models.families.wan",
    "HunyuanVideoTransformer3DModel": "radial_lora.models.families.hunyuan_video",
}
"""diffusers transformer class name -> the module holding its adapter (`FAMILY`)."""


class Family:
    """What the attention seam needs to know about one model family."""

    name: str = ""

    def processor(self, layer: int, routing):
        """Our self-attention processor for layer `layer`, sharing `routing`."""
        raise NotImplementedError

    def self_attention(self, transformer) -> list[torch.nn.Module]:
        """The attention modules whose processors are replaced, in layer order."""
        raise NotImplementedError

    def blocks(self, transformer) -> list[torch.nn.Module]:
        """The repeated transformer blocks, in order (checkpointed and compiled one by one)."""
        raise NotImplementedError

    def patch_size(self, config) -> tuple[int, int, int]:
        """(frames, height, width) of a latent patch: one token."""
        raise NotImplementedError

    def text_tokens(self, args: tuple, kwargs: dict) -> list[int] | None:
        """Per sample, the text tokens a joint attention holds (its valid prompt tokens), read from
        the transformer's forward arguments; None for a family without joint text."""
        return None

    def video_shape(self, transformer, hidden_states: torch.Tensor) -> tuple[int, int]:
        """(latent frames F, tokens per frame s) of a forward's input [B, C, T, H, W]."""
        p_t, p_h, p_w = self.patch_size(transformer.config)
        _, _, frames, height, width = hidden_states.shape
        return frames // p_t, (height // p_h) * (width // p_w)


def family_of(transformer) -> Family:
    """The adapter of `transformer`'s class (peft and accelerate wrappers looked through); a
    ConfigError naming the supported classes for any other."""
    model = transformer
    for attr in ("module", "base_model", "model"):  # DDP / DeepSpeed, then peft wrappers
        inner = getattr(model, attr, None)
        if isinstance(inner, torch.nn.Module) and type(model).__name__ not in FAMILY_MODULES:
            model = inner
    name = type(model).__name__
    if name not in FAMILY_MODULES:
        raise ConfigError(
            f"{name}: no attention adapter for this transformer class (supported: {', '.join(FAMILY_MODULES)})"
        )
    return importlib.import_module(FAMILY_MODULES[name]).FAMILY
