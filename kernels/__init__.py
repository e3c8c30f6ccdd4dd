"""Attention implementations behind the transformer's self-attention.

Layout everywhere: q, k, v and the output are [B, H, S, D] (batch, heads, tokens, head dim), the
layout of torch's scaled_dot_product_attention. Block masks are bool [ceil(S/B), ceil(S/B)].
"""

from kernels.dispatch import BACKENDS, SPARSE_BACKENDS, attention
from kernels.flex import block_sparse_attention_flex
from kernels.radial_mask import block_density, radial_block_mask, token_mask
from kernels.reference import block_sparse_attention_reference


def __getattr__(name):
    # `from kernels import block_sparse_attention` imports Triton only when asked for.
    if name == "block_sparse_attention":
        from kernels.triton_attention import block_sparse_attention

        return block_sparse_attention
    raise AttributeError(f"module 'kernels' has no attribute {name!r}")


__all__ = [
    "block_sparse_attention",
    "BACKENDS",
    "SPARSE_BACKENDS",
    "attention",
    "block_density",
    "block_sparse_attention_flex",
    "block_sparse_attention_reference",
    "radial_block_mask",
    "token_mask",
]
