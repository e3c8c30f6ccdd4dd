"""The attention seam: each Wan block's self-attention (attn1) runs through our processor.

The processor does what diffusers' `WanAttnProcessor` does for self-attention (projections,
RMS q/k norm, rotary embedding, output projection) and replaces only the attention call: dense, or
radial block-sparse on the configured backend. Cross-attention (attn2) keeps the stock processor.
The swap goes through diffusers' per-module `set_processor`, never a global patch.

The radial mask depends on the latent video's shape (frames F, tokens per frame s), which the
attention call itself cannot see: a forward pre-hook on the transformer reads it from each call's
input (so batches of any size and length work) together with the timestep, from which the
configured rule decides which samples run dense (`dense_timesteps` in generation,
`train_dense_above_sigma` in training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from radial_lora.configs.schema import (
    AttentionBackend,
    AttentionConfig,
    ConfigError,
    GluonKernels,
    MaskPattern,
    TmaLoads,
)
from radial_lora.kernels.dispatch import attention, prepare_mask
from radial_lora.kernels.local_mask import local_block_mask
from radial_lora.kernels.radial_mask import radial_block_mask


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding on interleaved pairs; x [B, S, H, D], cos/sin [1, S, 1, D] (fp32/64)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class DenseFirstSteps:
    """Generation rule: dense attention for the first `n` denoising steps.

    Counts distinct timesteps as they decrease (a classifier-free-guidance pass at the same
    timestep is the same step); a timestep above the previous one starts a new generation.
    """

    def __init__(self, n: int):
        self.n, self.last, self.step = n, None, -1

    def __call__(self, timestep: torch.Tensor) -> torch.Tensor:
        t = float(timestep.max())
        if self.last is None or t > self.last:
            self.step = 0
        elif t < self.last:
            self.step += 1
        self.last = t
        return torch.full((timestep.shape[0],), self.step < self.n)


class DenseAboveSigma:
    """Training rule: a sample runs dense when its noise level sigma = timestep / 1000 >= `sigma`."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def __call__(self, timestep: torch.Tensor) -> torch.Tensor:
        level = timestep.float()
        if level.ndim == 2:  # per-token timesteps (given frames at 0): the sample's noise level is its highest
            level = level.amax(dim=1)
        return (level / 1000 >= self.sigma).cpu()


@dataclass
class AttentionRouting:
    """What every self-attention processor of one transformer shares."""

    cfg: AttentionConfig
    dense_rule: Callable[[torch.Tensor], torch.Tensor] | None = None
    video_shape: tuple[int, int] | None = None
    """(latent frames F, tokens per frame s) of the current forward, set by the pre-hook."""
    dense_samples: torch.Tensor | None = None
    """bool [B]: samples of the current forward that run dense, set by the pre-hook."""
    sp: Any = None
    """models.sequence_parallel.SequenceParallel when the tokens are split over processes."""
    mask: torch.Tensor | None = None
    """The radial block mask of the current forward, built by the pre-hook: outside the
    transformer blocks, so a compiled block sees a plain tensor input (no graph break)."""
    kernels: Any = None
    """kernels.kernel_choice.KernelChoice of the triton backend (cfg.kernels as the op takes it)."""
    calls: dict = field(default_factory=lambda: {"dense": 0, "radial": 0})
    """How many attention calls went each way (for tests and logs; eager calls only: counting
    inside a compiled block would make every call a new graph)."""

    def count(self, path: str, n: int = 1) -> None:
        if not torch.compiler.is_compiling():
            self.calls[path] += n

    def block_mask(self, device: torch.device) -> torch.Tensor:
        frames, tokens_per_frame = self.video_shape
        if self.cfg.pattern == MaskPattern.local:
            return local_block_mask(
                frames,
                tokens_per_frame,
                block_size=self.cfg.block_size,
                window=self.cfg.local_window,
                sink=self.cfg.sink,
                device=device,
            )
        return radial_block_mask(
            frames,
            tokens_per_frame,
            block_size=self.cfg.block_size,
            decay=self.cfg.decay,
            sink=self.cfg.sink,
            legacy_adjacent=self.cfg.legacy_adjacent,
            device=device,
        )


class WanSelfAttnProcessor:
    """Self-attention of one `WanAttention` module (block `layer`), dense or radial."""

    def __init__(self, layer: int, routing: AttentionRouting):
        self.layer, self.routing = layer, routing
        cfg = routing.cfg
        self.radial = cfg.backend.value != "dense" and layer >= cfg.dense_layers

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
        out = self._attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)
        if sp is not None:
            out = sp.to_tokens(out)
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] attention, radial or dense per sample as the routing says."""
        routing = self.routing
        dense = routing.dense_samples
        if not self.radial or (dense is not None and bool(dense.all())):
            routing.count("dense")
            return attention(q, k, v, backend="dense")
        if routing.video_shape is None:
            raise RuntimeError("radial attention needs the video shape: call the transformer, not a block")
        frames, tokens_per_frame = routing.video_shape
        if frames * tokens_per_frame != q.shape[-2]:
            raise RuntimeError(f"attention over {q.shape[-2]} tokens, but the video has {frames}x{tokens_per_frame}")
        cfg = routing.cfg
        mask = routing.mask
        if mask is None or mask.device != q.device:  # a block called on its own, or on another device
            mask = routing.block_mask(q.device)

        def radial(q, k, v):
            return attention(
                q, k, v, backend=cfg.backend.value, block_mask=mask, block_size=cfg.block_size, kernels=routing.kernels
            )

        if dense is None or not bool(dense.any()):
            routing.count("radial")
            return radial(q, k, v)
        # Mixed batch (training with a sigma rule): each sample on its own path.
        routing.count("dense", int(dense.sum()))
        routing.count("radial", int((~dense).sum()))
        return torch.cat(
            [
                (
                    attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], backend="dense")
                    if dense[i]
                    else radial(q[i : i + 1], k[i : i + 1], v[i : i + 1])
                )
                for i in range(q.shape[0])
            ]
        )


def set_self_attention(transformer, cfg: AttentionConfig, mode: str = "train") -> AttentionRouting:
    """Route every block's attn1 through `WanSelfAttnProcessor`s sharing one `AttentionRouting`.

    `mode` picks the dense-timestep rule: "train" (cfg.train_dense_above_sigma) or "generate"
    (cfg.dense_timesteps). Returns the routing; `describe(routing, n)` says which layer got what.
    """
    cfg = replace(cfg, backend=AttentionBackend(cfg.backend))  # also accept a plain string
    routing = AttentionRouting(cfg, dense_rule(cfg, mode))
    if cfg.backend == AttentionBackend.triton:
        from radial_lora.kernels.kernel_choice import KernelChoice  # imports Triton: only for this backend

        routing.kernels = KernelChoice(gluon=GluonKernels(cfg.kernels.gluon).value, tma=TmaLoads(cfg.kernels.tma).value)
    for layer, block in enumerate(transformer.blocks):
        block.attn1.set_processor(WanSelfAttnProcessor(layer, routing))
    patch_t, patch_h, patch_w = transformer.config.patch_size

    def read_shape_and_timestep(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = hidden.shape
        routing.video_shape = (frames // patch_t, (height // patch_h) * (width // patch_w))
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        rule = routing.dense_rule  # read per forward: generation_rules swaps it
        routing.dense_samples = rule(timestep) if rule is not None else None
        routing.mask = None
        if cfg.backend != AttentionBackend.dense:
            routing.mask = routing.block_mask(hidden.device)
            prepare_mask(cfg.backend.value, routing.mask, math.prod(routing.video_shape), cfg.block_size)

    if getattr(transformer, "_radial_hook", None) is not None:
        transformer._radial_hook.remove()  # a second swap replaces the first
    transformer._radial_hook = transformer.register_forward_pre_hook(read_shape_and_timestep, with_kwargs=True)
    transformer._radial_routing = routing
    return routing


def dense_rule(cfg: AttentionConfig, mode: str):
    """Which samples of a forward run dense: in "train" mode by noise level
    (cfg.train_dense_above_sigma), in "generate" mode the first cfg.dense_timesteps denoising steps;
    None when the config asks for neither."""
    if mode == "train":
        return DenseAboveSigma(cfg.train_dense_above_sigma) if cfg.train_dense_above_sigma is not None else None
    if mode == "generate":
        return DenseFirstSteps(cfg.dense_timesteps) if cfg.dense_timesteps > 0 else None
    raise ValueError(f"mode must be 'train' or 'generate', got {mode!r}")


@contextmanager
def generation_rules(transformer):
    """Inside: the transformer's attention follows the generation rule (the first
    attention.dense_timesteps denoising steps dense), whatever `set_self_attention` mode it was
    set up in; afterwards the rule it had. A no-op for a transformer without our processors."""
    routing = getattr(transformer, "_radial_routing", None)
    if routing is None:
        yield
        return
    saved = routing.dense_rule
    routing.dense_rule = dense_rule(routing.cfg, "generate")
    try:
        yield
    finally:
        routing.dense_rule = saved


def _radial_processors(transformer) -> list:
    """The self-attention processors of `transformer` that run the radial mask."""
    processors = (block.attn1.processor for block in transformer.blocks)
    return [p for p in processors if isinstance(p, WanSelfAttnProcessor) and p.radial]


def triton_kernels(transformer, device: torch.device, dtype: torch.dtype) -> str | None:
    """Which of our kernels the radial layers will run for inputs of this device and dtype
    (kernels.kernel_choice.kernel_plan), or None when no layer is radial on the triton backend.
    A ConfigError if they cannot run here (no GPU; Gluon kernels attention.kernels.gluon requires)."""
    radial = _radial_processors(transformer)
    if not radial or radial[0].routing.cfg.backend != AttentionBackend.triton:
        return None
    from radial_lora.kernels.kernel_choice import kernel_plan

    routing = radial[0].routing
    try:
        return kernel_plan(
            routing.kernels, device, dtype, transformer.config.attention_head_dim, routing.cfg.block_size
        )
    except RuntimeError as e:
        raise ConfigError(f"attention.backend=triton: {e}") from None


def describe(transformer) -> str:
    """One line: how many self-attention layers got which backend."""
    layers, radial = len(transformer.blocks), _radial_processors(transformer)
    if not radial:
        return f"self-attention: {layers} layers dense"
    cfg = radial[0].routing.cfg
    if MaskPattern(cfg.pattern) == MaskPattern.local:
        shape = f"local (+-{cfg.local_window} frames) on {cfg.backend.value} (block {cfg.block_size}, sink {cfg.sink})"
    else:
        shape = f"radial on {cfg.backend.value} (block {cfg.block_size}, decay {cfg.decay}, sink {cfg.sink})"
    return f"self-attention: {layers - len(radial)} layers dense, {len(radial)} layers {shape}"
