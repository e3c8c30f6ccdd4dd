"""Attention implementations behind the transformer's self-attention.

Layout everywhere: q, k, v and the output are [B, H, S, D] (batch, heads, tokens, head dim), the
layout of torch's scaled_dot_product_attention.
"""

from kernels.dispatch import BACKENDS, attention

__all__ = ["BACKENDS", "attention"]
