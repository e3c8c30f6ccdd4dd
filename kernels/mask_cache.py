"""Per-mask caches: derived forms of a block mask (index lists, FlexAttention's BlockMask, ...)
built once and kept as long as the mask tensor itself lives.

Keyed by the tensor's identity plus a key, and dropped when the tensor is freed, so a new mask
that happens to reuse a freed tensor's id (or memory) can never get a stale entry.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

_cache: dict[tuple[int, Any], tuple[weakref.ref, Any]] = {}


def derived(mask: torch.Tensor, key: Any, build: Callable[[], Any]) -> Any:
    """`build()`'s result for (mask, key), computed on first use and cached with the mask."""
    entry = _cache.get((id(mask), key))
    if entry is not None and entry[0]() is mask:
        return entry[1]
    value = build()
    mask_id = id(mask)
    _cache[(mask_id, key)] = (weakref.ref(mask, lambda _: _cache.pop((mask_id, key), None)), value)
    return value
