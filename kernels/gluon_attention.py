"""Hopper (sm_90) forward of the block-sparse attention, warp-specialized, in Gluon.

Shapes as in kernels/triton_attention.py (B batch, H heads, S tokens, D head dim 64 or 128):
  q, k, v, out  [B, H, S, D] bf16 / fp16, any strides TMA accepts (16-byte aligned rows)
  lse           [B, H, S]    fp32, base 2
  kv_count [NB], kv_index [NB, W]: the kept key blocks of each query block (compact_mask)

Why a second forward: Triton's `tl.*` kernel runs FlashAttention-2's schedule (every warp loads
and computes; the softmax of tile j waits for the tensor cores), which measured 447 TFLOP/s on an
H100 against cuDNN's 590 dense (docs/benchmarks/attention.md). Triton 3.6 does not warp-specialize
on Hopper. Gluon, Triton's lower-level dialect, does, so this kernel takes FlashAttention-3's
layout:
  - one producer warpgroup (few registers) walks the mask row's kept blocks and brings the query
    tile and each key/value tile into shared memory with TMA, through a ring of STAGES buffers
    guarded by mbarriers (ready: bytes arrived; empty: both consumers are done with it);
  - two consumer warpgroups (240 registers each), each owning 64 of the program's 128 query rows,
    run Q·Kᵀ and P·V as asynchronous wgmma on the shared tiles and the online softmax in
    registers. Two warpgroups on one SM interleave: one's exponentials run while the other's
    products are on the tensor cores.
One program per (mask block of 128 query rows, batch*head), as in the Triton kernel. Numerics are
the Triton kernel's: fp32 scores, one fp32 factor (scale * log2 e) applied in the FMA with the max,
exp2, keys past S masked only in the tiles past S, a row with no kept block outputs zeros and lse
+inf. The backward stays the Triton one (it reads this lse).

GPU only (Gluon has no CPU interpreter): tests/test_gluon_attention.py runs on the lent GPU.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

# Triton 3.6 (the GPU image) names the TMA load async_copy_global_to_shared; newer ones async_load.
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

ROWS = 64  # query rows per consumer warpgroup (wgmma's M per warpgroup)
CONSUMERS = 2
BLOCK_M = ROWS * CONSUMERS  # query rows per program: one mask block of 128


@gluon.jit
def _producer(
    Q, K, V, KV_COUNT, KV_INDEX, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
    stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
    stride_index, H, S,
    HEAD_DIM: gl.constexpr, MASK_BLOCK: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
):  # fmt: skip
    """Load the query tile once, then every kept key/value tile of this row into the ring."""
    start_m = gl.program_id(0) * MASK_BLOCK
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    row = start_m // MASK_BLOCK
    # Descriptors over this (b, h) matrix: rows past S read as zeros.
    q_desc = tma.make_tensor_descriptor(Q + b * stride_qb + h * stride_qh, shape=[S, HEAD_DIM],
                                        strides=[stride_qs, 1], block_shape=[MASK_BLOCK, HEAD_DIM],
                                        layout=q_smem.type.layout)  # fmt: skip
    k_desc = tma.make_tensor_descriptor(K + b * stride_kb + h * stride_kh, shape=[S, HEAD_DIM],
                                        strides=[stride_ks, 1], block_shape=[BLOCK_N, HEAD_DIM],
                                        layout=k_smem.type.layout)  # fmt: skip
    v_desc = tma.make_tensor_descriptor(V + b * stride_vb + h * stride_vh, shape=[S, HEAD_DIM],
                                        strides=[stride_vs, 1], block_shape=[BLOCK_N, HEAD_DIM],
                                        layout=v_smem.type.layout)  # fmt: skip
    mbarrier.expect(q_ready, MASK_BLOCK * HEAD_DIM * Q.dtype.element_ty.primitive_bitwidth // 8)
    _tma_load(q_desc, [start_m, 0], q_ready, q_smem)

    tiles_per_block: gl.constexpr = MASK_BLOCK // BLOCK_N
    tile_bytes: gl.constexpr = 2 * BLOCK_N * HEAD_DIM * K.dtype.element_ty.primitive_bitwidth // 8
    num_tiles = gl.load(KV_COUNT + row) * tiles_per_block
    for t in range(num_tiles):
        stage = t % STAGES
        # A fresh barrier counts as having completed the phase before its first: parity 1 passes.
        mbarrier.wait(kv_empty.index(stage), ((t // STAGES) & 1) ^ 1)
        kv_block = gl.load(KV_INDEX + row * stride_index + t // tiles_per_block)
        start_n = kv_block * MASK_BLOCK + (t % tiles_per_block) * BLOCK_N
        ready = kv_ready.index(stage)
        mbarrier.expect(ready, tile_bytes)
        _tma_load(k_desc, [start_n, 0], ready, k_smem.index(stage))
        _tma_load(v_desc, [start_n, 0], ready, v_smem.index(stage))


@gluon.jit
def _consumer(
    O, LSE, KV_COUNT, KV_INDEX, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
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

    start_m = gl.program_id(0) * MASK_BLOCK
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    row = start_m // MASK_BLOCK
    tiles_per_block: gl.constexpr = MASK_BLOCK // BLOCK_N
    count = gl.load(KV_COUNT + row)
    num_tiles = count * tiles_per_block
    # Indices ascend, so a kept partial last block is the last entry; only its tiles are masked.
    last_block = gl.load(KV_INDEX + row * stride_index + gl.maximum(count - 1, 0))
    ragged = (count > 0) & (S % MASK_BLOCK != 0) & (last_block == (S - 1) // MASK_BLOCK)
    num_full = num_tiles - gl.where(ragged, tiles_per_block, 0)

    m_i = gl.full([ROWS], float("-inf"), gl.float32, layout=s_rows)
    l_i = gl.zeros([ROWS], gl.float32, layout=s_rows)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)
    s_init = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))

    mbarrier.wait(q_ready, 0)
    q = q_smem.slice(CONSUMER * ROWS, ROWS, dim=0)
    for t in range(num_tiles):
        stage = t % STAGES
        mbarrier.wait(kv_ready.index(stage), (t // STAGES) & 1)
        s = warpgroup_mma(q, k_smem.index(stage).permute((1, 0)), s_init, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
        if t >= num_full:  # a tile of the partial last block: keys past S get no weight
            start_n = (S // MASK_BLOCK) * MASK_BLOCK + (t % tiles_per_block) * BLOCK_N
            s = gl.where((start_n + offs_n)[None, :] < S, s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale)  # log2 units
        p = gl.exp2(gl.fma(s, qk_scale, -m_new[:, None]))
        alpha = gl.exp2(m_i - m_new)
        l_i = l_i * alpha + gl.sum(p, axis=1)
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        acc = warpgroup_mma(p_op, v_smem.index(stage), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(kv_empty.index(stage), count=1)
        m_i = m_new

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
def _fwd_kernel(
    Q, K, V, O, LSE, KV_COUNT, KV_INDEX,
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
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # one arrival per consumer warpgroup
    fence_async_shared()

    gl.warp_specialize(
        [
            (_producer, (Q, K, V, KV_COUNT, KV_INDEX, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                         stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
                         stride_vs, stride_index, H, S, HEAD_DIM, MASK_BLOCK, BLOCK_N, STAGES)),
            (_consumer, (O, LSE, KV_COUNT, KV_INDEX, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                         stride_ob, stride_oh, stride_os, stride_index, H, S, qk_scale,
                         HEAD_DIM, MASK_BLOCK, BLOCK_N, STAGES, MASK_BLOCK // 2, 0)),
            (_consumer, (O, LSE, KV_COUNT, KV_INDEX, q_smem, k_smem, v_smem, q_ready, kv_ready, kv_empty,
                         stride_ob, stride_oh, stride_os, stride_index, H, S, qk_scale,
                         HEAD_DIM, MASK_BLOCK, BLOCK_N, STAGES, MASK_BLOCK // 2, 1)),
        ],
        [4, 4],
        [240, 240],
    )  # fmt: skip


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int) -> bool:
    """Whether this kernel can run these [B, H, S, D] tensors: an sm_90 GPU (wgmma is Hopper's),
    bf16/fp16, head dim 64 or 128, mask block 128, and layouts TMA reads (16-byte aligned (b, h)
    matrices and row strides)."""
    if not (q.is_cuda and torch.cuda.get_device_capability(q.device) == (9, 0)):
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] not in (64, 128) or block_size != 128:
        return False
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.storage_offset() % 8 or any(s % 8 for s in t.stride()[:3]):
            return False
    return True


# The key tile and ring depth: BLOCK_N 128 with 2 stages fits Hopper's 227 KB of shared memory
# with the 128-row query tile (164 KB; 3 stages would need 229 KB).
TILE = {"BLOCK_N": 128, "STAGES": 2}


@torch.library.custom_op("radial_lora::block_sparse_attn_fwd_hopper", mutates_args=())
def hopper_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_count: torch.Tensor,
    kv_index: torch.Tensor,
    block_size: int,
    qk_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, S, D], lse [B, H, S] base 2) of q, k, v that `supported` accepts; qk_scale is the
    softmax scale times log2 e. A custom op (not a triton_op): torch.compile calls it as it is."""
    from kernels.triton_attention import _tma_scratch

    batch, heads, seq, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq), device=q.device, dtype=torch.float32)
    triton.set_allocator(_tma_scratch)  # the in-kernel TMA descriptors live in scratch memory
    grid = (triton.cdiv(seq, block_size), batch * heads)
    _fwd_kernel[grid](
        q, k, v, out, lse, kv_count, kv_index,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        kv_index.stride(0),
        heads, seq, qk_scale,
        HEAD_DIM=head_dim, MASK_BLOCK=block_size, **TILE, num_warps=4,
    )  # fmt: skip
    return out, lse


@hopper_forward.register_fake
def _(q, k, v, kv_count, kv_index, block_size, qk_scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)
