"""Hopper (sm_90) kernels of the block-sparse attention, warp-specialized, in Gluon: the forward,
the backward's dK/dV and dQ, and a one-kernel backward (the default; attention.kernels.gluon=fused
requires it). Launched by kernels/sparse_attention.py where kernels/kernel_choice.py routes to them.

Shapes as in kernels/triton_kernels.py (B batch, H heads, S tokens, D head dim 64 or 128):
  q, k, v, out  [B, H, S, D] bf16 / fp16, any strides TMA accepts (16-byte aligned rows)
  lse           [B, H, S]    fp32, base 2
  kv_count [NB], kv_index [NB, W]: the kept key blocks of each query block (compact_mask)

Why a second forward: Triton's `tl.*` kernel runs FlashAttention-2's schedule (every warp loads
and computes; the softmax of tile j waits for the tensor cores), which measured 447 TFLOP/s on an
H100 against cuDNN's 590 dense (docs/radial_attention.md, what we tried). Triton 3.6 does not warp-specialize
on Hopper. Gluon, Triton's lower-level dialect, does, so this kernel takes FlashAttention-3's
layout:
  - one producer warpgroup (few registers) walks the mask row's kept blocks and brings the query
    tile and each key/value tile into shared memory with TMA, through a ring of STAGES buffers
    guarded by mbarriers (ready: bytes arrived; empty: both consumers are done with it);
  - two consumer warpgroups (240 registers each), each owning 64 of the program's 128 query rows,
    run Q·Kᵀ and P·V as asynchronous wgmma on the shared tiles and the online softmax in
    registers. Two warpgroups on one SM interleave: one's exponentials run while the other's
    products are on the tensor cores. Within each, FlashAttention-3's pipeline: tile t's Q·Kᵀ
    goes out with tile t-1's P·V, and tile t's softmax runs under that product.
One program per (mask block of 128 query rows, batch*head), as in the Triton kernel, the blocks
with the most kept blocks launched first (_program_block). Numerics are
the Triton kernel's: fp32 scores, one fp32 factor (scale * log2 e) applied in the FMA with the max,
exp2, keys past S masked only in the tiles past S, a row with no kept block outputs zeros and lse
+inf. The dK/dV kernel is the same arrangement turned around: one program per mask block of 128
keys, each consumer warpgroup owning 64 keys, the producer streaming the Q and dO tiles of the
query blocks that keep them (the transposed index); 4 products per block pair, no atomics, as the
Triton dK/dV kernel it replaces. The dQ kernel is the forward's arrangement again (a program per
query block, K/V tiles streamed, the same pipeline), with Q and dO resident and three products
per tile. (The dK/dV kernel pipelined that way measured slower: its dSᵀ has to wait in shared
memory, since in registers it spills.) The fused
backward is the dK/dV kernel plus dQ = dS K summed over programs by TMA reduce-adds into fp32
(5 products per block pair instead of 7): on an H100 1-4% faster than the split pair
(docs/benchmarks/attention.md), so the
default, except under torch.use_deterministic_algorithms (its dQ adds land in varying order;
kernels/kernel_choice.py GLUON_CHOICES; docs/benchmarks/attention.md).

GPU only (Gluon has no CPU interpreter): tests/test_gluon_kernels.py runs them on a GPU;
on CPU, tests/test_scripts.py compiles them for sm_90 (scripts/lab/kernel_sass.py) with the installed
Triton, which is newer than the GPU image's 3.6.
"""

from __future__ import annotations

import contextlib
from types import MappingProxyType

import torch
import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from radial_lora.kernels.launch import set_tma_allocator, strides, tma_layout_ok

# Triton 3.6 (the GPU image) names the TMA load async_copy_global_to_shared; newer ones async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared


@gluon.jit
def _program_block(ORDER, MASK_BLOCK: gl.constexpr, H):
    """(first row of this program's mask block, b*H + h, b, h, the block's index). Programs take
    their blocks in ORDER (the most kept blocks first, compact_mask): the GPU starts programs in
    grid order, so the longest are not left for the last wave."""
    block = gl.load(ORDER + gl.program_id(0))
    bh = gl.program_id(1)
    return block * MASK_BLOCK, bh, bh // H, bh % H, block


@gluon.jit
def _rows_desc(base, S, stride_s, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, smem):
    """TMA descriptor of one [S, HEAD_DIM] matrix (batch and head applied to `base`) in ROWS-row
    tiles, in the shared-memory layout of `smem` (where they land); rows past S read as zeros."""
    return tma.make_tensor_descriptor(base, shape=[S, HEAD_DIM], strides=[stride_s, 1], block_shape=[ROWS, HEAD_DIM],
                                      layout=smem.type.layout)  # fmt: skip


@gluon.jit
def _ring_barriers(STAGES: gl.constexpr):
    """The mbarriers of a STAGES-deep ring of shared-memory tiles: ready (one arrival, the
    producer's expected-bytes arrive; TMA completes it) and empty (one arrival per consumer
    warpgroup, when both are done with the tile)."""
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    return ready, empty


@gluon.jit
def _tile_start(index_row, t, MASK_BLOCK: gl.constexpr, TILE: gl.constexpr):
    """First token of the t-th TILE-row tile of the kept blocks listed (ascending) at index_row
    (the Gluon twin of triton_kernels._tile_start: Gluon calls only Gluon functions)."""
    tiles_per_block: gl.constexpr = MASK_BLOCK // TILE
    return gl.load(index_row + t // tiles_per_block) * MASK_BLOCK + (t % tiles_per_block) * TILE


@gluon.jit
def _row_tiles(count_ptr, index_row, S, MASK_BLOCK: gl.constexpr, TILE: gl.constexpr):
    """(tiles, full tiles) of one mask row's kept key blocks in TILE-key tiles: tiles numbered from
    the full count on belong to a kept partial last block (indices ascend, so it is the last
    entry), and only they need their keys past S masked."""
    tiles_per_block: gl.constexpr = MASK_BLOCK // TILE
    count = gl.load(count_ptr)
    num_tiles = count * tiles_per_block
    last_block = gl.load(index_row + gl.maximum(count - 1, 0))
    ragged = (count > 0) & (S % MASK_BLOCK != 0) & (last_block == (S - 1) // MASK_BLOCK)
    return num_tiles, num_tiles - gl.where(ragged, tiles_per_block, 0)


@gluon.jit
def _keys_in_range(t, offs_n, S, MASK_BLOCK: gl.constexpr, TILE: gl.constexpr):
    """[1, TILE]: which keys of the t-th tile, one of the partial last block's, lie before S."""
    start_n = (S // MASK_BLOCK) * MASK_BLOCK + (t % (MASK_BLOCK // TILE)) * TILE
    return (start_n + offs_n)[None, :] < S


@gluon.jit
def _producer(
    Q, K, V, KV_COUNT, KV_INDEX, ORDER, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_index, H, S,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """Load the query tile once, then every kept key/value tile of this row into the ring."""
    start_m, bh, b, h, row = _program_block(ORDER, MASK_BLOCK, H)
    # Descriptors over this (b, h) matrix: rows past S read as zeros.
    q_desc = _rows_desc(Q + b * stride_qb + h * stride_qh, S, stride_qs, MASK_BLOCK, HEAD_DIM, q_smem)
    k_desc = _rows_desc(K + b * stride_kb + h * stride_kh, S, stride_ks, BLOCK_N, HEAD_DIM, k_smem)
    v_desc = _rows_desc(V + b * stride_vb + h * stride_vh, S, stride_vs, BLOCK_N, HEAD_DIM, v_smem)
    mbarrier.expect(q_ready, MASK_BLOCK * HEAD_DIM * Q.dtype.element_ty.primitive_bitwidth // 8)
    _tma_load(q_desc, [start_m, 0], q_ready, q_smem)
    tile_bytes: gl.constexpr = 2 * BLOCK_N * HEAD_DIM * K.dtype.element_ty.primitive_bitwidth // 8
    _tile_ring(k_desc, v_desc, KV_COUNT + row, KV_INDEX + row * stride_index, k_smem, v_smem, kv_ready, kv_empty,
             MASK_BLOCK, BLOCK_N, STAGES, tile_bytes)  # fmt: skip


@gluon.jit
def _tile_ring(
    a_desc, b_desc, count_ptr, index_row, a_smem, b_smem, ready, empty,
    MASK_BLOCK: gl.constexpr, TILE: gl.constexpr, STAGES: gl.constexpr, TILE_BYTES: gl.constexpr,
):  # fmt: skip
    """Bring the TILE-row tiles of two matrices (K and V, or Q and dO) at every block one mask row
    or column keeps (its count and index row given) into a ring, each stage once both consumers
    have released it."""
    tiles_per_block: gl.constexpr = MASK_BLOCK // TILE
    num_tiles = gl.load(count_ptr) * tiles_per_block
    for t in range(num_tiles):
        stage = t % STAGES
        # A fresh barrier counts as having completed the phase before its first: parity 1 passes.
        mbarrier.wait(empty.index(stage), ((t // STAGES) & 1) ^ 1)
        start = _tile_start(index_row, t, MASK_BLOCK, TILE)
        arrived = ready.index(stage)
        mbarrier.expect(arrived, TILE_BYTES)
        _tma_load(a_desc, [start, 0], arrived, a_smem.index(stage))
        _tma_load(b_desc, [start, 0], arrived, b_smem.index(stage))


@gluon.jit
def _consumer(
    O, LSE, KV_COUNT, KV_INDEX, ORDER, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
    stride_ob, stride_oh, stride_os, stride_index, H, S, qk_scale,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ROWS: gl.constexpr, CONSUMER: gl.constexpr,
):  # fmt: skip
    """Online softmax over the ring's tiles for this warpgroup's ROWS query rows; store O and lse."""
    dtype: gl.constexpr = O.dtype.element_ty
    k_width: gl.constexpr = 32 // dtype.primitive_bitwidth
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=k_width)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    start_m, bh, b, h, row = _program_block(ORDER, MASK_BLOCK, H)
    num_tiles, num_full = _row_tiles(KV_COUNT + row, KV_INDEX + row * stride_index, S, MASK_BLOCK, BLOCK_N)

    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=s_rows)
    l_i = gl.zeros([ROWS], gl.float32, layout=s_rows)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_init = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

    mbarrier.wait(q_ready, 0)
    q = q_smem.slice(CONSUMER * ROWS, ROWS, dim=0)
    if num_tiles > 0:
        # FlashAttention-3's intra-warpgroup pipeline: tile t's S = Q Kᵀ and tile t-1's P V go to
        # the tensor cores together, and tile t's softmax runs while P V does. Tile t-1's stage is
        # released a tile later, so the ring needs 3 stages (with 2, the loads stall it: 9% slower
        # than the unpipelined loop; with 3, 10% faster, H100, docs/radial_attention.md).
        mbarrier.wait(kv_ready.index(0), 0)
        s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_init, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        if num_full == 0:
            s = gl.where(_keys_in_range(0, offs_n, S, MASK_BLOCK, BLOCK_N), s, float("-inf"))
        m_i = gl.max(s, axis=1) * qk_scale  # log2 units
        p = gl.exp2(gl.fma(s, qk_scale, -m_i[:, None]))
        l_i = gl.sum(p, axis=1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        for t in range(1, num_tiles):
            stage = t % STAGES
            prev = (t - 1) % STAGES
            mbarrier.wait(kv_ready.index(stage), (t // STAGES) & 1)
            s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
            acc = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=1, deps=(s,))  # S done; P V may still run
            if t >= num_full:  # a tile of the partial last block: keys past S get no weight
                s = gl.where(_keys_in_range(t, offs_n, S, MASK_BLOCK, BLOCK_N), s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)
            p = gl.exp2(gl.fma(s, qk_scale, -m_new[:, None]))
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.sum(p, axis=1)
            acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(acc, p_op))
            mbarrier.arrive(kv_empty.index(prev), count=1)
            acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            m_i = m_new
        last = (num_tiles - 1) % STAGES
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(last), count=1)

    has_keys = l_i > 0  # False only for a query block with no kept key block
    l_safe = gl.where(has_keys, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, o_rows)[:, None]
    offs_m = start_m + CONSUMER * ROWS + gl.arange(0, ROWS, layout=o_rows)
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    gl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], out.to(dtype),
             mask=offs_m[:, None] < S)  # fmt: skip
    lse = gl.where(has_keys, m_i + gl.log2(l_safe), float("inf"))  # +inf: p = 0 in the backward
    offs_l = start_m + CONSUMER * ROWS + gl.arange(0, ROWS, layout=s_rows)
    gl.store(LSE + bh * S + offs_l, lse, mask=offs_l < S)


@gluon.jit
def forward_kernel(
    Q, K, V, O, LSE, KV_COUNT, KV_INDEX, ORDER,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_index,
    H, S, qk_scale,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = Q.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=dtype.primitive_bitwidth,
                                                     rank=2)  # fmt: skip
    q_smem = gl.allocate_shared_memory(dtype, [MASK_BLOCK, HEAD_DIM], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    kv_ready, kv_empty = _ring_barriers(STAGES)
    fence_async_shared()

    gl.warp_specialize(
        [
            (_producer, (Q, K, V, KV_COUNT, KV_INDEX, ORDER, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
                         stride_vs, stride_index, H, S, HEAD_DIM, MASK_BLOCK, BLOCK_N, STAGES)),
            (_consumer, (O, LSE, KV_COUNT, KV_INDEX, ORDER, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                         stride_ob, stride_oh, stride_os, stride_index, H, S, qk_scale,
                         HEAD_DIM, MASK_BLOCK, BLOCK_N, STAGES, MASK_BLOCK // 2, 0)),
            (_consumer, (O, LSE, KV_COUNT, KV_INDEX, ORDER, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                         stride_ob, stride_oh, stride_os, stride_index, H, S, qk_scale,
                         HEAD_DIM, MASK_BLOCK, BLOCK_N, STAGES, MASK_BLOCK // 2, 1)),
        ],
        [4, 4],
        [240, 240],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Backward: dK and dV. One program per mask block of 128 keys;
# each consumer warpgroup owns 64 of them (their K and V rows stay in shared memory) and walks the
# query blocks that keep its key block in tiles of 64 queries, which the producer streams in.
# ----------------------------------------------------------------------------------------------


@gluon.jit
def _dkdv_producer(
    Q, K, V, DO, Q_COUNT, Q_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, kv_ready, tile_ready, tile_empty,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds, stride_index, H, S,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """Load the program's K and V rows once, then Q and dO of every query tile that keeps them."""
    start_n, bh, b, h, col = _program_block(ORDER, MASK_BLOCK, H)
    k_desc = _rows_desc(K + b * stride_kb + h * stride_kh, S, stride_ks, MASK_BLOCK, HEAD_DIM, k_smem)
    v_desc = _rows_desc(V + b * stride_vb + h * stride_vh, S, stride_vs, MASK_BLOCK, HEAD_DIM, v_smem)
    q_desc = _rows_desc(Q + b * stride_qb + h * stride_qh, S, stride_qs, BLOCK_M, HEAD_DIM, q_smem)
    do_desc = _rows_desc(DO + b * stride_db + h * stride_dh, S, stride_ds, BLOCK_M, HEAD_DIM, do_smem)
    element_bytes: gl.constexpr = K.dtype.element_ty.primitive_bitwidth // 8
    mbarrier.expect(kv_ready, 2 * MASK_BLOCK * HEAD_DIM * element_bytes)
    _tma_load(k_desc, [start_n, 0], kv_ready, k_smem)
    _tma_load(v_desc, [start_n, 0], kv_ready, v_smem)
    _tile_ring(q_desc, do_desc, Q_COUNT + col, Q_INDEX + col * stride_index, q_smem, do_smem, tile_ready, tile_empty,
               MASK_BLOCK, BLOCK_M, STAGES, 2 * BLOCK_M * HEAD_DIM * element_bytes)  # fmt: skip


@gluon.jit
def _store_key_rows(
    DK, DV, dk, dv, first, b, h, S, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs,
    KEYS: gl.constexpr, HEAD_DIM: gl.constexpr,
):  # fmt: skip
    """Store a warpgroup's dK and dV rows (fp32 accumulators, keys first .. first + KEYS) in the
    outputs' dtype; rows past S are dropped."""
    layout: gl.constexpr = dk.type.layout
    offs_n = first + gl.arange(0, KEYS, layout=gl.SliceLayout(1, layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, layout))
    keys = offs_n[:, None] < S
    gl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=keys)  # fmt: skip
    gl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=keys)  # fmt: skip


@gluon.jit
def _query_tile_stats(
    t, num_tiles, LSE, DELTA, Q_INDEX, col, stride_index, bh, S, offs_m,
    MASK_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, LATE_ROW_STATS: gl.constexpr,
):  # fmt: skip
    """(lse, delta, first row) of the t-th streamed query tile; a t past the last tile reads tile
    0's entry (harmless: the consumers' prefetch of a tile that never comes; the index row has at
    least one entry, a valid block, even for a mask column with none kept).

    The consumers call it for tile t + 1 once tile t's products are issued, so its two dependent
    loads (the index entry, then the rows) are in flight while the tensor cores work. Loaded at the
    top of tile t instead, their latency stalled every tile: on an H100 the
    dK/dV kernel runs 5.5% faster this way (61.1 -> 57.7 ms at the wan_4x shape) and the fused one
    0-2.4%; prefetching at the top of the tile instead keeps the values live through all the
    products and spills (dK/dV: 197 instructions, 112 ms; docs/radial_attention.md, what we tried).

    LATE_ROW_STATS: load lse and delta one value per thread and spread them over the score columns
    (16 registers each) only where they are used. That frees registers while the products run:
    the fused kernel's spills drop from 46 to 12 instructions (Triton 3.6) and it runs 6% faster on
    an H100; the dK/dV kernel, which did not spill much, runs 4% slower (the layout conversions),
    so it loads them spread from the start."""
    start_m = _tile_start(Q_INDEX + col * stride_index, t * (t < num_tiles), MASK_BLOCK, BLOCK_M)
    if LATE_ROW_STATS:
        rows = start_m + gl.arange(0, BLOCK_M, layout=gl.BlockedLayout([1], [32], [4], [0]))
    else:
        rows = start_m + offs_m
    lse = gl.load(LSE + bh * S + rows, mask=rows < S, other=float("inf"))  # +inf: rows past S get p = 0
    delta = gl.load(DELTA + bh * S + rows, mask=rows < S, other=0.0)
    return lse, delta, start_m


@gluon.jit
def _key_tile_products(
    t, k, v, q_smem, do_smem, tile_ready, lse, delta, qk_scale, dk, dv, s_init, offs_m,
    BLOCK_M: gl.constexpr, STAGES: gl.constexpr, HEAD_DIM: gl.constexpr,
):  # fmt: skip
    """A key-block consumer's products with the t-th streamed query tile (transposed: Sᵀ = K Qᵀ,
    Pᵀ, dPᵀ = V dOᵀ, dV += Pᵀ dO, dSᵀ = Pᵀ (dPᵀ - delta), dK += dSᵀ Q), given the tile's lse and
    delta (_query_tile_stats): (dv, dk) with their products still in flight, and dSᵀ in the
    inputs' dtype."""
    dtype: gl.constexpr = q_smem.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout,
                                                  k_width=32 // dtype.primitive_bitwidth)  # fmt: skip
    stage = t % STAGES
    mbarrier.wait(tile_ready.index(stage), (t // STAGES) & 1)
    q = q_smem.index(stage)
    do = do_smem.index(stage)
    # dPᵀ goes to the tensor cores right behind Sᵀ, so it runs while the exponentials do
    # (5-6% faster on an H100 than issuing it after them; docs/radial_attention.md).
    s_t = warpgroup_mma(k, q.permute((1, 0)), s_init, use_acc=False, is_async=True)
    dp_t = warpgroup_mma(v, do.permute((1, 0)), s_init, use_acc=False, is_async=True)
    s_t = warpgroup_mma_wait(num_outstanding=1, deps=(s_t,))
    lse = gl.convert_layout(lse, offs_m.type.layout)  # no-op unless loaded LATE_ROW_STATS
    p_t = gl.exp2(gl.fma(s_t, qk_scale, -lse[None, :]))  # Pᵀ [keys, BLOCK_M]
    dv = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_layout), do, dv, is_async=True)
    dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t,))  # dV's product may still run
    delta = gl.convert_layout(delta, offs_m.type.layout)
    ds_t = (p_t * (dp_t - delta[None, :])).to(dtype)
    dk = warpgroup_mma(gl.convert_layout(ds_t, op_layout), q, dk, is_async=True)
    return dv, dk, ds_t


@gluon.jit
def _dkdv_consumer(
    LSE, DELTA, DK, DV, Q_COUNT, Q_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, kv_ready, tile_ready, tile_empty,
    stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs, stride_index, H, S, qk_scale, sm_scale,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
    KEYS: gl.constexpr, CONSUMER: gl.constexpr,
):  # fmt: skip
    """dK and dV of this warpgroup's KEYS keys over the streamed query tiles (_key_tile_products)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])  # fmt: skip
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)

    start_n, bh, b, h, col = _program_block(ORDER, MASK_BLOCK, H)
    tiles_per_block: gl.constexpr = MASK_BLOCK // BLOCK_M
    num_tiles = gl.load(Q_COUNT + col) * tiles_per_block
    offs_m = gl.arange(0, BLOCK_M, layout=s_cols)

    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=acc_layout)
    s_init = gl.zeros([KEYS, BLOCK_M], gl.float32, layout=s_layout)
    mbarrier.wait(kv_ready, 0)
    k = k_smem.slice(CONSUMER * KEYS, KEYS, dim=0)
    v = v_smem.slice(CONSUMER * KEYS, KEYS, dim=0)
    lse, delta, first = _query_tile_stats(0, num_tiles, LSE, DELTA, Q_INDEX, col, stride_index, bh, S, offs_m,
                                          MASK_BLOCK, BLOCK_M, False)  # fmt: skip
    for t in range(num_tiles):
        dv, dk, ds_t = _key_tile_products(t, k, v, q_smem, do_smem, tile_ready, lse, delta, qk_scale, dk, dv, s_init,
                                          offs_m, BLOCK_M, STAGES, HEAD_DIM)  # fmt: skip
        # The next tile's lse and delta load while this tile's products run (_query_tile_stats).
        lse, delta, first = _query_tile_stats(t + 1, num_tiles, LSE, DELTA, Q_INDEX, col, stride_index, bh, S, offs_m,
                                              MASK_BLOCK, BLOCK_M, False)  # fmt: skip
        dv, dk = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk))
        mbarrier.arrive(tile_empty.index(t % STAGES), count=1)

    _store_key_rows(DK, DV, dk * sm_scale, dv, start_n + CONSUMER * KEYS, b, h, S, stride_dkb, stride_dkh, stride_dks,
                    stride_dvb, stride_dvh, stride_dvs, KEYS, HEAD_DIM)  # fmt: skip


@gluon.jit
def dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_COUNT, Q_INDEX, ORDER,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_index,
    H, S, qk_scale, sm_scale,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = Q.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=dtype.primitive_bitwidth,
                                                     rank=2)  # fmt: skip
    k_smem = gl.allocate_shared_memory(dtype, [MASK_BLOCK, HEAD_DIM], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [MASK_BLOCK, HEAD_DIM], smem_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], smem_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], smem_layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    tile_ready, tile_empty = _ring_barriers(STAGES)
    fence_async_shared()

    gl.warp_specialize(
        [
            (_dkdv_producer, (Q, K, V, DO, Q_COUNT, Q_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, kv_ready,
                              tile_ready, tile_empty, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                              stride_ks, stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
                              stride_index, H, S, HEAD_DIM, MASK_BLOCK, BLOCK_M, STAGES)),
            (_dkdv_consumer, (LSE, DELTA, DK, DV, Q_COUNT, Q_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, kv_ready,
                              tile_ready, tile_empty, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh,
                              stride_dvs, stride_index, H, S, qk_scale, sm_scale,
                              HEAD_DIM, MASK_BLOCK, BLOCK_M, STAGES, MASK_BLOCK // 2, 0)),
            (_dkdv_consumer, (LSE, DELTA, DK, DV, Q_COUNT, Q_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, kv_ready,
                              tile_ready, tile_empty, stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh,
                              stride_dvs, stride_index, H, S, qk_scale, sm_scale,
                              HEAD_DIM, MASK_BLOCK, BLOCK_M, STAGES, MASK_BLOCK // 2, 1)),
        ],
        [4, 4],
        [240, 240],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Backward: dQ. The forward's arrangement with one more product: one program per mask block of
# 128 queries, the producer loads the Q and dO rows once and streams the kept K/V tiles through the
# ring; each consumer warpgroup owns 64 query rows: S = Q Kᵀ and dP = dO Vᵀ (both on the tensor
# cores at once), P from the forward's lse, dS = P (dP - delta), dQ += dS K.
# ----------------------------------------------------------------------------------------------


@gluon.jit
def _dq_producer(
    Q, K, V, DO, KV_COUNT, KV_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, rows_ready, kv_ready, kv_empty,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds, stride_index, H, S,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """Load the program's Q and dO rows once, then every kept key/value tile into the ring."""
    start_m, bh, b, h, row = _program_block(ORDER, MASK_BLOCK, H)
    q_desc = _rows_desc(Q + b * stride_qb + h * stride_qh, S, stride_qs, MASK_BLOCK, HEAD_DIM, q_smem)
    do_desc = _rows_desc(DO + b * stride_db + h * stride_dh, S, stride_ds, MASK_BLOCK, HEAD_DIM, do_smem)
    k_desc = _rows_desc(K + b * stride_kb + h * stride_kh, S, stride_ks, BLOCK_N, HEAD_DIM, k_smem)
    v_desc = _rows_desc(V + b * stride_vb + h * stride_vh, S, stride_vs, BLOCK_N, HEAD_DIM, v_smem)
    element_bytes: gl.constexpr = Q.dtype.element_ty.primitive_bitwidth // 8
    mbarrier.expect(rows_ready, 2 * MASK_BLOCK * HEAD_DIM * element_bytes)
    _tma_load(q_desc, [start_m, 0], rows_ready, q_smem)
    _tma_load(do_desc, [start_m, 0], rows_ready, do_smem)
    _tile_ring(k_desc, v_desc, KV_COUNT + row, KV_INDEX + row * stride_index, k_smem, v_smem, kv_ready, kv_empty,
             MASK_BLOCK, BLOCK_N, STAGES, 2 * BLOCK_N * HEAD_DIM * element_bytes)  # fmt: skip


@gluon.jit
def _dq_consumer(
    LSE, DELTA, DQ, KV_COUNT, KV_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, rows_ready, kv_ready, kv_empty,
    stride_dqb, stride_dqh, stride_dqs, stride_index, H, S, qk_scale, sm_scale,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    ROWS: gl.constexpr, CONSUMER: gl.constexpr,
):  # fmt: skip
    """dQ of this warpgroup's ROWS query rows over the ring's tiles."""
    dtype: gl.constexpr = DQ.dtype.element_ty
    k_width: gl.constexpr = 32 // dtype.primitive_bitwidth
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=k_width)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)

    start_m, bh, b, h, row = _program_block(ORDER, MASK_BLOCK, H)
    # As in the forward, only the tiles of a kept partial last block are masked. Their keys past S
    # are zeros (TMA), which would already add nothing to dQ, but P there is exp2(-lse), which can
    # overflow; masked, it is 0.
    num_tiles, num_full = _row_tiles(KV_COUNT + row, KV_INDEX + row * stride_index, S, MASK_BLOCK, BLOCK_N)

    offs_m = start_m + CONSUMER * ROWS + gl.arange(0, ROWS, layout=s_rows)
    lse = gl.load(LSE + bh * S + offs_m, mask=offs_m < S, other=float("inf"))  # +inf: rows past S get p = 0
    delta = gl.load(DELTA + bh * S + offs_m, mask=offs_m < S, other=0.0)
    dq = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=acc_layout)
    s_init = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

    mbarrier.wait(rows_ready, 0)
    q = q_smem.slice(CONSUMER * ROWS, ROWS, dim=0)
    do = do_smem.slice(CONSUMER * ROWS, ROWS, dim=0)
    if num_tiles > 0:
        # The forward's pipeline: tile t's S and dP go to the tensor cores with tile t-1's
        # dQ += dS K, and tile t's dS is computed while that product runs (7% faster on an H100).
        # With 128-key tiles the ring would need 3 stages of 64 KB and the registers would spill,
        # so tiles are 64 keys (DQ_TILE).
        mbarrier.wait(kv_ready.index(0), 0)
        s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_init, use_acc=False, is_async=True)
        dp = warpgroup_mma(do, v_smem.index(0).permute((1, 0)), s_init, use_acc=False, is_async=True)
        s, dp = warpgroup_mma_wait(num_outstanding=0, deps=(s, dp))
        p = gl.exp2(gl.fma(s, qk_scale, -lse[:, None]))
        if num_full == 0:
            p = gl.where(_keys_in_range(0, offs_n, S, MASK_BLOCK, BLOCK_N), p, 0.0)
        ds_op = gl.convert_layout((p * (dp - delta[:, None])).to(dtype), op_layout)
        for t in range(1, num_tiles):
            stage = t % STAGES
            prev = (t - 1) % STAGES
            mbarrier.wait(kv_ready.index(stage), (t // STAGES) & 1)
            s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
            dp = warpgroup_mma(do, v_smem.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
            dq = warpgroup_mma(ds_op, k_smem.index(prev), dq, is_async=True)
            s, dp = warpgroup_mma_wait(num_outstanding=1, deps=(s, dp))  # dQ's product may still run
            p = gl.exp2(gl.fma(s, qk_scale, -lse[:, None]))
            if t >= num_full:
                p = gl.where(_keys_in_range(t, offs_n, S, MASK_BLOCK, BLOCK_N), p, 0.0)
            ds = (p * (dp - delta[:, None])).to(dtype)
            dq, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ds_op))
            mbarrier.arrive(kv_empty.index(prev), count=1)
            ds_op = gl.convert_layout(ds, op_layout)
        last = (num_tiles - 1) % STAGES
        dq = warpgroup_mma(ds_op, k_smem.index(last), dq, is_async=True)
        dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq,))
        mbarrier.arrive(kv_empty.index(last), count=1)

    dq = dq * sm_scale
    offs_q = start_m + CONSUMER * ROWS + gl.arange(0, ROWS, layout=gl.SliceLayout(1, acc_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, acc_layout))
    gl.store(DQ + b * stride_dqb + h * stride_dqh + offs_q[:, None] * stride_dqs + offs_d[None, :], dq.to(dtype),
             mask=offs_q[:, None] < S)  # fmt: skip


@gluon.jit
def dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_COUNT, KV_INDEX, ORDER,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds,
    stride_dqb, stride_dqh, stride_dqs,
    stride_index,
    H, S, qk_scale, sm_scale,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = Q.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=dtype.primitive_bitwidth,
                                                     rank=2)  # fmt: skip
    q_smem = gl.allocate_shared_memory(dtype, [MASK_BLOCK, HEAD_DIM], smem_layout)
    do_smem = gl.allocate_shared_memory(dtype, [MASK_BLOCK, HEAD_DIM], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    rows_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(rows_ready, count=1)
    kv_ready, kv_empty = _ring_barriers(STAGES)
    fence_async_shared()

    gl.warp_specialize(
        [
            (_dq_producer, (Q, K, V, DO, KV_COUNT, KV_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, rows_ready,
                            kv_ready, kv_empty, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks,
                            stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds, stride_index, H, S,
                            HEAD_DIM, MASK_BLOCK, BLOCK_N, STAGES)),
            (_dq_consumer, (LSE, DELTA, DQ, KV_COUNT, KV_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, rows_ready,
                            kv_ready, kv_empty, stride_dqb, stride_dqh, stride_dqs, stride_index, H, S, qk_scale,
                            sm_scale, HEAD_DIM, MASK_BLOCK, BLOCK_N, STAGES, MASK_BLOCK // 2, 0)),
            (_dq_consumer, (LSE, DELTA, DQ, KV_COUNT, KV_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, rows_ready,
                            kv_ready, kv_empty, stride_dqb, stride_dqh, stride_dqs, stride_index, H, S, qk_scale,
                            sm_scale, HEAD_DIM, MASK_BLOCK, BLOCK_N, STAGES, MASK_BLOCK // 2, 1)),
        ],
        [4, 4],
        [240, 240],
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------
# Backward in one kernel: the dK/dV kernel above plus dQ, FlashAttention-3's way. 5 tensor-core
# products per block pair instead of the split backward's 7 (which recomputes S and dP for dQ):
# the two consumer warpgroups put their dSᵀ halves (64 keys x 64 queries each) into shared memory,
# each then computes dQ for its half of the head dim over all 128 keys (dS · K[:, half]), stages it
# in shared memory and adds it into an fp32 [B*H, S, D] buffer with one TMA reduce-add, which the
# copy engine carries out while the warpgroup goes on (no registers held, no per-element atomics:
# those spilled 115 instructions' worth, docs/radial_attention.md). The sum's order varies
# between runs, so dQ is not bitwise reproducible (the split kernels are).
# ----------------------------------------------------------------------------------------------

if hasattr(tma, "async_atomic_add"):  # newer Triton names the TMA reduce-add
    _tma_reduce_add = tma.async_atomic_add
else:  # Triton 3.6 (the GPU image) has the op in its Gluon builder but no Python wrapper for it

    @builtin
    def _tma_reduce_add(tensor_desc, coord, src, _semantic=None):
        """Add the shared-memory tile `src` into global memory at `coord` of `tensor_desc` (TMA)."""
        coord = _semantic._convert_to_ir_values(coord, require_i64=False)
        _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _fused_consumer(
    LSE, DELTA, DK, DV, DQ_ACC, Q_COUNT, Q_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, ds_smem, dq_smem, kv_ready,
    tile_ready, tile_empty, ds_full, ds_empty,
    stride_dkb, stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs, stride_index, H, S, qk_scale, sm_scale,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
    KEYS: gl.constexpr, CONSUMER: gl.constexpr,
):  # fmt: skip
    """_dkdv_consumer's products for this warpgroup's KEYS keys, plus dQ[:, this half of D] of each
    streamed query tile over all the program's keys, added into DQ_ACC (unscaled, fp32)."""
    DQ_COLS: gl.constexpr = HEAD_DIM // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_M, 16])  # fmt: skip
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_DIM, 16])  # fmt: skip
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_COLS, 16])  # fmt: skip
    s_cols: gl.constexpr = gl.SliceLayout(0, s_layout)

    start_n, bh, b, h, col = _program_block(ORDER, MASK_BLOCK, H)
    tiles_per_block: gl.constexpr = MASK_BLOCK // BLOCK_M
    num_tiles = gl.load(Q_COUNT + col) * tiles_per_block
    offs_m = gl.arange(0, BLOCK_M, layout=s_cols)
    # Rows past S are dropped by the TMA reduce (the descriptor's shape ends at S).
    dq_desc = tma.make_tensor_descriptor(DQ_ACC + bh.to(gl.int64) * S * HEAD_DIM, shape=[S, HEAD_DIM],
                                         strides=[HEAD_DIM, 1], block_shape=[BLOCK_M, DQ_COLS],
                                         layout=dq_smem.type.layout)  # fmt: skip

    dk = gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([KEYS, HEAD_DIM], gl.float32, layout=acc_layout)
    s_init = gl.zeros([KEYS, BLOCK_M], gl.float32, layout=s_layout)
    dq_init = gl.zeros([BLOCK_M, DQ_COLS], gl.float32, layout=dq_layout)
    mbarrier.wait(kv_ready, 0)
    k = k_smem.slice(CONSUMER * KEYS, KEYS, dim=0)
    v = v_smem.slice(CONSUMER * KEYS, KEYS, dim=0)
    k_half = k_smem.slice(CONSUMER * DQ_COLS, DQ_COLS, dim=1)  # [all 128 keys, this half of D]
    lse, delta, start_m = _query_tile_stats(0, num_tiles, LSE, DELTA, Q_INDEX, col, stride_index, bh, S, offs_m,
                                            MASK_BLOCK, BLOCK_M, True)  # fmt: skip
    for t in range(num_tiles):
        dv, dk, ds_t = _key_tile_products(t, k, v, q_smem, do_smem, tile_ready, lse, delta, qk_scale, dk, dv, s_init,
                                          offs_m, BLOCK_M, STAGES, HEAD_DIM)  # fmt: skip
        # The next tile's lse and delta load while this tile's products run (_query_tile_stats).
        lse_next, delta_next, start_next = _query_tile_stats(t + 1, num_tiles, LSE, DELTA, Q_INDEX, col, stride_index,
                                                             bh, S, offs_m, MASK_BLOCK, BLOCK_M, True)  # fmt: skip
        # Both halves of dSᵀ into shared memory, double-buffered: tile t's buffer is written again
        # at t + 2, once both warpgroups have read it (ds_empty).
        buf = t % 2
        mbarrier.wait(ds_empty.index(buf), ((t // 2) & 1) ^ 1)
        ds_smem.index(buf).slice(CONSUMER * KEYS, KEYS, dim=0).store(ds_t)
        fence_async_shared()
        mbarrier.arrive(ds_full.index(buf), count=1)
        mbarrier.wait(ds_full.index(buf), (t // 2) & 1)
        dq = warpgroup_mma(ds_smem.index(buf).permute((1, 0)), k_half, dq_init, use_acc=False, is_async=True)
        dv, dk, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, dq))
        mbarrier.arrive(ds_empty.index(buf), count=1)
        mbarrier.arrive(tile_empty.index(t % STAGES), count=1)
        # The previous tile's reduce-add has had a whole tile's products to read its staging
        # buffer; wait for that read, refill the buffer, and hand it to the copy engine. (Two
        # buffers, waiting one tile later, measured no faster: the adds' cost is their traffic.)
        tma.store_wait(pendings=0)
        dq_smem.store(dq * sm_scale)  # scaled here, not by a pass over the whole buffer afterwards
        fence_async_shared()
        _tma_reduce_add(dq_desc, [start_m, CONSUMER * DQ_COLS], dq_smem)
        lse, delta, start_m = lse_next, delta_next, start_next

    tma.store_wait(pendings=0)
    _store_key_rows(DK, DV, dk * sm_scale, dv, start_n + CONSUMER * KEYS, b, h, S, stride_dkb, stride_dkh, stride_dks,
                    stride_dvb, stride_dvh, stride_dvs, KEYS, HEAD_DIM)  # fmt: skip


@gluon.jit
def fused_backward_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, Q_COUNT, Q_INDEX, ORDER,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_index,
    H, S, qk_scale, sm_scale,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    dtype: gl.constexpr = Q.dtype.element_ty
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=dtype.primitive_bitwidth,
                                                     rank=2)  # fmt: skip
    dq_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    k_smem = gl.allocate_shared_memory(dtype, [MASK_BLOCK, HEAD_DIM], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [MASK_BLOCK, HEAD_DIM], smem_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], smem_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], smem_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [2, MASK_BLOCK, BLOCK_M], smem_layout)
    dq0_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM // 2], dq_layout)
    dq1_smem = gl.allocate_shared_memory(gl.float32, [BLOCK_M, HEAD_DIM // 2], dq_layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    tile_ready, tile_empty = _ring_barriers(STAGES)
    # The dS exchange: each buffer is full once both warpgroups wrote their half, empty once both read it.
    ds_full = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    ds_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(ds_full.index(i), count=2)
        mbarrier.init(ds_empty.index(i), count=2)
    fence_async_shared()

    gl.warp_specialize(
        [
            (_dkdv_producer, (Q, K, V, DO, Q_COUNT, Q_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem, kv_ready,
                              tile_ready, tile_empty, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh,
                              stride_ks, stride_vb, stride_vh, stride_vs, stride_db, stride_dh, stride_ds,
                              stride_index, H, S, HEAD_DIM, MASK_BLOCK, BLOCK_M, STAGES)),
            (_fused_consumer, (LSE, DELTA, DK, DV, DQ_ACC, Q_COUNT, Q_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem,
                               ds_smem, dq0_smem, kv_ready, tile_ready, tile_empty, ds_full, ds_empty, stride_dkb,
                               stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs, stride_index, H, S,
                               qk_scale, sm_scale, HEAD_DIM, MASK_BLOCK, BLOCK_M, STAGES, MASK_BLOCK // 2, 0)),
            (_fused_consumer, (LSE, DELTA, DK, DV, DQ_ACC, Q_COUNT, Q_INDEX, ORDER, q_smem, do_smem, k_smem, v_smem,
                               ds_smem, dq1_smem, kv_ready, tile_ready, tile_empty, ds_full, ds_empty, stride_dkb,
                               stride_dkh, stride_dks, stride_dvb, stride_dvh, stride_dvs, stride_index, H, S,
                               qk_scale, sm_scale, HEAD_DIM, MASK_BLOCK, BLOCK_M, STAGES, MASK_BLOCK // 2, 1)),
        ],
        [4, 4],
        [240, 240],
    )  # fmt: skip


def supported(block_size: int, *tensors: torch.Tensor) -> bool:
    """Whether these kernels can run these [B, H, S, D] tensors: an sm_90 GPU (wgmma is Hopper's),
    bf16/fp16, head dim 64 or 128, mask block 128, and layouts TMA reads (launch.tma_layout_ok)."""
    q = tensors[0]
    if not (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] not in (64, 128) or block_size != 128:
        return False
    return tma_layout_ok(*tensors)


def _launch_per_block(kernel, tile: dict, block_size: int, tensors, index, strided, scalars) -> None:
    """Launch one of the kernels above, one program per (mask block, batch*head), with its
    arguments in their common order: tensors, the mask's count, index and launch order, the
    strides of the `strided` tensors, the index's row stride, H, S, the scalars, the constants."""
    batch, heads, seq, head_dim = tensors[0].shape
    set_tma_allocator()  # the in-kernel TMA descriptors live in scratch memory
    kernel[(triton.cdiv(seq, block_size), batch * heads)](
        *tensors, *index, *(stride for t in strided for stride in strides(t)), index[1].stride(0), heads, seq,
        *scalars, HEAD_DIM=head_dim, MASK_BLOCK=block_size, **tile, num_warps=4,
    )  # fmt: skip


# The key tile and ring depth: 128-key tiles, 3 stages, 224 KB of the 227 KB of shared memory with
# the 128-row query tile. The pipelined consumer releases a stage a tile late, so 2 stages stall it
# (H100: 581 TFLOP/s with 3 stages, 477 with 2; docs/radial_attention.md).
FORWARD_TILE = MappingProxyType({"BLOCK_N": 128, "STAGES": 3})


@torch.library.custom_op("radial_lora::block_sparse_attn_fwd_hopper", mutates_args=())
def hopper_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_count: torch.Tensor,
    kv_index: torch.Tensor,
    kv_order: torch.Tensor,
    block_size: int,
    qk_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, S, D], lse [B, H, S] base 2) of q, k, v that `supported` accepts; qk_scale is the
    softmax scale times log2 e. A custom op (not a triton_op): torch.compile calls it as it is."""
    out = torch.empty_like(q)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    _launch_per_block(forward_kernel, _tiles["fwd"], block_size, (q, k, v, out, lse), (kv_count, kv_index, kv_order),
                      (q, k, v, out), (qk_scale,))  # fmt: skip
    return out, lse


@hopper_forward.register_fake
def _(q, k, v, kv_count, kv_index, kv_order, block_size, qk_scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


# Query rows per streamed tile in the dK/dV kernel, and its ring depth.
DKDV_TILE = MappingProxyType({"BLOCK_M": 64, "STAGES": 2})


@torch.library.custom_op("radial_lora::block_sparse_attn_dkdv_hopper", mutates_args=())
def hopper_dkdv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    q_count: torch.Tensor,
    q_index: torch.Tensor,
    q_order: torch.Tensor,
    block_size: int,
    qk_scale: float,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(dk, dv) [B, H, S, D] of tensors that `supported` accepts (d_out too), given the forward's
    base-2 lse and delta = rowsum(dO * O); qk_scale is sm_scale times log2 e."""
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    _launch_per_block(dkdv_kernel, _tiles["dkdv"], block_size, (q, k, v, d_out, lse, delta, dk, dv),
                      (q_count, q_index, q_order), (q, k, v, d_out, dk, dv), (qk_scale, sm_scale))  # fmt: skip
    return dk, dv


@hopper_dkdv.register_fake
def _(q, k, v, d_out, lse, delta, q_count, q_index, q_order, block_size, qk_scale, sm_scale):
    return torch.empty_like(k), torch.empty_like(v)


# Keys per streamed tile in the dQ kernel, and its ring depth: 64-key tiles, 4 stages, 192 KB of
# shared memory (H100: 40.2 ms at the wan_4x shape, 3 stages 40.4; the unpipelined
# loop took 43.3 with 128-key tiles, 42.5 with these).
DQ_TILE = MappingProxyType({"BLOCK_N": 64, "STAGES": 4})


@torch.library.custom_op("radial_lora::block_sparse_attn_dq_hopper", mutates_args=())
def hopper_dq(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    kv_count: torch.Tensor,
    kv_index: torch.Tensor,
    kv_order: torch.Tensor,
    block_size: int,
    qk_scale: float,
    sm_scale: float,
) -> torch.Tensor:
    """dq [B, H, S, D] of tensors that `supported` accepts (d_out too), given the forward's base-2
    lse and delta = rowsum(dO * O); qk_scale is sm_scale times log2 e."""
    dq = torch.empty_like(q)
    _launch_per_block(dq_kernel, _tiles["dq"], block_size, (q, k, v, d_out, lse, delta, dq), (kv_count, kv_index, kv_order),
                      (q, k, v, d_out, dq), (qk_scale, sm_scale))  # fmt: skip
    return dq


@hopper_dq.register_fake
def _(q, k, v, d_out, lse, delta, kv_count, kv_index, kv_order, block_size, qk_scale, sm_scale):
    return torch.empty_like(q)


# The fused backward's query tile and ring depth: 192 KB of shared memory with the dS and dQ
# staging buffers.
FUSED_TILE = MappingProxyType({"BLOCK_M": 64, "STAGES": 2})

# The tiles the ops launch: the measured ones above, unless a tool times another (only_tile).
_tiles = {"fwd": FORWARD_TILE, "dkdv": DKDV_TILE, "dq": DQ_TILE, "fused": FUSED_TILE}


@contextlib.contextmanager
def only_tile(kernel: str, **knobs: int):
    """Inside, `kernel` ("fwd", "dkdv", "dq" or "fused") launches with these tile knobs changed
    (e.g. STAGES=2): for tools that time one variant against another (scripts/lab/)."""
    previous = _tiles[kernel]
    unknown = set(knobs) - set(previous)
    if unknown:
        raise ValueError(f"{kernel} has no tile knob {', '.join(sorted(unknown))}; it has {', '.join(previous)}")
    _tiles[kernel] = MappingProxyType({**previous, **knobs})
    try:
        yield
    finally:
        _tiles[kernel] = previous


@torch.library.custom_op("radial_lora::block_sparse_attn_bwd_fused_hopper", mutates_args=())
def hopper_fused_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    d_out: torch.Tensor,
    lse: torch.Tensor,
    delta: torch.Tensor,
    q_count: torch.Tensor,
    q_index: torch.Tensor,
    q_order: torch.Tensor,
    block_size: int,
    qk_scale: float,
    sm_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) [B, H, S, D] of tensors that `supported` accepts (d_out too) in one kernel, given
    the forward's base-2 lse and delta = rowsum(dO * O); qk_scale is sm_scale times log2 e. dQ is
    summed in an fp32 buffer (TMA reduce-adds in varying order: not bitwise reproducible)."""
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    dq_acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # contiguous: the kernel indexes it so
    _launch_per_block(fused_backward_kernel, _tiles["fused"], block_size, (q, k, v, d_out, lse, delta, dk, dv, dq_acc),
                      (q_count, q_index, q_order), (q, k, v, d_out, dk, dv), (qk_scale, sm_scale))  # fmt: skip
    dq = torch.empty_like(q)
    dq.copy_(dq_acc)  # into q's strides, as the fake below promises
    return dq, dk, dv


@hopper_fused_backward.register_fake
def _(q, k, v, d_out, lse, delta, q_count, q_index, q_order, block_size, qk_scale, sm_scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
