"""The warp-specialized Hopper kernels (kernels/gluon_kernels.py) against the reference.

Gluon has no CPU interpreter: apart from the routing checks, these run on a GPU (`pytest -m gpu`),
in bf16 and fp16 at real shapes, under flash-attention's tolerance rule (via
tests/test_sparse_attention.py's helpers): the Gluon forward with the Triton backward (fed its
log-sum-exp), with the Gluon dQ, and with both Gluon backward kernels. test_sparse_attention.py's
real-shape test runs them too (gluon=auto, the default).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_sparse_attention import check_against_reference, random_inputs  # tests/ is on the path under pytest

from radial_lora.kernels.compact_mask import compact_mask
from radial_lora.kernels.kernel_choice import GLUON_CHOICES, KernelChoice, kernel_plan
from radial_lora.kernels.radial_mask import radial_block_mask
from radial_lora.kernels.reference import block_sparse_attention_reference
from radial_lora.kernels.sparse_attention import LOG2E, block_sparse_attention

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
hopper = pytest.mark.skipif(not HOPPER, reason="the Gluon forward needs an sm_90 GPU")


def test_default_is_gluon_where_it_runs_and_triton_elsewhere():
    """The default (auto) asks for every Gluon kernel (the one-kernel backward first), and on CPU
    falls back to Triton."""
    assert KernelChoice().gluon == "auto" and GLUON_CHOICES["auto"] == (
        frozenset({"fwd", "fused", "dkdv", "dq"}),
        False,
    )
    q = torch.randn(1, 2, 100, 32)
    mask = radial_block_mask(5, 20, block_size=32)
    torch.testing.assert_close(
        block_sparse_attention(q, q, q, mask, block_size=32),
        block_sparse_attention_reference(q, q, q, mask, block_size=32),
        atol=1e-5,
        rtol=1e-5,
    )


def test_required_gluon_kernels_that_cannot_run_raise(deterministic_restored):
    q = torch.randn(1, 2, 100, 32)
    mask = radial_block_mask(5, 20, block_size=32)
    for choice in ("all", "fwd", "fwd_dkdv", "fwd_dq", "fused"):
        with pytest.raises(RuntimeError, match=f"attention.kernels.gluon={choice} needs an sm_90 GPU"):
            block_sparse_attention(q, q, q, mask, block_size=32, kernels=KernelChoice(gluon=choice))
    # The one-kernel backward's dQ is not bitwise reproducible: refused, by name, while PyTorch's
    # deterministic mode is on (the default then takes the split pair).
    torch.use_deterministic_algorithms(True, warn_only=True)
    refused = "attention.kernels.gluon=fused: the one-kernel backward sums"
    with pytest.raises(RuntimeError, match=refused):
        kernel_plan(KernelChoice(gluon="fused"), q.device, q.dtype, 32, 32)  # the run's start-up check


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch, frames, tokens_per_frame, heads, head_dim, decay",  # the reference holds S x S scores: batch 1 at 32k
    [(1, 21, 1560, 2, 128, 1.0), (1, 11, 1560, 2, 64, 0.2), (2, 5, 777, 3, 128, 1.0), (2, 4, 1024, 1, 128, 1.0)],
)
@pytest.mark.parametrize(
    "gluon",
    ["fwd", "fwd_dq", "all", "fused"],
    ids=["gluon-forward", "gluon-forward-and-dq", "gluon-all", "gluon-fused-backward"],
)
def test_gpu_gluon_forward_and_gradients(batch, frames, tokens_per_frame, heads, head_dim, decay, dtype, gluon):
    mask = radial_block_mask(frames, tokens_per_frame, decay=decay, device="cuda")
    inputs = random_inputs((batch, heads, frames * tokens_per_frame, head_dim), torch.float32, "cuda")
    check_against_reference(inputs, mask, 128, dtype, kernels=KernelChoice(gluon=gluon))


@pytest.mark.gpu
@hopper
@pytest.mark.parametrize("gluon", ["all", "fused"])
def test_gpu_gluon_empty_rows_full_mask_and_strided_inputs(gluon):
    kernels = KernelChoice(gluon=gluon)
    mask = torch.rand(9, 9, device="cuda") < 0.5
    mask[3] = False  # a query block with nothing to attend: zeros out, zero gradients
    inputs = random_inputs((2, 2, 9 * 128 - 77, 128), torch.float32, "cuda")
    out, dq, _, _ = check_against_reference(inputs, mask, 128, torch.bfloat16, kernels=kernels)
    assert (out[:, :, 384:512] == 0).all() and (dq[:, :, 384:512] == 0).all()
    q, k, v, _ = (t.bfloat16() for t in inputs)
    full = block_sparse_attention(q, k, v, torch.ones(9, 9, dtype=torch.bool, device="cuda"), kernels=kernels)
    torch.testing.assert_close(full, F.scaled_dot_product_attention(q, k, v), atol=2e-2, rtol=2e-2)
    # The attention processor hands [B, S, H, D] tensors transposed to [B, H, S, D].
    qt, kt, vt = (
        torch.randn(1, 6 * 1560, 4, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)
    )
    radial = radial_block_mask(6, 1560, device="cuda")
    out = block_sparse_attention(qt, kt, vt, radial, kernels=kernels)
    ref = block_sparse_attention_reference(qt, kt, vt, radial)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@hopper
def test_gpu_gluon_ops_opcheck():
    """Schema, fake tensors and autograd registration of the Gluon ops. (torch.compile and
    checkpointing with them: test_sparse_attention.py's test_gpu_torch_compile_and_checkpointing.)"""
    from radial_lora.kernels.gluon_kernels import hopper_dkdv, hopper_dq, hopper_forward, hopper_fused_backward

    mask = radial_block_mask(6, 1560, device="cuda")
    q, k, v, d_out = (t.bfloat16() for t in random_inputs((1, 2, 6 * 1560, 128), torch.float32, "cuda"))
    by_query, by_key = compact_mask(mask)[:3], compact_mask(mask)[3:]
    torch.library.opcheck(hopper_forward, (q, k, v, *by_query, 128, 0.125))
    lse = torch.randn(q.shape[:3], device="cuda")
    torch.library.opcheck(hopper_dkdv, (q, k, v, d_out, lse, lse.clone(), *by_key, 128, 0.18, 0.125))
    torch.library.opcheck(hopper_dq, (q, k, v, d_out, lse, lse.clone(), *by_query, 128, 0.18, 0.125))
    # The fused backward sums dQ in varying order, and opcheck compares its outputs across calls
    # within bf16's tolerance: that needs the forward's own lse and delta (random ones make dS a
    # difference of huge terms, whose rounding differs from run to run).
    out, lse = hopper_forward(q, k, v, *by_query, 128, 0.125 * LOG2E)
    delta = (out.float() * d_out.float()).sum(-1)
    torch.library.opcheck(hopper_fused_backward, (q, k, v, d_out, lse, delta, *by_key, 128, 0.125 * LOG2E, 0.125))


@pytest.mark.gpu
@hopper
def test_gpu_gluon_tiles_can_be_varied_by_name():
    """The lab tools' knob (gluon_kernels.only_tile) changes one kernel's tile for a while, refuses a
    knob the kernel has not, and puts the measured tile back."""
    from radial_lora.kernels import gluon_kernels

    mask = radial_block_mask(6, 1560, device="cuda")
    inputs = random_inputs((1, 2, 6 * 1560, 128), torch.float32, "cuda")
    with gluon_kernels.only_tile("fused", STAGES=3):
        check_against_reference(inputs, mask, 128, torch.bfloat16, kernels=KernelChoice(gluon="fused"))
    assert gluon_kernels._tiles["fused"] is gluon_kernels.FUSED_TILE
    with pytest.raises(ValueError, match="fwd has no tile knob BLOCK_M"):
        with gluon_kernels.only_tile("fwd", BLOCK_M=64):
            pass


@pytest.mark.gpu
@hopper
def test_gpu_kernel_plan_names_the_kernels_that_run():
    """The run's log line (kernels.kernel_choice.kernel_plan) on an H100/H200."""
    cuda = torch.device("cuda")

    def plan(dtype=torch.bfloat16, **choice):
        return kernel_plan(KernelChoice(**choice), cuda, dtype, 128, 128)

    assert plan() == "Gluon forward, dK/dV+dQ in one kernel (gluon=auto, tma=backward)"
    assert plan(gluon="auto_split") == "Gluon forward, dK/dV, dQ (gluon=auto_split, tma=backward)"
    assert plan(gluon="auto_fwd", tma="all") == "Gluon forward; Triton dK/dV, dQ (gluon=auto_fwd, tma=all)"
    assert plan(torch.float32) == "Triton forward, dK/dV, dQ (gluon=auto, tma=backward)"
    assert plan(gluon="fused") == "Gluon forward, dK/dV+dQ in one kernel (gluon=fused, tma=backward)"


@pytest.mark.gpu
@hopper
def test_gpu_default_backward_is_deterministic_in_deterministic_mode(deterministic_restored):
    """By default dQ comes from the one-kernel backward (TMA reduce-adds, varying order); with
    torch.use_deterministic_algorithms on, the default takes the split pair: dQ bitwise the same
    on every call and equal to gluon=auto_split's."""
    mask = radial_block_mask(11, 1560, device="cuda")
    q, k, v, d_out = (t.bfloat16() for t in random_inputs((1, 4, 11 * 1560, 128), torch.float32, "cuda"))

    def dq(kernels=KernelChoice()):
        x = q.detach().requires_grad_()
        block_sparse_attention(x, k, v, mask, kernels=kernels).backward(d_out)
        return x.grad

    split = dq(KernelChoice(gluon="auto_split"))
    fused = dq()
    assert kernel_plan(KernelChoice(), q.device, q.dtype, 128, 128).startswith("Gluon forward, dK/dV+dQ in one kernel")
    torch.testing.assert_close(fused, split, atol=2e-2, rtol=2e-2)
    torch.use_deterministic_algorithms(True, warn_only=True)
    assert (
        kernel_plan(KernelChoice(), q.device, q.dtype, 128, 128)
        == "Gluon forward, dK/dV, dQ (gluon=auto, tma=backward)"
    )
    first, second = dq(), dq()
    assert torch.equal(first, second) and torch.equal(first, split)
