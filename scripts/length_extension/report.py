"""The length-extension experiment's report: every arm's metrics with bootstrap intervals, the
registered decision rules applied (verdict.decide), and pictures a reader can look at (position
error against the frame index per arm, sample strips, one mp4 per arm), written into RUN/report/.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from radial_lora.scripts.length_extension import verdict as v

ARM_ORDER = ("a", "b", "f", "c0", "c1", "d0", "d1", "recipe", "e")
ARM_NAMES = {
    "a": "untuned, dense",
    "b": "untuned, radial",
    "f": "untuned, dense + RIFLEx",
    "c0": "dense LoRA, seed 0",
    "c1": "dense LoRA, seed 1",
    "d0": "radial LoRA, seed 0",
    "d1": "radial LoRA, seed 1",
    "recipe": "radial LoRA, 1 dense layer + 1 dense step",
    "e": "local-window LoRA (+-6 frames + sink)",
}
COLUMNS = (
    "heldout_loss", "heldout_loss_late", "position_error", "physics_residual", "speed_ratio", "identity_failure",
    "flicker", "off_palette", "ssim", "uncond_physics_residual", "uncond_speed_ratio", "uncond_identity_failure",
)  # fmt: skip


def load_results(run_dir: Path) -> dict[str, dict[str, np.ndarray]]:
    out = {}
    for name in (*ARM_ORDER, "base_L"):
        path = run_dir / "results" / f"{name}.npz"
        if path.exists():
            with np.load(path) as data:
                out[name] = {k: data[k] for k in data.files}
    return out


def _fmt(ci) -> str:
    mean, lo, hi = ci
    return "-" if mean != mean else f"{mean:.4g} [{lo:.3g}, {hi:.3g}]"


def _strip(frames: np.ndarray, path: Path, every: int = 4) -> None:
    """Rows of clips, every `every`-th frame side by side, as a PNG."""
    from PIL import Image

    rows = [np.concatenate(list(clip[::every]), axis=1) for clip in frames]
    Image.fromarray(np.concatenate(rows, axis=0)).resize(
        (rows[0].shape[1] * 2, len(rows) * frames.shape[2] * 2), 0
    ).save(path)


def write_report(run_dir: Path, s: dict) -> Path:
    """RUN/report/report.md (and its pictures); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from radial_lora.data.demo_videos import write_mp4

    results = load_results(run_dir)
    plan = json.loads((run_dir / "plan.json").read_text()) if (run_dir / "plan.json").exists() else {}
    folder = run_dir / "report"
    folder.mkdir(exist_ok=True)
    lines = [
        f"# Length extension: L = {s['L']} -> 4L = {s['L4']} frames",
        "",
        "Mean over evaluation clips [bootstrap 95% interval]; lower is better except speed ratio (1 is",
        "right) and SSIM (higher is better).",
        "",
        "| arm | " + " | ".join(COLUMNS) + " |",
        "|---" * (len(COLUMNS) + 1) + "|",
    ]
    for name in ARM_ORDER:
        if name in results:
            cells = [_fmt(v.mean_ci(results[name][c])) if c in results[name] else "-" for c in COLUMNS]
            lines.append(f"| {ARM_NAMES[name]} | " + " | ".join(cells) + " |")

    # Occlusion recall by hidden duration, and the position error along the clip.
    lines += ["", "## Occlusion recall by hidden duration (sprites that came out right / events)", ""]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for name in ARM_ORDER:
        info_path = run_dir / "results" / f"{name}.json"
        if not info_path.exists():
            continue
        info = json.loads(info_path.read_text())
        recall = ", ".join(f"{k}: {h}/{n}" for k, (h, n) in info["recall"].items())
        lines.append(f"- {ARM_NAMES[name]}: {recall}")
        ax.plot(info["position_curve"], label=ARM_NAMES[name])
        rollouts = results[name]["rollouts"]
        _strip(rollouts, folder / f"rollouts_{name}.png")
        write_mp4(folder / f"rollout_{name}.mp4", rollouts[0], fps=16.0)
    ax.axvline(s["L"], color="gray", lw=0.8)
    ax.set_xlabel("frame")
    ax.set_ylabel("position error (px)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / "position_error_by_frame.png")

    # The registered rules.
    needed = ("a", "b", "c0", "c1", "d0", "d1")
    if all(n in results for n in needed) and "base_L" in results:
        base = results["base_L"]
        gates = v.Gates(
            float(np.nanmean(base["position_error"])),
            float(np.nanmean(base["identity_failure"])),
            float(np.nanmean(base["physics_residual"])),
            plan.get("radial_mass_at_L"),
            plan.get("temporal_fit_r2"),
        )
        step = plan.get("arm_step_s", {})
        verdict = v.decide(
            {n: results[n] for n in needed}, gates, {"c0": step.get("c0") or np.inf, "d0": step.get("d0") or np.inf}
        )
        lines += ["", f"## Verdict: **{verdict.verdict}**", ""] + [f"- {r}" for r in verdict.reasons]
        lines += ["", "| rule input | value |", "|---|---|"]
        lines += [f"| {k} | {val} |" for k, val in verdict.table.items()]
    else:
        lines += [
            "",
            "## Verdict: not reached (arms missing: "
            + ", ".join(n for n in (*needed, "base_L") if n not in results)
            + ")",
        ]
    # Cost: attention FLOPs of one forward relative to dense (kept blocks over all layers), and
    # the measured LoRA step of each tuned arm.
    from radial_lora.kernels.local_mask import local_block_mask
    from radial_lora.kernels.radial_mask import block_density, radial_block_mask

    config = run_dir / "outputs/sprites_base/model/transformer/config.json"
    layers = json.loads(config.read_text())["num_layers"] if config.exists() else 8
    s4 = 256  # tokens a 64x64 frame
    radial = block_density(radial_block_mask(s["L4"], s4, block_size=64, decay=0.2))
    local = block_density(local_block_mask(s["L4"], s4, block_size=64, window=6))
    density = {
        "c0": 1.0,
        "c1": 1.0,
        "d0": radial,
        "d1": radial,
        "recipe": (1 + (layers - 1) * radial) / layers,
        "e": local,
    }
    lines += ["", "## Cost", "", "| arm | attention FLOPs vs dense | LoRA step (s) | wall (s) |", "|---|---|---|---|"]
    for name, d in density.items():
        step = plan.get("arm_step_s", {}).get(name)
        wall = plan.get("arm_wall_s", {}).get(name)
        lines.append(
            f"| {ARM_NAMES[name]} | {d:.3f} | {step if step is not None else '-'} | {wall if wall is not None else '-'} |"
        )
    lines += ["", "Plan and measured step times: `plan.json`.", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
