"""Decoding the demo clips with decord; the deterministic, sharded, resumable batch order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.dataset import ClipBatchSampler, VideoCaptionDataset, collate, find_videos
from data.demo_videos import render_clip, write_mp4
from data.video import clip_window, decode_clip, resize_center_crop


def test_demo_dataset_is_real_h264_with_captions(demo_videos_dir):
    import av
    import decord

    items = find_videos(demo_videos_dir)
    assert len(items) == 24
    for video, caption in items:
        assert caption and caption.startswith("a ")
        with av.open(str(video)) as container:
            assert container.streams.video[0].codec_context.name == "h264"
        reader = decord.VideoReader(str(video))
        assert 33 <= len(reader) <= 65
        assert reader[0].shape == (64, 64, 3)


def test_decode_clip_shape_and_frame_count(demo_videos_dir):
    video, _ = find_videos(demo_videos_dir)[0]
    clip = decode_clip(str(video), num_frames=17, height=32, width=48, stride=2, rng=np.random.default_rng(0))
    assert clip.shape == (17, 32, 48, 3) and clip.dtype == torch.uint8


def test_decoded_frames_match_what_was_encoded(tmp_path):
    frames = render_clip("square", (230, 40, 40), (10, 10, 10), (1, 0), num_frames=21, size=64, speed=1.5)
    write_mp4(tmp_path / "c.mp4", frames, fps=16)
    clip = decode_clip(str(tmp_path / "c.mp4"), num_frames=21, height=64, width=64)
    # H.264 is lossy: compare the mean absolute error, which is large for any wrong frame.
    err = (clip.float() - torch.from_numpy(frames).float()).abs().mean(dim=(1, 2, 3))
    assert err.max() < 6, err


def test_clip_window():
    assert clip_window(10, 5, 2, None) == [0, 2, 4, 6, 8]
    rng = np.random.default_rng(0)
    starts = {clip_window(100, 5, 1, rng)[0] for _ in range(50)}
    assert len(starts) > 10 and max(starts) <= 95
    with pytest.raises(ValueError, match="clip needs 9"):
        clip_window(8, 5, 2, None)


def test_resize_center_crop_keeps_the_centre():
    frames = torch.zeros(1, 40, 80, 3, dtype=torch.uint8)
    frames[:, :, 20:60] = 255  # a white band in the middle half of a wide frame
    out = resize_center_crop(frames, 32, 32)
    assert out.shape == (1, 32, 32, 3)
    assert out.float().mean() > 200  # the crop of the centre is (almost) all band


def test_dataset_windows_depend_on_epoch_not_worker(demo_videos_dir):
    ds = VideoCaptionDataset(demo_videos_dir, num_frames=9, height=32, width=32)
    a, b, c = ds[(3, 0)], ds[(3, 0)], ds[(3, 1)]
    assert torch.equal(a["frames"], b["frames"])
    assert not torch.equal(a["frames"], c["frames"])  # another epoch, another window
    batch = collate([a, c])
    assert batch["frames"].shape == (2, 9, 32, 32, 3) and len(batch["captions"]) == 2


def take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_sampler_shards_are_disjoint_equal_and_cover_an_epoch():
    r0 = ClipBatchSampler(10, 2, seed=1, rank=0, world_size=2)
    r1 = ClipBatchSampler(10, 2, seed=1, rank=1, world_size=2)
    assert r0.batches_per_epoch == r1.batches_per_epoch == 2
    e0 = [k for b in r0.epoch_batches(0) for k in b]
    e1 = [k for b in r1.epoch_batches(0) for k in b]
    assert not set(e0) & set(e1) and len(set(e0 + e1)) == 8
    assert r0.epoch_batches(0) != r0.epoch_batches(1)


def test_sampler_resumes_mid_epoch():
    full = take(ClipBatchSampler(24, 2, seed=0), 30)  # 12 batches per epoch: crosses two epochs
    resumed = take(ClipBatchSampler(24, 2, seed=0, start=17), 13)
    assert resumed == full[17:]
