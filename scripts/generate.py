"""Generate a video with a trained LoRA, the way the run trained it: same model, same attention.

    python -m scripts.generate --run outputs/wan_4x --prompt "a red fox running through snow"
    python -m scripts.generate --run outputs/wan_4x --prompt "..." --frames 321 --steps 50 --out fox.mp4
    python -m scripts.generate --run outputs/tiny --prompt "a red square" --steps 4 --device cpu   # the demo's
    python -m scripts.generate --run outputs/wan22_5b_4x --prompt "..." --image first_frame.png  # image-to-video
    python -m scripts.generate --run outputs/wan22_4x --other-lora outputs/wan22_4x_low/lora/pytorch_lora_weights.safetensors

A run of one expert of a two-expert model (Wan2.2-A14B, model.expert) generates with both experts:
its LoRA on its expert, `--other-lora` (the other expert's run) on the other, else that one as
pretrained. Both run the run's attention; the first attention.dense_timesteps steps, all in the
high-noise expert's share, are dense.

The run folder's `config.yaml` gives the model (`model.path` / hub id), the attention (radial
mask, backend, and `attention.dense_timesteps`: the first denoising steps run dense, as in the
paper) and the default length (the run's longest clips); the default size is the one most of the
run's clips were trained at (its `clips.json`). Its
`lora/` export is loaded with diffusers' `load_lora_weights`, as any diffusers user would.
Writes an H.264 mp4 and prints its path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from radial_lora.configs.schema import Config, typed_config
from radial_lora.models.attention import describe, set_self_attention
from radial_lora.models.generation import check_video_shape, generate_video
from radial_lora.models.image_conditioning import takes_first_frame
from radial_lora.models.loading import EXPERT_FOLDERS, load_pipeline
from radial_lora.models.lora import LORA_WEIGHT_NAME


def run_config(run: Path) -> Config:
    """The typed config a training run was started with (config.yaml in its folder; .hydra/ for
    runs of older versions)."""
    from omegaconf import OmegaConf

    for path in (run / "config.yaml", run / ".hydra" / "config.yaml"):
        if path.exists():
            return typed_config(OmegaConf.load(path))
    raise SystemExit(f"error: {run} has no config.yaml: --run must be a training run's folder (outputs/NAME)")


def trained_size(run: Path, cfg: Config) -> tuple[int, int, str]:
    """(height, width, why): the size most of the run's clips were trained at (its clips.json),
    else the config's first size."""
    import json

    path = run / "clips.json"
    if path.exists():
        buckets = json.loads(path.read_text())["buckets_frames_height_width_count"]
        if buckets:
            by_size: dict[tuple[int, int], int] = {}
            for _, h, w, n in buckets:
                by_size[h, w] = by_size.get((h, w), 0) + n
            (height, width), n = max(by_size.items(), key=lambda kv: kv[1])
            return height, width, f"the size of {n} of the run's clips"
    return cfg.data.sizes[0][0], cfg.data.sizes[0][1], "the run's first data.sizes (no clips.json)"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a training run's folder (outputs/NAME)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument(
        "--image",
        type=Path,
        help="image-to-video: the first frame (Wan2.1/2.2 I2V models need one; Wan2.2-TI2V-5B takes one)",
    )
    parser.add_argument("--lora", type=Path, help=f"a LoRA file (default: RUN/lora/{LORA_WEIGHT_NAME})")
    parser.add_argument("--no-lora", action="store_true", help="the base model alone, for comparison")
    parser.add_argument("--other-lora", type=Path, help="two-expert models: the other expert's LoRA file")
    parser.add_argument("--frames", type=int, help="video frames, 4n+1 (default: the run's longest clips)")
    parser.add_argument("--height", type=int, help="default: the run's first size")
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=float, help="of the written file (default: the run's data.fps, else 16)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="default: RUN/samples/seed{seed}.mp4")
    args = parser.parse_args(argv)

    cfg = run_config(args.run)
    frames = args.frames or max(cfg.data.frames)
    height, width, why = trained_size(args.run, cfg)
    if args.height or args.width:
        height, width, why = args.height or height, args.width or width, "as asked"
    try:
        check_video_shape(frames, height, width)
    except ValueError as err:
        raise SystemExit(f"error: --frames/--height/--width: {err}") from None
    device = torch.device(args.device)
    print(f"size: {height}x{width} ({why}), {frames} frames")
    image = None
    if args.image is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(args.image).convert("RGB")
        except (OSError, UnidentifiedImageError) as err:
            raise SystemExit(f"error: --image {args.image}: not a readable image ({err})") from None

    expert = cfg.model.expert.value if cfg.model.expert is not None else None
    pipe = load_pipeline(cfg.model, device=device, both_experts=expert is not None)
    loras = []
    if not args.no_lora:
        lora = args.lora or args.run / "lora" / LORA_WEIGHT_NAME
        if not lora.exists():
            raise SystemExit(f"error: no LoRA at {lora} (pass --lora FILE, or --no-lora for the base model)")
        loras.append((lora, EXPERT_FOLDERS.get(expert, "transformer")))
    if args.other_lora is not None:
        if expert is None:
            raise SystemExit("error: --other-lora: this run's model has one transformer")
        if not args.other_lora.exists():
            raise SystemExit(f"error: --other-lora: no file {args.other_lora}")
        loras.append((args.other_lora, EXPERT_FOLDERS["low_noise" if expert == "high_noise" else "high_noise"]))
    for path, target in loras:
        pipe.load_lora_weights(
            str(path.parent), weight_name=path.name, load_into_transformer_2=target == "transformer_2"
        )
        print(f"LoRA: {path}" + (f" on {target}" if expert is not None else ""))
    # The attention the LoRA was trained with; `dense_timesteps` makes the first steps dense.
    set_self_attention(pipe.transformer, cfg.attention, mode="generate")
    if getattr(pipe, "transformer_2", None) is not None:  # the low-noise expert: past the dense first steps
        from dataclasses import replace

        set_self_attention(pipe.transformer_2, replace(cfg.attention, dense_timesteps=0), mode="generate")
    print(describe(pipe.transformer) + f"; first {cfg.attention.dense_timesteps} steps dense")
    pipe.to(device)

    if image is None and takes_first_frame(pipe):
        raise SystemExit(f"error: --image: {cfg.model.id} is an image-to-video model; give it the first frame")
    if image is not None and not (takes_first_frame(pipe) or pipe.config.get("expand_timesteps", False)):
        raise SystemExit(
            f"error: --image: {cfg.model.id} has no image input (the Wan2.1/2.2 I2V models and Wan2.2-TI2V-5B have)"
        )
    video = generate_video(
        pipe,
        args.prompt,
        negative_prompt=args.negative_prompt,
        frames=frames,
        height=height,
        width=width,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        max_text_tokens=cfg.model.max_text_tokens,
        device=device,
        image=image,
    )

    from radial_lora.data.demo_videos import write_mp4

    out = (args.out or args.run / "samples" / f"seed{args.seed}.mp4").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    write_mp4(out, video, fps=args.fps or cfg.data.fps or 16.0)
    print(f"video written to {out}")
    return out


if __name__ == "__main__":
    main()
