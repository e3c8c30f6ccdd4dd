"""Convert a Wan LoRA file between the diffusers, ComfyUI and kohya/musubi formats.

    python -m scripts.convert_lora outputs/wan_4x/lora/pytorch_lora_weights.safetensors wan_4x_comfy.safetensors --to comfyui
    python -m scripts.convert_lora community_lora.safetensors converted/ --to diffusers

The input's format is read from its keys; every key must map to a module of Wan's transformer,
else the conversion stops with one line naming the key (no partial file). The output applies the
same weight change as the input in the tool its format is for (models/lora_files.py has the
naming and alpha rules of each). OUT may be a folder: the file gets the format's usual name
(pytorch_lora_weights.safetensors for diffusers). An existing OUT is kept unless --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from radial_lora.configs.schema import LoraFormat
from radial_lora.models.lora_files import FILE_NAMES, LoraFileError, load_lora, save_lora


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="a Wan LoRA .safetensors in any of the three formats")
    parser.add_argument("output", type=Path, help="the file to write, or a folder for it")
    parser.add_argument("--to", required=True, choices=[f.value for f in LoraFormat], help="the output's format")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)

    fmt = LoraFormat(args.to)
    out = args.output / FILE_NAMES[fmt] if args.output.is_dir() else args.output
    if out.exists() and not args.overwrite:
        raise SystemExit(f"error: {out} exists (pass --overwrite to replace it)")
    if out.resolve() == args.input.resolve():
        raise SystemExit(f"error: {out} is the input file")
    try:
        weights, source_format, metadata = load_lora(args.input)
        # Keep what the input says about its training; the format entries are the output's own.
        info = {k: v for k, v in metadata.items() if k.startswith(("radial_lora.", "ss_", "modelspec."))}
        ranks = sorted({a.rank for a in weights.values()})
        alphas = sorted({a.alpha for a in weights.values()})
        stated_alpha = ranks[0] if fmt == LoraFormat.diffusers and len(ranks) == 1 else alphas[0]
        info |= {"radial_lora.format": fmt.value, "radial_lora.rank": ",".join(map(str, ranks))}
        info["radial_lora.alpha"] = (
            f"{stated_alpha:g}" if len(alphas) == 1 or fmt == LoraFormat.diffusers else "per module"
        )
        info = {k: v for k, v in info.items() if not k.startswith("ss_")}  # the kohya writer sets its own
        path = save_lora(weights, out, fmt, info)
    except LoraFileError as err:
        raise SystemExit(f"error: {err}") from None
    print(
        f"{args.input} ({source_format.value}, {len(weights)} adapters, rank {'/'.join(map(str, ranks))}) -> {path} ({fmt.value})"
    )
    return path


if __name__ == "__main__":
    main()
