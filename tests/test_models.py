"""The tiny Wan loads like a real one; the attention seam; LoRA's trainable set; the LoRA export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from radial_lora.configs.schema import AttentionConfig, LoraConfig, ModelConfig, TimestepConfig
from radial_lora.models.attention import set_self_attention
from radial_lora.models.families.wan import WanSelfAttnProcessor
from radial_lora.models.lora import LORA_WEIGHT_NAME, add_lora, export_lora
from radial_lora.train.step import flow_matching_loss, sample_sigmas

DENSE = AttentionConfig(backend="dense")


def load(model_dir):
    from radial_lora.models.loading import load_pipeline

    return load_pipeline(ModelConfig(id="tiny-wan", path=str(model_dir)))


def inputs(pipe, seed=0, frames=3, size=8):
    g = torch.Generator().manual_seed(seed)
    cfg = pipe.transformer.config
    x = torch.randn(2, cfg.in_channels, frames, size, size, generator=g)
    text = torch.randn(2, 7, cfg.text_dim, generator=g)
    t = torch.tensor([100.0, 900.0])
    return x, t, text


def forward(transformer, x, t, text):
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def test_tiny_model_is_a_real_wan_pipeline(tiny_model_dir):
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel
    from transformers import UMT5EncoderModel

    pipe = load(tiny_model_dir)
    assert isinstance(pipe, WanPipeline)
    assert isinstance(pipe.transformer, WanTransformer3DModel)
    assert isinstance(pipe.vae, AutoencoderKLWan)
    assert isinstance(pipe.text_encoder, UMT5EncoderModel)
    embeds, _ = pipe.encode_prompt(
        "a red square moving left", do_classifier_free_guidance=False, max_sequence_length=16
    )
    assert embeds.shape == (1, 16, pipe.transformer.config.text_dim)
    video = pipe("a blue circle", num_frames=5, height=32, width=32, num_inference_steps=2, output_type="pt").frames
    assert video.shape == (1, 5, 3, 32, 32) and torch.isfinite(video).all()


def test_clips_beyond_the_rotary_table_are_refused_in_one_line(tiny_model_dir):
    from radial_lora.configs.schema import ConfigError
    from radial_lora.models.setup import check_rotary_covers

    pipe = load(tiny_model_dir)  # rope_max_seq_len 1024, VAE x4 in time and x8 in space, patch 1x2x2
    check_rotary_covers(pipe, [321, 81], [[480, 832]])
    check_rotary_covers(pipe, [4093], [[16384, 16384]])  # exactly 1024 positions on every axis
    with pytest.raises(ConfigError, match=r"data\.frames 4097 gives 1025 rotary positions; .* holds 1024"):
        check_rotary_covers(pipe, [81, 4097], [[480, 832]])
    with pytest.raises(ConfigError, match=r"data\.sizes width 16400 gives 1025 rotary positions"):
        check_rotary_covers(pipe, [81], [[480, 832], [480, 16400]])
    with pytest.raises(ConfigError, match=r"data\.sizes=\[\[480, 840\]\]: .* multiples of 16"):
        check_rotary_covers(pipe, [81], [[480, 840]])


def test_tiny_wan22_ti2v_is_a_real_pipeline_with_its_vae(tmp_path):
    """The Wan2.2-TI2V stand-in: the residual VAE compresses 16x (sizes in multiples of 32), the
    pipeline passes per-token timesteps, and it generates."""
    from radial_lora.configs.schema import ConfigError
    from radial_lora.models.setup import check_rotary_covers
    from radial_lora.models.tiny_wan import build_tiny_wan

    pipe = load(build_tiny_wan(tmp_path / "ti2v", preset="ti2v"))
    assert pipe.vae.config.is_residual and pipe.vae_scale_factor_spatial == 16 and pipe.config.expand_timesteps
    with pytest.raises(ConfigError, match="multiples of 32"):
        check_rotary_covers(pipe, [17], [[48, 48]])
    video = pipe("a blue circle", num_frames=5, height=64, width=64, num_inference_steps=2, output_type="pt").frames
    assert video.shape == (1, 5, 3, 64, 64) and torch.isfinite(video).all()


def test_dense_processor_matches_diffusers_stock_processor(tiny_model_dir):
    pipe = load(tiny_model_dir)
    x, t, text = inputs(pipe)
    stock = forward(pipe.transformer, x, t, text)
    set_self_attention(pipe.transformer, DENSE)
    ours = forward(pipe.transformer, x, t, text)
    assert all(isinstance(b.attn1.processor, WanSelfAttnProcessor) for b in pipe.transformer.blocks)
    assert not any(isinstance(b.attn2.processor, WanSelfAttnProcessor) for b in pipe.transformer.blocks)
    torch.testing.assert_close(ours, stock, atol=1e-6, rtol=0)


def test_trainable_parameters_are_exactly_the_lora_ones(tiny_model_dir):
    pipe = load(tiny_model_dir)
    cfg = LoraConfig(rank=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    params = add_lora(pipe.transformer, cfg)
    names = {n for n, p in pipe.transformer.named_parameters() if p.requires_grad}
    lora_names = {n for n, _ in pipe.transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert names == lora_names
    # 2 blocks x (attn1, attn2) x 4 projections x (A, B)
    assert len(names) == len(pipe.transformer.blocks) * 2 * 4 * 2 == len(params)
    assert all(p.dtype == torch.float32 for p in params)


def test_loss_falls_when_overfitting_one_batch(tiny_model_dir):
    torch.manual_seed(0)
    pipe = load(tiny_model_dir)
    transformer = pipe.transformer
    set_self_attention(transformer, DENSE)
    params = add_lora(transformer, LoraConfig(rank=8, alpha=8))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, transformer.config.in_channels, 3, 8, 8, generator=g)
    text = torch.randn(2, 7, transformer.config.text_dim, generator=g)
    noise = torch.randn(latents.shape, generator=g)
    sigmas = sample_sigmas(TimestepConfig(), 2, g, "cpu")
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(100):
        loss = flow_matching_loss(transformer, latents, text, sigmas, noise, torch.float32)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_export_loads_into_a_fresh_pipeline_with_the_same_output(tiny_model_dir, tmp_path):
    from diffusers import WanPipeline
    from safetensors import safe_open

    pipe = load(tiny_model_dir)
    set_self_attention(pipe.transformer, DENSE)
    # alpha != rank, so the export must carry the scale for the outputs to agree.
    params = add_lora(pipe.transformer, LoraConfig(rank=4, alpha=12))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in params:  # stand-in for training: B is zero at init, which would hide any bug
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x, t, text = inputs(pipe, seed=3)
    trained = forward(pipe.transformer, x, t, text)

    path = export_lora(pipe.transformer, tmp_path)
    assert path == (tmp_path / LORA_WEIGHT_NAME).resolve()
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("transformer.") for k in keys)

    fresh = WanPipeline.from_pretrained(tiny_model_dir)
    base = forward(fresh.transformer, x, t, text)
    fresh.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAME)
    loaded = forward(fresh.transformer, x, t, text)
    assert (trained - base).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(loaded, trained, atol=1e-5, rtol=0)


def test_random_init_builds_the_published_architectures():
    """model.init=random: Wan2.1 1.3B / 14B, Wan's VAE and UMT5-XXL's encoder (on the meta device:
    shapes and dtypes without the memory)."""
    from radial_lora.models.random_init import random_pipeline

    dtypes = {"transformer": torch.bfloat16, "vae": torch.float32, "text_encoder": torch.bfloat16}

    def billions(module):
        return sum(p.numel() for p in module.parameters()) / 1e9

    small = random_pipeline("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", dtypes, "meta")
    assert 1.4 < billions(small.transformer) < 1.45 and small.transformer.dtype == torch.bfloat16
    assert small.transformer.config.num_layers == 30 and small.transformer.config.num_attention_heads == 12
    assert 0.12 < billions(small.vae) < 0.13 and 5.6 < billions(small.text_encoder) < 5.7
    large = random_pipeline("Wan-AI/Wan2.1-T2V-14B-Diffusers", dtypes, "meta")
    assert 14.2 < billions(large.transformer) < 14.4 and large.transformer.config.num_layers == 40
    vae_only = random_pipeline("Wan-AI/Wan2.1-T2V-14B-Diffusers", dtypes, "meta", transformer=False, text_encoder=False)
    assert vae_only.transformer is None and vae_only.text_encoder is None and vae_only.vae is not None
    ti2v = random_pipeline("Wan-AI/Wan2.2-TI2V-5B-Diffusers", dtypes, "meta", text_encoder=False)
    assert 4.9 < billions(ti2v.transformer) < 5.1 and ti2v.transformer.config.in_channels == 48
    assert ti2v.vae.config.z_dim == 48 and ti2v.vae_scale_factor_spatial == 16 and ti2v.config.expand_timesteps


def test_pipeline_without_the_text_encoder_for_cached_training(tiny_model_dir):
    from radial_lora.models.loading import load_pipeline

    pipe = load_pipeline(ModelConfig(id="tiny-wan", path=str(tiny_model_dir)), text_encoder=False)
    assert pipe.text_encoder is None and pipe.transformer is not None and pipe.vae is not None


def test_offline_missing_model_fails_at_once_saying_how_to_fix_it(tmp_path, demo_videos_dir):
    from conftest import run_train

    proc = run_train(
        tmp_path,
        "model=wan2.1_t2v_1.3b",
        f"data.root={demo_videos_dir}",
        "data.demo=false",
        env={"HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: cannot load model 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'") and "model.path=DIR" in line


def test_a_local_folder_that_is_not_a_model_is_named(tmp_path):
    from radial_lora.models.loading import load_pipeline

    with pytest.raises(FileNotFoundError, match="is not a diffusers model folder"):
        load_pipeline(ModelConfig(id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers", path=str(tmp_path)))


@pytest.mark.slow
def test_tiny_wan22_ti2v_trains_image_to_video_and_its_lora_loads(tmp_path, demo_videos_dir):
    """model=tiny_wan2.2_ti2v through the trainer: the first latent frame given (its image-to-video
    mode, per-token timesteps), a radial LoRA exported, loaded back into its pipeline."""
    from conftest import DEMO_DATA, REPO, run_train

    proc = run_train(
        REPO, "model=tiny_wan2.2_ti2v", f"data.root={demo_videos_dir}", *DEMO_DATA, "data.num_workers=0",
        f"cache_dir={tmp_path / 'cache'}", f"output_root={tmp_path / 'out'}", "attention=radial_tiny",
        "train.condition_frames=1", "train.steps=2", "logger.mode=disabled",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layers radial on" in proc.stdout
    lora = tmp_path / "out/tiny/lora/pytorch_lora_weights.safetensors"
    pipe = load(tmp_path / "cache/models/tiny-wan2.2-ti2v")
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    video = pipe("a blue circle", num_frames=5, height=64, width=64, num_inference_steps=2, output_type="pt").frames
    assert video.shape == (1, 5, 3, 64, 64) and torch.isfinite(video).all()


def test_image_to_video_starts_from_the_image(tmp_path):
    """Wan2.2-TI2V's image input: the video's first frame is the image through the VAE (its latent
    held as the first latent frame), a different image gives a different video; a model without
    an image input says so."""
    from PIL import Image

    from radial_lora.models.generation import generate_video
    from radial_lora.models.tiny_wan import build_tiny_wan

    pipe = load(build_tiny_wan(tmp_path / "ti2v", preset="ti2v"))
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(2)]
    kw = dict(frames=5, height=64, width=64, steps=2, guidance=1.0, seed=0, max_text_tokens=8, device="cpu")
    first, again, other = (generate_video(pipe, "a cat", image=im, **kw) for im in (images[0], images[0], images[1]))
    assert first.shape == (5, 64, 64, 3) and np.array_equal(first, again) and not np.array_equal(first[0], other[0])
    with torch.no_grad():  # the image through the VAE alone: what the first frame must be
        x = torch.from_numpy(np.asarray(images[0])).permute(2, 0, 1)[None, :, None].float() / 127.5 - 1
        alone = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample[0, :, 0]
    alone = ((alone.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()
    assert np.abs(first[0].astype(float) - alone).max() <= 2
    with pytest.raises(ValueError, match="this model has no image input"):
        generate_video(load(build_tiny_wan(tmp_path / "t2v")), "a cat", image=images[0], **kw)
