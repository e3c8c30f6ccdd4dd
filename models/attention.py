"""The attention seam: each block's self-attention runs through our processor.

A processor per model family (models/families/: Wan's `attn1`, HunyuanVideo's joint text+video
attention) does what the stock diffusers processor does (projections, q/k norms, rotary, output
projections) and replaces only the attention call (`RadialSelfAttention` here): dense, or radial
block-sparse on the configured backend. Cross-attention keeps the stock processor. The swap goes
through diffusers' per-module `set_processor`, never a global patch.

The radial mask depends on the latent video's shape (frames F, tokens per frame s) and, for joint
attention, on each prompt's text tokens, which the attention call itself cannot see: a forward
pre-hook on the transformer reads them from each call's input (so batches of any size and length
work) together with the timestep, from which the configured rule decides which samples run dense
(`dense_timesteps` in generation, `train_dense_above_sigma` in training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F

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
from radial_lora.models.families import family_of


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
    text_tokens: list[int] | None = None
    """Per sample, the valid text tokens after the video in a joint attention (None: no joint text)."""
    masks: dict[int, torch.Tensor] = field(default_factory=dict)
    """The block masks of the current forward by text tokens (0: the video alone), built by the
    pre-hook: outside the transformer blocks, so a compiled block sees a plain tensor input (no
    graph break)."""
    kernels: Any = None
    """kernels.kernel_choice.KernelChoice of the triton backend (cfg.kernels as the op takes it)."""
    calls: dict = field(default_factory=lambda: {"dense": 0, "radial": 0})
    """How many attention calls went each way (for tests and logs; eager calls only: counting
    inside a compiled block would make every call a new graph)."""

    def count(self, path: str, n: int = 1) -> None:
        if not torch.compiler.is_compiling():
            self.calls[path] += n

    def block_mask(self, device: torch.device, text_tokens: int = 0) -> torch.Tensor:
        """The configured mask over the current video and `text_tokens` text tokens after it
        (their rows and columns dense)."""
        frames, tokens_per_frame = self.video_shape
        if self.cfg.pattern == MaskPattern.local:
            if text_tokens:
                raise ConfigError("attention.pattern=local is built for video-only attention (Wan), not joint text")
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
            text_tokens=text_tokens,
            block_size=self.cfg.block_size,
            decay=self.cfg.decay,
            sink=self.cfg.sink,
            legacy_adjacent=self.cfg.legacy_adjacent,
            device=device,
        )


class RadialSelfAttention:
    """The attention call of one self-attention layer (block `layer`), dense or radial: what every
    family's processor (models/families/) shares. Each processor does its family's projections,
    norms and rotary as diffusers does, then calls `attend` (video only) or `attend_joint` (video
    tokens followed by text tokens)."""

    def __init__(self, layer: int, routing: AttentionRouting):
        self.layer, self.routing = layer, routing
        cfg = routing.cfg
        self.radial = cfg.backend.value != "dense" and layer >= cfg.dense_layers

    def _runs_dense(self) -> bool:
        dense = self.routing.dense_samples
        return not self.radial or (dense is not None and bool(dense.all()))

    def _mask(self, q: torch.Tensor, text_tokens: int = 0) -> torch.Tensor:
        routing = self.routing
        if routing.video_shape is None:
            raise RuntimeError("radial attention needs the video shape: call the transformer, not a block")
        mask = routing.masks.get(text_tokens)
        if mask is None or mask.device != q.device:  # a block called on its own, or on another device
            mask = routing.block_mask(q.device, text_tokens)
        return mask

    def _radial(self, q, k, v, mask):
        cfg = self.routing.cfg
        return attention(
            q, k, v, backend=cfg.backend.value, block_mask=mask, block_size=cfg.block_size, kernels=self.routing.kernels
        )

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[B, H, S, D] attention over the video's S = F*s tokens, radial or dense per sample as the
        routing says."""
        routing = self.routing
        if self._runs_dense():
            routing.count("dense")
            return attention(q, k, v, backend="dense")
        frames, tokens_per_frame = routing.video_shape
        if frames * tokens_per_frame != q.shape[-2]:
            raise RuntimeError(f"attention over {q.shape[-2]} tokens, but the video has {frames}x{tokens_per_frame}")
        mask, dense = self._mask(q), routing.dense_samples
        if dense is None or not bool(dense.any()):
            routing.count("radial")
            return self._radial(q, k, v, mask)
        # Mixed batch (training with a sigma rule): each sample on its own path.
        routing.count("dense", int(dense.sum()))
        routing.count("radial", int((~dense).sum()))
        return torch.cat(
            [
                (
                    attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], backend="dense")
                    if dense[i]
                    else self._radial(q[i : i + 1], k[i : i + 1], v[i : i + 1], mask)
                )
                for i in range(q.shape[0])
            ]
        )

    def attend_joint(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        """[B, H, N, D] joint attention over the video's F*s tokens followed by text tokens;
        `key_mask` bool [B, N]: the valid tokens (the video, then each prompt's own tokens; the
        padding after them never gets attention).

        Dense: one masked SDPA call, as diffusers does. Radial: per sample, its n valid tokens run
        the block-sparse kernel with the radial mask over the video and the text's rows and
        columns dense (radial_block_mask's text_tokens); the padding rows, whose outputs no valid
        token reads, attend densely to the n valid tokens, as they do in the stock model."""
        routing = self.routing
        dense, lengths = routing.dense_samples, routing.text_tokens
        video = math.prod(routing.video_shape) if routing.video_shape is not None else None
        if self._runs_dense():
            routing.count("dense")
            return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
        if lengths is None or video is None or video + max(lengths) > q.shape[-2]:
            raise RuntimeError("joint radial attention needs the video shape and text lengths: call the transformer")
        out = []
        for i in range(q.shape[0]):
            one = slice(i, i + 1)
            if dense is not None and bool(dense[i]):
                routing.count("dense")
                out.append(
                    F.scaled_dot_product_attention(q[one], k[one], v[one], attn_mask=key_mask[one, None, None, :])
                )
                continue
            routing.count("radial")
            n = video + lengths[i]
            qi, ki, vi = q[one], k[one, :, :n], v[one, :, :n]
            valid = self._radial(qi[:, :, :n], ki, vi, self._mask(q, lengths[i]))
            if n < q.shape[-2]:
                valid = torch.cat([valid, F.scaled_dot_product_attention(qi[:, :, n:], ki, vi)], dim=2)
            out.append(valid)
        return torch.cat(out)


def set_self_attention(transformer, cfg: AttentionConfig, mode: str = "train") -> AttentionRouting:
    """Route every self-attention layer of `transformer` through its family's processor
    (models/families/), all sharing one `AttentionRouting`.

    `mode` picks the dense-timestep rule: "train" (cfg.train_dense_above_sigma) or "generate"
    (cfg.dense_timesteps). Returns the routing; `describe(transformer)` says which layer got what.
    """
    cfg = replace(cfg, backend=AttentionBackend(cfg.backend))  # also accept a plain string
    family = family_of(transformer)
    routing = AttentionRouting(cfg, dense_rule(cfg, mode))
    if cfg.backend == AttentionBackend.triton:
        from radial_lora.kernels.kernel_choice import KernelChoice  # imports Triton: only for this backend

        routing.kernels = KernelChoice(gluon=GluonKernels(cfg.kernels.gluon).value, tma=TmaLoads(cfg.kernels.tma).value)
    for layer, module in enumerate(family.self_attention(transformer)):
        module.set_processor(family.processor(layer, routing))

    def read_shape_and_timestep(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        routing.video_shape = family.video_shape(module, hidden)
        routing.text_tokens = family.text_tokens(args, kwargs)
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        rule = routing.dense_rule  # read per forward: generation_rules swaps it
        routing.dense_samples = rule(timestep) if rule is not None else None
        routing.masks = {}
        if cfg.backend != AttentionBackend.dense:
            for text in sorted(set(routing.text_tokens or [0])):
                mask = routing.masks[text] = routing.block_mask(hidden.device, text)
                prepare_mask(cfg.backend.value, mask, math.prod(routing.video_shape) + text, cfg.block_size)

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
    processors = (module.processor for module in family_of(transformer).self_attention(transformer))
    return [p for p in processors if isinstance(p, RadialSelfAttention) and p.radial]


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
    layers, radial = len(family_of(transformer).self_attention(transformer)), _radial_processors(transformer)
    if not radial:
        return f"self-attention: {layers} layers dense"
    cfg = radial[0].routing.cfg
    if MaskPattern(cfg.pattern) == MaskPattern.local:
        shape = f"local (+-{cfg.local_window} frames) on {cfg.backend.value} (block {cfg.block_size}, sink {cfg.sink})"
    else:
        shape = f"radial on {cfg.backend.value} (block {cfg.block_size}, decay {cfg.decay}, sink {cfg.sink})"
    return f"self-attention: {layers - len(radial)} layers dense, {len(radial)} layers {shape}"
