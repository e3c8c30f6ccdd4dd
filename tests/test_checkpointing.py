"""Gradient checkpointing that keeps attention outputs: the same gradients, one attention forward
less per kept block (the attention ops are counted as they run, forward and backward)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.checkpointing import attention_ops, is_self_attention
from models.setup import prepare_transformer
from train.config import AttentionConfig, LoraConfig, ModelConfig

RADIAL = dict(block_size=16, decay=1.0, sink=True)


class CountSelfAttention(TorchDispatchMode):
    """Counts self-attention op calls (CPU: one thread, so the backward's recomputation runs
    under the mode too). Cross-attention calls are counted apart."""

    def __init__(self):
        super().__init__()
        self.ops, self.calls, self.cross = attention_ops(), 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_self_attention(func, self.ops, args):
            self.calls += 1
        elif func in self.ops:
            self.cross += 1
        return func(*args, **(kwargs or {}))


def tiny_lora_model(tiny_model_dir, attention: AttentionConfig, keep: int | None, compile_blocks=False, device="cpu"):
    """The tiny Wan prepared as training prepares it (models/setup.py), checkpointed unless `keep`
    is None, with random LoRA weights (B starts at zero; random values give every adapter a gradient)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer").to(device)
    how = ModelConfig(id="tiny-wan", gradient_checkpointing=keep is not None, checkpoint_keep_attention=keep or 0,
                      compile_blocks=compile_blocks)  # fmt: skip
    params = prepare_transformer(model, how, attention, LoraConfig(rank=4, alpha=4))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    return model.train(), params


def train_step(tiny_model_dir, attention: AttentionConfig, keep: int | None):
    """(attention op calls in forward + backward, LoRA gradients) of one step of the tiny Wan."""
    model, params = tiny_lora_model(tiny_model_dir, attention, keep)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, model.config.in_channels, 5, 8, 8, generator=g)
    text = torch.randn(1, 7, model.config.text_dim, generator=g)
    with CountSelfAttention() as count:
        out = model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample
        out.square().mean().backward()
    # Cross-attention is never kept: run once per block, again in the backward when checkpointed.
    assert count.cross == (2 if keep is not None else 1) * len(model.blocks)
    return count.calls, [p.grad.clone() for p in params]


@pytest.mark.parametrize("backend", ["triton", "dense"])
def test_kept_attention_is_not_recomputed_and_gradients_match(tiny_model_dir, backend):
    attention = AttentionConfig(backend=backend, **RADIAL)
    blocks = 2  # the tiny Wan's
    plain_calls, expected = train_step(tiny_model_dir, attention, keep=None)
    assert plain_calls == blocks  # no checkpointing: one attention forward per block
    for keep, calls in ((0, 2 * blocks), (1, 2 * blocks - 1), (-1, blocks)):
        got_calls, grads = train_step(tiny_model_dir, attention, keep)
        assert got_calls == calls, f"keep={keep}: {got_calls} attention forwards, expected {calls}"
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("keep, compile_blocks", [(0, True), (-1, False), (-1, True)])
def test_gpu_kept_attention_and_compiled_blocks_match_plain_checkpointing(tiny_model_dir, keep, compile_blocks):
    """On the GPU, bf16, triton backend: keeping attention outputs and compiling the blocks
    (inductor) change how the step runs, not what it computes."""
    results = []
    for variant_keep, variant_compile in ((0, False), (keep, compile_blocks)):
        model, params = tiny_lora_model(tiny_model_dir, AttentionConfig(backend="triton", **RADIAL), variant_keep,
                                        compile_blocks=variant_compile, device="cuda")  # fmt: skip
        g = torch.Generator("cuda").manual_seed(1)
        x = torch.randn(2, model.config.in_channels, 9, 8, 8, generator=g, device="cuda")
        text = torch.randn(2, 7, model.config.text_dim, generator=g, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(hidden_states=x, timestep=torch.tensor([300.0, 700.0], device="cuda"),
                        encoder_hidden_states=text).sample  # fmt: skip
        out.float().square().mean().backward()
        results.append((out.float().detach(), [p.grad.float() for p in params]))
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=2e-2 * b.abs().max().item(), rtol=5e-2)
