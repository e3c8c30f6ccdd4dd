"""Triton block-sparse attention over the kept blocks of a block mask: forward and backward.

Shapes (any strides with a unit last dim; B batch, H heads, S tokens, D head dim):
  q, k, v, out, d_out, dq, dk, dv   [B, H, S, D]   bf16 / fp16 (fp32 too: CPU interpreter)
  lse, delta                        [B, H, S]      fp32
  block mask                        [NB, NB] bool, NB = ceil(S / MASK_BLOCK), one for all batches/heads
The mask reaches the kernels in a compact form, built once and cached with the mask tensor:
  kv_count [NB] int32, kv_index [NB, W] int32   kept key blocks of each query block, ascending
  q_count  [NB] int32, q_index  [NB, W'] int32  query blocks that keep each key block (the transpose)
  kv_order, q_order [NB] int32                  mask rows / columns by kept count, most first: the
                                                kernels' launch order (compact_mask)

Forward (FlashAttention-2 style; on Hopper the op runs the warp-specialized Gluon kernels of
kernels/gluon_attention.py instead, forward and backward, see RADIAL_GLUON): one program per
(BLOCK_M query rows, batch*head) walks the kept key blocks of its mask row in BLOCK_N tiles with an
online softmax, and saves the base-2 log-sum-exp. Backward: a dK/dV kernel, one program per key
tile, walks the transposed index (so each dK/dV tile is owned by one program: no atomics on dK/dV);
a dQ kernel walks the forward index, recomputing P and dP: 7 matrix products per block pair,
deterministic.
(A fused Triton variant, dS·K added into an fp32 dQ buffer with atomics inside the dK/dV kernel,
5 products, measured 8% slower on an H100 and was removed: docs/benchmarks/attention.md. The
Gluon one-kernel backward, the Hopper default, does this with TMA reduce-adds and is faster.)

Loads of the streamed tiles (K/V in the forward and dQ kernels, Q/dO in the dK/dV kernel) are
masked pointer loads (`cp.async`) or tensor-descriptor loads through Hopper's tensor memory
accelerator (`UTMALDG`; rows past S read as zeros), per kernel, where the GPU (sm_90+) and the
tensors' layout allow: RADIAL_TRITON_TMA=backward (the default: on an H100 TMA made the backward
2-4% faster and the forward no faster, docs/benchmarks/attention.md), all or none.

Numerics: scores and softmax statistics in fp32; the softmax scale times log2(e) is folded into
one fp32 factor applied to the fp32 product q.k, so exp2 can be used and K is never pre-scaled
in low precision (which would make the backward's recomputed probabilities disagree with the
forward's). Rows past S (the partial last block) are loaded as zeros and never stored; keys past
S are masked to -inf in the forward (in the backward their zero K/V contribute nothing to dQ, and
their own dK/dV rows are never stored). A query block with no kept key block outputs zeros.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl

from radial_lora.kernels import gluon_attention
from radial_lora.kernels.launch import INTERPRET, set_tma_allocator, strides, tma_layout_ok
from radial_lora.kernels.mask_cache import derived

LOG2E = 1.4426950408889634
# Which kernels load their streamed tiles through TMA descriptors (see above).
TMA_CHOICES = {"all": frozenset({"fwd", "dkdv", "dq"}), "backward": frozenset({"dkdv", "dq"}), "none": frozenset()}
_tma_choice = os.environ.get("RADIAL_TRITON_TMA", "backward")
if _tma_choice not in TMA_CHOICES:
    raise ValueError(f"RADIAL_TRITON_TMA={_tma_choice!r}: expected one of {', '.join(TMA_CHOICES)}")
TMA_KERNELS = TMA_CHOICES[_tma_choice]
# Which kernels run in Gluon (kernels/gluon_attention.py: warp-specialized, Hopper only) instead of
# Triton, and whether they must. "auto" (the default): wherever they can run (sm_90, bf16/fp16,
# head dim 64 or 128, mask block 128, TMA-readable layouts) the Gluon forward and the one-kernel
# Gluon backward (dK/dV and dQ together, dQ summed by TMA reduce-adds in varying order: not
# bitwise reproducible, 1-2% faster than the split pair on an H100, docs/benchmarks/attention.md),
# or, while torch.use_deterministic_algorithms is on, the split pair (Gluon dK/dV and dQ: every
# output written once); Triton elsewhere. "auto_split": the split pair always (the default
# before session 8). "auto_fwd": the forward only. "all" (forward and the split pair), "fwd",
# "fwd_dkdv", "fwd_dq" and "fused" (forward and the one-kernel backward): those kernels, raising
# where they cannot run. "none": Triton throughout.
GLUON_CHOICES = {"auto": (frozenset({"fwd", "fused", "dkdv", "dq"}), False),
                 "auto_split": (frozenset({"fwd", "dkdv", "dq"}), False), "auto_fwd": (frozenset({"fwd"}), False),
                 "all": (frozenset({"fwd", "dkdv", "dq"}), True), "fwd": (frozenset({"fwd"}), True),
                 "fwd_dkdv": (frozenset({"fwd", "dkdv"}), True), "fwd_dq": (frozenset({"fwd", "dq"}), True),
                 "fused": (frozenset({"fwd", "fused"}), True), "none": (frozenset(), False)}  # fmt: skip
GLUON = os.environ.get("RADIAL_GLUON", "auto")
if GLUON not in GLUON_CHOICES:
    raise ValueError(f"RADIAL_GLUON={GLUON!r}: expected one of {', '.join(GLUON_CHOICES)}")


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
# wan_4x shape every tile was timed alone (scripts/lab/tune_attention.py, docs/benchmarks/): forward
# 128x128 (8 warps, 3 stages) 450 TFLOP/s vs 404 for 128x64; dK/dV 64x64 (4 warps, 3 stages); dQ
# 128x128 (8 warps, 2 stages); the autotuner chooses among these and their neighbours.
_SMALL = [(32, 32, 4, 2), (16, 16, 4, 2)]
if INTERPRET:
    _FWD_CONFIGS = _DKDV_CONFIGS = _DQ_CONFIGS = _configs([(16, 16, 4, 1)])
else:
    _FWD_CONFIGS = _configs([(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), *_SMALL])
    _DKDV_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (128, 64, 8, 2), *_SMALL])
    _DQ_CONFIGS = _configs([(128, 128, 8, 2), (128, 64, 8, 2), (64, 64, 4, 2), (64, 128, 4, 2), *_SMALL])


def _autotune(configs):
    return triton.autotune(
        configs=configs,
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


@_autotune(_FWD_CONFIGS)
@triton.jit
def _fwd_kernel(
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
def _bwd_delta_kernel(
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


@_autotune(_DKDV_CONFIGS)
@triton.jit
def _bwd_dkdv_kernel(
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


@_autotune(_DQ_CONFIGS)
@triton.jit
def _bwd_dq_kernel(
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


# ----------------------------------------------------------------------------------------------
# The custom ops (torch.library.triton_op: torch.compile traces into them; the fake
# implementation is derived from these functions) and their autograd.
# ----------------------------------------------------------------------------------------------


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with stride 1 and other dims by their strides."""
    return t if t.stride(-1) == 1 and 0 not in t.stride() else t.contiguous()


def _tma_ok(kernel: str, *tensors: torch.Tensor) -> bool:
    """Whether `kernel` ("fwd", "dkdv" or "dq") reads these [B, H, S, D] tensors through TMA: chosen
    for it (RADIAL_TRITON_TMA), a GPU that has TMA (sm_90+; the interpreter emulates it), and a
    layout the tensor memory accelerator accepts (launch.tma_layout_ok). Otherwise the kernel uses
    pointer loads."""
    if kernel not in TMA_KERNELS or not (INTERPRET or _has_tma(tensors[0].device)):
        return False
    if not tma_layout_ok(*tensors):
        return False
    set_tma_allocator()
    return True


@contextlib.contextmanager
def gluon_kernels(choice: str):
    """Inside, the op picks its kernels as RADIAL_GLUON=choice would (a key of GLUON_CHOICES): for
    benchmarks and tests that compare them in one process."""
    global GLUON
    if choice not in GLUON_CHOICES:
        raise ValueError(f"gluon kernels {choice!r}: expected one of {', '.join(GLUON_CHOICES)}")
    previous, GLUON = GLUON, choice
    try:
        yield
    finally:
        GLUON = previous


def _use_gluon(kernel: str, block_size: int, *tensors: torch.Tensor) -> bool:
    """Whether `kernel` ("fwd", "dkdv", "dq" or "fused") runs in Gluon here (RADIAL_GLUON); a Gluon kernel
    that was required ("all", "fwd", ...) but cannot run raises."""
    kernels, required = GLUON_CHOICES[GLUON]
    if kernel not in kernels or (INTERPRET and not required):
        return False
    if kernel == "fused" and torch.are_deterministic_algorithms_enabled():
        if required:
            raise RuntimeError(f"RADIAL_GLUON={GLUON}: the one-kernel backward sums dQ in varying order, and "
                               "torch.use_deterministic_algorithms is on (RADIAL_GLUON=all is deterministic)")
        return False  # auto: the split pair
    if not INTERPRET and gluon_attention.supported(block_size, *tensors):
        return True
    if not required:
        return False
    raise RuntimeError(f"RADIAL_GLUON={GLUON} needs an sm_90 GPU, bf16/fp16 q/k/v with head dim 64 or 128 in "
                       "TMA-readable layouts, and mask block 128")  # fmt: skip


NEEDS_GPU = "the triton attention backend needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU)"


def kernel_plan(device: torch.device, dtype: torch.dtype, head_dim: int, block_size: int) -> str:
    """Which kernels the op runs for [B, H, S, head_dim] inputs of this device and dtype (in layouts
    TMA reads), in words, for a run's log: RADIAL_GLUON's automatic choice said once at the start,
    and kernels that cannot run here (no GPU, a required Gluon kernel) refused there rather than in
    the first step."""
    if device.type != "cuda" and not INTERPRET:
        raise RuntimeError(NEEDS_GPU)
    probe = torch.empty(1, 1, block_size, head_dim, device=device, dtype=dtype)
    names = {"fwd": "forward", "dkdv": "dK/dV", "dq": "dQ"}
    if _use_gluon("fused", block_size, probe):  # it replaces the dK/dV and dQ kernels
        names = {"fwd": "forward", "fused": "dK/dV+dQ in one kernel"}
    gluon = [name for kernel, name in names.items() if _use_gluon(kernel, block_size, probe)]
    triton_side = [name for name in names.values() if name not in gluon]
    where = " (Triton's CPU interpreter)" if INTERPRET else ""
    parts = ([f"Gluon {', '.join(gluon)}"] if gluon else []) + ([f"Triton {', '.join(triton_side)}{where}"]
                                                               if triton_side else [])  # fmt: skip
    return f"{'; '.join(parts)} (RADIAL_GLUON={GLUON})"


@contextlib.contextmanager
def tma_loads(choice: str):
    """Inside, the kernels load as RADIAL_TRITON_TMA=choice would make them ("all", "backward" or
    "none"): for benchmarks that compare the load paths in one process."""
    global TMA_KERNELS
    previous, TMA_KERNELS = TMA_KERNELS, TMA_CHOICES[choice]
    try:
        yield
    finally:
        TMA_KERNELS = previous


@functools.cache
def _has_tma(device: torch.device) -> bool:
    """Whether the device has Hopper's tensor memory accelerator (compute capability 9.0 or later)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def _launch(kernel, grid, *args, **kwargs) -> None:
    """Launch through `wrap_triton` (what lets torch.compile trace the kernel into its graph).

    Under the CPU interpreter the kernel is plain Python that reads its tensors' memory, so it can
    only run on real tensors: fake ones (shape propagation, opcheck's fake-tensor test) get no
    launch, and a graph being captured for torch.compile is refused, since the kernel would be
    missing from it and the compiled op would return uninitialised memory.
    """
    from torch._subclasses.fake_tensor import FakeTensor

    if INTERPRET:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if any(isinstance(a, FakeTensor) or a.is_meta for a in tensors):
            return
        if any(type(a) not in (torch.Tensor, torch.nn.Parameter) for a in tensors):
            raise RuntimeError("torch.compile with the triton attention backend needs a GPU: Triton's CPU interpreter "
                               "cannot run inside a compiled graph (on CPU use attention.backend=reference)")  # fmt: skip
    torch.library.wrap_triton(kernel)[grid](*args, **kwargs)


@torch.library.triton_op("radial_lora::block_sparse_attn_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_count: torch.Tensor,
    kv_index: torch.Tensor,
    kv_order: torch.Tensor,
    q_count: torch.Tensor,
    q_index: torch.Tensor,
    q_order: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    if _use_gluon("fwd", block_size, q, k, v):
        return gluon_attention.hopper_forward(q, k, v, kv_count, kv_index, kv_order, block_size, scale * LOG2E)
    batch, heads, seq, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq), device=q.device, dtype=torch.float32)

    def grid(meta):  # every mask block's tiles, in kv_order (_program_start)
        return (len(kv_order) * (block_size // meta["BLOCK_M"]), batch * heads)

    _launch(
        _fwd_kernel,
        grid,
        q, k, v, out, lse, kv_count, kv_index, kv_order,
        *strides(q), *strides(k), *strides(v), *strides(out),
        kv_index.stride(0),
        heads, seq, scale * LOG2E,
        HEAD_DIM=head_dim, MASK_BLOCK=block_size, TMA=_tma_ok("fwd", k, v),
    )  # fmt: skip
    return out, lse


@torch.library.triton_op("radial_lora::block_sparse_attn_bwd", mutates_args=())
def _bwd_op(
    d_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    kv_count: torch.Tensor,
    kv_index: torch.Tensor,
    kv_order: torch.Tensor,
    q_count: torch.Tensor,
    q_index: torch.Tensor,
    q_order: torch.Tensor,
    block_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Incoming gradients are often expanded views (`out.sum().backward()` gives strides of 0).
    d_out = _unit_last_stride(d_out)
    batch, heads, seq, head_dim = q.shape
    delta = torch.empty_like(lse)
    delta_rows = 64
    _launch(
        _bwd_delta_kernel,
        (triton.cdiv(seq, delta_rows), batch * heads),
        out, d_out, delta, *strides(out), *strides(d_out), heads, seq, HEAD_DIM=head_dim, BLOCK_M=delta_rows
    )

    if _use_gluon("fused", block_size, q, k, v, d_out):
        return gluon_attention.hopper_fused_backward(q, k, v, d_out, lse, delta, q_count, q_index, q_order, block_size,
                                                     scale * LOG2E, scale)  # fmt: skip
    if _use_gluon("dkdv", block_size, q, k, v, d_out):
        dk, dv = gluon_attention.hopper_dkdv(q, k, v, d_out, lse, delta, q_count, q_index, q_order, block_size,
                                             scale * LOG2E, scale)  # fmt: skip
    else:
        dk, dv = torch.empty_like(k), torch.empty_like(v)

        def key_grid(meta):
            return (len(q_order) * (block_size // meta["BLOCK_N"]), batch * heads)

        _launch(
            _bwd_dkdv_kernel,
            key_grid,
            q, k, v, d_out, lse, delta, dk, dv, q_count, q_index, q_order,
            *strides(q), *strides(k), *strides(v), *strides(d_out), *strides(dk), *strides(dv),
            q_index.stride(0),
            heads, seq, scale * LOG2E, scale,
            HEAD_DIM=head_dim, MASK_BLOCK=block_size, TMA=_tma_ok("dkdv", q, d_out),
        )  # fmt: skip

    if _use_gluon("dq", block_size, q, k, v, d_out):
        dq = gluon_attention.hopper_dq(q, k, v, d_out, lse, delta, kv_count, kv_index, kv_order, block_size,
                                       scale * LOG2E, scale)  # fmt: skip
    else:
        dq = torch.empty_like(q)

        def query_grid(meta):
            return (len(kv_order) * (block_size // meta["BLOCK_M"]), batch * heads)

        _launch(
            _bwd_dq_kernel,
            query_grid,
            q, k, v, d_out, lse, delta, dq, kv_count, kv_index, kv_order,
            *strides(q), *strides(k), *strides(v), *strides(d_out), *strides(dq),
            kv_index.stride(0),
            heads, seq, scale * LOG2E, scale,
            HEAD_DIM=head_dim, MASK_BLOCK=block_size, TMA=_tma_ok("dq", k, v),
        )  # fmt: skip
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, kv_count, kv_index, kv_order, q_count, q_index, q_order, block_size, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_count, kv_index, kv_order, q_count, q_index, q_order)
    ctx.block_size, ctx.scale = block_size, scale


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, *indices = ctx.saved_tensors
    dq, dk, dv = _bwd_op(d_out, q, k, v, out, lse, *indices, ctx.block_size, ctx.scale)
    return dq, dk, dv, *[None] * (len(indices) + 2)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------
# The public function
# ----------------------------------------------------------------------------------------------


def compact_mask(block_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(kv_count, kv_index, kv_order, q_count, q_index, q_order) of a bool block mask, int32 on its
    device (cached).

    Indices are ascending (kept blocks first, by a stable sort), padded to the widest row. An order
    lists the rows by kept count, most first: every kernel launches its programs in it, so
    the longest start first and the grid's last wave is short ones. A radial mask keeps its first
    frame's blocks for every row (the attention sink): at the wan_4x shape those key blocks have
    5.3x the mean count, and in block order they start late enough in the last head to leave the
    GPU waiting on them (a list-scheduling model of 132 SMs, scripts/lab/launch_order_model.py: 5.3-6.6%
    over the ideal makespan in block order, 0.1-0.6% in this order; measured:
    docs/benchmarks/attention.md, session 9).
    """

    def build():
        def rows(mask):
            count = mask.sum(-1, dtype=torch.int32)
            width = max(int(count.max()) if count.numel() else 0, 1)
            index = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True)[:, :width]
            heavy_first = torch.argsort(count, descending=True, stable=True)
            return count.contiguous(), index.to(torch.int32).contiguous(), heavy_first.to(torch.int32).contiguous()

        return (*rows(block_mask), *rows(block_mask.t()))

    return derived(block_mask, "triton_compact", build)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact attention over the kept blocks of `block_mask`, differentiable (Triton kernels).

    q, k, v [B, H, S, D] (SDPA's layout, any strides with a unit last dim); block_mask bool
    [ceil(S/block_size)]^2 shared by batch and heads. Non-causal. The last block may be partial.
    No atomics on the forward, dK or dV. dQ is bitwise reproducible where every output element is
    written once: on CPU, on GPUs other than sm_90, with RADIAL_GLUON=auto_split or all, and while
    torch.use_deterministic_algorithms is on; the default one-kernel Hopper backward sums it by
    TMA reduce-adds in varying order (run to run differences around 4e-4 relative).
    """
    if not (q.is_cuda or INTERPRET):
        raise RuntimeError(NEEDS_GPU)
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be [B, H, S, D] of one shape; got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")  # fmt: skip
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"q, k, v must share one of bf16, fp16, fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    head_dim, seq = q.shape[-1], q.shape[-2]
    if head_dim not in (16, 32, 64, 128):
        raise ValueError(f"head_dim {head_dim} is not supported by the triton backend (16, 32, 64 or 128)")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size {block_size} must be a power of two >= 16 for the triton backend")
    expected = -(-seq // block_size)
    if block_mask.shape != (expected, expected) or block_mask.dtype != torch.bool:
        raise ValueError(f"block_mask must be bool [{expected}, {expected}] for S={seq}, block_size={block_size}; "
                         f"got {block_mask.dtype} {tuple(block_mask.shape)}")  # fmt: skip
    scale = head_dim**-0.5 if scale is None else float(scale)
    indices = compact_mask(block_mask.to(q.device) if block_mask.device != q.device else block_mask)
    out, _ = _fwd_op(q, k, v, *indices, block_size, scale)
    return out
