"""Gradient checkpointing that keeps attention outputs: the same gradients, one attention forward
less per kept block (the attention ops are counted as they run, forward and backward)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models.attention import set_self_attention
from models.checkpointing import attention_ops, enable_checkpointing, is_self_attention
from models.lora import add_lora
from train.config import AttentionConfig, LoraConfig

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


def train_step(tiny_model_dir, attention: AttentionConfig, keep: int | None):
    """(attention op calls in forward + backward, LoRA gradients) of one step of the tiny Wan."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
    set_self_attention(model, attention)
    params = add_lora(model, LoraConfig(rank=4, alpha=4))
    with torch.no_grad():
        for p in params:  # LoRA B starts at zero; random values give every adapter a gradient
            p.normal_(0, 0.05)
    if keep is not None:
        enable_checkpointing(model, keep_attention_blocks=keep)
    model.train()
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
