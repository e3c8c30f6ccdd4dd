"""Radial Attention's block mask: the rules, the published sparsity, any size, O(n log n), caching."""

from __future__ import annotations

import math

import pytest
import torch

from radial_lora.kernels.radial_mask import band_width, block_density, radial_block_mask, token_mask


def literal_radial_block_mask(f, s, *, text=0, b=128, decay=1.0, sink=True, legacy=False):
    """The rules written out literally: an s x s token mask per frame pair, laid on the padded
    global token grid, quantized block by block with float densities as the reference does."""
    total = f * s + text
    nb = -(-total // b)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    k = torch.arange(s)
    for i in range(f):
        for j in range(f):
            d = abs(i - j)
            if sink and j == 0:
                local = torch.ones(s, s, dtype=torch.bool)
            else:
                length = 2 ** s.bit_length() / 2 ** d.bit_length()
                if d == 0 or (d == 1 and not legacy):
                    w = s
                elif d == 1:
                    w = s // 2
                else:
                    w = max(length * decay, b)
                local = (k.view(-1, 1) - k.view(1, -1)).abs() <= w
                if length < 128 and d % int(128 / length) != 0:
                    local[:] = False
            grid = torch.zeros(nb * b, nb * b, dtype=torch.bool)
            grid[i * s : (i + 1) * s, j * s : (j + 1) * s] = local
            count = grid.view(nb, b, nb, b).sum(1).float()  # [row block, col block, column]
            col_density = count / b
            frac = (col_density > 1 / 3).sum(-1) / ((col_density > 0).sum(-1) + 1e-9)
            out |= frac > 0.6
    border = (f * s) // b
    out[border:] = True
    out[:, border:] = True
    out.fill_diagonal_(True)
    return out


@pytest.mark.parametrize(
    "f, s, text, b, decay, sink, legacy",
    [
        (6, 100, 0, 32, 1.0, True, False),  # frames not aligned to blocks, partial last block
        (7, 48, 0, 16, 0.5, True, True),
        (5, 130, 20, 64, 1.0, True, False),  # text tokens after the video
        (9, 16, 0, 16, 1.0, True, False),  # the demo's shape
        (12, 40, 0, 16, 0.2, False, False),
        (4, 257, 3, 128, 1.0, True, False),
        (20, 12, 0, 16, 1.0, True, False),  # frames shorter than a block
    ],
)
def test_matches_the_rules_written_out_literally(f, s, text, b, decay, sink, legacy):
    fast = radial_block_mask(f, s, text_tokens=text, block_size=b, decay=decay, sink=sink, legacy_adjacent=legacy)
    slow = literal_radial_block_mask(f, s, text=text, b=b, decay=decay, sink=sink, legacy=legacy)
    assert fast.shape == (-(-(f * s + text) // b),) * 2
    assert torch.equal(fast, slow)


def test_band_widths_by_hand():
    # s = 1560 (Wan 480p): bitlen 11, P = 2048, L(d) = 2048 / 2**bitlen(d).
    assert band_width(0, 1560, 128, 1.0, False) == 1560
    assert band_width(1, 1560, 128, 1.0, False) == 1560
    assert band_width(1, 1560, 128, 1.0, True) == 780
    assert band_width(2, 1560, 128, 1.0, False) == 512  # L = 512
    assert band_width(3, 1560, 128, 0.2, False) == 128  # 512 * 0.2 < B
    assert band_width(7, 1560, 128, 1.0, False) == 256  # L = 256
    assert band_width(8, 1560, 128, 1.0, False) == 128  # L = 128
    assert band_width(16, 1560, 128, 1.0, False) == 128  # L = 64: kept, 16 % 2 == 0
    assert band_width(17, 1560, 128, 1.0, False) is None  # L = 64: dropped, 17 % 2 == 1
    assert band_width(32, 1560, 128, 1.0, False) == 128  # L = 32: kept, 32 % 4 == 0
    assert band_width(38, 1560, 128, 1.0, False) is None  # L = 32: 38 % 4 == 2


def test_one_frame_per_block_by_hand():
    # s = B = 128: P = 256; d=2,3: L=64 (keep d % 2 == 0); d=4..7: L=32 (keep d % 4 == 0).
    mask = radial_block_mask(8, 128, block_size=128)
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    expected = ((i - j).abs().unsqueeze(-1) == torch.tensor([0, 1, 2, 4])).any(-1) | (j == 0)
    assert torch.equal(mask, expected)


def test_published_sparsity_wan_720p_69_frames():
    legacy = radial_block_mask(18, 3840, decay=0.2, legacy_adjacent=True)
    current = radial_block_mask(18, 3840, decay=0.2)
    assert round(1 - block_density(legacy), 4) == 0.7366
    assert round(1 - block_density(current), 4) == 0.7129


def test_wan_480p_partial_last_block_is_covered():
    # 81 latent frames x 1560 tokens = 126,360 = 987 full blocks + 24 tokens.
    mask = radial_block_mask(81, 1560)
    assert mask.shape == (988, 988)
    assert mask[-1].all() and mask[:, -1].all()
    assert mask.any(-1).all()  # every query block attends something


def test_text_tokens_are_dense_rows_and_columns():
    mask = radial_block_mask(10, 256, text_tokens=300, block_size=128)
    first_text = 10 * 256 // 128
    assert mask.shape == (-(-2860 // 128),) * 2
    assert mask[first_text:].all() and mask[:, first_text:].all()
    assert not mask[:first_text, :first_text].all()


def test_token_mask_crops_the_partial_block():
    mask = radial_block_mask(3, 50, block_size=32)
    tokens = token_mask(mask, 150, 32)
    assert tokens.shape == (150, 150)
    assert torch.equal(tokens[::32, ::32], mask)


def test_cached_per_arguments_and_device():
    a = radial_block_mask(21, 1560, decay=0.5)
    assert radial_block_mask(21, 1560, decay=0.5) is a
    assert radial_block_mask(21, 1560, decay=0.4) is not a
    meta = radial_block_mask(21, 1560, decay=0.5, device="meta")
    assert meta.device.type == "meta" and meta is not a


def test_grows_like_n_log_n():
    """At fixed s, kept blocks / (F log F) stays nearly flat as F doubles from 8 to 256, where a
    dense mask's grows 12x; so kept blocks grow as O(n log n), n = F*s."""
    s = 1560
    frames = [8, 16, 32, 64, 128, 256]
    kept = [int(radial_block_mask(f, s).sum()) for f in frames]
    ratio = [k / (f * math.log2(f)) for k, f in zip(kept, frames)]
    assert max(ratio) / min(ratio) < 1.5, ratio
    assert kept[-1] / kept[-2] < 2.5  # one doubling: ~2x (quadratic would be ~4x)
    dense = [(-(-f * s // 128)) ** 2 / (f * math.log2(f)) for f in frames]
    assert dense[-1] / dense[0] > 10


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="num_frames"):
        radial_block_mask(0, 100)
    with pytest.raises(ValueError, match="decay"):
        radial_block_mask(4, 100, decay=0)


def test_report_script_writes_the_table_and_a_picture(tmp_path):
    from radial_lora.scripts.radial_mask_report import density_table, plot_mask

    table = density_table(decays=(1.0, 0.2)).splitlines()
    assert len(table) == 2 + 6 and "| 480p (480x832) | 321 | 81 | 126,360 |" in table[4]
    densities = [float(x) for x in table[4].split("|")[5:7]]
    assert densities[0] > densities[1]  # a smaller decay narrows the bands
    png = plot_mask(tmp_path / "mask.png", frames=9, tokens_per_frame=300, decay=1.0)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
