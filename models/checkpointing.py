"""Gradient checkpointing of the transformer blocks, optionally keeping attention outputs.

Plain checkpointing recomputes each block's whole forward in the backward, attention included:
at 126k tokens that recomputation is one more attention forward per block per step, the most
expensive op of the block. Selective checkpointing (torch's `create_selective_checkpoint_contexts`)
can keep the outputs of the attention op (output and log-sum-exp) for chosen blocks and recompute
only the cheap rest (projections, norms, rotary embedding, MLP), trading memory for that time:
about S x hidden x 2 bytes per block in bf16 (S tokens, hidden the model width).

With compiled blocks the checkpoint goes *inside* the compiled function (as torchtitan does it):
selective checkpointing picks ops as they are dispatched, and a compiled block called from inside
a checkpoint is one opaque graph to it (measured on an H100: keeping did nothing). Traced
together, AOTAutograd's partitioner applies the policy to the block's graph: the forward graph
saves the block's inputs (and the kept attention outputs), the backward graph recomputes the rest,
fused by inductor with the backward's own elementwise work.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from radial_lora.models.families import family_of


def attention_ops() -> set:
    """The attention ops whose outputs are kept: our Triton kernel and SDPA's fused kernels."""
    aten = torch.ops.aten
    ops = {
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
    try:
        import radial_lora.kernels.sparse_attention  # noqa: F401  registers radial_lora::block_sparse_attn_fwd

        ops.add(torch.ops.radial_lora.block_sparse_attn_fwd.default)
    except ImportError:  # no Triton on this machine: the triton backend cannot run here anyway
        pass
    return ops


def is_self_attention(op, ops, args) -> bool:
    """An attention op over as many keys as queries: self-attention (q, k [B, H, S, D]). Text
    cross-attention also runs on SDPA, but over 512 keys it is cheap to recompute while its
    output is as large as self-attention's, so it is not kept."""
    return op in ops and args[1].shape[-2] == args[0].shape[-2]


def _keep_self_attention(ops, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if is_self_attention(op, ops, args) else CheckpointPolicy.PREFER_RECOMPUTE


def enable_checkpointing(transformer, keep_attention_blocks: int = 0, compile_backend: str | None = None) -> None:
    """Checkpoint every block of `transformer`; the first `keep_attention_blocks` of them (-1: all)
    keep their self-attention outputs instead of recomputing self-attention in the backward.

    With `compile_backend` each block runs as a torch.compile graph of the checkpointed block:
    one graph for the blocks that keep attention and one for the rest, each shared by the blocks
    it serves (dynamo treats the block as an input, not a constant), except that the first block
    compiles apart (its input needs no gradient)."""
    blocks = family_of(transformer).blocks(transformer)
    count = len(blocks) if keep_attention_blocks < 0 else min(keep_attention_blocks, len(blocks))
    keep = {id(b) for b in blocks[:count]}
    context = partial(create_selective_checkpoint_contexts, partial(_keep_self_attention, attention_ops()))

    def keeping(block, *args):
        return checkpoint(block, *args, use_reentrant=False, context_fn=context)

    def plain(block, *args):
        return checkpoint(block, *args, use_reentrant=False)

    if compile_backend is not None:
        keeping, plain = (torch.compile(fn, backend=compile_backend) for fn in (keeping, plain))

    def checkpoint_block(block, *args):
        return (keeping if id(block) in keep else plain)(block, *args)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=checkpoint_block)
