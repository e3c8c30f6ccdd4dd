"""What a user's first runs must be able to trust: their videos are never touched, a resumed run
is the run it resumes, an interrupted run saves and says so, and nothing defaults silently."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import DEMO_DATA, REPO, run_train
from omegaconf import OmegaConf
from safetensors.torch import load_file

from radial_lora.data.demo_videos import generate_demo_videos

pytestmark = pytest.mark.slow
FAST = ["data.frames=[9]", "data.sizes=[[32,32]]", "data.batch_size=2", "logger.mode=disabled"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path -> sha256) and every subfolder (-> 'dir')."""
    out = {}
    for p in sorted(folder.rglob("*")):
        out[str(p.relative_to(folder))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def own_videos(tmp_path_factory) -> Path:
    """A user's folder: no .mp4 at its top, a VP9 .webm and an H.264 .mkv in a subfolder, captions,
    and a file that is not a video. Written in a subprocess (PyAV's VP9 encoder and decord's FFmpeg
    do not share a process well: tests/make_videos.py)."""
    root = tmp_path_factory.mktemp("user") / "my videos"
    code = (
        "import sys; from pathlib import Path\n"
        "from radial_lora.data.demo_videos import render_clip, write_mp4\n"
        "root = Path(sys.argv[1]); (root / 'sub').mkdir(parents=True)\n"
        "frames = render_clip('circle', (40, 200, 60), (10, 10, 10), (1, 0), 24, 48, 1.0)\n"
        "write_mp4(root / 'a06_vp9.webm', frames, 16, codec='libvpx-vp9')\n"
        "write_mp4(root / 'sub' / 'a07_h264.mkv', frames, 16)\n"
        "(root / 'a06_vp9.txt').write_text('a green circle moving right\\n')\n"
        "(root / 'sub' / 'a07_h264.txt').write_text('a green circle, again\\n')\n"
        "(root / 'notes.md').write_text('my own notes\\n')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(root)], check=True, timeout=120)
    return root


def test_own_videos_are_read_and_never_touched(own_videos, tmp_path, tiny_model_dir):
    """The README's own-videos command, on a folder the demo generator would once have wiped."""
    before = snapshot(own_videos)
    proc = run_train(
        tmp_path,
        f"data.root={own_videos}",
        f"model.path={tiny_model_dir}",
        *FAST,
        "train.steps=2",
        "data.num_workers=1",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data.root names your videos: using data=videos" in proc.stdout
    assert "data: 2 clips" in proc.stdout  # the .webm and the nested .mkv, not generated clips
    assert snapshot(own_videos) == before  # byte for byte, and nothing added
    assert not (tmp_path / ".cache" / "demo_videos").exists()


def test_a_folder_without_videos_is_a_one_line_error(tmp_path, tiny_model_dir):
    folder = tmp_path / "photos"
    (folder / "2024").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg", "2024/c.jpg", "readme.txt"):
        (folder / name).write_text("x")
    before = snapshot(folder)
    proc = run_train(tmp_path, f"data.root={folder}", f"model.path={tiny_model_dir}", *FAST)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"no videos in {folder}" in line and "4 files (3 .jpg, 1 .txt) in 1 subfolders" in line
    assert snapshot(folder) == before


def test_the_demo_generator_never_writes_into_a_folder_it_did_not_make(own_videos, tmp_path):
    before = snapshot(own_videos)
    with pytest.raises(FileExistsError, match="not made by the demo generator"):
        generate_demo_videos(own_videos, num_clips=1, min_frames=9, max_frames=9, size=32)
    assert snapshot(own_videos) == before
    made = generate_demo_videos(tmp_path / "new", num_clips=2, min_frames=9, max_frames=9, size=32)
    assert generate_demo_videos(made, num_clips=2) == made and len(list(made.glob("*.mp4"))) == 2  # reused
    proc = run_train(tmp_path, "data=demo", f"data.root={own_videos}", *FAST)  # demo clips outside cache_dir
    assert proc.returncode != 0 and "data.demo=true generates clips, only under cache_dir" in proc.stderr
    assert snapshot(own_videos) == before


def test_a_mistyped_model_path_is_an_error_not_a_new_model(tmp_path, demo_videos_dir):
    typo = tmp_path / "modles" / "tiny-wan"
    proc = run_train(tmp_path, f"model.path={typo}", f"data.root={demo_videos_dir}", *FAST)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"model.path={typo} holds no model" in proc.stderr and not typo.parent.exists()


def lora_ranks(run: Path) -> set[int]:
    """The rank of every adapter in a run's exported LoRA (lora_A is [rank, in_features])."""
    weights = load_file(run / "lora" / "pytorch_lora_weights.safetensors")
    return {t.shape[0] for name, t in weights.items() if "lora_A" in name}


def test_resume_continues_the_run_as_it_was(train_cli):
    """Resumed with only name= and train.resume=latest (as the README says): the run's own settings
    (here a rank-4 LoRA and 3 steps), not the defaults; train.steps may grow, and says so; the LoRA
    may not change; the first config and every start's copy stay in the run folder."""
    run = train_cli.cwd / "outputs/r"
    train_cli(*FAST, "name=r", "lora.rank=4", "lora.alpha=4", "train.steps=3", "train.checkpoint_every=3")

    def resume(*overrides):  # exactly the README's command, plus the changes asked for
        return run_train(train_cli.cwd, "name=r", "train.resume=latest", *overrides)

    grown = resume("train.steps=5")
    assert grown.returncode == 0, grown.stderr[-3000:]
    assert "changed on the command line: train.steps: 3 -> 5" in grown.stdout
    assert "Resumed from" in grown.stdout and "at step 3" in grown.stdout
    assert lora_ranks(run) == {4}
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_000005"
    assert OmegaConf.load(run / "config.yaml").train.steps == 3  # the original, kept
    starts = sorted((run / "starts").iterdir())
    assert len(starts) == 2 and OmegaConf.load(starts[1] / "config.yaml").train.steps == 5
    assert "train.steps=5" in OmegaConf.load(starts[1] / "overrides.yaml")

    refused = resume("train.steps=9", "lora.rank=8")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "error: lora.rank: cannot change on resume (4 -> 8)" in refused.stderr
    data = resume("train.steps=9", "data.sizes=[[48,48]]")
    assert data.returncode != 0 and "error: data.sizes: cannot change on resume" in data.stderr


def test_resume_with_nothing_to_resume_says_so(train_cli):
    proc = train_cli(*FAST, "name=nothing", "train.resume=latest", check=False)
    assert proc.returncode != 0 and "holds no checkpoint to resume" in proc.stderr and "Traceback" not in proc.stderr
    fresh = train_cli(*FAST, "name=nothing", "train.resume=auto", "train.steps=1")
    assert "train.resume=auto: no checkpoint in" in fresh.stdout and "starting fresh" in fresh.stdout


def wait_for(path: Path, text: str, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared in {path}")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_to_the_process_group_saves_and_resumes_exactly(sig, train_cli, tiny_model_dir, demo_videos_dir):
    """Ctrl-C in a terminal, and Slurm's scancel, signal every process of the group, DataLoader
    workers included: the run finishes its step, saves, says in its last line that it was
    interrupted and how to go on, and the resumed run ends with the LoRA of an uninterrupted one."""
    common = [*FAST, "train.steps=12", "train.checkpoint_every=0", "data.num_workers=2"]
    straight = train_cli(*common, "name=straight")
    assert straight.returncode == 0
    cwd = train_cli.cwd
    args = [
        sys.executable,
        "-m",
        "radial_lora.train",
        f"model.path={tiny_model_dir}",
        f"data.root={demo_videos_dir}",
        *DEMO_DATA,
        *common,
        "name=cut",
    ]  # what train_cli runs
    with open(cwd / "cut.out", "w") as out, open(cwd / "cut.err", "w") as err:
        # The requeue note a batch script asks for (scripts/slurm/train.sbatch sets this variable).
        env = {**os.environ, "RADIAL_LORA_PREEMPTED_FILE": str(cwd / "preempted")}
        proc = subprocess.Popen(args, cwd=cwd, stdout=out, stderr=err, start_new_session=True, env=env)
        wait_for(cwd / "outputs/cut/train.log", "step 2/12")
        os.killpg(proc.pid, sig)
        code = proc.wait(timeout=300)
    stdout, stderr = (cwd / "cut.out").read_text(), (cwd / "cut.err").read_text()
    assert code == (130 if sig == signal.SIGINT else 0), stderr[-3000:]
    assert "Traceback" not in stderr
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"Interrupted by {signal.Signals(sig).name} at step "), last
    assert last.endswith("continue with: python -m train name=cut train.resume=latest")
    assert not (cwd / "outputs/cut/lora").exists()  # an unfinished run does not look finished
    step = int(last.split(" at step ")[1].split()[0])
    assert step < 12 and (cwd / f"outputs/cut/checkpoints/step_{step:06d}").is_dir()
    assert (cwd / "preempted").read_text() == f"{signal.Signals(sig).name} at step {step}\n"
    train_cli(*common, "name=cut", "train.resume=latest")
    a = load_file(cwd / "outputs/straight/lora/pytorch_lora_weights.safetensors")
    b = load_file(cwd / "outputs/cut/lora/pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_log_holds_the_runs_lines(train_cli):
    train_cli(*FAST, "name=logged", "train.steps=2")
    text = (train_cli.cwd / "outputs/logged/train.log").read_text()
    for needle in ("data: 24 clips", "self-attention:", "step 2/2: loss", "LoRA exported to"):
        assert needle in text, needle


def test_flex_attention_on_cpu_is_a_one_line_error(train_cli):
    proc = train_cli(*FAST, "attention.backend=flex", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "attention.backend=flex: PyTorch's FlexAttention has no backward on CPU" in proc.stderr


def test_help_says_what_each_key_means():
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert "Peak learning rate" in lines["optim.lr"] and "Rank r" in lines["lora.rank"]
    assert "+experiment=" in lines and "wan_4x" in lines["+experiment="]


def test_inspect_checks_with_the_runs_settings(own_videos, tmp_path):
    """scripts.inspect_data with training's overrides, and with a run's saved config: the same clips the
    run sees (its defaults are the videos data group's, not a size of their own)."""

    def inspect(*args):
        return subprocess.run(
            [sys.executable, "-m", "radial_lora.scripts.inspect_data", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )

    default = inspect(str(own_videos))  # videos.yaml: 81 frames at 16 fps, longer than these clips
    assert default.returncode == 1 and "frames [81]" in default.stdout and "too_short" in default.stdout
    short = inspect(str(own_videos), "data.frames=[9]", "data.sizes=[[32,32]]")
    assert short.returncode == 0 and "2 usable clips" in short.stdout and "9 frames at 32x32" in short.stdout
    run = tmp_path / "outputs/x"
    run.mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create({"data": {"root": str(own_videos), "frames": [17], "sizes": [[48, 48]]}}), run / "config.yaml"
    )
    saved = inspect("--run", str(run))
    assert saved.returncode == 0 and "2 usable clips" in saved.stdout and "17 frames at 48x48" in saved.stdout


def test_a_second_ctrl_c_aborts_at_once():
    """The first SIGINT is recorded (the run finishes its step and saves); a second one aborts."""
    code = (
        "import os, signal, time\n"
        "from radial_lora.train.preemption import stop_signals\n"
        "stop = stop_signals()\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
        "print('recorded', stop.received, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "print('not reached', flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130 and proc.stdout == "recorded SIGINT\n"
    assert "second Ctrl-C: aborting without saving" in proc.stderr and "Traceback" not in proc.stderr


class _Payload:
    """Unpickling this creates a file: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_no_code_runs_from_a_checkpoint(train_cli):
    """A crafted pickle where accelerate used to unpickle with weights_only=False (the scheduler and
    train state) is never opened; one in place of a file that is still a pickle (the RNG state,
    loaded weights_only) is refused in one line. Either way the payload never runs."""
    import pickle

    train_cli(*FAST, "name=p", "train.steps=2", "train.checkpoint_every=2")
    ckpt = train_cli.cwd / "outputs/p/checkpoints/step_000002"
    marker = train_cli.cwd / "pwned"
    assert (ckpt / "train_state.json").is_file() and not list(ckpt.glob("custom_checkpoint_*.pkl"))
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):
        (ckpt / name).write_bytes(pickle.dumps(_Payload(marker)))
    resumed = train_cli(*FAST, "name=p", "train.resume=latest", "train.steps=3")
    assert "at step 2" in resumed.stdout and not marker.exists()

    ckpt = train_cli.cwd / "outputs/p/checkpoints/step_000003"
    (ckpt / "random_states_0.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    refused = train_cli(*FAST, "name=p", "train.resume=latest", "train.steps=4", check=False)
    assert refused.returncode != 0 and not marker.exists() and "Traceback" not in refused.stderr
    assert "refused to load a file that holds more than tensors and plain data" in refused.stderr


def test_resume_with_a_lower_learning_rate_uses_it(train_cli):
    """The divergence error's advice, resume "with a lower optim.lr", does what it says: the
    scheduler's saved rate no longer wins."""
    train_cli(*FAST, "name=lr", "train.steps=2", "optim.lr=1e-3", "optim.warmup_steps=0")
    resumed = train_cli(*FAST, "name=lr", "train.resume=latest", "train.steps=4", "optim.lr=1e-5")
    assert "changed on the command line: optim.lr: 0.001 -> 1e-05" in resumed.stdout
    log = (train_cli.cwd / "outputs/lr/train.log").read_text()
    assert "step 4/4:" in log and "lr 1e-05," in log.split("step 4/4:")[1].splitlines()[0]


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB tmpfs: room for one checkpoint of the FAST run (about 0.6 MB) and the run's other
    files, not for a second one beside it. Needs root (CI runs as root)."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1000k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_is_one_line_and_keeps_the_last_checkpoint(train_cli, small_disk):
    proc = train_cli(
        *FAST,
        "name=full",
        f"output_root={small_disk}",
        "train.steps=4",
        "train.checkpoint_every=1",
        "train.keep_last=1",
        check=False,
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "could not write checkpoint step_00000" in line and "No space left on device" in line
    kept = sorted((small_disk / "full/checkpoints").iterdir())
    assert [p.name for p in kept] == ["step_000001"] and (kept[0] / "checkpoint.json").is_file()
    assert "the newest complete checkpoint, step_000001, is intact" in line
    assert (kept[0] / "trainable.safetensors").stat().st_size > 0


def test_resume_on_other_base_weights_is_refused(train_cli, tmp_path):
    """Same architecture, same model.path, other weights (a re-downloaded or swapped checkpoint):
    the checkpoint's fingerprint of the base weights does not match, and resume says so."""
    import shutil

    from radial_lora.models.tiny_wan import build_tiny_wan

    model = tmp_path / "base"
    shutil.copytree(build_tiny_wan(tmp_path / "seed0", seed=0), model)
    train_cli(*FAST, "name=fp", f"model.path={model}", "train.steps=1")
    shutil.rmtree(model)
    shutil.copytree(build_tiny_wan(tmp_path / "seed1", seed=1), model)
    proc = train_cli(*FAST, "name=fp", f"model.path={model}", "train.resume=latest", "train.steps=2", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "the base model's weights differ from those step_000001 was trained on" in proc.stderr


@pytest.fixture
def immutable(tmp_path):
    """`immutable(folder)` makes a folder refuse new entries, renames and deletions, even to root
    (chattr +i; chmod does not stop root, and CI runs as root); undone afterwards."""
    made = []

    def make(folder: Path) -> None:
        done = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"chattr +i does not work here: {done.stderr.strip()}")
        made.append(folder)

    yield make
    for folder in made:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


def test_a_run_folder_that_cannot_be_written_is_one_line(train_cli, tmp_path, immutable):
    root = tmp_path / "read_only"
    root.mkdir()
    immutable(root)
    proc = train_cli(*FAST, "name=refused", f"output_root={root}", "train.steps=2", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert (
        proc.stderr.strip() == f"error: cannot write the run folder {root}/refused (output_root/name): "
        "Operation not permitted"
    )


def test_a_permission_error_mid_run_is_one_line_and_keeps_the_last_checkpoint(
    train_cli, tiny_model_dir, demo_videos_dir, immutable
):
    """The checkpoints folder stops accepting writes while the run trains (an operator's chmod, a
    quota, a remount): the run ends at its next checkpoint with one line naming the folder and the
    cause, and every checkpoint it leaves is complete."""
    cwd = train_cli.cwd
    args = [
        sys.executable,
        "-m",
        "radial_lora.train",
        f"model.path={tiny_model_dir}",
        f"data.root={demo_videos_dir}",
        *DEMO_DATA,
        *FAST,
        "name=locked",
        "train.steps=200",
        "train.checkpoint_every=2",
        "train.keep_last=0",
        "data.num_workers=1",
    ]
    ckpts = cwd / "outputs/locked/checkpoints"
    with open(cwd / "locked.err", "w") as err:
        proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 300
        while not (ckpts / "step_000002/checkpoint.json").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no first checkpoint"
            time.sleep(0.05)
        immutable(ckpts)
        code = proc.wait(timeout=300)
    stderr = (cwd / "locked.err").read_text()
    assert code != 0 and "Traceback" not in stderr, stderr[-3000:]
    (line,) = [x for x in stderr.splitlines() if x.startswith("error:")]
    kept = sorted(p.name for p in ckpts.iterdir())
    assert kept and all((ckpts / name / "checkpoint.json").is_file() for name in kept), kept
    assert line.startswith("error: could not write checkpoint step_") and "Operation not permitted" in line
    assert str(ckpts) in line and f"the newest complete checkpoint, {kept[-1]}, is intact" in line


def test_a_final_lora_that_cannot_be_written_is_one_line(train_cli, immutable):
    lora = train_cli.cwd / "outputs/final/lora"
    lora.mkdir(parents=True)
    immutable(lora)
    proc = train_cli(*FAST, "name=final", "train.steps=2", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: could not write the final LoRA: Operation not permitted"), line
    assert "the newest complete checkpoint, step_000002, is intact" in line
