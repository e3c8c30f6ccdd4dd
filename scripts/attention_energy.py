"""Does a model's attention decay the way Radial Attention assumes, and how much of it does a mask
keep? Measured on a real clip at chosen noise levels (models/attention_probe.py):

    python -m scripts.attention_energy --run outputs/NAME                 # a training run's model (+ its LoRA)
    python -m scripts.attention_energy model=wan2.1_t2v_1.3b data.root=/videos attention.decay=0.2
    python -m scripts.attention_energy --run outputs/NAME --sigmas 0.3 0.6 0.9 --queries 512

For sampled queries of every layer and head: the paper's two profiles (post-softmax score against
temporal distance at the same position, and against spatial distance within a frame) with
exponential fits (a, b, R^2); the attention mass the radial mask (at the config's decay and
block), a local window (attention.local_window frames) and dense attention keep, and the output
error of each; each head labelled spatial or temporal. Writes OUT/attention_energy.json (every
row and the summary) and OUT/attention_energy.png, and prints the summary. Use it to choose
attention.decay and dense_layers: layers whose kept mass is low are candidates to keep dense.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from radial_lora.configs.schema import Config
from radial_lora.kernels.local_mask import local_block_mask
from radial_lora.kernels.radial_mask import radial_block_mask
from radial_lora.models.attention_probe import Recorder, install_probe, summarize


def composed_config(overrides: list[str]) -> Config:
    from hydra import compose, initialize_config_dir

    from radial_lora.configs.schema import CONFIG_DIR, register_configs, typed_config

    register_configs()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return typed_config(compose("train", overrides=overrides))


def load_model(cfg: Config, run: Path | None, device):
    """The pipeline as trained: a full-training run's exported model, or the base with the run's LoRA."""
    from dataclasses import replace

    from radial_lora.models.loading import load_pipeline

    if run is not None and (run / "model" / "model_index.json").exists():
        cfg = replace(cfg, model=replace(cfg.model, path=str(run / "model"), init="pretrained"))
    pipe = load_pipeline(cfg.model, device=device)
    lora = run / "lora" / "pytorch_lora_weights.safetensors" if run is not None else None
    if lora is not None and lora.exists():
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    return pipe.to(device)


def input_clip(cfg: Config, pipe, device):
    """(clean latents [1, C, F, H, W], text embedding, what it is, an image-to-video model's
    first-frame inputs): the first held-out clip of the config's data (else its first clip),
    encoded as training encodes it."""
    from radial_lora.data.dataset import ClipDataset, collate
    from radial_lora.data.setup import catalog_for, split_held_out
    from radial_lora.train.step import encode_captions, first_frame_inputs, posterior_params
    from radial_lora.train.validation import latent_mean

    catalog = catalog_for(cfg.data, seed=cfg.train.seed)
    train_clips, held = split_held_out(catalog.clips, max(cfg.data.val_clips, 1), cfg.train.seed)
    clip = (held or train_clips)[0]
    dataset = ClipDataset([clip], fps=cfg.data.fps, seed=cfg.train.seed, random_window=False)
    batch = collate([{**dataset.load(0, 0), "skipped": []}])
    x0 = latent_mean(pipe.vae, posterior_params(pipe.vae, batch["frames"])).to(device)
    text = encode_captions(pipe, batch["captions"], cfg.model.max_text_tokens, device)
    image = first_frame_inputs(pipe, pipe.transformer, batch["frames"], device)
    return x0, text, f"{clip.video} ({clip.bucket[0]} frames at {clip.bucket[1]}x{clip.bucket[2]})", image


def plot(rows: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), dpi=110)
    for ax, profile, xlabel in (
        (axes[0], "temporal_profile", "frame distance"),
        (axes[1], "spatial_profile", "grid distance (tokens)"),
    ):
        y = np.array(summary[profile])
        x = np.arange(len(y))
        fit = summary[f"{profile}_fit"]
        ax.semilogy(x, y, "o", label="mean score")
        ax.semilogy(
            x,
            np.exp(-fit["a"] * x + fit["b"]),
            "-",
            label=f"exp(-{fit['a']:.3g} x + {fit['b']:.3g}), R2 {fit['r2']:.3f}",
        )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("post-softmax score")
        ax.legend(fontsize=7)
    layers = sorted({r["layer"] for r in rows})
    for key in (k for k in rows[0] if k.startswith("kept_mass_")):
        axes[2].plot(
            layers,
            [np.mean([r[key] for r in rows if r["layer"] == layer]) for layer in layers],
            marker="o",
            label=key[10:],
        )
    axes[2].set_xlabel("layer")
    axes[2].set_ylabel("attention mass kept")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (key=value), as for training")
    parser.add_argument("--run", type=Path, help="a training run's folder: its config, model and LoRA")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--queries", type=int, default=256, help="query tokens sampled per layer")
    parser.add_argument("--out", type=Path, help="default: RUN, else the current folder")
    parser.add_argument("--decay", type=float, help="the radial mask's decay (default: the config's)")
    parser.add_argument("--block-size", type=int, help="the masks' block (default: the config's)")
    parser.add_argument("--local-window", type=int, help="the local mask's frames each side (default: the config's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    if args.run is not None:
        from radial_lora.scripts.generate import run_config

        cfg = run_config(args.run)
    else:
        cfg = composed_config(args.overrides)
    from dataclasses import replace

    chosen = {"decay": args.decay, "block_size": args.block_size, "local_window": args.local_window}
    cfg = replace(cfg, attention=replace(cfg.attention, **{k: v for k, v in chosen.items() if v is not None}))
    device = torch.device(args.device)
    pipe = load_model(cfg, args.run, device)
    transformer = pipe.transformer.eval()
    a = cfg.attention
    masks = {
        "radial": lambda f, s: radial_block_mask(
            f, s, block_size=a.block_size, decay=a.decay, sink=a.sink, legacy_adjacent=a.legacy_adjacent
        ),
        "local": lambda f, s: local_block_mask(f, s, block_size=a.block_size, window=a.local_window, sink=a.sink),
    }
    recorder = Recorder(queries=args.queries, seed=cfg.train.seed, masks=masks, block_size=a.block_size)
    install_probe(transformer, a, recorder)
    x0, text, what, image = input_clip(cfg, pipe, device)
    dtype = next(transformer.parameters()).dtype
    generator = torch.Generator(device).manual_seed(cfg.train.seed)
    noise = torch.randn(x0.shape, generator=generator, device=device)
    extra = {}
    if image.get("image_embeds") is not None:
        extra["encoder_hidden_states_image"] = image["image_embeds"].to(dtype)
    with torch.no_grad():
        for sigma in args.sigmas:
            recorder.sigma = sigma
            noisy = (1 - sigma) * x0 + sigma * noise
            if image:  # an image-to-video model: the first-frame condition beside the latents
                noisy = torch.cat([noisy, image["condition"]], dim=1)
            transformer(hidden_states=noisy.to(dtype), timestep=torch.tensor([sigma * 1000], device=device),
                        encoder_hidden_states=text.to(dtype), return_dict=False, **extra)  # fmt: skip
    summary = summarize(recorder.rows) | {
        "clip": what,
        "sigmas": args.sigmas,
        "decay": a.decay,
        "block_size": a.block_size,
        "local_window": a.local_window,
    }
    out = args.out or args.run or Path(".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_energy.json").write_text(json.dumps({"summary": summary, "rows": recorder.rows}) + "\n")
    plot(recorder.rows, summary, out / "attention_energy.png")
    t, sp = summary["temporal_profile_fit"], summary["spatial_profile_fit"]
    print(f"clip: {what}; {summary['heads_probed']} (layer, head, sigma) rows")
    print(f"kept mass: radial {summary['kept_mass_radial']:.3f}, local {summary['kept_mass_local']:.3f}; "
          f"output error: radial {summary['output_error_radial']:.3g}, local {summary['output_error_local']:.3g}")  # fmt: skip
    print(f"temporal decay a {t['a']:.3g} (R2 {t['r2']:.3f}), spatial decay a {sp['a']:.3g} (R2 {sp['r2']:.3f}); "
          f"{summary['spatial_heads']:.0%} of heads spatial")  # fmt: skip
    print(f"wrote {out / 'attention_energy.json'} and {out / 'attention_energy.png'}")
    return summary


if __name__ == "__main__":
    main()
