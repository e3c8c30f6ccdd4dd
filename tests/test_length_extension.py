"""The length-extension experiment's world, detector, metrics and decision rules, on CPU: the world
obeys its physics, the detector finds what the ground truth says is there, every metric is about 0
on simulated clips and grows with its own corruption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radial_lora.data import sprite_world as w
from radial_lora.scripts.length_extension import metrics as m
from radial_lora.scripts.length_extension import verdict as v

CLIPS, FRAMES = 16, 40


@pytest.fixture(scope="module")
def clips():
    return w.render_clips(0, "eval", range(CLIPS), FRAMES)


@pytest.fixture(scope="module")
def truth(clips):
    return m.detect(clips.frames)


def noisy_blurred(frames, sigma=0.05, seed=0):
    """The frames with N(0, sigma) noise and a 1-px binomial blur, as a model's output might look."""
    g = torch.Generator().manual_seed(seed)
    x = frames + sigma * torch.randn(frames.shape, generator=g)
    B, T, H, W, C = x.shape
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    x = F.conv2d(x.permute(0, 1, 4, 2, 3).reshape(-1, 1, H, W), k.view(1, 1, 3, 3), padding=1)
    return x.view(B, T, C, H, W).permute(0, 1, 3, 4, 2)


# --- the world ---


def test_same_seed_same_clip_and_streams_are_disjoint():
    a = w.render_clips(3, "train", [5, 9], 8)
    b = w.render_clips(3, "train", [9], 8)
    assert torch.equal(a.frames[1], b.frames[0])  # clip 9 is clip 9 in any batch
    other = w.render_clips(3, "eval", [9], 8)
    assert not torch.equal(other.frames[0], b.frames[0])
    assert a.frames.shape == (2, 8, 64, 64, 3) and a.frames.min() >= -1 and a.frames.max() <= 1


def test_speed_is_conserved_and_walls_reflect(clips):
    r = clips.radius[:, None, :, None]
    present = clips.present[:, None, :, None]
    assert ((clips.centres >= r - 1e-4) & (clips.centres <= 64 - r + 1e-4) | ~present).all()
    # Per axis the step's size never changes: a reflection flips its sign only.
    step = (clips.centres[:, 1:] - clips.centres[:, :-1]).abs()
    velocity = torch.stack([torch.tensor(w.clip_params(0, "eval", i).velocity) for i in range(CLIPS)]).float()
    bounce = step < velocity.abs()[:, None] - 1e-3  # the frame pairs that straddle a wall
    assert bounce.float().mean() < 0.1
    assert torch.allclose(step[~bounce], velocity.abs()[:, None].expand_as(step)[~bounce], atol=1e-3)
    assert (clips.speed[clips.present] >= 1.0).all() and (clips.speed[clips.present] <= 2.5).all()


def test_no_sprite_hides_in_frame_0_and_hidings_are_booked(clips):
    assert not clips.behind_bar[:, 0].any()
    events = w.occlusions(clips)
    assert events, "the clips hold passages behind the bar"
    for e in events:
        hidden = clips.behind_bar[e.clip, :, e.sprite]
        assert hidden[e.hidden_from : e.reappears].all()
        assert not hidden[e.hidden_from - 1] and not hidden[e.reappears]
        assert 2 <= e.duration <= 31  # (20 - 2r - 1) / |vx| for r in [4, 6], |vx| in [0.4, 2.5]
        assert clips.bar_left[e.clip] >= 0


# --- the detector against ground truth ---


def test_detector_finds_what_shows_under_noise_and_blur(clips):
    det = m.detect(noisy_blurred(clips.frames))
    area, centroid = m._sprite_view(det, clips)
    shown = m.shown_alone(clips)
    found = area >= m.FOUND_PX
    assert (found & shown).sum() / shown.sum() >= 0.995
    error = (centroid - clips.visible_centroid).norm(dim=-1)[shown & found]
    assert error.mean() <= 0.3
    # Nothing is found that is not there.
    cast = torch.zeros(CLIPS, 6, dtype=torch.bool)
    for i in range(3):
        cast |= F.one_hot(clips.colours[:, i].clamp(min=0), 6).bool() & clips.present[:, i : i + 1]
    assert not (det.found & ~cast[:, None]).any()


# --- each metric: about 0 on the simulation, growing with its corruption ---


def shift_sprite(frames, clips, clip, sprite, from_frame, dx):
    """Move one sprite's pixels `dx` px to the right from `from_frame` on (a teleport)."""
    out = frames.clone()
    colour = w.PALETTE[clips.colours[clip, sprite]] * 2 - 1
    for t in range(from_frame, frames.shape[1]):
        mask = (frames[clip, t] - colour).norm(dim=-1) < 0.3
        bg = m.background_colour(frames[clip : clip + 1])[0]
        out[clip, t][mask] = bg
        moved = torch.roll(mask, dx, dims=1)
        out[clip, t][moved] = colour
    return out


def test_position_error_is_zero_on_the_simulation_and_grows_with_a_teleport(clips, truth):
    per_clip, per_frame = m.position_error(truth, truth, clips)
    assert per_clip.abs().max() == 0 and per_frame.shape == (FRAMES,)
    errors = [
        m.position_error(m.detect(shift_sprite(clips.frames, clips, 0, 0, 10, dx)), truth, clips)[0][0]
        for dx in (2, 5, 10)
    ]
    assert 0 < errors[0] < errors[1] < errors[2]


def test_physics_residual_is_small_on_the_simulation_and_grows_with_a_jump(clips, truth):
    clean = m.physics_residual(truth)
    assert clean.nanmean() < 0.15
    # One sprite jumps forward mid-air by dx for a single frame: an impossible acceleration.
    residuals = []
    for dx in (2, 4, 8):
        frames = clips.frames.clone()
        jumped = shift_sprite(clips.frames, clips, 0, 0, 20, dx)
        frames[0, 20] = jumped[0, 20]
        residuals.append(m.physics_residual(m.detect(frames))[0])
    assert clean[0] < residuals[0] < residuals[1] < residuals[2]


def test_speed_ratio_is_one_and_halves_with_duplicated_frames(clips, truth):
    assert torch.allclose(m.speed_ratio(truth, truth).nanmean(), torch.tensor(1.0))
    ratios = []
    for repeat in (2, 4):
        slowed = clips.frames[:, : FRAMES // repeat].repeat_interleave(repeat, dim=1)
        ratios.append(m.speed_ratio(m.detect(slowed), truth).nanmean().item())
    assert ratios[0] == pytest.approx(1 / 2, abs=0.1) and ratios[1] == pytest.approx(1 / 4, abs=0.1)


def recolour(frames, clips, clip, sprite, from_frame, new_colour):
    out = frames.clone()
    colour = w.PALETTE[clips.colours[clip, sprite]] * 2 - 1
    for t in range(from_frame, frames.shape[1]):
        mask = (frames[clip, t] - colour).norm(dim=-1) < 0.6
        out[clip, t][mask] = w.PALETTE[new_colour] * 2 - 1
    return out


def test_identity_failures_are_zero_on_the_simulation_and_count_swaps(clips, truth):
    assert not m.identity_failures(truth, clips).any()
    assert not m.identity_failures(truth).any()
    unused = [k for k in range(6) if k not in clips.colours[:, :].flatten().tolist()[:3]]
    rates = []
    frames = clips.frames
    for clip in range(4):  # swap one sprite's colour in 1, 2, 3, 4 clips: the rate follows
        spare = next(k for k in range(6) if k not in clips.colours[clip].tolist())
        frames = recolour(frames, clips, clip, 0, 10, spare)
        rates.append(m.identity_failures(m.detect(frames), clips).float().mean().item())
    assert rates == sorted(rates) and rates[0] > 0 and rates[-1] == pytest.approx(4 / CLIPS)
    assert unused is not None


def test_occlusion_recall_is_full_on_the_simulation_and_falls_when_the_wrong_colour_comes_out():
    clips = w.render_clips(0, "eval", range(48), 48)
    events = w.occlusions(clips)
    truth = m.detect(clips.frames)
    recall = m.occlusion_recall(truth, clips, events)
    assert sum(n for _, n in recall.values()) > 10
    assert all(hit == n for hit, n in recall.values())
    frames = clips.frames
    wrong = [e for e in events if e.reappears + 3 < 48][:6]
    for e in wrong:  # the sprite comes out in another colour
        spare = next(k for k in range(6) if k not in clips.colours[e.clip].tolist())
        frames = recolour(frames, clips, e.clip, e.sprite, e.reappears, spare)
    after = m.occlusion_recall(m.detect(frames), clips, events)
    assert sum(h for h, _ in after.values()) <= sum(h for h, _ in recall.values()) - len(wrong)


def test_flicker_off_palette_psnr_ssim(clips):
    assert m.flicker(clips.frames).max() < 1e-3
    flickers = [
        m.flicker(clips.frames + s * torch.randn(clips.frames.shape, generator=torch.Generator().manual_seed(1))).mean()
        for s in (0.01, 0.03, 0.06)
    ]
    assert flickers[0] < flickers[1] < flickers[2]
    assert m.off_palette_rate(clips.frames).max() == 0
    # Washed-out sprites (their colour half way to gray) in the first n frames of every clip.
    palette = w.PALETTE * 2 - 1
    sprite = ((clips.frames.unsqueeze(-2) - palette).norm(dim=-1) < 0.3).any(dim=-1, keepdim=True)
    washed = torch.where(sprite, 0.5 * clips.frames, clips.frames)
    rates = []
    for n in (5, 10, 20):
        frames = clips.frames.clone()
        frames[:, :n] = washed[:, :n]
        rates.append(m.off_palette_rate(frames).mean())
    assert 0 < rates[0] < rates[1] < rates[2]
    assert (m.psnr(clips.frames, clips.frames) > 90).all()
    assert torch.allclose(m.ssim(clips.frames, clips.frames), torch.ones(CLIPS), atol=1e-5)
    worse = [m.ssim(noisy_blurred(clips.frames, s), clips.frames).mean() for s in (0.02, 0.1, 0.3)]
    assert 1 > worse[0] > worse[1] > worse[2]


# --- the decision rules ---


def test_paired_bootstrap_interval_covers_the_true_difference():
    rng = np.random.default_rng(0)
    base = rng.normal(size=400)
    mean, lo, hi = v.paired_ci(base + 0.5 + rng.normal(scale=0.1, size=400), base)
    assert lo < 0.5 < hi and hi - lo < 0.05 and mean == pytest.approx(0.5, abs=0.02)


def arms_with(d_shift: float, n: int = 200, seed: int = 0):
    """Synthetic per-clip metrics: untuned dense far worse, the two dense LoRA seeds alike, radial
    LoRA dense LoRA plus `d_shift`."""
    rng = np.random.default_rng(seed)
    base = {metric: rng.normal(1.0, 0.2, size=n) for metric in v.PRIMARY}
    arm = lambda shift, s: {k: x + shift + rng.normal(0, 0.01, size=n) for k, x in base.items()}  # noqa: E731
    return {
        "a": arm(1.0, 0),
        "b": arm(0.8, 0),
        "c0": arm(0.0, 0),
        "c1": arm(0.0, 1),
        "d0": arm(d_shift, 0),
        "d1": arm(d_shift, 1),
    }


GOOD_GATES = v.Gates(0.5, 0.01, 0.3, 0.95, 0.97)


def test_decide_confirms_refutes_and_stays_inconclusive_as_registered():
    fast = {"c0": 2.0, "d0": 1.0}
    assert v.decide(arms_with(0.0), GOOD_GATES, fast).verdict == "confirmed"
    assert v.decide(arms_with(0.5), GOOD_GATES, fast).verdict == "refuted"
    bad_base = v.Gates(3.0, 0.01, 0.3, 0.95, 0.97)  # G1 fails: the base model is not good at L
    assert v.decide(arms_with(0.0), bad_base, fast).verdict == "inconclusive"
    assert v.decide(arms_with(0.0), GOOD_GATES, {"c0": 1.0, "d0": 2.0}).verdict == "inconclusive"


# --- the masks the arms run ---


def test_the_arms_masks_at_the_experiments_shapes():
    from radial_lora.kernels.local_mask import local_block_mask
    from radial_lora.kernels.radial_mask import block_density, radial_block_mask

    # 256 tokens a frame (64x64 pixels in 4x4 patches), block 64: a frame is 4 blocks.
    radial = {f: block_density(radial_block_mask(f, 256, block_size=64, decay=0.2)) for f in (17, 65)}
    assert radial == pytest.approx({17: 0.500, 65: 0.206}, abs=5e-4)
    local = local_block_mask(65, 256, block_size=64, window=6)
    assert abs(block_density(local) - radial[65]) < 0.01  # the control: the same density
    # At token level: frame i sees frame j iff |i - j| <= 6 or j == 0.
    frame = torch.arange(65 * 256 // 64) // 4
    expected = ((frame[:, None] - frame[None, :]).abs() <= 6) | (frame[None, :] == 0)
    assert torch.equal(local, expected)


def test_pattern_local_reaches_the_attention(tmp_path):
    from diffusers import WanPipeline

    from radial_lora.configs.schema import AttentionConfig
    from radial_lora.kernels.local_mask import local_block_mask
    from radial_lora.models.attention import describe, set_self_attention
    from radial_lora.models.pixel_wan import build_pixel_wan

    transformer = WanPipeline.from_pretrained(str(build_pixel_wan(tmp_path / "pw", preset="toy"))).transformer
    cfg = AttentionConfig(backend="reference", block_size=64, pattern="local", local_window=1)
    routing = set_self_attention(transformer, cfg)
    assert "2 layers local (+-1 frames) on reference" in describe(transformer)
    with torch.no_grad():
        transformer(torch.zeros(1, 3, 5, 64, 64), torch.tensor([500.0]), torch.zeros(1, 8, 32), return_dict=False)
    assert torch.equal(routing.masks[0], local_block_mask(5, 256, block_size=64, window=1))
    assert routing.calls["radial"] == 2


# --- the phases, end to end at toy size ---


@pytest.mark.slow
def test_the_experiments_phases_run_end_to_end_at_toy_size(tmp_path):
    """calibrate -> pretrain -> pilot -> arms -> evaluate (with check) -> report through the project's trainer,
    at CPU size (a few steps: the numbers mean nothing, the plumbing and the report's shape do)."""
    from radial_lora.scripts.length_extension import run

    folder = tmp_path / "le"
    for phase in (["calibrate"], ["pretrain"], ["pilot"], ["arms", "--only", "c0", "d0"]):
        run.main([*phase, "--dir", str(folder), "--toy"])
    run.main(["evaluate", "--dir", str(folder), "--toy", "--only", "base_L", "a", "c0", "d0"])
    run.main(["report", "--dir", str(folder), "--toy"])
    plan = json.loads((folder / "plan.json").read_text())
    assert plan["lr"] in run.PILOT_LRS and plan["step_s"]["pretrain"] > 0
    # The sampler's shift was chosen on the base at L (tuning clips) before any arm was scored.
    assert plan["sample_shift"] in run.SAMPLE_SHIFTS and plan["checks"][0]["pretrained_steps"] == 6
    assert set(plan["checks"][0]["by_shift"]) == {f"{x:g}" for x in run.SAMPLE_SHIFTS}
    for arm in ("base_L", "a", "c0", "d0"):
        with np.load(folder / "results" / f"{arm}.npz") as data:
            assert data["rollouts"].dtype == np.uint8 and data["rollouts"].shape[1] == (5 if arm == "base_L" else 17)
            assert np.isfinite(data["heldout_loss"]).all() and np.isfinite(data["position_error"]).all()
            assert data["position_error"].shape == (3,)
    report = (folder / "report/report.md").read_text()
    assert "| radial LoRA, seed 0 |" in report and "| dense LoRA, seed 0 |" in report
    assert "Verdict: not reached (arms missing: b, c1, d1)" in report
    assert (folder / "report/position_error_by_frame.png").stat().st_size > 5000
    assert (folder / "report/rollout_d0.mp4").stat().st_size > 0
    # The base model travels in bf16 parts of at most 15 MiB, and the plan with it.
    run.main(["pack", "--dir", str(folder), "--toy", "--to", str(tmp_path / "parts")])
    assert all(p.stat().st_size <= run.PART for p in (tmp_path / "parts").glob("base.tar.part*"))
    run.main(["unpack", "--dir", str(tmp_path / "elsewhere"), "--toy", "--source", str(tmp_path / "parts")])
    elsewhere = tmp_path / "elsewhere"
    carried = json.loads((elsewhere / "plan.json").read_text())
    assert carried["pretrained_steps"] == 6 and carried["lr"] == plan["lr"]
    assert (elsewhere / "outputs/sprites_base/model/transformer/config.json").exists()
    # On a fresh machine pretraining goes on from the carried weights, for the steps left.
    carried["pretrained_steps"] = 4
    (elsewhere / "plan.json").write_text(json.dumps(carried))
    run.main(["pretrain", "--dir", str(elsewhere), "--toy"])
    log = (elsewhere / "pretrain.log").read_text()
    from omegaconf import OmegaConf

    started = OmegaConf.load(elsewhere / "outputs/sprites_base/config.yaml")
    assert started.model.path == str(elsewhere / "outputs/sprites_start/model") and started.optim.warmup_steps == 100
    assert "Model exported to" in log and (elsewhere / "outputs/sprites_base/checkpoints/step_000002").exists()
    # The energy probe (gate G2) of a carried base, whose training config stayed behind.
    fresh = tmp_path / "fresh"
    run.main(["unpack", "--dir", str(fresh), "--toy", "--source", str(tmp_path / "parts")])
    run.energy(fresh, run.settings(True))
    assert 0 < json.loads((fresh / "plan.json").read_text())["radial_mass_at_L"] <= 1


# --- the energy-decay tool ---


def planted_scores(a: float, c: float, frames=16, h=4, w=4, queries=128):
    """Post-softmax rows whose logits fall by `a` a frame and `c` a grid step: a known decay."""
    from radial_lora.models.attention_probe import sample_queries

    s = h * w
    idx = torch.arange(frames * s)
    frame, pos = idx // s, idx % s
    dt = (frame[:, None] - frame[None]).abs().float()
    ds = torch.sqrt(((pos // w)[:, None] - (pos // w)[None]) ** 2 + ((pos % w)[:, None] - (pos % w)[None]) ** 2.0)
    q = sample_queries(frames, s, queries, 0)
    return torch.softmax((-a * dt - c * ds)[q], dim=-1)[None], q, (frames, h, w)


def test_the_energy_probe_recovers_a_planted_decay_and_the_kept_mass_identity():
    from radial_lora.models.attention_probe import fit_exponential, head_statistics

    scores, queries, grid = planted_scores(0.7, 0.5)
    S = scores.shape[-1]
    nb = S // 16
    dense = torch.ones(nb, nb, dtype=torch.bool)
    local = (torch.arange(nb)[:, None] - torch.arange(nb)[None]).abs() <= 2
    (row,) = head_statistics(scores, torch.randn(1, S, 8), queries, grid, {"dense": dense, "local": local}, 16)
    fit = fit_exponential(np.arange(grid[0]), np.array(row["temporal_profile"]))
    assert fit["a"] == pytest.approx(0.7, rel=0.05) and fit["r2"] > 0.99
    assert fit_exponential(np.arange(len(row["spatial_profile"])), np.array(row["spatial_profile"]))["r2"] > 0.95
    assert row["kept_mass_dense"] == pytest.approx(1.0, abs=1e-6) and row["output_error_dense"] < 1e-6
    assert 0.5 < row["kept_mass_local"] < 1
    assert row["l1_local"] == pytest.approx(2 * (1 - row["kept_mass_local"]), abs=1e-5)  # ||p' - p||_1 = 2(1 - m)
    # A head whose mass stays in its own frame is spatial; one spread along time, temporal.
    assert row["label"] == "temporal"
    (within,) = head_statistics(planted_scores(5.0, 0.1)[0], torch.randn(1, S, 8), queries, grid, {}, 16)
    assert within["label"] == "spatial"


def test_the_energy_tool_runs_on_a_toy_wan_on_cpu(tmp_path):
    from radial_lora.scripts import attention_energy

    summary = attention_energy.main(
        [
            "+experiment=sprites_base",
            "model=pixel_wan_toy",
            "data.frames=[5]",
            "attention.block_size=64",
            f"cache_dir={tmp_path / 'cache'}",
            "--queries",
            "32",
            "--sigmas",
            "0.3",
            "0.8",
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    )
    record = json.loads((tmp_path / "out/attention_energy.json").read_text())
    assert len(record["rows"]) == 2 * 2 * 2  # layers x heads x noise levels
    assert summary["kept_mass_radial"] <= 1 and summary["spatial_heads"] >= 0
    assert len(summary["temporal_profile"]) == 5 and (tmp_path / "out/attention_energy.png").stat().st_size > 5000


def test_the_sampler_follows_the_flow_to_the_clip_an_oracle_points_at():
    """With the exact velocity of a straight path to x0 (what a perfect model predicts), Euler
    steps from noise end at x0, and given frames stay as given with their timestep at 0."""
    from types import SimpleNamespace

    from radial_lora.scripts.length_extension.sample import sample

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 5, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    seen = []

    class Oracle(torch.nn.Module):
        config = SimpleNamespace(patch_size=(1, 4, 4))

        def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False):
            seen.append(timestep)
            sigma = (timestep if timestep.ndim == 1 else timestep[:, -1]) / 1000
            return ((hidden_states - x0) / sigma.view(-1, 1, 1, 1, 1)).unsqueeze(0)

    out = sample(Oracle(), torch.zeros(2, 1, 4), noise, steps=7)
    assert torch.allclose(out, x0.clamp(-1, 1), atol=1e-5)
    given = x0[:, :, :2]
    out = sample(Oracle(), torch.zeros(2, 1, 4), noise, given=given, steps=7)
    assert torch.equal(out[:, :, :2], given) and torch.allclose(out, x0, atol=1e-5)
    per_token = seen[-1]
    assert per_token.shape == (2, 5 * 4) and (per_token[:, :8] == 0).all() and (per_token[:, 8:] > 0).all()
