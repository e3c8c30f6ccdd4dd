"""Two-expert models (Wan2.2-A14B's layout): a run loads one expert (model.expert) as the
pipeline's transformer, draws only that expert's noise levels, and its LoRA says which expert it
belongs to; the settings that cannot work with one expert are refused in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import DEMO_DATA, REPO, run_train

from radial_lora.configs.schema import ConfigError, ModelConfig, TimestepConfig
from radial_lora.models.loading import load_pipeline
from radial_lora.train.step import sample_generator, sample_sigmas


def test_noise_levels_are_drawn_inside_the_range_from_the_schemes_distribution():
    for sampling in ("uniform", "shifted", "logit_normal"):
        cfg = TimestepConfig(sampling=sampling, min_sigma=0.875, max_sigma=1.0)
        draws = torch.cat([sample_sigmas(cfg, 1, sample_generator(0, 0, j, "cpu"), "cpu") for j in range(400)])
        again = torch.cat([sample_sigmas(cfg, 1, sample_generator(0, 0, j, "cpu"), "cpu") for j in range(400)])
        assert torch.equal(draws, again) and bool(((draws >= 0.875) & (draws < 1.0)).all()), sampling
    # Uniform cut to [0, 0.5): uniform there (mean 0.25), not piled at an edge.
    low = TimestepConfig(sampling="uniform", max_sigma=0.5)
    draws = torch.cat([sample_sigmas(low, 1, sample_generator(1, 0, j, "cpu"), "cpu") for j in range(2000)])
    assert draws.max() < 0.5 and abs(float(draws.mean()) - 0.25) < 0.02


def test_a_run_loads_only_its_expert(tmp_path):
    from diffusers import WanPipeline

    from radial_lora.models.tiny_wan import build_tiny_wan

    folder = build_tiny_wan(tmp_path / "a14b", preset="a14b")
    both = WanPipeline.from_pretrained(str(folder))
    low = load_pipeline(ModelConfig(id="tiny-wan2.2-a14b", path=str(folder), expert="low_noise"))
    high = load_pipeline(ModelConfig(id="tiny-wan2.2-a14b", path=str(folder), expert="high_noise"))
    assert low.transformer_2 is None and high.transformer_2 is None and low.config.boundary_ratio == 0.875
    for pipe, source in ((low, both.transformer_2), (high, both.transformer)):
        want = source.state_dict()
        assert all(torch.equal(t, want[k]) for k, t in pipe.transformer.state_dict().items())
    with pytest.raises(ConfigError, match="has two experts .* set model.expert=high_noise or model.expert=low_noise"):
        load_pipeline(ModelConfig(id="tiny-wan2.2-a14b", path=str(folder)))
    single = build_tiny_wan(tmp_path / "one")
    with pytest.raises(ConfigError, match="model.expert=low_noise: tiny-wan has one transformer"):
        load_pipeline(ModelConfig(id="tiny-wan", path=str(single), expert="low_noise"))


@pytest.mark.slow
def test_the_low_noise_expert_trains_its_own_lora(tmp_path, demo_videos_dir):
    from safetensors import safe_open

    common = [
        "model=tiny_wan2.2_a14b", "model.expert=low_noise", f"data.root={demo_videos_dir}", *DEMO_DATA,
        "data.num_workers=0", f"cache_dir={tmp_path / 'cache'}", f"output_root={tmp_path / 'out'}",
        "logger.mode=disabled", "train.steps=2",
    ]  # fmt: skip
    proc = run_train(REPO, *common, "data.val_clips=1", "validation.every=2", "validation.samples=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "expert: low_noise (noise levels [0, 0.875) of the model's two experts)" in proc.stdout
    assert "validation: loss_33f" in proc.stdout
    with safe_open(str(tmp_path / "out/tiny/lora/pytorch_lora_weights.safetensors"), "pt") as f:
        assert f.metadata()["radial_lora.expert"] == "low_noise"
    # It generates with both experts: its LoRA on the low-noise one, another on the high-noise one.
    from radial_lora.scripts import generate

    lora = tmp_path / "out/tiny/lora/pytorch_lora_weights.safetensors"
    video = generate.main(
        ["--run", str(tmp_path / "out/tiny"), "--prompt", "a red square", "--frames", "5", "--steps", "2",
         "--device", "cpu", "--other-lora", str(lora), "--out", str(tmp_path / "both.mp4")]
    )  # fmt: skip
    assert video.stat().st_size > 0
    pipe = load_pipeline(
        ModelConfig(id="tiny-wan2.2-a14b", path=str(tmp_path / "cache/models/tiny-wan2.2-a14b")), both_experts=True
    )
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, load_into_transformer_2=True)
    adapted = [any("lora_A" in n for n, _ in t.named_parameters()) for t in (pipe.transformer, pipe.transformer_2)]
    assert adapted == [False, True], "the low-noise expert's LoRA goes on transformer_2 alone"
    with pytest.raises(SystemExit, match="--other-lora: no file"):
        generate.main(["--run", str(tmp_path / "out/tiny"), "--prompt", "x", "--other-lora", str(tmp_path / "nope")])
    refused = run_train(REPO, *common, "name=samples", "validation.every=2", "validation.samples=1")
    assert refused.returncode != 0 and "a sample needs both" in refused.stderr
    refused = run_train(REPO, *common, "name=sigmas", "data.val_clips=1", "validation.every=2", "validation.samples=0",
                        "validation.sigmas=[0.25,0.9]")  # fmt: skip
    assert refused.returncode != 0 and "validation.sigmas [0.9] lie outside" in refused.stderr
