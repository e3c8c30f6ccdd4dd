"""The block-sparse backends against each other and against dense attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radial_lora.kernels.dispatch import attention
from radial_lora.kernels.flex import block_sparse_attention_flex
from radial_lora.kernels.radial_mask import radial_block_mask
from radial_lora.kernels.reference import block_sparse_attention_reference


def qkv(b, h, s, d, dtype=torch.float32, seed=0, device="cpu", grad=False):
    g = torch.Generator(device).manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=g, device=device, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def random_block_mask(nb, density, seed, empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(nb, nb, generator=g) < density
    for r in empty_rows:
        mask[r] = False
    return mask


def test_reference_with_full_mask_is_dense_sdpa():
    q, k, v = qkv(2, 2, 200, 64)
    full = torch.ones(4, 4, dtype=torch.bool)
    out = block_sparse_attention_reference(q, k, v, full, block_size=64)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_reference_equals_sdpa_with_the_token_mask():
    from radial_lora.kernels.radial_mask import token_mask

    q, k, v = qkv(1, 2, 150, 32, seed=1)
    mask = random_block_mask(5, 0.5, seed=2)
    mask.fill_diagonal_(True)  # every row has a key, so SDPA is defined everywhere
    out = block_sparse_attention_reference(q, k, v, mask, block_size=32)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=token_mask(mask, 150, 32))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_reference_rows_without_keys_are_zero_with_zero_grads():
    q, k, v = qkv(1, 2, 100, 32, seed=3, grad=True)
    mask = random_block_mask(4, 0.6, seed=4, empty_rows=(1,))
    out = block_sparse_attention_reference(q, k, v, mask, block_size=32)
    assert torch.isfinite(out).all() and (out[:, :, 32:64] == 0).all()
    out.square().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert (q.grad[:, :, 32:64] == 0).all()


def test_reference_rejects_a_mask_of_the_wrong_size():
    q, k, v = qkv(1, 1, 100, 16)
    with pytest.raises(ValueError, match="does not fit S=100"):
        block_sparse_attention_reference(q, k, v, torch.ones(3, 3, dtype=torch.bool), block_size=32)


@pytest.mark.parametrize(
    "frames, tokens_per_frame, block_size, head_dim",
    [(5, 40, 32, 64), (9, 16, 16, 32), (3, 70, 64, 128)],  # all with a partial last block or frames off-grid
)
def test_flex_forward_matches_reference_on_radial_masks(frames, tokens_per_frame, block_size, head_dim):
    mask = radial_block_mask(frames, tokens_per_frame, block_size=block_size)
    q, k, v = qkv(2, 2, frames * tokens_per_frame, head_dim, seed=5)
    out = block_sparse_attention_flex(q, k, v, mask, block_size=block_size)
    ref = block_sparse_attention_reference(q, k, v, mask, block_size=block_size)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_dispatch_names_the_backends():
    q, k, v = qkv(1, 1, 64, 16)
    with pytest.raises(ValueError, match="unknown attention backend 'magic'"):
        attention(q, k, v, backend="magic")
    with pytest.raises(ValueError, match="needs a block_mask"):
        attention(q, k, v, backend="reference")


@pytest.mark.gpu
@pytest.mark.parametrize("frames, tokens_per_frame", [(9, 520), (21, 390)])
def test_flex_forward_and_gradients_match_reference_on_gpu(frames, tokens_per_frame):
    """bf16 FlexAttention vs the fp32 reference, within 2x the error of bf16 PyTorch (flash-attn's rule)."""
    seq = frames * tokens_per_frame
    mask = radial_block_mask(frames, tokens_per_frame, block_size=128, device="cuda")
    q32, k32, v32 = qkv(1, 2, seq, 128, seed=int(torch.randint(0, 2**31, ())), device="cuda", grad=True)
    dout = torch.randn_like(q32)

    def run(fn, dtype):
        q, k, v = (t.detach().to(dtype, copy=True).requires_grad_() for t in (q32, k32, v32))
        out = fn(q, k, v, mask, block_size=128)
        out.backward(dout.to(dtype))
        return [out.float(), q.grad.float(), k.grad.float(), v.grad.float()]

    def plain_bf16(q, k, v, mask, block_size):
        return block_sparse_attention_reference(q, k, v, mask, block_size=block_size, upcast=False)

    truth = run(block_sparse_attention_reference, torch.float32)
    same_precision = run(plain_bf16, torch.bfloat16)
    flex = run(block_sparse_attention_flex, torch.bfloat16)
    for name, t, p, f in zip(["out", "dq", "dk", "dv"], truth, same_precision, flex):
        assert (f - t).abs().max() <= 2 * (p - t).abs().max() + 1e-5, name
