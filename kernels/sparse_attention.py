"""Block-sparse attention over the kept blocks of a block mask, forward and backward: the custom
ops (torch.compile traces into them) and the public function.

Shapes (any strides with a unit last dim; B batch, H heads, S tokens, D head dim):
  q, k, v, out, d_out, dq, dk, dv   [B, H, S, D]   bf16 / fp16 (fp32 too: CPU interpreter)
  lse, delta                        [B, H, S]      fp32, base 2
  block mask                        [NB, NB] bool, NB = ceil(S / MASK_BLOCK), one for all batches/heads

The mask reaches the kernels in its compact form (kernels/compact_mask.py), built once and cached
with the mask tensor. Each call runs the kernels its KernelChoice routes it to
(kernels/kernel_choice.py): on Hopper the warp-specialized Gluon kernels (kernels/gluon_kernels.py),
elsewhere the Triton ones (kernels/triton_kernels.py); the choice is an argument of the ops, so a
compiled graph records it too.
"""

from __future__ import annotations

import torch
import triton

from radial_lora.kernels import triton_kernels
from radial_lora.kernels.compact_mask import compact_mask
from radial_lora.kernels.kernel_choice import NEEDS_GPU, KernelChoice, tma_ok, use_gluon
from radial_lora.kernels.launch import INTERPRET, strides

LOG2E = 1.4426950408889634


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels index the head dim with stride 1 and other dims by their strides."""
    return t if t.stride(-1) == 1 and 0 not in t.stride() else t.contiguous()


def _gluon():
    """The Gluon kernels, imported only where the router sends a call to them."""
    from radial_lora.kernels import gluon_kernels

    return gluon_kernels


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
    gluon: str,
    tma: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    if use_gluon("fwd", gluon, block_size, q, k, v):
        return _gluon().hopper_forward(q, k, v, kv_count, kv_index, kv_order, block_size, scale * LOG2E)
    batch, heads, seq, head_dim = q.shape
    out = torch.empty_like(q)
    lse = torch.empty((batch, heads, seq), device=q.device, dtype=torch.float32)

    def grid(meta):  # every mask block's tiles, in kv_order (_program_start)
        return (len(kv_order) * (block_size // meta["BLOCK_M"]), batch * heads)

    _launch(
        triton_kernels.forward_kernel,
        grid,
        q, k, v, out, lse, kv_count, kv_index, kv_order,
        *strides(q), *strides(k), *strides(v), *strides(out),
        kv_index.stride(0),
        heads, seq, scale * LOG2E,
        HEAD_DIM=head_dim, MASK_BLOCK=block_size, TMA=tma_ok("fwd", tma, k, v),
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
    gluon: str,
    tma: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Incoming gradients are often expanded views (`out.sum().backward()` gives strides of 0).
    d_out = _unit_last_stride(d_out)
    batch, heads, seq, head_dim = q.shape
    delta = torch.empty_like(lse)
    delta_rows = 64
    _launch(
        triton_kernels.delta_kernel,
        (triton.cdiv(seq, delta_rows), batch * heads),
        out,
        d_out,
        delta,
        *strides(out),
        *strides(d_out),
        heads,
        seq,
        HEAD_DIM=head_dim,
        BLOCK_M=delta_rows,
    )

    if use_gluon("fused", gluon, block_size, q, k, v, d_out):
        return _gluon().hopper_fused_backward(q, k, v, d_out, lse, delta, q_count, q_index, q_order, block_size,
                                                     scale * LOG2E, scale)  # fmt: skip
    if use_gluon("dkdv", gluon, block_size, q, k, v, d_out):
        dk, dv = _gluon().hopper_dkdv(q, k, v, d_out, lse, delta, q_count, q_index, q_order, block_size,
                                             scale * LOG2E, scale)  # fmt: skip
    else:
        dk, dv = torch.empty_like(k), torch.empty_like(v)

        def key_grid(meta):
            return (len(q_order) * (block_size // meta["BLOCK_N"]), batch * heads)

        _launch(
            triton_kernels.dkdv_kernel,
            key_grid,
            q, k, v, d_out, lse, delta, dk, dv, q_count, q_index, q_order,
            *strides(q), *strides(k), *strides(v), *strides(d_out), *strides(dk), *strides(dv),
            q_index.stride(0),
            heads, seq, scale * LOG2E, scale,
            HEAD_DIM=head_dim, MASK_BLOCK=block_size, TMA=tma_ok("dkdv", tma, q, d_out),
        )  # fmt: skip

    if use_gluon("dq", gluon, block_size, q, k, v, d_out):
        dq = _gluon().hopper_dq(q, k, v, d_out, lse, delta, kv_count, kv_index, kv_order, block_size,
                                       scale * LOG2E, scale)  # fmt: skip
    else:
        dq = torch.empty_like(q)

        def query_grid(meta):
            return (len(kv_order) * (block_size // meta["BLOCK_M"]), batch * heads)

        _launch(
            triton_kernels.dq_kernel,
            query_grid,
            q, k, v, d_out, lse, delta, dq, kv_count, kv_index, kv_order,
            *strides(q), *strides(k), *strides(v), *strides(d_out), *strides(dq),
            kv_index.stride(0),
            heads, seq, scale * LOG2E, scale,
            HEAD_DIM=head_dim, MASK_BLOCK=block_size, TMA=tma_ok("dq", tma, k, v),
        )  # fmt: skip
    return dq, dk, dv


def _setup_context(ctx, inputs, output):
    q, k, v, kv_count, kv_index, kv_order, q_count, q_index, q_order, block_size, scale, gluon, tma = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_count, kv_index, kv_order, q_count, q_index, q_order)
    ctx.block_size, ctx.scale, ctx.kernels = block_size, scale, (gluon, tma)


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, *indices = ctx.saved_tensors
    dq, dk, dv = _bwd_op(d_out, q, k, v, out, lse, *indices, ctx.block_size, ctx.scale, *ctx.kernels)
    return dq, dk, dv, *[None] * (len(indices) + 4)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    *,
    block_size: int = 128,
    scale: float | None = None,
    kernels: KernelChoice = KernelChoice(),
) -> torch.Tensor:
    """Exact attention over the kept blocks of `block_mask`, differentiable (Triton kernels).

    q, k, v [B, H, S, D] (SDPA's layout, any strides with a unit last dim); block_mask bool
    [ceil(S/block_size)]^2 shared by batch and heads. Non-causal. The last block may be partial.
    No atomics on the forward, dK or dV. dQ is bitwise reproducible where every output element is
    written once: on CPU, on GPUs other than sm_90, with kernels.gluon auto_split or all, and while
    torch.use_deterministic_algorithms is on; the default one-kernel Hopper backward sums it by
    TMA reduce-adds in varying order (run to run differences around 4e-4 relative). `kernels`:
    which kernels run (kernels/kernel_choice.py).
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
    out, _ = _fwd_op(q, k, v, *indices, block_size, scale, kernels.gluon, kernels.tma)
    return out
