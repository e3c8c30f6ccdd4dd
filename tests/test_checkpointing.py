"""Gradient checkpointing that keeps attention outputs: the same gradients, one attention forward
less per kept block (the attention ops are counted as they run, forward and backward)."""

from __future__ import annotations

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo import register_backend
from torch._dynamo.backends.common import aot_autograd
from torch.utils._python_dispatch import TorchDispatchMode

from radial_lora.configs.schema import AttentionConfig, LoraConfig, ModelConfig
from radial_lora.models.checkpointing import attention_ops, is_self_attention
from radial_lora.models.setup import prepare_transformer

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


def tiny_lora_model(
    tiny_model_dir, attention: AttentionConfig, keep: int | None, compile_blocks=False, device="cpu", backend="inductor"
):
    """The tiny Wan prepared as training prepares it (models/setup.py), checkpointed unless `keep`
    is None, with random LoRA weights (B starts at zero; random values give every adapter a gradient)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer").to(device)
    how = ModelConfig(
        id="tiny-wan",
        gradient_checkpointing=keep is not None,
        checkpoint_keep_attention=keep or 0,
        compile_blocks=compile_blocks,
        compile_backend=backend,
    )
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
        model, params = tiny_lora_model(
            tiny_model_dir,
            AttentionConfig(backend="triton", **RADIAL),
            variant_keep,
            compile_blocks=variant_compile,
            device="cuda",
        )
        g = torch.Generator("cuda").manual_seed(1)
        x = torch.randn(2, model.config.in_channels, 9, 8, 8, generator=g, device="cuda")
        text = torch.randn(2, 7, model.config.text_dim, generator=g, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(
                hidden_states=x, timestep=torch.tensor([300.0, 700.0], device="cuda"), encoder_hidden_states=text
            ).sample
        out.float().square().mean().backward()
        results.append((out.float().detach(), [p.grad.float() for p in params]))
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=2e-2 * b.abs().max().item(), rtol=5e-2)


def self_attention_nodes(graph) -> int:
    """Self-attention op calls in an AOTAutograd graph (SDPA's CPU op may sit inside the rng
    wrappers that make recomputation replay the forward's random state)."""
    ops, count = attention_ops(), 0
    for node in graph.nodes:
        target, args = node.target, node.args
        if target is torch.ops.higher_order.run_and_save_rng_state:
            target, args = args[0], args[1:]
        elif target is torch.ops.higher_order.run_with_rng_state:
            target, args = args[1], args[2:]
        if node.op == "call_function" and target in ops:
            q, k = (a.meta["val"] for a in args[:2])
            count += k.shape[-2] == q.shape[-2]
    return count


GRAPHS = {"forward": [], "backward": []}


def _recorder(kind):
    def compile_graph(gm, example_inputs):
        GRAPHS[kind].append(self_attention_nodes(gm.graph))
        return make_boxed_func(gm.forward)  # run the graph as traced, like aot_eager

    return compile_graph


register_backend(
    aot_autograd(fw_compiler=_recorder("forward"), bw_compiler=_recorder("backward")), name="record_attention"
)


@pytest.mark.parametrize("keep, backward_attention", [(0, [1, 1]), (1, [0, 1]), (-1, [0, 0])])
def test_compiled_blocks_keep_attention_inside_the_graph(tiny_model_dir, keep, backward_attention):
    """With compile_blocks the checkpoint is traced into the block's graph, so the kept blocks'
    backward graph has no attention forward left to recompute and the others' has one; the
    gradients are eager's. The tiny Wan has 2 blocks, each compiled on its own: the first block's
    input needs no gradient (the patch embedding is frozen), the later blocks share one graph."""
    attention = AttentionConfig(backend="dense", **RADIAL)
    _, expected = train_step(tiny_model_dir, attention, keep=0)
    torch._dynamo.reset()
    for graphs in GRAPHS.values():
        graphs.clear()
    model, params = tiny_lora_model(tiny_model_dir, attention, keep, compile_blocks=True, backend="record_attention")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, model.config.in_channels, 5, 8, 8, generator=g)
    text = torch.randn(1, 7, model.config.text_dim, generator=g)
    out = model(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample
    out.square().mean().backward()
    assert GRAPHS["forward"] == [1, 1]  # each block's graph computes attention once
    assert sorted(GRAPHS["backward"]) == backward_attention  # (compiled in the backward's order)
    for a, b in zip([p.grad for p in params], expected):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def attention_forward_launches(step) -> int:
    """Attention forward kernels (Triton's or Gluon's `forward_kernel`) launched on the GPU by `step()`."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if "forward_kernel" in event.name)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "keep, compile_blocks, gluon",
    [
        (0, False, "fwd"),
        (2, False, "fwd"),
        (0, True, "fwd"),
        (2, True, "fwd"),
        (-1, True, "none"),
    ],
)
def test_gpu_kept_blocks_launch_one_attention_forward(keep, compile_blocks, gluon):
    """What the bench's step times: a 3-block Wan at head_dim 128 with mask blocks of 128 (so the
    Gluon forward runs on an H100), bf16, checkpointed, eager or compiled with inductor. Each
    plainly checkpointed block launches the attention forward twice a step (forward and
    recomputation), each kept block once."""
    from diffusers import WanTransformer3DModel

    from radial_lora.configs.schema import KernelConfig

    if gluon == "fwd" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon forward needs an sm_90 GPU")
    torch._dynamo.reset()
    torch.manual_seed(0)
    blocks = 3
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        in_channels=16,
        out_channels=16,
        text_dim=32,
        num_attention_heads=2,
        attention_head_dim=128,
        ffn_dim=256,
        num_layers=blocks,
        freq_dim=32,
    ).to("cuda", torch.bfloat16)
    how = ModelConfig(
        id="wan", gradient_checkpointing=True, checkpoint_keep_attention=keep, compile_blocks=compile_blocks
    )
    attention = AttentionConfig(backend="triton", block_size=128, decay=1.0, kernels=KernelConfig(gluon=gluon))
    prepare_transformer(model, how, attention, LoraConfig(rank=4))
    x = torch.randn(1, 16, 5, 16, 16, device="cuda", dtype=torch.bfloat16)  # 5 x 64 = 320 tokens: 3 mask blocks
    text = torch.randn(1, 7, 32, device="cuda", dtype=torch.bfloat16)

    def step():
        out = model(hidden_states=x, timestep=torch.tensor([500.0], device="cuda"), encoder_hidden_states=text).sample
        out.float().square().mean().backward()

    step()  # compiles
    launches = attention_forward_launches(step)
    kept = blocks if keep < 0 else keep
    assert launches == 2 * blocks - kept
