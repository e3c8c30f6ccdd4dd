"""One entry point, `attention(q, k, v, backend=...)`, choosing the implementation by name.

Shapes: q, k, v [B, H, S, D] -> out [B, H, S, D].
A backend that cannot run on the given inputs raises; nothing falls back silently.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BACKENDS = ("sdpa",)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str = "sdpa") -> torch.Tensor:
    """Non-causal attention softmax(q k^T / sqrt(D)) v over [B, H, S, D] inputs with `backend`."""
    if backend == "sdpa":
        # Dense; torch picks cuDNN / flash / memory-efficient / math by device and dtype.
        return F.scaled_dot_product_attention(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
