"""Training a model from scratch through the loop: the procedural world as a data source
(data.root=world:sprites), the pixel-space Wan (identity VAE), every weight trained
(train.mode=full) with given first frames (train.condition_frames), and a LoRA at 4x length on top
of the exported model: the length-extension experiment's two phases at toy size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import REPO, run_train

from radial_lora.configs.schema import ConfigError, DataConfig
from radial_lora.data import sprite_world as w
from radial_lora.data.catalog import build_catalog
from radial_lora.data.setup import catalog_for
from radial_lora.data.video import decode_clip
from radial_lora.models.attention import DenseAboveSigma
from radial_lora.models.pixel_wan import build_pixel_wan
from radial_lora.train.step import conditioned_frames, flow_matching_loss, sample_generator


def test_the_world_is_a_catalog_of_rendered_clips():
    catalog = build_catalog([w.WORLD_SOURCE], fps=None, frames=[9, 17], sizes=[(64, 64)])
    assert len(catalog.clips) == 2 * w.EPOCH_CLIPS and not catalog.rejected
    assert catalog.bucket_counts() == {(17, 64, 64): w.EPOCH_CLIPS, (9, 64, 64): w.EPOCH_CLIPS}
    name = catalog.clips[3].video
    held = decode_clip(name, 17, 64, 64, rng=None)  # held-out: clip 3 of the evaluation stream, always
    expected = w.render_clips(0, "eval", [3], 17).frames[0]
    assert held.dtype == torch.uint8 and held.shape == (17, 64, 64, 3)
    assert (held.float() / 127.5 - 1 - expected).abs().max() <= 1 / 127.5
    a = decode_clip(name, 17, 64, 64, rng=np.random.default_rng([0, 1, 3]))
    b = decode_clip(name, 17, 64, 64, rng=np.random.default_rng([0, 1, 3]))
    c = decode_clip(name, 17, 64, 64, rng=np.random.default_rng([0, 2, 3]))
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, held)
    with pytest.raises(ConfigError, match="64x64"):
        catalog_for(DataConfig(root=w.WORLD_SOURCE, frames=[9], sizes=[[32, 32]], fps=None))


def test_the_identity_vae_keeps_the_frames(tmp_path):
    from diffusers import WanPipeline

    from radial_lora.train.step import posterior_params, sample_latents

    pipe = WanPipeline.from_pretrained(str(build_pixel_wan(tmp_path / "pw", preset="toy")))
    frames = w.render_clips(0, "eval", [0], 5).frames
    uint8 = ((frames + 1) * 127.5).round().to(torch.uint8)
    params = posterior_params(pipe.vae, uint8)
    x0 = sample_latents(pipe.vae, params, torch.Generator().manual_seed(0))
    assert x0.shape == (1, 3, 5, 64, 64)
    assert (x0 - uint8.permute(0, 4, 1, 2, 3).float() / 127.5 + 1).abs().max() < 1e-5
    assert torch.equal(pipe.vae.decode(x0).sample, x0.clamp(-1, 1))


def test_given_frames_are_left_out_of_the_loss_and_get_timestep_zero(tmp_path):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(build_pixel_wan(tmp_path / "pw", preset="toy")))
    transformer = pipe.transformer
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 3, 5, 64, 64, generator=g), torch.randn(2, 3, 5, 64, 64, generator=g)
    text = torch.zeros(2, 8, 32)
    sigmas = torch.tensor([0.7, 0.4])
    clean = torch.tensor([2, 0])
    loss = flow_matching_loss(transformer, latents, text, sigmas, noise, torch.float32, clean)
    # The given frames' noise is never used and their error never counted...
    other = noise.clone()
    other[0, :, :2] = torch.randn(3, 2, 64, 64, generator=g)
    assert torch.allclose(flow_matching_loss(transformer, latents, text, sigmas, other, torch.float32, clean), loss)
    # ... while the same noise matters without conditioning.
    plain = flow_matching_loss(transformer, latents, text, sigmas, noise, torch.float32)
    assert not torch.allclose(flow_matching_loss(transformer, latents, text, sigmas, other, torch.float32), plain)
    # Which samples are conditioned follows each sample's generator: the same draw on a resume.
    gens = lambda: [sample_generator(0, 7, j, "cpu") for j in range(64)]  # noqa: E731
    first, again = conditioned_frames(gens(), 2, 0.5, "cpu"), conditioned_frames(gens(), 2, 0.5, "cpu")
    assert torch.equal(first, again) and set(first.tolist()) == {0, 2} and 16 < int((first > 0).sum()) < 48
    assert not conditioned_frames(gens(), 0, 0.5, "cpu").any()
    # The training rule reads a per-token timestep as its sample's highest noise level.
    per_token = torch.tensor([[0.0, 0.0, 700.0, 700.0], [0.0, 0.0, 300.0, 300.0]])
    assert DenseAboveSigma(0.5)(per_token).tolist() == [True, False]


@pytest.mark.slow
def test_pretrain_from_scratch_then_a_4x_lora_on_the_exported_model(tmp_path):
    """Phase 1: the toy pixel Wan trained from scratch on the world at 5 frames, every weight, half
    the samples given 2 frames. Phase 2: a radial LoRA at 17 frames on the exported model."""
    from diffusers import WanPipeline
    from safetensors.torch import load_file

    common = [
        "model=pixel_wan_toy",
        "trainer.mixed_precision=no",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.val_clips=1",
        "logger.mode=disabled",
        f"output_root={tmp_path / 'outputs'}",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    base = run_train(
        REPO,
        "+experiment=sprites_base",
        *common,
        "data.frames=[5]",
        "train.steps=4",
        "train.checkpoint_every=2",
        "validation.every=4",
    )
    assert base.returncode == 0, base.stderr[-3000:]
    model = tmp_path / "outputs/sprites_base/model"
    assert base.stdout.strip().splitlines()[-1] == f"Model exported to {model}"
    assert "training every transformer weight (train.mode=full)" in base.stdout
    assert json.loads((model / "training.json").read_text())["radial_lora.mode"] == "full"
    assert all(f.stat().st_size <= 16 * 2**20 for f in model.rglob("*.safetensors"))
    trained = WanPipeline.from_pretrained(str(model)).transformer.state_dict()
    initial = WanPipeline.from_pretrained(str(tmp_path / "cache/models/pixel-wan-toy")).transformer.state_dict()
    assert any(not torch.equal(trained[k], initial[k]) for k in trained), "pretraining changed the weights"

    extend = run_train(
        REPO,
        "+experiment=sprites_4x",
        *common,
        f"model.path={model}",
        "attention.backend=reference",
        "data.frames=[17]",
        "train.steps=2",
        "validation.every=2",
    )
    assert extend.returncode == 0, extend.stderr[-3000:]
    assert "radial on reference (block 64, decay 0.2" in extend.stdout
    assert "validation: loss_17f" in extend.stdout
    lora = load_file(str(tmp_path / "outputs/sprites_4x_radial/lora/pytorch_lora_weights.safetensors"))
    assert any("attn1.to_q.lora_A" in k for k in lora)
