"""The SLURM launcher for real: a two-node Slurm cluster on this machine runs the project's own
sbatch script (2 nodes x 1 CPU process, gloo, ZeRO-2); a job stopped by SIGUSR1 requeues itself
and resumes; jobs ended by SIGTERM (a time limit, a plain scancel) save and resume when submitted
again.

`.ci/run` starts the cluster and exports SLURM_CONF; without one, the tests start their own with
scripts/slurm/local_cluster.sh when Slurm's daemons are installed and we are root, and skip
(saying why) otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow
SBATCH = REPO / "scripts/slurm/train.sbatch"


def slurm_up(env) -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%D"], env=env, capture_output=True, text=True, timeout=20)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and out.stdout.strip() != ""


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    env = {**os.environ, "WANDB_MODE": "disabled"}
    if os.environ.get("SLURM_CONF") and slurm_up(env):
        yield env
        return
    if not (shutil.which("slurmctld") and shutil.which("slurmd") and os.geteuid() == 0):
        pytest.skip("no Slurm cluster: SLURM_CONF unset and slurmctld/slurmd not installed (or not root)")
    folder = tmp_path_factory.mktemp("slurm")
    subprocess.run([str(REPO / "scripts/slurm/local_cluster.sh"), "start", str(folder)], check=True, timeout=60)
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    try:
        yield env
    finally:
        subprocess.run([str(REPO / "scripts/slurm/local_cluster.sh"), "stop", str(folder)], timeout=60)


def submit(env, cwd: Path, *overrides: str) -> tuple[str, Path]:
    out = subprocess.run(
        ["sbatch", "--parsable", str(SBATCH), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    job = out.stdout.strip().split(";")[0]
    return job, cwd / f"slurm-radial-lora-{job}.out"


def wait_for(condition, seconds: float, what, env=None) -> None:
    """Poll `condition` each second; on timeout fail with `what` (a string or a callable giving
    one, evaluated then so it shows the latest log) and, given `env`, the cluster's own view."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    what = what() if callable(what) else what
    raise AssertionError(f"timed out after {seconds:.0f}s waiting for {what}" + (cluster_report(env) if env else ""))


def resume_unavailable_nodes(env) -> None:
    """Put drained or down nodes back in service, saying so. On a loaded 2-core machine slurmd can
    drain a node when the old job's processes take long to exit ("Kill task failed"); on a real
    cluster an operator resumes it, and the job's own behaviour is what the test is about."""
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%T|%E"], env=env, capture_output=True, text=True).stdout
    for line in out.splitlines():
        node, state, reason = (line.split("|") + ["", ""])[:3]
        if any(word in state.lower() for word in ("drain", "down", "fail")):
            print(f"resuming node {node} ({state}: {reason})")
            subprocess.run(["scontrol", "update", f"NodeName={node}", "State=RESUME"], env=env, capture_output=True)


def cluster_report(env) -> str:
    """What Slurm thinks: jobs, node states and reasons, and the controller log's tail."""

    def run(*cmd):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=20)
        return f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}"

    parts = [
        run("squeue", "-a", "-o", "%i %T %r %S %N"),
        run("scontrol", "show", "job"),
        run("sinfo", "-N", "-l"),
        run("sinfo", "-R"),
    ]
    logfile = Path(env["SLURM_CONF"]).parent / "slurmctld.log"
    if logfile.exists():
        parts.append("slurmctld.log (tail):\n" + "\n".join(logfile.read_text().splitlines()[-40:]))
    return "\n--- cluster ---\n" + "\n".join(parts)


def latest_step(text: str) -> int:
    """The highest step a progress bar shows in a log (tqdm redraws a few times a second, so a
    given step may never be printed)."""
    return max((int(n) for n in re.findall(r"(\d+)/\d+ \[", text)), default=0)


def job_state(env, job: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], env=env, capture_output=True, text=True)
    return out.stdout.strip()


def job_gone(env, job: str) -> bool:
    return job_state(env, job) == ""


def log(path: Path) -> str:
    # Ranks write progress bars and messages to one file at once: a multi-byte character can be
    # split by another process's line, so decode leniently.
    return path.read_text(errors="replace").replace("\r", "\n") if path.exists() else ""


def common(model_dir, videos_dir, name, steps, every):
    return [
        f"model.path={model_dir}",
        f"data.root={videos_dir}",
        "data.frames=[17]",
        "data.sizes=[[32,32]]",
        "data.batch_size=1",
        "data.num_workers=1",
        f"train.steps={steps}",
        f"train.checkpoint_every={every}",
        "trainer=zero2",
        "trainer.mixed_precision=no",
        f"name={name}",
    ]


def test_sbatch_two_nodes_zero2(slurm_env, tmp_path, tiny_model_dir, demo_videos_dir):
    job, out = submit(slurm_env, tmp_path, *common(tiny_model_dir, demo_videos_dir, "two_nodes", 4, 2))
    wait_for(lambda: job_gone(slurm_env, job), 400, lambda: f"job {job} to finish:\n{log(out)[-3000:]}", slurm_env)
    text = log(out)
    assert "2 nodes x 1 processes" in text, text[-3000:]
    assert (
        text.count("LoRA exported to") == 1
        and (tmp_path / "outputs/two_nodes/lora/pytorch_lora_weights.safetensors").exists()
    )
    # Both ranks took part: ZeRO-2 wrote one optimizer shard per process.
    shards = sorted(p.name for p in (tmp_path / "outputs/two_nodes/checkpoints/step_000004/pytorch_model").iterdir())
    assert [s for s in shards if s.startswith("zero_pp_rank")] == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]


def test_signal_checkpoints_requeues_and_resumes(slurm_env, tmp_path, tiny_model_dir, demo_videos_dir):
    steps = 150
    job, out = submit(slurm_env, tmp_path, *common(tiny_model_dir, demo_videos_dir, "preempted", steps, 1000))
    wait_for(
        lambda: " 10/150" in log(out) or "11/150" in log(out), 300, lambda: f"step 10:\n{log(out)[-3000:]}", slurm_env
    )
    subprocess.run(
        ["scancel", "--signal=USR1", job], env=slurm_env, check=True
    )  # what Slurm sends at --signal=USR1@120
    wait_for(
        lambda: "requeueing" in log(out) and job_state(slurm_env, job) == "PENDING",
        120,
        "the job to requeue",
        slurm_env,
    )
    # Slurm holds a requeued job for a couple of minutes before starting it again (its begin
    # time is pushed back); we move the begin time to now rather than wait, but only once a few
    # seconds have passed since the requeue: slurmd revokes the old run's credential at the
    # requeue, to the second, and a relaunch within that same second is refused ("Job credential
    # revoked") and the job killed for good: Slurm's own delay exists to avoid exactly that.
    # While it waits, keep the begin time at now (Slurm may set it again once the old allocation
    # has finished completing), release it if it was held, and resume nodes a slow clean-up
    # drained, saying so. Starting the job again stays Slurm's part, as in production.
    requeued_at = time.monotonic()

    def resumed() -> bool:
        if "Resumed from" in log(out):
            return True
        state = job_state(slurm_env, job)
        if state == "" and "Resumed from" not in log(out):
            raise AssertionError(f"job {job} ended without resuming:\n{log(out)[-3000:]}" + cluster_report(slurm_env))
        if state == "PENDING" and time.monotonic() - requeued_at > 5:
            reason = subprocess.run(
                ["squeue", "-h", "-j", job, "-o", "%r"], env=slurm_env, capture_output=True, text=True
            ).stdout.strip()
            if "held" in reason.lower():
                print(f"releasing job {job}, pending with reason {reason!r}")
                subprocess.run(["scontrol", "release", job], env=slurm_env, capture_output=True)
            resume_unavailable_nodes(slurm_env)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], env=slurm_env, capture_output=True)
        return False

    wait_for(resumed, 420, lambda: f"the requeued job to resume:\n{log(out)[-3000:]}", slurm_env)
    wait_for(lambda: job_gone(slurm_env, job), 400, lambda: f"job {job} to finish:\n{log(out)[-3000:]}", slurm_env)
    text = log(out)
    stopped = int(text.split("Interrupted by SIGUSR1 at step ")[1].split()[0])
    assert 10 <= stopped < steps
    assert f"at step {stopped}" in text.split("Resumed from")[1].splitlines()[0]
    assert "(restart 1)" in text and "requeueing" in text
    ckpts = tmp_path / "outputs/preempted/checkpoints"
    assert [json.loads((ckpts / d / "checkpoint.json").read_text())["step"] for d in sorted(os.listdir(ckpts))] == [
        stopped,
        steps,
    ]
    assert text.count("LoRA exported to") == 1  # at the end: the stopped job's LoRA is in its checkpoint


def test_time_limit_and_scancel_save_and_the_job_resumes(slurm_env, tmp_path, tiny_model_dir, demo_videos_dir):
    """SIGTERM from Slurm itself, to every process of the job (the batch script, srun, the
    launchers, the ranks and their DataLoader workers): first at a time limit with no warning
    signal asked for, then from a plain `scancel`. Each time the ranks save within KillWait and
    the job ends (Slurm ended the batch script too: nothing requeues); the same command submitted
    again resumes where it stopped."""
    # The script without its `--signal=USR1@120` line: what a time limit does to a job that asked
    # for no warning (with it, a one-minute limit would warn at once).
    bare = tmp_path / "no_warning.sbatch"
    bare.write_text(
        "".join(
            line for line in SBATCH.read_text().splitlines(keepends=True) if not line.startswith("#SBATCH --signal")
        )
    )
    overrides = [
        o
        for o in common(tiny_model_dir, demo_videos_dir, "terminated", 100_000, 100_000)
        if not o.startswith("train.steps=")
    ] + ["logger.log_every=50"]

    def stopped_at(out: Path) -> int:
        text = log(out)
        assert "Traceback" not in text, text[-3000:]
        return int(text.split("Interrupted by SIGTERM at step ")[1].split()[0])

    def state(job: str) -> str:
        out = subprocess.run(["scontrol", "show", "job", job], env=slurm_env, capture_output=True, text=True).stdout
        return out.split("JobState=")[1].split()[0]

    out = subprocess.run(
        ["sbatch", "--parsable", "--time=1", str(bare), "train.steps=100000", *overrides],
        cwd=tmp_path,
        env=slurm_env,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    job = out.stdout.strip().split(";")[0]
    timed_log = tmp_path / f"slurm-radial-lora-{job}.out"
    wait_for(
        lambda: job_gone(slurm_env, job),
        300,
        lambda: f"job {job} to reach its limit:\n{log(timed_log)[-3000:]}",
        slurm_env,
    )
    first = stopped_at(timed_log)
    assert state(job) == "TIMEOUT" and f"continue with: scontrol requeue {job}" in log(timed_log)

    job, cancelled_log = submit(slurm_env, tmp_path, "train.steps=100000", *overrides)
    wait_for(
        lambda: latest_step(log(cancelled_log)) >= first + 20,
        300,
        lambda: f"job {job} to resume and train:\n{log(cancelled_log)[-3000:]}",
        slurm_env,
    )
    subprocess.run(["scancel", job], env=slurm_env, check=True)
    wait_for(
        lambda: job_gone(slurm_env, job), 120, lambda: f"job {job} to end:\n{log(cancelled_log)[-3000:]}", slurm_env
    )
    text = log(cancelled_log)
    second = stopped_at(cancelled_log)
    assert f"at step {first}" in text.split("Resumed from")[1].splitlines()[0]
    assert second >= first + 20 and state(job) == "CANCELLED" and "requeueing" not in text

    resume_unavailable_nodes(slurm_env)
    job, final_log = submit(slurm_env, tmp_path, f"train.steps={second + 2}", *overrides)
    wait_for(
        lambda: job_gone(slurm_env, job), 300, lambda: f"job {job} to finish:\n{log(final_log)[-3000:]}", slurm_env
    )
    text = log(final_log)
    assert f"at step {second}" in text.split("Resumed from")[1].splitlines()[0], text[-3000:]
    assert "LoRA exported to" in text
    ckpts = tmp_path / "outputs/terminated/checkpoints"
    assert [json.loads((ckpts / d / "checkpoint.json").read_text())["step"] for d in sorted(os.listdir(ckpts))] == [
        second,
        second + 2,
    ]
