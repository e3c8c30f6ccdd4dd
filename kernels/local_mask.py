"""A local-window block mask: each frame attends the frames within `window` of it, in full, and
(with `sink`) the first frame. A sliding-window attention (STA and local-attention methods'
temporal shape) to set against the radial mask at the same density: the radial mask reaches
distant frames thinly, this one reaches near frames fully and distant ones not at all.

Same layout and conventions as kernels/radial_mask.py: tokens frame after frame, s tokens a
frame; bool [nb, nb] over B x B blocks, True computed; a block is kept when any of its token
pairs is attended (frames need not start on a block edge), and every diagonal block is kept.
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=32)
def _local_block_mask_cached(
    num_frames: int, tokens_per_frame: int, block_size: int, window: int, sink: bool, device: str
):
    seq = num_frames * tokens_per_frame
    nb = -(-seq // block_size)
    starts = torch.arange(nb) * block_size
    first = starts // tokens_per_frame  # the first and last frame each block holds tokens of
    last = (torch.clamp(starts + block_size, max=seq) - 1) // tokens_per_frame
    # The nearest frames two blocks hold: 0 if their frame ranges overlap.
    gap = torch.clamp(torch.maximum(first[:, None] - last[None, :], first[None, :] - last[:, None]), min=0)
    mask = gap <= window
    if sink:
        mask |= (first == 0)[None, :]
    mask.diagonal().fill_(True)
    return mask.to(device)


def local_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    block_size: int = 128,
    window: int = 6,
    sink: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """bool [ceil(S/B), ceil(S/B)], S = F*s: frames within `window` of each other, and frame 0 with
    `sink`. Cached by its arguments on each device: the returned tensor is shared, don't modify it."""
    if num_frames < 1 or tokens_per_frame < 1 or block_size < 1 or window < 0:
        raise ValueError(
            f"local_block_mask needs num_frames, tokens_per_frame, block_size >= 1 and window >= 0; got "
            f"{num_frames}, {tokens_per_frame}, {block_size}, {window}"
        )
    device = str(torch.device(device)) if device is not None else "cpu"
    return _local_block_mask_cached(num_frames, tokens_per_frame, block_size, window, sink, device)
