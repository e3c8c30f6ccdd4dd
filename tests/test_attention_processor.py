"""The self-attention swap inside a real (tiny) Wan transformer: backends, dense rules, shapes."""

from __future__ import annotations

import pytest
import torch

from radial_lora.configs.schema import AttentionConfig, ConfigError
from radial_lora.models.attention import describe, set_self_attention, triton_kernels

RADIAL = dict(block_size=16, decay=1.0, sink=True)


@pytest.fixture
def transformer(tiny_model_dir):
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer")


def run(transformer, frames=5, size=8, seed=0, timestep=(500.0, 500.0)):
    """Output for a latent video of `frames` x size x size (tokens per frame = (size/2)^2)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    x = torch.randn(len(timestep), cfg.in_channels, frames, size, size, generator=g)
    text = torch.randn(len(timestep), 7, cfg.text_dim, generator=g)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor(timestep), encoder_hidden_states=text).sample


def test_radial_reference_and_flex_agree_through_the_model(transformer):
    set_self_attention(transformer, AttentionConfig(backend="reference", **RADIAL))
    ref = run(transformer, frames=6)
    set_self_attention(transformer, AttentionConfig(backend="flex", **RADIAL))
    flex = run(transformer, frames=6)
    torch.testing.assert_close(flex, ref, atol=1e-5, rtol=1e-5)


def test_radial_changes_the_output_and_dense_layers_undo_it(transformer):
    set_self_attention(transformer, AttentionConfig(backend="dense"))
    dense = run(transformer, frames=9)
    routing = set_self_attention(transformer, AttentionConfig(backend="reference", **RADIAL))
    radial = run(transformer, frames=9)
    assert routing.calls == {"dense": 0, "radial": 2}
    assert (radial - dense).abs().max() > 1e-3  # the 9-frame mask is really sparse
    routing = set_self_attention(transformer, AttentionConfig(backend="reference", dense_layers=2, **RADIAL))
    assert describe(transformer) == "self-attention: 2 layers dense"
    torch.testing.assert_close(run(transformer, frames=9), dense, atol=1e-6, rtol=0)
    assert routing.calls == {"dense": 2, "radial": 0}


def test_describe_counts_layers(transformer):
    set_self_attention(transformer, AttentionConfig(backend="reference", dense_layers=1, **RADIAL))
    assert describe(transformer).startswith("self-attention: 1 layers dense, 1 layers radial on reference")
    set_self_attention(transformer, AttentionConfig(backend="dense"))
    assert describe(transformer) == "self-attention: 2 layers dense"


def test_the_run_says_which_triton_kernels_it_runs(transformer, monkeypatch):
    """The log line of the triton backend's kernels (on CPU: Triton in the interpreter); a Gluon
    kernel that attention.kernels.gluon requires but cannot run is refused at start; other
    backends: no line."""
    from radial_lora.configs.schema import KernelConfig
    from radial_lora.kernels import kernel_choice

    set_self_attention(transformer, AttentionConfig(backend="triton", **RADIAL))
    cpu = torch.device("cpu")
    assert triton_kernels(transformer, cpu, torch.float32) == (
        "Triton forward, dK/dV, dQ (Triton's CPU interpreter) (gluon=auto, tma=backward)"
    )
    set_self_attention(transformer, AttentionConfig(backend="triton", **RADIAL, kernels=KernelConfig(gluon="fwd_dq")))
    refused = "attention.backend=triton: attention.kernels.gluon=fwd_dq needs an sm_90 GPU"
    with pytest.raises(ConfigError, match=refused):
        triton_kernels(transformer, cpu, torch.float32)
    set_self_attention(transformer, AttentionConfig(backend="triton", **RADIAL))
    monkeypatch.setattr(kernel_choice, "INTERPRET", False)  # a CPU run without Triton's interpreter
    with pytest.raises(ConfigError, match=r"attention.backend=triton: the triton attention backend needs a CUDA GPU"):
        triton_kernels(transformer, cpu, torch.float32)
    monkeypatch.undo()
    set_self_attention(transformer, AttentionConfig(backend="reference", **RADIAL))
    assert triton_kernels(transformer, cpu, torch.float32) is None


def test_mask_follows_each_calls_video_shape(transformer):
    routing = set_self_attention(transformer, AttentionConfig(backend="reference", **RADIAL))
    run(transformer, frames=3, size=8)
    assert routing.video_shape == (3, 16)
    out = run(transformer, frames=7, size=12)  # another bucket: 7 frames of 6x6 tokens
    assert routing.video_shape == (7, 36) and out.shape[2:] == (7, 12, 12)


def test_training_rule_runs_noisy_samples_dense(transformer):
    rule = AttentionConfig(backend="reference", train_dense_above_sigma=0.8, **RADIAL)
    routing = set_self_attention(transformer, rule, mode="train")
    mixed = run(transformer, frames=9, timestep=(900.0, 300.0))
    assert routing.calls == {"dense": 2, "radial": 2}  # 2 layers x (1 dense + 1 radial sample)
    set_self_attention(transformer, AttentionConfig(backend="dense"))
    all_dense = run(transformer, frames=9, timestep=(900.0, 300.0))
    set_self_attention(transformer, AttentionConfig(backend="reference", **RADIAL))
    all_radial = run(transformer, frames=9, timestep=(900.0, 300.0))
    torch.testing.assert_close(mixed[0], all_dense[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(mixed[1], all_radial[1], atol=1e-6, rtol=0)


def test_generation_rule_first_steps_dense(tiny_model_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_model_dir)
    cfg = AttentionConfig(backend="reference", dense_timesteps=2, **RADIAL)
    routing = set_self_attention(pipe.transformer, cfg, mode="generate")
    for _ in range(2):  # a second generation starts counting again
        routing.calls.update(dense=0, radial=0)
        pipe(
            "a red square",
            num_frames=13,
            height=32,
            width=32,
            num_inference_steps=5,
            guidance_scale=2.0,
            max_sequence_length=16,
        )
        # 5 steps x 2 passes (classifier-free guidance) x 2 layers; the first 2 steps dense.
        assert routing.calls == {"dense": 8, "radial": 12}


def test_block_size_from_config_reaches_the_mask(transformer):
    routing = set_self_attention(transformer, AttentionConfig(backend="reference", block_size=32))
    run(transformer, frames=4, size=8)
    assert routing.block_mask(torch.device("cpu")).shape == (2, 2)  # 64 tokens in blocks of 32


def test_triton_backend_through_the_model(transformer):
    """CPU (Triton's interpreter, fp32): output and a LoRA-relevant weight gradient vs the reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, transformer.config.in_channels, 5, 8, 8, generator=g)
    text = torch.randn(1, 7, transformer.config.text_dim, generator=g)
    results = []
    for cfg in (AttentionConfig(backend="reference", **RADIAL), AttentionConfig(backend="triton", **RADIAL)):
        set_self_attention(transformer, cfg)
        transformer.zero_grad()
        out = transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample
        out.square().mean().backward()
        results.append((out.detach(), transformer.blocks[1].attn1.to_q.weight.grad.clone()))
    assert "radial on triton" in describe(transformer)
    (ref_out, ref_grad), (tri_out, tri_grad) = results
    torch.testing.assert_close(tri_out, ref_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tri_grad, ref_grad, atol=1e-4 * ref_grad.abs().max().item(), rtol=1e-3)


def test_compiled_blocks_trace_the_triton_backend_in_one_graph(transformer):
    """The mask's kernel form is built by the transformer's pre-hook, so a compiled block traces
    attention as a plain op: no graph break (on an H100 the first try broke at every radial block)."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    # 7 latent frames: a mask no other test has built, so nothing is cached before the compiled call.
    x = torch.randn(1, transformer.config.in_channels, 7, 8, 8, generator=g)
    text = torch.randn(1, 7, transformer.config.text_dim, generator=g)
    set_self_attention(transformer, AttentionConfig(backend="triton", **RADIAL))
    torch._dynamo.reset()
    counters.clear()
    # "eager": dynamo's tracing alone; the interpreter cannot run inside AOT-compiled graphs.
    transformer.compile_repeated_blocks(backend="eager")
    compiled = transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample
    compiled.square().mean().backward()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1  # the blocks really went through dynamo
    set_self_attention(transformer, AttentionConfig(backend="reference", **RADIAL))
    reference = transformer(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text).sample
    torch.testing.assert_close(compiled, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_triton_backend_through_the_model_on_gpu(tiny_model_dir):
    """The tiny Wan on the GPU: radial attention on our kernels vs the reference, output and grads."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(tiny_model_dir, subfolder="transformer").cuda()
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(2, model.config.in_channels, 9, 8, 8, generator=g, device="cuda")
    text = torch.randn(2, 7, model.config.text_dim, generator=g, device="cuda")
    results = []
    for backend in ("reference", "triton"):
        set_self_attention(model, AttentionConfig(backend=backend, **RADIAL))
        model.zero_grad()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(
                hidden_states=x, timestep=torch.tensor([300.0, 700.0], device="cuda"), encoder_hidden_states=text
            ).sample
        out.float().square().mean().backward()
        results.append((out.float(), model.blocks[1].attn1.to_q.weight.grad.clone()))
    (ref_out, ref_grad), (tri_out, tri_grad) = results
    torch.testing.assert_close(tri_out, ref_out, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(tri_grad, ref_grad, atol=3e-2 * ref_grad.abs().max().item(), rtol=5e-2)
