"""The Radial Attention block mask (arXiv 2506.19852), for any video size.

Tokens are laid out frame after frame: token t of the video is (frame t // s, raster position
t % s), s = tokens_per_frame; text tokens, if any, come after the F*s video tokens. The mask is
[nb, nb] booleans over B x B blocks of the [S, S] attention matrix, nb = ceil(S / B); True means
the (query block, key block) pair is computed.

Rules, for query frame i and key frame j at temporal distance d = |i - j| (these are the
reference implementation's semantics, which reproduce its published sparsity):
  P = 2**bitlen(s), L(d) = P / 2**bitlen(d)
  band:  token k of frame i sees token l of frame j iff |k - l| <= w(d),
         w(d) = s for d <= 1 (legacy_adjacent: w(1) = s // 2), else max(L(d) * decay, B)
  decimation: if L(d) < 128 the pair is dropped unless d % int(128 / L(d)) == 0
  sink:  key frame 0 is seen in full by every query frame
  text:  block rows and columns from the one holding token F*s on are dense (text tokens, and a
         partial last video block, which the reference pads and treats alike); every diagonal
         block is kept, so no query block is left without keys
Each frame pair's token mask is laid on the global block grid (frame i starts at token i*s, not
necessarily on a block edge) and a block is kept for that pair iff, of the block's columns with
any attended token of the pair, more than 60% have more than B/3 of the block's B rows attended.
The mask is the OR over all pairs. The last block may be partial; it is still a block.

Only a handful of distinct per-pair block patterns exist (they depend on where the two frames
start inside a block, and on w), so each is computed once, from per-column interval counts
(never an s x s token mask), and scattered into the grid for all pairs that share it.
"""

from __future__ import annotations

import functools
import math

import torch

# The decimation threshold is a fixed 128 in the reference implementation, whatever the block size.
DECIMATION_THRESHOLD = 128


def band_width(d: int, tokens_per_frame: int, block_size: int, decay: float, legacy_adjacent: bool) -> int | None:
    """Half-width w of the band between two frames `d` apart, or None when decimation drops the pair."""
    s = tokens_per_frame
    length = 2 ** s.bit_length() / 2 ** d.bit_length()  # L(d), without the decay factor
    if length < DECIMATION_THRESHOLD and d % int(DECIMATION_THRESHOLD / length) != 0:
        return None
    if d == 0:
        return s
    if d == 1:
        return s // 2 if legacy_adjacent else s
    # |k - l| <= w over integers is |k - l| <= floor(w).
    return math.floor(max(length * decay, block_size))


def _pair_blocks(row_offset: int, col_offset: int, s: int, w: int, block_size: int) -> torch.Tensor:
    """Blocks [nbr, nbc] kept for one frame pair whose frames start `row_offset`/`col_offset`
    tokens into their first block, with band half-width `w` (w >= s - 1: the full frame pair)."""
    b = block_size
    nbr, nbc = -(-(row_offset + s) // b), -(-(col_offset + s) // b)
    col = torch.arange(nbc * b)
    l = col - col_offset  # token index within key frame j
    in_frame = (l >= 0) & (l < s)
    # Query tokens attending column l: k in [l - w, l + w] within the frame, as local rows.
    lo = row_offset + (l - w).clamp(min=0)
    hi = row_offset + (l + w).clamp(max=s - 1)
    block_lo = torch.arange(nbr).view(-1, 1) * b
    count = (torch.minimum(hi, block_lo + b - 1) - torch.maximum(lo, block_lo) + 1).clamp(min=0)
    count = (count * in_frame).view(nbr, nbc, b)  # rows attended, per block and column
    touched = (count > 0).sum(-1)
    dense = (3 * count > b).sum(-1)  # columns with more than B/3 of the block's rows
    return 5 * dense > 3 * touched  # more than 60% of the touched columns


@functools.lru_cache(maxsize=64)
def _radial_block_mask_cached(
    num_frames: int,
    tokens_per_frame: int,
    text_tokens: int,
    block_size: int,
    decay: float,
    sink: bool,
    legacy_adjacent: bool,
    device: str,
) -> torch.Tensor:
    f, s, b = num_frames, tokens_per_frame, block_size
    total = f * s + text_tokens
    nb = -(-total // b)
    mask = torch.zeros(nb, nb, dtype=torch.bool)

    # Group the frame pairs by the block pattern they produce: (row offset, col offset, w).
    groups: dict[tuple[int, int, int], list[tuple[int, int]]] = {}
    for i in range(f):
        for j in range(f):
            w = s if (sink and j == 0) else band_width(abs(i - j), s, b, decay, legacy_adjacent)
            if w is not None:
                groups.setdefault(((i * s) % b, (j * s) % b, min(w, s)), []).append((i, j))

    flat = mask.view(-1)
    for (row_offset, col_offset, w), pairs in groups.items():
        rows, cols = _pair_blocks(row_offset, col_offset, s, w, b).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        ij = torch.tensor(pairs)
        row0, col0 = (ij[:, 0] * s) // b, (ij[:, 1] * s) // b  # first block of each frame
        flat[((row0.view(-1, 1) + rows) * nb + col0.view(-1, 1) + cols).view(-1)] = True

    # Dense from the block holding the end of the video on: text tokens, and a partial last video
    # block (which the reference pads to a full block and treats the same way). Judged by the 60% /
    # B/3 rule, a last block of a few rows would otherwise keep no block at all: its tokens
    # (e.g. the last 24 of Wan 480p at 81 frames) would attend to nothing.
    border = (f * s) // b
    mask[border:, :] = True
    mask[:, border:] = True
    # Every block sees itself (each token's own position is in its d = 0 band). This only adds
    # blocks when frames are shorter than a third of a block, where rows could otherwise be empty.
    mask.diagonal().fill_(True)
    return mask.to(device)


def radial_block_mask(
    num_frames: int,
    tokens_per_frame: int,
    *,
    text_tokens: int = 0,
    block_size: int = 128,
    decay: float = 1.0,
    sink: bool = True,
    legacy_adjacent: bool = False,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Radial Attention's block mask: bool [ceil(S/B), ceil(S/B)], S = F*s + text_tokens.

    Cached by its arguments on each device: the returned tensor is shared, don't modify it.
    """
    if num_frames < 1 or tokens_per_frame < 1 or text_tokens < 0 or block_size < 1:
        raise ValueError(
            f"radial_block_mask needs num_frames, tokens_per_frame, block_size >= 1 and text_tokens >= 0; got "
            f"{num_frames}, {tokens_per_frame}, {block_size}, {text_tokens}"
        )
    if decay <= 0:
        raise ValueError(f"radial decay must be > 0, got {decay}")
    device = str(torch.device(device)) if device is not None else "cpu"
    return _radial_block_mask_cached(
        num_frames, tokens_per_frame, text_tokens, block_size, float(decay), sink, legacy_adjacent, device
    )


def block_density(block_mask: torch.Tensor) -> float:
    """Fraction of blocks computed (1 - sparsity)."""
    return block_mask.float().mean().item()


def token_mask(block_mask: torch.Tensor, seq_len: int, block_size: int) -> torch.Tensor:
    """Expand a block mask to the bool [S, S] token mask it stands for (the last block cropped)."""
    expanded = block_mask.repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return expanded[:seq_len, :seq_len]
