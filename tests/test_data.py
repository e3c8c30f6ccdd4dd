"""Data: decoding with decord, sampling by timestamps, buckets, formats, the bad-input policy,
the distributed bucket sampler, and the latent cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from radial_lora.data.catalog import build_catalog, choose_size
from radial_lora.data.dataset import BucketBatchSampler, ClipDataset, collate
from radial_lora.data.sources import read_source
from radial_lora.data.video import BadVideo, clip_indices, decode_clip, resize_center_crop

HERE = Path(__file__).resolve().parent
GOOD = ["h264.mp4", "mpeg4.mp4", "vp9.webm", "portrait.mp4", "odd_size.mp4", "fps30.mp4", "long.mp4", "vfr.mp4"]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    subprocess.run([sys.executable, str(HERE / "make_videos.py"), str(root)], check=True)
    return root, json.loads((root / "expect.json").read_text())


def catalog_of(path, **kw):
    kw = {"fps": 16.0, "frames": [33, 17], "sizes": [(64, 96), (112, 64)], **kw}
    return build_catalog([str(path)], **kw)


def brightness(frames: torch.Tensor) -> list[int]:
    """The frame numbers (mod 32) written into make_videos' frames (8*i in the top-left quarter)."""
    h, w = frames.shape[1] // 4, frames.shape[2] // 4
    return [round(v / 8) for v in frames[:, :h, :w].float().mean(dim=(1, 2, 3)).tolist()]


def test_demo_dataset_is_real_h264_with_captions(demo_videos_dir):
    import av
    import decord

    entries = read_source(demo_videos_dir)
    assert len(entries) == 24
    for entry in entries:
        assert entry.problem is None and entry.caption.startswith("a ")
        with av.open(entry.video) as container:
            assert container.streams.video[0].codec_context.name == "h264"
        reader = decord.VideoReader(entry.video)
        assert 33 <= len(reader) <= 65 and reader[0].shape == (64, 64, 3)


def test_synthetic_videos_command_writes_clips_of_the_asked_length(tmp_path, capsys):
    import decord

    from radial_lora.scripts.synthetic_videos import main

    main([str(tmp_path / "long"), "--clips", "2", "--frames", "81", "83", "--size", "32"])
    assert "2 clips in" in capsys.readouterr().out
    entries = read_source(tmp_path / "long")
    assert len(entries) == 2 and all(e.problem is None for e in entries)
    assert all(81 <= len(decord.VideoReader(e.video)) <= 83 for e in entries)
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--frames", "9", "5"])


def test_decoded_frames_match_what_was_encoded(corpus):
    root, _ = corpus
    clip = decode_clip(str(root / "h264.mp4"), 21, 64, 96, fps=None)
    assert clip.shape == (21, 64, 96, 3) and clip.dtype == torch.uint8
    assert brightness(clip) == list(range(21))


def test_every_input_is_usable_or_rejected_for_its_reason(corpus):
    root, expect = corpus
    catalog = catalog_of(root)
    usable = {Path(c.video).name for c in catalog.clips}
    assert usable == {n for n in GOOD if "skipped_encoder" not in expect[n]}
    rejected = {Path(p).name: r for p, r in catalog.rejected.items()}
    assert rejected.pop("truncated.mp4") in {"unreadable", "truncated", "too_short"}
    assert rejected == {
        "short.mp4": "too_short",
        "no_caption.mp4": "missing_caption",
        "empty_caption.mp4": "empty_caption",
        "latin1_caption.mp4": "caption_not_utf8",
        "zero.mp4": "empty_file",
        "garbage.mp4": "unreadable",
    }
    assert sum(catalog.counts.values()) == 7


def test_several_codecs_decode(corpus):
    root, expect = corpus
    for name in ("h264.mp4", "mpeg4.mp4", "vp9.webm"):
        if "skipped_encoder" in expect[name]:
            continue  # this PyAV build has no such encoder
        clip = decode_clip(str(root / name), 17, 64, 96, fps=16.0)
        assert brightness(clip) == list(range(17)), name


def test_buckets_by_aspect_and_length(corpus):
    root, _ = corpus
    buckets = {Path(c.video).name: c.bucket for c in catalog_of(root, frames=[65, 33]).clips}
    assert buckets["portrait.mp4"] == (33, 112, 64)  # 40 frames at 16 fps: too short for 65
    assert buckets["odd_size.mp4"] == (33, 64, 96)  # 50x78 is closest to 64x96
    assert buckets["long.mp4"] == (65, 64, 96)  # 400 frames: the longest clip
    strict = catalog_of(root, frames=[65, 33], too_short="skip")
    assert {Path(c.video).name for c in strict.clips} == {"long.mp4", "vfr.mp4"}  # vfr: 4.1 s
    assert choose_size(1920, 1080, [(480, 832), (832, 480), (624, 624)]) == (480, 832)


def test_variable_frame_rate_is_sampled_by_timestamps(corpus):
    root, expect = corpus
    starts = np.asarray(expect["vfr.mp4"]["timestamps"])
    clip = decode_clip(str(root / "vfr.mp4"), 17, 64, 96, fps=10.0)  # 1.6 s from the start
    shown = [int(np.searchsorted(starts, k / 10 + 1e-6, side="right") - 1) for k in range(17)]
    assert brightness(clip) == shown
    assert len(set(shown)) < 17 < len(range(shown[0], shown[-1] + 1))  # repeats and skips frames


def test_frame_rate_conversion(corpus):
    root, _ = corpus
    clip = decode_clip(str(root / "fps30.mp4"), 33, 48, 64, fps=16.0)  # 30 fps source
    assert brightness(clip) == [int(k * 30 / 16 + 1e-6) % 32 for k in range(33)]  # brightness wraps at 32


def test_windows_random_per_epoch_fixed_for_validation(corpus):
    root, _ = corpus
    clips = catalog_of(root, frames=[33]).clips
    long = next(i for i, c in enumerate(clips) if c.video.endswith("long.mp4"))
    train = ClipDataset(clips, fps=16.0, seed=3)
    a, b, c = train[(long, 0)], train[(long, 0)], train[(long, 1)]
    assert torch.equal(a["frames"], b["frames"]) and not torch.equal(a["frames"], c["frames"])
    val = ClipDataset(clips, fps=16.0, random_window=False)
    assert brightness(val[(long, 0)]["frames"])[:3] == [0, 1, 2] == brightness(val[(long, 5)]["frames"])[:3]


def test_clip_indices_too_short():
    with pytest.raises(BadVideo, match="too_short"):
        clip_indices(np.arange(10) / 16, 33, 16.0, None)


def test_sizes_decords_scaler_cannot_make_still_decode(demo_videos_dir):
    """decord 0.6 fails its own copy for some scaled widths (a 64x64 source to 48x48, say): the clip
    is decoded at the source size and resized instead, exactly as without scaling, not rejected."""
    clip = str(sorted(demo_videos_dir.glob("*.mp4"))[0])
    for height, width in ((48, 48), (16, 16), (32, 32)):
        scaled = decode_clip(clip, 9, height, width, fps=16.0, rng=np.random.default_rng(3), source_size=(64, 64))
        plain = decode_clip(clip, 9, height, width, fps=16.0, rng=np.random.default_rng(3))
        assert scaled.shape == (9, height, width, 3)
        if (height, width) != (32, 32):  # these went through the fallback: bit-identical to plain
            assert torch.equal(scaled, plain)
        else:  # FFmpeg's scaler (works at this size) and torch's resize differ by rounding only
            assert (scaled.float() - plain.float()).abs().mean() < 8


def test_resize_center_crop_keeps_the_centre():
    frames = torch.zeros(1, 40, 80, 3, dtype=torch.uint8)
    frames[:, :, 20:60] = 255  # a white band in the middle half of a wide frame
    out = resize_center_crop(frames, 32, 32)
    assert out.shape == (1, 32, 32, 3) and out.float().mean() > 200


def test_csv_and_jsonl_metadata(corpus, tmp_path):
    root, _ = corpus
    sub = tmp_path / "meta"
    sub.mkdir()
    rel = os.path.relpath(root, sub)
    (sub / "metadata.csv").write_text(
        f'video,caption\n{rel}/h264.mp4,"a clip, with a comma"\n{rel}/gone.mp4,missing\n{rel}/long.mp4,\n'
    )
    catalog = build_catalog([str(sub / "metadata.csv")], fps=16.0, frames=[17], sizes=[(64, 96)])
    assert [(Path(c.video).name, c.caption) for c in catalog.clips] == [("h264.mp4", "a clip, with a comma")]
    assert dict(catalog.counts) == {"missing_file": 1, "empty_caption": 1}

    lines = [json.dumps({"video": f"{rel}/vfr.mp4", "caption": "vfr"}), "{not json", json.dumps({"caption": "x"})]
    (sub / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    catalog = build_catalog([str(sub / "metadata.jsonl")], fps=16.0, frames=[17], sizes=[(64, 96)])
    assert [Path(c.video).name for c in catalog.clips] == ["vfr.mp4"]
    assert dict(catalog.counts) == {"bad_metadata_row": 2}


def test_mixing_weights(corpus):
    root, _ = corpus
    clips = catalog_of(root, frames=[17], sizes=[(64, 96)]).clips
    # Pretend the clips come from two datasets; the second weighted 3x.
    sources = [i % 2 for i in range(len(clips))]
    sampler = BucketBatchSampler([c.bucket for c in clips], 1, seed=0, sources=sources, weights=[1.0, 3.0])
    drawn = [sources[i] for b in sampler.epoch_batches(0) for i, _ in b]
    assert drawn.count(1) == 3 * drawn.count(0)


def test_sampler_over_two_ranks():
    buckets = [(33, 64, 96)] * 10 + [(17, 64, 96)] * 7 + [(33, 112, 64)] * 3
    ranks = [BucketBatchSampler(buckets, 2, seed=1, rank=r, world_size=2) for r in (0, 1)]
    for epoch in (0, 1):
        mine = [r.epoch_batches(epoch) for r in ranks]
        assert len(mine[0]) == len(mine[1]) > 0
        keys = [k for batches in mine for b in batches for k in b]
        assert len(keys) == len(set(keys))  # disjoint
        for batches in mine:
            for b in batches:
                assert len(b) == 2 and len({buckets[i] for i, _ in b}) == 1  # one bucket per batch
    assert ranks[0].epoch_batches(0) != ranks[0].epoch_batches(1)
    again = BucketBatchSampler(buckets, 2, seed=1, rank=0, world_size=2)
    assert again.epoch_batches(0) == ranks[0].epoch_batches(0)


def test_global_batches_do_not_depend_on_the_process_count():
    buckets = [(33, 64, 96)] * 10 + [(17, 64, 96)] * 7
    one = BucketBatchSampler(buckets, 4, seed=5).epoch_batches(2)
    four = [BucketBatchSampler(buckets, 1, seed=5, rank=r, world_size=4).epoch_batches(2) for r in range(4)]
    assert [sum((ranks[t] for ranks in four), []) for t in range(len(one))] == one


def test_sampler_resumes_mid_epoch():
    buckets = [(33, 64, 96)] * 13 + [(17, 64, 96)] * 11
    it = iter(BucketBatchSampler(buckets, 2, seed=0))
    full = [next(it) for _ in range(40)]  # 11 batches per epoch: crosses epochs
    it = iter(BucketBatchSampler(buckets, 2, seed=0, start=17))
    assert [next(it) for _ in range(23)] == full[17:]


def test_sampler_refuses_too_few_clips():
    with pytest.raises(ValueError, match="enough clips for one batch of 4"):
        BucketBatchSampler([(17, 64, 96)] * 3, 4, seed=0)


def test_a_clip_failing_mid_run_costs_one_sample(corpus, tmp_path):
    root, _ = corpus
    work = tmp_path / "clips"
    work.mkdir()
    for name in ("h264.mp4", "mpeg4.mp4", "long.mp4"):
        (work / name).write_bytes((root / name).read_bytes())
        (work / name).with_suffix(".txt").write_text(name)
    clips = catalog_of(work, frames=[17], sizes=[(64, 96)]).clips
    (work / "mpeg4.mp4").write_bytes(b"")  # broken after the catalog was built
    broken = next(i for i, c in enumerate(clips) if c.video.endswith("mpeg4.mp4"))
    sample = ClipDataset(clips, fps=16.0)[(broken, 0)]
    assert sample["skipped"] == [(str((work / "mpeg4.mp4").resolve()), "empty_file")]
    assert sample["frames"].shape == (17, 64, 96, 3) and sample["caption"] != "mpeg4.mp4"
    assert collate([sample, sample])["skipped"] == sample["skipped"] * 2
    with pytest.raises(RuntimeError, match=r"mpeg4\.mp4.*on_error=raise"):
        ClipDataset(clips, fps=16.0, on_error="raise")[(broken, 0)]


def run_inspect(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scripts.inspect_data", *args], capture_output=True, text=True, cwd=HERE.parent
    )


def test_inspect_reports_usable_and_rejects(corpus, tmp_path):
    root, _ = corpus
    proc = run_inspect(str(root), "--json", "--frames", "33", "17", "--sizes", "64x96", "112x64")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["usable"] == len(catalog_of(root).clips)
    assert report["rejected"]["too_short"] == 1 and report["rejected"]["empty_file"] == 1
    assert report["files"][str((root / "garbage.mp4").resolve())] == "unreadable"
    text = run_inspect(str(root), "--frames", "17")
    assert text.returncode == 0 and "usable clips" in text.stdout and "missing_caption" in text.stdout

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.mp4").write_bytes(b"")
    (bad / "zero.txt").write_text("x")
    proc = run_inspect(str(bad), "--json")
    assert proc.returncode == 1 and json.loads(proc.stdout) == {
        "usable": 0,
        "rejected": {"empty_file": 1},
        "files": {str((bad / "zero.mp4").resolve()): "empty_file"},
        "settings": {
            "fps": 16.0,
            "frames": [81],
            "sizes": [[480, 832], [832, 480], [624, 624]],
            "too_short": "shorter",
        },
    }  # (the videos data group's settings: what training on your videos uses)


def test_odd_entries_are_rejected_by_reason_and_counted(demo_videos_dir, tmp_path):
    """What a real folder or metadata file holds besides good clips: an unreadable caption, a folder
    named like a caption or a video, a broken link, the same video listed twice. Each is one
    counted reject with its reason, never a crash and never dropped without a word."""
    import shutil

    root = tmp_path / "odd"
    root.mkdir()
    clips = sorted(demo_videos_dir.glob("*.mp4"))[:4]
    for clip in clips:
        shutil.copy(clip, root / clip.name)
        shutil.copy(clip.with_suffix(".txt"), root / clip.with_suffix(".txt").name)
    (root / clips[0].with_suffix(".txt").name).unlink()
    (root / clips[0].with_suffix(".txt").name).mkdir()  # a folder named x.txt
    (root / "folder.mp4").mkdir()  # a folder named like a video
    (root / "gone.mp4").symlink_to(root / "nowhere.mp4")  # a broken link
    locked = root / clips[1].with_suffix(".txt").name
    locked.chmod(0)  # no permission (root reads it anyway: then it is a good caption)
    catalog = catalog_of(root)
    expected_caption = "caption_unreadable" if not os.access(locked, os.R_OK) else None
    assert catalog.rejected[str((root / clips[0].name).resolve())] == "caption_unreadable"
    assert catalog.rejected[str(root / "folder.mp4")] == "not_a_file"
    assert catalog.rejected[str(root / "gone.mp4")] == "broken_link"
    assert catalog.rejected.get(str((root / clips[1].name).resolve())) == expected_caption
    locked.chmod(0o644)

    metadata = tmp_path / "metadata.jsonl"
    rows = [
        {"video": str(clips[2]), "caption": "a"},
        {"video": str(clips[3]), "caption": "b"},
        {"video": str(clips[2]), "caption": "a again"},
    ]
    metadata.write_text("".join(json.dumps(r) + "\n" for r in rows))
    catalog = catalog_of(metadata)
    assert len(catalog.clips) == 2 and catalog.counts["duplicate"] == 1
    assert [c.caption for c in catalog.clips if c.video == str(clips[2].resolve())] == ["a"]  # the first kept
