"""The length-extension experiment, one command per phase (docs/length_extension.md):

    python -m scripts.length_extension.run calibrate --dir RUN   # time each step type, fix the step counts
    python -m scripts.length_extension.run pretrain  --dir RUN   # the base model at L (resumes; a wall budget)
    python -m scripts.length_extension.run check     --dir RUN   # the base at L on tuning clips: G1's metrics, the sampler's shift
    python -m scripts.length_extension.run pilot     --dir RUN   # the learning rate, on the dense arm only
    python -m scripts.length_extension.run arms      --dir RUN   # every LoRA arm at 4L
    python -m scripts.length_extension.run evaluate  --dir RUN   # every arm scored on the same clips
    python -m scripts.length_extension.run report    --dir RUN   # tables with intervals, the verdict, pictures

Every phase trains through the project's own trainer (`python -m train +experiment=sprites_base`
/ `sprites_4x` with overrides), writes under RUN (outputs/, cache/, plan.json, results/) and skips
what is already done, so a phase cut short by a time limit is run again to go on. `pack` / `unpack`
carry the pretrained base model (bf16, in parts of at most 15 MiB) from one machine to the next.
`--toy` runs the same phases at CPU-test size (the toy model, 5 and 17 frames, the reference attention backend, a
few steps): what CI runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

SEEDS = (0, 1)
PILOT_LRS = (2e-4, 1e-3)
SAMPLE_SHIFTS = (1.0, 3.0)
"""The sampler's time shifts the `check` phase compares on the base model at L (1: uniform steps;
3: Wan's, more steps at high noise, where the sprites' places are decided)."""


def settings(toy: bool) -> dict:
    """The phases' sizes: the real experiment's, or the CPU toy's."""
    if toy:
        return dict(
            model="pixel_wan_toy", L=5, L4=17, backend="reference", batch=2, lora_batch=2, workers=0,
            calibrate_steps=3, calibrate_arms=("d",), pretrain_steps=6, lora_steps=2, pilot_steps=2, conditional=3, unconditional=2,
            sample_steps=2, precision="no", device="cpu", eval_batch=2, val_clips=1, compile=False, check_clips=2,
        )  # fmt: skip
    return dict(
        model="pixel_wan", L=17, L4=65, backend="triton", batch=32, lora_batch=8, workers=8,
        calibrate_steps=12, calibrate_arms=("c", "d", "e"), pretrain_steps=None, lora_steps=200, pilot_steps=60, conditional=96, unconditional=32,
        sample_steps=25, precision="bf16", device="cuda", eval_batch=16, val_clips=8, compile=True, check_clips=48,
    )  # fmt: skip


def train(run_dir: Path, s: dict, experiment: str, *overrides: str, log: Path | None = None) -> str:
    """Run the project's trainer on this experiment's folders; returns its output (raises on failure)."""
    command = [
        sys.executable,
        "-m",
        "radial_lora.train",
        f"+experiment={experiment}",
        f"model={s['model']}",
        f"output_root={run_dir / 'outputs'}",
        f"cache_dir={run_dir / 'cache'}",
        f"trainer.mixed_precision={s['precision']}",
        f"data.num_workers={s['workers']}",
        f"data.val_clips={s['val_clips']}",
        "logger.mode=disabled",
        *overrides,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if log is not None:
        log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(command[3:])} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def median_step(output: str) -> float:
    """The trainer's median step time, from its throughput line."""
    found = re.search(r"median step ([0-9.]+) s", output)
    if found is None:
        raise SystemExit("error: the trainer printed no throughput line (too few steps?)")
    return float(found.group(1))


def lora_arm_overrides(arm: str, s: dict) -> list[str]:
    """What each tuned arm changes from experiment/sprites_4x.yaml (the radial arm)."""
    backend = f"attention.backend={s['backend']}"
    return {
        "c": ["attention=dense"],
        "d": [backend],
        "recipe": [backend, "attention.dense_layers=1"],
        "e": [backend, "attention.pattern=local", "attention.local_window=6"],
    }[arm]


def base_model(run_dir: Path) -> Path:
    return run_dir / "outputs/sprites_base/model"


def calibrate(run_dir: Path, s: dict) -> None:
    """Time pretraining at L and each LoRA arm's step at 4L; fix the pretraining steps to the wall
    budget (phases of at most 8.5 minutes) and write plan.json."""
    steps = s["calibrate_steps"]
    common = ["train.checkpoint_every=0", "validation.every=0", f"train.steps={steps}"]
    times = {
        "pretrain": median_step(
            train(
                run_dir,
                s,
                "sprites_base",
                *common,
                f"data.frames=[{s['L']}]",
                f"data.batch_size={s['batch']}",
                "name=calibrate_base",
            )
        )
    }
    base = run_dir / "outputs/calibrate_base/model"
    for arm in s["calibrate_arms"]:
        times[arm] = median_step(
            train(
                run_dir,
                s,
                "sprites_4x",
                *common,
                *lora_arm_overrides(arm, s),
                f"model.path={base}",
                f"data.frames=[{s['L4']}]",
                f"data.batch_size={s['lora_batch']}",
                f"name=calibrate_{arm}",
            )  # fmt: skip
        )
    pretrain_steps = s["pretrain_steps"] or int(2 * 8.5 * 60 / times["pretrain"])  # two phases of 8.5 min
    plan = {"step_s": times, "pretrain_steps": pretrain_steps, "lora_steps": s["lora_steps"]}
    save_plan(run_dir, plan)
    print(json.dumps(plan, indent=1))


def save_plan(run_dir: Path, plan: dict) -> None:
    """Write plan.json (what plan_of reads)."""
    (run_dir / "plan.json").write_text(json.dumps(plan, indent=1) + "\n")


def plan_of(run_dir: Path) -> dict:
    path = run_dir / "plan.json"
    if not path.exists():
        raise SystemExit(f"error: no {path}: run the calibrate phase first")
    return json.loads(path.read_text())


def pretrained_here(run_dir: Path) -> int:
    """The step of the base model's newest complete checkpoint on this machine (0: none)."""
    from radial_lora.train.checkpoint import checkpoint_dirs, checkpoint_step

    done = checkpoint_dirs(run_dir / "outputs/sprites_base")
    return checkpoint_step(done[-1]) if done else 0


def pretrain(run_dir: Path, s: dict, minutes: float, total_steps: int | None = None) -> None:
    """Pretrain (or go on pretraining) the base model; stops with a checkpoint after `minutes`.

    On the machine that holds its checkpoints it resumes from them (optimizer state and all). On a
    fresh machine with only an unpacked base (`unpack`), it goes on from those weights as a new
    run of the remaining steps, with fresh AdamW moments and a 100-step warm-up. `total_steps`
    raises the planned pretraining (G1's remedy: pretrain longer); it is recorded in plan.json.
    On the GPU the transformer's blocks are compiled (model.compile_blocks): the step time of the
    last phase, not the eager calibration, sets the next phase's budget."""
    plan = plan_of(run_dir)
    if total_steps is not None and total_steps != plan["pretrain_steps"]:
        plan.setdefault("pretrain_steps_changes", []).append([plan["pretrain_steps"], total_steps])
        plan["pretrain_steps"] = total_steps
        save_plan(run_dir, plan)
    step_s = plan.get("pretrain_step_s_measured", plan["step_s"]["pretrain"])
    budget = max(1, int(minutes * 60 / step_s))
    earlier = plan.get("pretrained_steps", 0)  # steps of runs before this one (packed and carried here)
    total = plan["pretrain_steps"] - earlier
    if total <= 0:
        print(f"pretraining done ({earlier} of {plan['pretrain_steps']} steps)")
        return
    start = pretrained_here(run_dir)
    carried = []
    if not start and base_model(run_dir).exists():
        start_from = run_dir / "outputs/sprites_start/model"
        if not start_from.exists():
            base_model(run_dir).parent.rename(start_from.parent)
        carried = [f"model.path={start_from}", "optim.warmup_steps=100"]
    stop = min(total, start + budget)
    compiled = ["model.compile_blocks=true"] if s["compile"] else []
    out = train(
        run_dir, s, "sprites_base", f"data.frames=[{s['L']}]", f"data.batch_size={s['batch']}",
        f"train.steps={total}", f"train.stop_after_step={stop}", "train.resume=auto",
        f"train.checkpoint_every={max(1, budget // 4)}", *compiled, *carried, log=run_dir / "pretrain.log",
    )  # fmt: skip
    if stop - start > 2:
        plan = plan_of(run_dir)
        plan["pretrain_step_s_measured"] = median_step(out)
        save_plan(run_dir, plan)
    print(out.strip().splitlines()[-1])


def pilot(run_dir: Path, s: dict) -> None:
    """The dense LoRA arm at each candidate learning rate; the lowest held-out loss at 4L wins."""
    plan = plan_of(run_dir)
    losses = {}
    for lr in PILOT_LRS:
        out = train(
            run_dir, s, "sprites_4x", *lora_arm_overrides("c", s), f"model.path={base_model(run_dir)}",
            f"data.frames=[{s['L4']}]", f"data.batch_size={s['lora_batch']}", f"optim.lr={lr}",
            f"train.steps={s['pilot_steps']}", f"validation.every={s['pilot_steps']}", "train.checkpoint_every=0",
            f"name=pilot_lr{lr:g}",
        )  # fmt: skip
        losses[lr] = float(re.findall(r"validation: loss_\d+f ([0-9.]+)", out)[-1])
    plan["pilot_loss"] = {f"{lr:g}": v for lr, v in losses.items()}
    plan["lr"] = min(losses, key=losses.get)
    save_plan(run_dir, plan)
    print(f"learning rate {plan['lr']:g} (held-out loss {losses})")


TUNED = {"c0": ("c", 0), "c1": ("c", 1), "d0": ("d", 0), "d1": ("d", 1), "recipe": ("recipe", 0), "e": ("e", 0)}


def arms(run_dir: Path, s: dict, only: list[str] | None = None) -> None:
    """Train every LoRA arm (those whose LoRA exists are skipped), recording each one's step time."""
    plan = plan_of(run_dir)
    if "lr" not in plan:
        raise SystemExit("error: no learning rate in plan.json: run the pilot phase first")
    for name, (arm, seed) in TUNED.items():
        if only and name not in only:
            continue
        if (run_dir / f"outputs/arm_{name}/lora/pytorch_lora_weights.safetensors").exists():
            continue
        started = time.time()
        out = train(
            run_dir, s, "sprites_4x", *lora_arm_overrides(arm, s), f"model.path={base_model(run_dir)}",
            f"data.frames=[{s['L4']}]", f"data.batch_size={s['lora_batch']}", f"optim.lr={plan['lr']}",
            f"train.seed={seed}", f"train.steps={plan['lora_steps']}", f"name=arm_{name}",
            log=run_dir / f"arm_{name}.log",
        )  # fmt: skip
        plan.setdefault("arm_step_s", {})[name] = median_step(out) if plan["lora_steps"] > 2 else None
        plan.setdefault("arm_wall_s", {})[name] = round(time.time() - started, 1)
        save_plan(run_dir, plan)
        print(f"arm {name}: {out.strip().splitlines()[-1]}")


def arm_specs(run_dir: Path, s: dict):
    """Every arm as evaluate.Arm: the untuned a, b, f and the tuned ones."""
    from radial_lora.scripts.length_extension.evaluate import Arm

    base = str(base_model(run_dir))
    radial = dict(backend=s["backend"], block_size=64, decay=0.2)
    lora = lambda name: str(run_dir / f"outputs/arm_{name}/lora/pytorch_lora_weights.safetensors")  # noqa: E731
    specs = [Arm("a", base), Arm("b", base, attention=radial), Arm("f", base, riflex=True)]
    specs += [Arm(n, base, lora(n)) for n in ("c0", "c1")]
    specs += [Arm(n, base, lora(n), attention=radial) for n in ("d0", "d1")]
    specs += [Arm("recipe", base, lora("recipe"), attention={**radial, "dense_layers": 1, "dense_timesteps": 1})]
    specs += [
        Arm("e", base, lora("e"), attention=dict(backend=s["backend"], block_size=64, pattern="local", local_window=6))
    ]
    return specs


def energy(run_dir: Path, s: dict) -> None:
    """Gate G2, the premise: the base model's attention at L through the energy probe, the radial
    mask of the arms (block 64, decay 0.2); and the dense LoRA's at 4L, if trained. The kept mass
    and the temporal fit go into plan.json."""
    from radial_lora.scripts import attention_energy

    plan = plan_of(run_dir)
    # The base by its folder and the experiment's config (an unpacked base has no run config: its
    # training ran on another machine); the dense LoRA by its run, which trained here.
    base = [
        "+experiment=sprites_base", f"model={s['model']}", f"model.path={base_model(run_dir)}",
        f"data.frames=[{s['L']}]", f"data.val_clips={s['val_clips']}", f"cache_dir={run_dir / 'cache'}",
        f"output_root={run_dir / 'outputs'}",
    ]  # fmt: skip
    probes = {
        "base": (base_model(run_dir), base),
        "c0": (run_dir / "outputs/arm_c0", ["--run", str(run_dir / "outputs/arm_c0")]),
    }
    for name, (needed, source) in probes.items():
        if name in plan.get("energy", {}) or not needed.exists():
            continue
        summary = attention_energy.main(
            [*source, "--decay", "0.2", "--block-size", "64", "--local-window", "6",
             "--out", str(run_dir / "results" / f"energy_{name}"), "--device", s["device"]]
        )  # fmt: skip
        plan.setdefault("energy", {})[name] = {
            k: summary[k]
            for k in (
                "kept_mass_radial",
                "kept_mass_local",
                "output_error_radial",
                "temporal_profile_fit",
                "spatial_heads",
            )
        }
    if "base" in plan.get("energy", {}):
        plan["radial_mass_at_L"] = plan["energy"]["base"]["kept_mass_radial"]
        plan["temporal_fit_r2"] = plan["energy"]["base"]["temporal_profile_fit"]["r2"]
    save_plan(run_dir, plan)


def check(run_dir: Path, s: dict) -> dict:
    """The base model at L on tuning clips (never scored): G1's three metrics at each shift of
    SAMPLE_SHIFTS; the best shift by position error becomes the sampler's for every arm. Run after
    each pretraining phase to watch the base improve; recorded in plan.json under `checks`."""
    import numpy as np
    import torch

    from radial_lora.scripts.length_extension.evaluate import TUNING_FIRST, Arm, evaluation_clips, score_arm
    from radial_lora.scripts.length_extension.verdict import GATE_LIMITS

    plan = plan_of(run_dir)
    cond, uncond = evaluation_clips(0, s["check_clips"], 2, s["L"], hiding=False, first=TUNING_FIRST)
    dtype = torch.bfloat16 if s["device"] == "cuda" else torch.float32
    steps_so_far = plan.get("pretrained_steps", 0) + pretrained_here(run_dir)
    record = {"pretrained_steps": steps_so_far, "clips": len(cond), "by_shift": {}}
    for shift in SAMPLE_SHIFTS:
        metrics, _ = score_arm(
            Arm("base_L", str(base_model(run_dir))), seed=0, conditional=cond, unconditional=uncond, frames=s["L"],
            train_frames=s["L"], steps=s["sample_steps"], shift=shift, batch=s["eval_batch"], device=s["device"],
            dtype=dtype,
        )  # fmt: skip
        record["by_shift"][f"{shift:g}"] = {
            "position_error": float(np.nanmean(metrics["position_error"])),
            "identity_failure": float(np.nanmean(metrics["identity_failure"])),
            "physics_residual": float(np.nanmean(metrics["physics_residual"])),
        }
    best = min(record["by_shift"], key=lambda k: record["by_shift"][k]["position_error"])
    plan["sample_shift"] = float(best)
    plan.setdefault("checks", []).append(record)
    save_plan(run_dir, plan)
    limits = {k.removeprefix("base_"): v for k, v in GATE_LIMITS.items() if k.startswith("base_")}
    for shift, got in record["by_shift"].items():
        line = ", ".join(f"{k} {v:.3f} (G1: <= {limits[k]:g})" for k, v in got.items())
        print(f"base at L after {steps_so_far} steps, shift {shift}: {line}")
    print(f"sampler shift {best} (lowest position error on {len(cond)} tuning clips)")
    return record


def evaluate(run_dir: Path, s: dict, only: list[str] | None = None) -> None:
    """Score every arm (skipping those scored already) into results/ARM.npz and .json, after the
    energy probe of gate G2."""
    import numpy as np
    import torch

    from radial_lora.scripts.length_extension.evaluate import Arm, evaluation_clips, score_arm

    results = run_dir / "results"
    results.mkdir(exist_ok=True)
    if "sample_shift" not in plan_of(run_dir):  # frozen on the base at L before any 4L output exists
        check(run_dir, s)
    shift = plan_of(run_dir)["sample_shift"]
    energy(run_dir, s)
    conditional, unconditional = evaluation_clips(0, s["conditional"], s["unconditional"], s["L4"])
    dtype = torch.bfloat16 if s["device"] == "cuda" else torch.float32
    # Gate G1 scores the base model at its own length L, on clips of that length.
    at_l = evaluation_clips(0, s["conditional"], s["unconditional"], s["L"], hiding=False)
    jobs = [(Arm("base_L", str(base_model(run_dir))), s["L"], at_l)]
    jobs += [(arm, s["L4"], (conditional, unconditional)) for arm in arm_specs(run_dir, s)]
    for arm, frames, (cond, uncond) in jobs:
        if (only and arm.name not in only) or (results / f"{arm.name}.npz").exists():
            continue
        started = time.time()
        metrics, extras = score_arm(
            arm, seed=0, conditional=cond, unconditional=uncond, frames=frames, train_frames=s["L"],
            steps=s["sample_steps"], shift=shift, batch=s["eval_batch"], device=s["device"], dtype=dtype,
        )  # fmt: skip
        np.savez_compressed(
            results / f"{arm.name}.npz", **metrics, rollouts=extras["rollouts"], samples=extras["samples"]
        )
        info = {
            "recall": extras["recall"],
            "position_curve": extras["position_curve"],
            "seconds": time.time() - started,
        }
        (results / f"{arm.name}.json").write_text(json.dumps(info) + "\n")
        print(f"arm {arm.name}: scored in {info['seconds']:.0f} s")


PART = 15 * 2**20
"""Largest file `pack` writes: the device returns files of at most 16 MiB."""


def pack(run_dir: Path, out: Path) -> None:
    """The pretrained base model, its transformer in bf16, as a tar cut into parts of at most
    PART bytes (with plan.json beside them): what travels from one machine to the next."""
    import io
    import tarfile
    import tempfile

    import torch
    from diffusers import WanPipeline

    import radial_lora.models.pixel_wan  # noqa: F401  the identity VAE's class, for from_pretrained

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = WanPipeline.from_pretrained(str(base_model(run_dir)))
        pipe.transformer.to(torch.bfloat16)
        pipe.save_pretrained(Path(tmp) / "model", max_shard_size="1GB")
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(Path(tmp) / "model", arcname="model")
    data = buffer.getvalue()
    for i in range(0, len(data), PART):
        (out / f"base.tar.part{i // PART:02d}").write_bytes(data[i : i + PART])
    # The plan travels with the steps the packed weights have had, for a later `pretrain` to go on.
    plan = plan_of(run_dir)
    plan["pretrained_steps"] = plan.get("pretrained_steps", 0) + pretrained_here(run_dir)
    save_plan(out, plan)
    print(f"packed {len(data) / 2**20:.1f} MiB into {-(-len(data) // PART)} parts in {out}")


def unpack(run_dir: Path, source: Path) -> None:
    """Put a packed base model (and its plan.json) back where the later phases look for it."""
    import io
    import shutil
    import tarfile

    data = b"".join(p.read_bytes() for p in sorted(source.glob("base.tar.part*")))
    if not data:
        raise SystemExit(f"error: no base.tar.part* in {source}")
    target = base_model(run_dir).parent
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(target, filter="data")
    if (source / "plan.json").exists():
        shutil.copy(source / "plan.json", run_dir / "plan.json")
    print(f"unpacked the base model into {base_model(run_dir)}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "phase", choices=["calibrate", "pretrain", "check", "pilot", "arms", "evaluate", "report", "pack", "unpack"]
    )
    parser.add_argument("--to", type=Path, help="pack: the folder the parts go to")
    parser.add_argument("--source", type=Path, help="unpack: the folder holding the parts")
    parser.add_argument("--dir", type=Path, required=True, help="the experiment's folder")
    parser.add_argument("--toy", action="store_true", help="the CPU-test size")
    parser.add_argument("--minutes", type=float, default=8.5, help="pretrain: the wall budget of this phase")
    parser.add_argument("--only", nargs="+", help="arms / evaluate: only these arms")
    parser.add_argument("--total-steps", type=int, help="pretrain: raise the planned pretraining steps to this")
    args = parser.parse_args(argv)
    s = settings(args.toy)
    args.dir.mkdir(parents=True, exist_ok=True)
    run_dir = args.dir.resolve()
    if args.phase == "calibrate":
        calibrate(run_dir, s)
    elif args.phase == "pretrain":
        pretrain(run_dir, s, args.minutes, args.total_steps)
    elif args.phase == "check":
        check(run_dir, s)
    elif args.phase == "pilot":
        pilot(run_dir, s)
    elif args.phase == "arms":
        arms(run_dir, s, args.only)
    elif args.phase == "evaluate":
        evaluate(run_dir, s, args.only)
    elif args.phase == "pack":
        pack(run_dir, args.to or run_dir / "pack")
    elif args.phase == "unpack":
        unpack(run_dir, args.source or run_dir / "pack")
    else:
        from radial_lora.scripts.length_extension.report import write_report

        print(write_report(run_dir, s))


if __name__ == "__main__":
    main()
