"""The Triton kernels of the block-sparse attention: forward, delta, dK/dV and dQ (FlashAttention-2
style), each autotuned over a few measured tiles. Launched by kernels/sparse_attention.py.

Shapes (any strides with a unit last dim; B batch, H heads, S tokens, D head dim):
  q, k, v, out, d_out, dq, dk, dv   [B, H, S, D]   bf16 / fp16 (fp32 too: CPU interpreter)
  lse, delta                        [B, H, S]      fp32, base 2
  kv_count, kv_index, kv_order      the mask's compact form (kernels/compact_mask.py)

Forward: one program per (BLOCK_M query rows, batch*head) walks the kept key blocks of its mask row
in BLOCK_N tiles with an online softmax, and saves the base-2 log-sum-exp. Backward: a dK/dV kernel,
one program per key tile, walks the transposed index (so each dK/dV tile is owned by one program:
no atomics on dK/dV); a dQ kernel walks the forward index, recomputing P and dP: 7 matrix products
per block pair, deterministic.
(A fused Triton variant, dS·K added into an fp32 dQ buffer with atomics inside the dK/dV kernel,
5 products, measured 8% slower on an H100 and was removed: docs/radial_attention.md. The
Gluon one-kernel backward, the Hopper default, does this with TMA reduce-adds and is faster.)

Loads of the streamed tiles (K/V in the forward and dQ kernels, Q/dO in the dK/dV kernel) are
masked pointer loads (`cp.async`) or tensor-descriptor loads through Hopper's tensor memory
accelerator (`UTMALDG`; rows past S read as zeros): the TMA constant, chosen per kernel by
attention.kernels.tma (kernels/kernel_choice.py).

Numerics: scores and softmax statistics in fp32; the softmax scale times log2(e) is folded into
one fp32 factor applied to the fp32 product q.k, so exp2 can be used and K is never pre-scaled
in low precision (which would make the backward's recomputed probabilities disagree with the
forward's). Rows past S (the partial last block) are loaded as zeros and never stored; keys past
S are masked to -inf in the forward (in the backward their zero K/V contribute nothing to dQ, and
their own dK/dV rows are never stored). A query block with no kept key block outputs zeros.
"""

from __future__ import annotations

import contextlib

import triton
import triton.language as tl

from radial_lora.kernels.launch import INTERPRET

# ----------------------------------------------------------------------------------------------
# Launch configurations. On a GPU they are autotuned per (S, head dim, mask block); the choice
# changes only tile order, never which products are computed, and every kernel writes each
# output element exactly once (no accumulation across launches), so tuning runs cannot change
# results.
# The CPU interpreter runs one small fixed configuration.
# ----------------------------------------------------------------------------------------------


def _fits_mask_block(configs, named_args, **kwargs):
    mask_block = named_args["MASK_BLOCK"] if "MASK_BLOCK" in named_args else kwargs["MASK_BLOCK"]
    head_dim = named_args["HEAD_DIM"] if "HEAD_DIM" in named_args else kwargs["HEAD_DIM"]
    kept = [
        c
        for c in configs
        if mask_block % c.kwargs["BLOCK_M"] == 0
        and mask_block % c.kwargs["BLOCK_N"] == 0
        and not (head_dim > 128 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] > 64 * 128)
    ]
    if not kept:
        raise ValueError(f"no kernel tile fits mask block {mask_block}")
    return kept


def _configs(choices):
    """(BLOCK_M, BLOCK_N, warps, stages) tuples as triton Configs."""
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in choices]


# Small tiles serve small mask blocks (and are the interpreter's only choice). On an H100 at the
# wan_4x shape every tile was timed alone (scripts/lab/tune_attention.py): forward
# 128x128 (8 warps, 3 stages) 450 TFLOP/s vs 404 for 128x64; dK/dV 64x64 (4 warps, 3 stages); dQ
# 128x128 (8 warps, 2 stages); the autotuner chooses among these and their neighbours.
_SMALL = ((32, 32, 4, 2), (16, 16, 4, 2))
if INTERPRET:
    FORWARD_TILES = DKDV_TILES = DQ_TILES = ((16, 16, 4, 1),)
else:
    FORWARD_TILES = ((128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), *_SMALL)
    DKDV_TILES = ((64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2), *_SMALL)
    DQ_TILES = ((128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 128, 4, 2), *_SMALL)


def _autotune(tiles):
    return triton.autotune(
        configs=_configs(tiles),
        key=["S", "HEAD_DIM", "MASK_BLOCK", "TMA"],
        prune_configs_by={"early_config_prune": _fits_mask_block},
    )


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _rows_source(ptr, S, stride, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """Where `_load_rows` reads one [S, HEAD_DIM] matrix (batch and head applied to `ptr`): a TMA
    descriptor for ROWS-row tiles, or the pointer itself."""
    if TMA:
        return tl.make_tensor_descriptor(ptr, shape=[S, HEAD_DIM], strides=[stride, 1], block_shape=[ROWS, HEAD_DIM])
    else:
        return ptr


@triton.jit
def _load_rows(source, start, S, stride, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """Rows start .. start+ROWS of a `_rows_source`, [ROWS, HEAD_DIM]; rows past S read as zeros."""
    if TMA:
        return source.load([start, 0])
    else:
        rows = start + tl.arange(0, ROWS)
        cols = tl.arange(0, HEAD_DIM)
        return tl.load(source + rows[:, None] * stride + cols[None, :], mask=rows[:, None] < S, other=0.0)


@triton.jit
def _program_start(ORDER, MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """First token of this program's TILE rows: programs take their mask blocks in ORDER (the most
    kept blocks first, compact_mask), so the longest are not left for the grid's last wave. The
    grid has MASK_BLOCK / TILE programs per mask block, also for a partial last one (rows past S
    are masked)."""
    tiles_per_block: tl.constexpr = MASK_BLOCK // TILE
    pid = tl.program_id(0)
    return tl.load(ORDER + pid // tiles_per_block) * MASK_BLOCK + (pid % tiles_per_block) * TILE


@triton.jit
def _tile_start(index_row, t, MASK_BLOCK: tl.constexpr, TILE: tl.constexpr):
    """First token of the t-th TILE-row tile of the kept blocks listed (ascending) at index_row."""
    tiles_per_block: tl.constexpr = MASK_BLOCK // TILE
    return tl.load(index_row + t // tiles_per_block) * MASK_BLOCK + (t % tiles_per_block) * TILE


@triton.jit
def _fwd_tiles(
    acc, l_i, m_i, q, k_src, v_src, index_row, first, last, S, stride_ks, stride_vs, qk_scale,
    HEAD_DIM: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
    RAGGED: tl.constexpr,
):  # fmt: skip
    """The online softmax over key tiles first .. last of one query tile's kept blocks.

    RAGGED masks keys past S: only the tiles of a partial last block need it, so the main loop
    runs without the compare-and-select per score, and the scale is applied in the same fused
    multiply-add as the max subtraction (the max of raw scores times a positive scale is the max
    of scaled scores, exactly)."""
    offs_n = tl.arange(0, BLOCK_N)
    for t in range(first, last):
        start_n = _tile_start(index_row, t, MASK_BLOCK, BLOCK_N)
        k = _load_rows(k_src, start_n, S, stride_ks, BLOCK_N, HEAD_DIM, TMA)
        qk = tl.dot(q, tl.trans(k))  # fp32 raw scores
        if RAGGED:
            qk = tl.where((start_n + offs_n)[None, :] < S, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # log2 units
        p = tl.math.exp2(tl.fma(qk, qk_scale, -m_new[:, None]))  # one FFMA per score, fusion setting or not
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_src, start_n, S, stride_vs, BLOCK_N, HEAD_DIM, TMA)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@_autotune(FORWARD_TILES)
@triton.jit
def forward_kernel(
    Q, K, V, O, LSE, KV_COUNT, KV_INDEX, KV_ORDER,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_index,
    H, S, qk_scale,
    HEAD_DIM: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One query tile: its output rows and their log-sum-exp over the kept key blocks."""
    qk_scale = tl.cast(qk_scale, tl.float32)  # torch.compile may pass Python floats as fp64
    start_m = _program_start(KV_ORDER, MASK_BLOCK, BLOCK_M)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    row = start_m // MASK_BLOCK
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = _load_rows(Q + b * stride_qb + h * stride_qh, start_m, S, stride_qs, BLOCK_M, HEAD_DIM, False)
    k_src = _rows_source(K + b * stride_kb + h * stride_kh, S, stride_ks, BLOCK_N, HEAD_DIM, TMA)
    v_src = _rows_source(V + b * stride_vb + h * stride_vh, S, stride_vs, BLOCK_N, HEAD_DIM, TMA)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    tiles_per_block: tl.constexpr = MASK_BLOCK // BLOCK_N
    index_row = KV_INDEX + row * stride_index
    count = tl.load(KV_COUNT + row)
    num_tiles = count * tiles_per_block
    # Indices ascend, so a kept partial last block (S not a multiple of MASK_BLOCK) is the last
    # entry: its tiles go through the masked loop, all others through the unmasked one.
    last_block = tl.load(index_row + tl.maximum(count - 1, 0))
    ragged = (count > 0) & (S % MASK_BLOCK != 0) & (last_block == (S - 1) // MASK_BLOCK)
    num_full = num_tiles - tl.where(ragged, tiles_per_block, 0)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, index_row, 0, num_full, S, stride_ks, stride_vs,
                               qk_scale, HEAD_DIM, MASK_BLOCK, BLOCK_N, TMA, RAGGED=False)  # fmt: skip
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, index_row, num_full, num_tiles, S, stride_ks,
                               stride_vs, qk_scale, HEAD_DIM, MASK_BLOCK, BLOCK_N, TMA, RAGGED=True)  # fmt: skip

    has_keys = l_i > 0  # False only for a query block with no kept key block
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=offs_m[:, None] < S)  # fmt: skip
    lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))  # +inf: p = 0 in the backward
    tl.store(LSE + bh * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_os,
    stride_db, stride_dh, stride_ds,
    H, S,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """delta = rowsum(dO * O) in fp32: the softmax backward's correction term."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = start_m + tl.arange(0, BLOCK_M)
    o = _load_rows(O + b * stride_ob + h * stride_oh, start_m, S, stride_os, BLOCK_M, HEAD_DIM, False)
    do = _load_rows(DO + b * stride_db + h * stride_dh, start_m, S, stride_ds, BLOCK_M, HEAD_DIM, False)
    tl.store(DELTA + bh * S + offs_m, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=offs_m < S)


@_autotune(DKDV_TILES)
@triton.jit
def dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, Q_COUNT, Q_INDEX, Q_ORDER,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    stride_index,
    H, S, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One key tile: dK and dV over the query blocks that keep it."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)
    start_n = _program_start(Q_ORDER, MASK_BLOCK, BLOCK_N)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    col = start_n // MASK_BLOCK
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < S
    k = _load_rows(K + b * stride_kb + h * stride_kh, start_n, S, stride_ks, BLOCK_N, HEAD_DIM, False)
    v = _load_rows(V + b * stride_vb + h * stride_vh, start_n, S, stride_vs, BLOCK_N, HEAD_DIM, False)
    q_src = _rows_source(Q + b * stride_qb + h * stride_qh, S, stride_qs, BLOCK_M, HEAD_DIM, TMA)
    do_src = _rows_source(DO + b * stride_db + h * stride_dh, S, stride_ds, BLOCK_M, HEAD_DIM, TMA)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    tiles_per_block: tl.constexpr = MASK_BLOCK // BLOCK_M
    num_tiles = tl.load(Q_COUNT + col) * tiles_per_block
    for t in range(num_tiles):
        start_m = _tile_start(Q_INDEX + col * stride_index, t, MASK_BLOCK, BLOCK_M)
        rows = start_m + offs_m
        q = _load_rows(q_src, start_m, S, stride_qs, BLOCK_M, HEAD_DIM, TMA)
        do = _load_rows(do_src, start_m, S, stride_ds, BLOCK_M, HEAD_DIM, TMA)
        lse = tl.load(LSE + bh * S + rows, mask=rows < S, other=float("inf"))
        delta = tl.load(DELTA + bh * S + rows, mask=rows < S, other=0.0)
        p_t = tl.math.exp2(tl.fma(tl.dot(k, tl.trans(q)), qk_scale, -lse[None, :]))  # P^T [BLOCK_N, BLOCK_M]
        dv += tl.dot(p_t.to(do.dtype), do)
        dp_t = tl.dot(v, tl.trans(do))
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)

    dk *= sm_scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=keys)  # fmt: skip
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=keys)  # fmt: skip


@_autotune(DQ_TILES)
@triton.jit
def dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_COUNT, KV_INDEX, KV_ORDER,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_db, stride_dh, stride_ds,
    stride_dqb, stride_dqh, stride_dqs,
    stride_index,
    H, S, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
):  # fmt: skip
    """One query tile: dQ over its kept key blocks."""
    qk_scale, sm_scale = tl.cast(qk_scale, tl.float32), tl.cast(sm_scale, tl.float32)
    start_m = _program_start(KV_ORDER, MASK_BLOCK, BLOCK_M)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    row = start_m // MASK_BLOCK
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < S
    q = _load_rows(Q + b * stride_qb + h * stride_qh, start_m, S, stride_qs, BLOCK_M, HEAD_DIM, False)
    do = _load_rows(DO + b * stride_db + h * stride_dh, start_m, S, stride_ds, BLOCK_M, HEAD_DIM, False)
    lse = tl.load(LSE + bh * S + offs_m, mask=offs_m < S, other=float("inf"))
    delta = tl.load(DELTA + bh * S + offs_m, mask=offs_m < S, other=0.0)
    k_src = _rows_source(K + b * stride_kb + h * stride_kh, S, stride_ks, BLOCK_N, HEAD_DIM, TMA)
    v_src = _rows_source(V + b * stride_vb + h * stride_vh, S, stride_vs, BLOCK_N, HEAD_DIM, TMA)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    tiles_per_block: tl.constexpr = MASK_BLOCK // BLOCK_N
    num_tiles = tl.load(KV_COUNT + row) * tiles_per_block
    for t in range(num_tiles):
        start_n = _tile_start(KV_INDEX + row * stride_index, t, MASK_BLOCK, BLOCK_N)
        k = _load_rows(k_src, start_n, S, stride_ks, BLOCK_N, HEAD_DIM, TMA)
        v = _load_rows(v_src, start_n, S, stride_vs, BLOCK_N, HEAD_DIM, TMA)
        p = tl.math.exp2(tl.fma(tl.dot(q, tl.trans(k)), qk_scale, -lse[:, None]))
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)

    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=rows)  # fmt: skip


AUTOTUNED = {"fwd": forward_kernel, "dkdv": dkdv_kernel, "dq": dq_kernel}


@contextlib.contextmanager
def only_tile(kernel: str, tile: tuple[int, int, int, int]):
    """Inside, `kernel` ("fwd", "dkdv" or "dq") runs this one (BLOCK_M, BLOCK_N, warps, stages) tile
    instead of autotuning: for tools that time each tile alone (scripts/lab/tune_attention.py)."""
    tuner = AUTOTUNED[kernel]
    previous, tuner.configs = tuner.configs, _configs([tile])
    tuner.cache.clear()
    try:
        yield
    finally:
        tuner.configs = previous
        tuner.cache.clear()
