"""The latent cache: built by `python -m scripts.precompute`, equal to on-the-fly encoding, refused
when built for other settings or stale; and training from it."""

from __future__ import annotations

import pytest
import torch

from radial_lora.configs.schema import ConfigError
from radial_lora.data.cache import LatentCache
from radial_lora.data.setup import catalog_for, meta_for
from radial_lora.data.video import decode_clip

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory, tiny_model_dir, demo_videos_dir):
    from conftest import DEMO_DATA, run_train

    cwd = tmp_path_factory.mktemp("precompute")
    cache_dir = cwd / "cache"
    proc = run_train(
        cwd,
        f"model.path={tiny_model_dir}",
        f"data.root={demo_videos_dir}",
        *DEMO_DATA,
        f"data.cache={cache_dir}",
        module="radial_lora.scripts.precompute",
    )
    assert "cached 24 clips" in proc.stdout, proc.stdout + proc.stderr
    return cache_dir


def demo_config(tiny_model_dir, demo_videos_dir, cache_dir, *overrides):
    from conftest import DEMO_DATA, REPO
    from hydra import compose, initialize_config_dir

    from radial_lora.configs.schema import register_configs, typed_config

    register_configs()
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):  # as `python -m train` composes it
        return typed_config(
            compose(
                "train",
                overrides=[
                    "data=videos",
                    f"model.path={tiny_model_dir}",
                    f"data.root={demo_videos_dir}",
                    *DEMO_DATA,
                    f"data.cache={cache_dir}",
                    *overrides,
                ],
            )
        )


def test_cache_round_trip_equals_on_the_fly_encoding(built_cache, tiny_model_dir, demo_videos_dir):
    from radial_lora.models.loading import load_pipeline
    from radial_lora.train.step import encode_captions, posterior_params

    cfg = demo_config(tiny_model_dir, demo_videos_dir, built_cache)
    cache = LatentCache(built_cache, meta_for(cfg))
    clips, failed = cache.usable(catalog_for(cfg.data).clips)
    assert len(clips) == 24 and not failed
    pipe = load_pipeline(cfg.model, transformer=False)
    for clip in clips[:4]:
        frames, height, width = clip.bucket
        pixels = decode_clip(clip.video, frames, height, width, cfg.data.fps)  # the start window
        cached = cache.load(clip)
        assert torch.equal(cached["latent_params"], posterior_params(pipe.vae, pixels[None])[0])
        text = encode_captions(pipe, [clip.caption], cfg.model.max_text_tokens, "cpu")[0]
        assert torch.equal(cached["text"], text)


def test_cache_for_other_settings_or_stale_files_is_refused(built_cache, tiny_model_dir, demo_videos_dir, tmp_path):
    from radial_lora.data.setup import usable_clips

    cfg = demo_config(tiny_model_dir, demo_videos_dir, built_cache, "data.fps=8")
    with pytest.raises(ConfigError, match=r"built for other settings \(fps: cache has 16.0, run wants 8.0\)"):
        usable_clips(cfg, catalog_for(cfg.data))

    # A copy of the dataset whose caption changed after the cache was built.
    import shutil

    videos = tmp_path / "videos"
    shutil.copytree(demo_videos_dir, videos)
    cfg = demo_config(tiny_model_dir, videos, built_cache)
    with pytest.raises(ConfigError, match="not in data.cache"):
        usable_clips(cfg, catalog_for(cfg.data))


def test_training_reads_the_cache(train_cli, built_cache):
    proc = train_cli(f"data.cache={built_cache}", "train.steps=3", "logger.mode=disabled")
    assert f"latents from {built_cache}" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("LoRA exported to ")


def test_empty_dataset_fails_at_start(train_cli, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.mp4").write_bytes(b"")
    (bad / "a.txt").write_text("zero bytes")
    proc = train_cli(f"data.root={bad}", "data.demo=false", check=False)
    assert proc.returncode != 0
    assert "error: no usable clips" in proc.stderr and "1 (1 empty_file)" in proc.stderr
    assert "Traceback" not in proc.stderr
