"""Image-to-video Wan (Wan2.1-I2V-14B, Wan2.2-I2V-A14B) at tiny size: the first-frame inputs are
the pipeline's own, our processor equals the stock one in dense mode with the CLIP tokens in the
cross-attention, the radial mask sees the video's F x s, the given frame is left out of the loss,
a LoRA trains, exports and reloads into WanImageToVideoPipeline with the trained output, the
two-expert layout switches at 0.9, and a run trains (on the fly and from a latent cache),
validates and generates from a first frame."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DEMO_DATA, REPO, run_train

from radial_lora.configs.schema import AttentionConfig, LoraConfig, ModelConfig, TimestepConfig
from radial_lora.models.attention import set_self_attention
from radial_lora.models.image_conditioning import MASK_CHANNELS, takes_first_frame
from radial_lora.models.loading import expert_sigma_range, load_pipeline
from radial_lora.models.lora import LORA_WEIGHT_NAME, add_lora, export_lora
from radial_lora.train.step import first_frame_inputs, flow_matching_loss, sample_sigmas

FRAMES, SIDE = 9, 32  # pixel frames and side: 3 latent frames of 4x4 (2x2 tokens a frame)


@pytest.fixture(scope="module")
def i2v_dir(tmp_path_factory):
    from radial_lora.models.tiny_wan import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan2.1-i2v", preset="i2v")


def load(folder, **kw):
    return load_pipeline(ModelConfig(id="tiny-wan2.1-i2v", path=str(folder), **kw))


def clips(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, FRAMES, SIDE, SIDE, 3), generator=g, dtype=torch.uint8)


def model_inputs(pipe, seed=0):
    frames = clips(seed)
    g = torch.Generator().manual_seed(seed + 1)
    cfg = pipe.transformer.config
    x0 = torch.randn(2, cfg.out_channels, 3, SIDE // 8, SIDE // 8, generator=g)
    text = torch.randn(2, 7, cfg.text_dim, generator=g)
    return x0, text, first_frame_inputs(pipe, pipe.transformer, frames, "cpu")


def forward(transformer, x0, text, image, t=(300.0, 800.0)):
    hidden = torch.cat([x0, image["condition"]], dim=1)
    with torch.no_grad():
        return transformer(
            hidden_states=hidden, timestep=torch.tensor(t), encoder_hidden_states=text,
            encoder_hidden_states_image=image["image_embeds"], return_dict=False,
        )[0]  # fmt: skip


def test_the_first_frame_inputs_are_the_pipelines_own(i2v_dir):
    from diffusers import WanImageToVideoPipeline

    pipe = load(i2v_dir)
    assert isinstance(pipe, WanImageToVideoPipeline) and takes_first_frame(pipe)
    assert pipe.transformer.config.in_channels == 2 * pipe.vae.config.z_dim + MASK_CHANNELS
    frames = clips()
    ours = first_frame_inputs(pipe, pipe.transformer, frames, "cpu")
    for j in range(2):
        image = frames[j : j + 1, 0].permute(0, 3, 1, 2).float() / 127.5 - 1  # the pipeline's preprocessing
        with torch.no_grad():
            _, condition = pipe.prepare_latents(
                image, 1, pipe.vae.config.z_dim, SIDE, SIDE, FRAMES, torch.float32, "cpu"
            )
            embeds = pipe.encode_image([frames[j, 0].numpy()], "cpu")
        torch.testing.assert_close(ours["condition"][j : j + 1], condition, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours["image_embeds"][j : j + 1], embeds.float(), atol=1e-6, rtol=0)
    assert ours["condition"][:, :MASK_CHANNELS, 0].eq(1).all() and ours["condition"][:, :MASK_CHANNELS, 1:].eq(0).all()
    # A text-to-video model takes no image.
    from radial_lora.models.tiny_wan import build_tiny_wan

    t2v = load_pipeline(ModelConfig(id="tiny-wan", path=str(build_tiny_wan(i2v_dir.parent / "t2v"))))
    assert first_frame_inputs(t2v, t2v.transformer, frames, "cpu") == {}


def test_dense_processor_matches_the_stock_one_and_radial_sees_the_video(i2v_dir):
    pipe = load(i2v_dir)
    x0, text, image = model_inputs(pipe)
    stock = forward(pipe.transformer, x0, text, image)
    set_self_attention(pipe.transformer, AttentionConfig(backend="dense"))
    torch.testing.assert_close(forward(pipe.transformer, x0, text, image), stock, atol=1e-6, rtol=0)
    routing = set_self_attention(pipe.transformer, AttentionConfig(backend="reference", block_size=2, decay=0.2))
    forward(pipe.transformer, x0, text, image)
    assert routing.video_shape == (3, 4), "3 latent frames of 2x2 tokens: the condition channels add no tokens"
    assert routing.calls == {"radial": 2, "dense": 0}  # 2 layers, each one call for the batch


def test_the_given_frame_is_left_out_of_the_loss(i2v_dir):
    pipe = load(i2v_dir)
    x0, text, image = model_inputs(pipe)
    sigmas, noise = torch.tensor([0.3, 0.8]), torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    loss = flow_matching_loss(pipe.transformer, x0, text, sigmas, noise, torch.float32, **image)
    s = sigmas.view(-1, 1, 1, 1, 1)
    pred = forward(pipe.transformer, (1 - s) * x0 + s * noise, text, image, t=tuple(sigmas * 1000))
    error = (pred - (noise - x0)) ** 2
    torch.testing.assert_close(loss.detach(), error[:, :, 1:].mean(), atol=1e-6, rtol=1e-6)
    assert abs(float(loss) - float(error.mean())) > 1e-4, "frame 0 would change the value"


def test_a_lora_trains_and_reloads_into_the_image_to_video_pipeline(i2v_dir, tmp_path):
    from diffusers import WanImageToVideoPipeline

    torch.manual_seed(0)
    pipe = load(i2v_dir)
    set_self_attention(pipe.transformer, AttentionConfig(backend="dense"))
    params = add_lora(pipe.transformer, LoraConfig(rank=8, alpha=8))
    x0, text, image = model_inputs(pipe)
    g = torch.Generator().manual_seed(0)
    noise, sigmas = torch.randn(x0.shape, generator=g), sample_sigmas(TimestepConfig(), 2, g, "cpu")
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(60):
        loss = flow_matching_loss(pipe.transformer, x0, text, sigmas, noise, torch.float32, **image)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    trained = forward(pipe.transformer, x0, text, image)
    export_lora(pipe.transformer, tmp_path)
    fresh = WanImageToVideoPipeline.from_pretrained(i2v_dir)
    base = forward(fresh.transformer, x0, text, image)
    fresh.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHT_NAME)
    assert (trained - base).abs().max() > 1e-3
    torch.testing.assert_close(forward(fresh.transformer, x0, text, image), trained, atol=1e-5, rtol=0)


def test_the_two_expert_image_model_switches_at_its_boundary(tmp_path):
    from radial_lora.models.tiny_wan import build_tiny_wan

    folder = build_tiny_wan(tmp_path / "a14b-i2v", preset="a14b_i2v")
    for expert, levels in (("high_noise", (0.9, 1.0)), ("low_noise", (0.0, 0.9))):
        pipe = load_pipeline(ModelConfig(id="tiny-wan2.2-i2v-a14b", path=str(folder), expert=expert))
        assert takes_first_frame(pipe) and pipe.transformer_2 is None and pipe.image_encoder is None
        assert expert_sigma_range(pipe, expert) == levels
        inputs = first_frame_inputs(pipe, pipe.transformer, clips(), "cpu")
        assert inputs["image_embeds"] is None and inputs["condition"].shape == (2, 8, 3, 4, 4)


def test_random_init_builds_the_published_image_to_video_architectures():
    from radial_lora.models.random_init import random_pipeline

    dtypes = {"transformer": torch.bfloat16, "vae": torch.float32, "text_encoder": torch.bfloat16}

    def billions(module):
        return sum(p.numel() for p in module.parameters()) / 1e9

    wan21 = random_pipeline("Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", dtypes, "meta", text_encoder=True)
    config = wan21.transformer.config
    assert config.in_channels == 36 and config.image_dim == 1280 and config.added_kv_proj_dim == 5120
    assert 16.3 < billions(wan21.transformer) < 16.5 and 0.6 < billions(wan21.image_encoder) < 0.65
    assert takes_first_frame(wan21)
    wan22 = random_pipeline("Wan-AI/Wan2.2-I2V-A14B-Diffusers", dtypes, "meta", text_encoder=False, expert="low_noise")
    assert wan22.transformer.config.in_channels == 36 and wan22.transformer.config.image_dim is None
    assert wan22.config.boundary_ratio == 0.9 and wan22.image_encoder is None


@pytest.mark.slow
def test_an_image_to_video_run_trains_validates_caches_and_generates(tmp_path, demo_videos_dir):
    """model=tiny_wan2.1_i2v through the trainer with radial attention: held-out loss and a sample
    from a held-out clip's first frame; a cache built by scripts.precompute holds the first-frame
    inputs and a run trains from it; scripts.generate needs --image and makes a video from one."""
    common = [
        "model=tiny_wan2.1_i2v", f"data.root={demo_videos_dir}", *DEMO_DATA, "data.num_workers=0",
        f"cache_dir={tmp_path / 'cache'}", f"output_root={tmp_path / 'out'}", "logger.mode=disabled",
    ]  # fmt: skip
    proc = run_train(
        REPO, *common, "attention=radial_tiny", "train.steps=2", "data.val_clips=1", "validation.every=2",
        "validation.samples=1", "validation.steps=2", "validation.frames=5",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layers radial on" in proc.stdout and "validation: loss_33f" in proc.stdout
    assert (tmp_path / "out/tiny/samples/step_000002/sample_0.mp4").stat().st_size > 0

    from PIL import Image

    from radial_lora.scripts import generate

    image = tmp_path / "first.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    args = ["--run", str(tmp_path / "out/tiny"), "--prompt", "a red square", "--frames", "5", "--steps", "2",
            "--device", "cpu"]  # fmt: skip
    with pytest.raises(SystemExit, match="is an image-to-video model; give it the first frame"):
        generate.main(args)
    video = generate.main([*args, "--image", str(image), "--out", str(tmp_path / "i2v.mp4")])
    assert video.stat().st_size > 0

    cache = tmp_path / "latents"
    built = run_train(REPO, *common, f"data.cache={cache}", module="radial_lora.scripts.precompute")
    assert built.returncode == 0 and "cached 24 clips" in built.stdout, built.stderr[-3000:]
    from safetensors import safe_open

    shard = sorted(cache.glob("shard_*.safetensors"))[0]
    with safe_open(str(shard), "pt") as f:
        names = {k.split(".", 1)[1] for k in f.keys()}
    assert names == {"latent_params", "text", "condition", "image_embeds"}
    cached = run_train(REPO, *common, f"data.cache={cache}", "train.steps=2", "name=cached", "validation.samples=0")
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert (tmp_path / "out/cached/lora/pytorch_lora_weights.safetensors").exists()
