"""Ulysses sequence parallelism for Wan: one clip's tokens spread over a group of P processes.

At 4x length one clip is 126k tokens (291k at 720p), and a 14B model's activations for it do not
fit one GPU. Each process of a group keeps 1/P of the tokens through every transformer block:
norms, projections, cross-attention and the MLP work token by token, so they run on the local
slice as they are. Only self-attention needs every token; around it an all-to-all trades the
token split for a head split ([B, S/P, H, D] -> [B, S, H/P, D]), so each process attends over the
whole clip with H/P heads, with the same radial mask and kernels as without parallelism, and a
second all-to-all trades back (DeepSpeed-Ulysses, arXiv 2309.14509).

Where the split happens (hooks, no copy of diffusers' forward):
  - blocks[0] pre-hook: the patch-embedded tokens [B, S, C] -> this process's slice [B, S/P, C]
    (zero-padded at the end to a multiple of P); every block's pre-hook slices the rotary table;
  - norm_out pre-hook: the slices are gathered back to [B, S, C] before the output projection and
    unpatchify, so every process of the group returns the whole prediction.
Every process of a group computes the same loss from the same sample: the gather's backward hands
each process the gradient of its own slice (not a sum over the group), and the training loop
scales the loss by P so that data-parallel averaging over all processes yields the sum of the
group's partial gradients (each process saw 1/P of the tokens).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from radial_lora.configs.schema import ConfigError
from radial_lora.models.families import family_of


class SequenceParallel:
    """One process's place in its sequence-parallel group, and the exchanges it takes part in."""

    def __init__(self, group, size: int, rank: int):
        self.group, self.size, self.rank = group, size, rank
        self.tokens = 0  # S of the current forward (set by the first block's pre-hook)
        self._rotary_key, self._rotary = None, None

    @property
    def padded(self) -> int:
        return -(-self.tokens // self.size) * self.size

    @property
    def local(self) -> int:
        return self.padded // self.size

    def _exchange(self, x: torch.Tensor) -> torch.Tensor:
        """all-to-all along dim 0 (P equal chunks), differentiable."""
        return funcol.wait_tensor(funcol.all_to_all_single_autograd(x.contiguous(), None, None, self.group))

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S/P, ...] slices of the group -> [B, S_padded, ...] in rank (token) order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S/P, H, D] token slice -> [B, S, H/P, D] head slice (padding dropped)."""
        b, s, h, d = x.shape
        x = x.reshape(b, s, self.size, h // self.size, d).permute(2, 0, 1, 3, 4)  # [P, B, s, H/P, D]
        x = self._exchange(x)  # chunk i now holds rank i's tokens for our heads
        x = x.permute(1, 0, 2, 3, 4).reshape(b, self.padded, h // self.size, d)
        return x[:, : self.tokens]

    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S, H/P, D] head slice -> [B, S/P, H, D] token slice: to_heads' inverse."""
        b, _, hp, d = x.shape
        x = F.pad(x, (0, 0, 0, 0, 0, self.padded - self.tokens))
        x = x.reshape(b, self.size, self.local, hp, d).permute(1, 0, 2, 3, 4)  # [P, B, s, H/P, D]
        x = self._exchange(x)  # chunk i now holds our tokens for rank i's heads
        return x.permute(1, 2, 0, 3, 4).reshape(b, self.local, self.size * hp, d)

    def slice_rotary(self, rotary):
        """This process's rows of the rotary tables (cos, sin [1, S, 1, D]); one slice per forward."""
        key = (*(id(t) for t in rotary), self.tokens)
        if key != self._rotary_key:
            lo = self.rank * self.local
            self._rotary = tuple(
                F.pad(t, (0, 0, 0, 0, 0, self.padded - self.tokens))[:, lo : lo + self.local] for t in rotary
            )
            self._rotary_key = key
        return self._rotary


class _Split(torch.autograd.Function):
    """Keep this process's token slice; backward gathers the slices' gradients."""

    @staticmethod
    def forward(ctx, x, sp: SequenceParallel):
        ctx.sp = sp
        x = F.pad(x, (0, 0, 0, sp.padded - sp.tokens))
        return x[:, sp.rank * sp.local : (sp.rank + 1) * sp.local].contiguous()

    @staticmethod
    def backward(ctx, grad):
        sp = ctx.sp
        return sp.gather(grad)[:, : sp.tokens], None


class _Gather(torch.autograd.Function):
    """All slices in token order; every process then computes the same thing from them, so the
    backward keeps just this process's slice of the gradient (no sum over the group)."""

    @staticmethod
    def forward(ctx, x, sp: SequenceParallel):
        ctx.sp = sp
        return sp.gather(x)[:, : sp.tokens]

    @staticmethod
    def backward(ctx, grad):
        sp = ctx.sp
        grad = F.pad(grad, (0, 0, 0, sp.padded - sp.tokens))
        return grad[:, sp.rank * sp.local : (sp.rank + 1) * sp.local].contiguous(), None


def enable_sequence_parallel(transformer, routing, group) -> SequenceParallel:
    """Split `transformer`'s tokens over the processes of `group` (after set_self_attention: the
    self-attention processors read `routing.sp`). Raises if the heads don't divide evenly."""
    family = family_of(transformer)
    if family.name != "wan":
        raise ConfigError(f"trainer.sequence_parallel: built for Wan's blocks, not {family.name} yet")
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    heads = transformer.config.num_attention_heads
    if heads % size:
        raise ConfigError(f"trainer.sequence_parallel={size} must divide the model's {heads} attention heads")
    sp = SequenceParallel(group, size, rank)
    routing.sp = sp

    def split_tokens(module, args):
        hidden, encoder, temb, rotary = args
        if temb.ndim != 3:
            raise NotImplementedError("sequence parallelism supports per-sample timesteps (Wan2.1), not per-token")
        sp.tokens = hidden.shape[1]
        return _Split.apply(hidden, sp), encoder, temb, rotary

    def slice_rotary(module, args):
        hidden, encoder, temb, rotary = args
        return hidden, encoder, temb, sp.slice_rotary(rotary)

    def gather_tokens(module, args):
        return (_Gather.apply(args[0], sp),)

    hooks = [transformer.blocks[0].register_forward_pre_hook(split_tokens)]
    hooks += [block.register_forward_pre_hook(slice_rotary) for block in transformer.blocks]
    hooks.append(transformer.norm_out.register_forward_pre_hook(gather_tokens))
    transformer._sequence_parallel_hooks = hooks
    return sp
