"""Wan LoRA files in the three formats the ecosystem reads, and conversion between them.

One in-memory form, `LoraWeights`: for each adapted module, by its diffusers name (the transformer's
own, e.g. `blocks.0.attn1.to_q`), the down matrix A [r, in], the up matrix B [out, r] and alpha: the
module's weight changes by (alpha / r) B A. Each format is a naming of those tensors and a rule
for alpha:

- `diffusers` (`WanPipeline.load_lora_weights`): `transformer.<module>.lora_A.weight` / `lora_B.weight`,
  peft's config in the `lora_adapter_metadata` entry of the safetensors metadata. alpha/r is folded
  into B and the file says alpha = r, so a loader that ignores the metadata (and takes alpha = r,
  as peft does without one) applies the same delta as one that reads it.
- `comfyui` (ComfyUI's LoRA loader; also Wan's own repository and diffusers' converter for
  non-diffusers Wan LoRAs): Wan's native module names, `diffusion_model.blocks.N.self_attn.q`,
  `cross_attn.{q,k,v,o}`, `ffn.0`, `ffn.2`, with `.lora_A.weight` / `.lora_B.weight` and a
  `.alpha` scalar per module.
- `kohya` (kohya-ss / musubi-tuner, whose Wan LoRAs diffusers and ComfyUI read too):
  `lora_unet_blocks_N_self_attn_q.lora_down.weight` / `.lora_up.weight` / `.alpha`.

Reading accepts what these tools write (also `lora_down`/`lora_up` under `diffusion_model.`, and
peft keys without the `transformer.` prefix); a key it cannot place (an unknown module, a LyCORIS
or bias-diff tensor) is a one-line `LoraFileError`, never a silently partial LoRA.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from radial_lora.configs.schema import LoraFormat

DIFFUSERS_PREFIX = "transformer."
COMFYUI_PREFIX = "diffusion_model."
KOHYA_PREFIX = "lora_unet_"

# A block's linear layers: diffusers' name -> Wan's native name (the checkpoint names ComfyUI and
# Wan's repository use; diffusers' single-file loader maps them the same way, which
# tests/test_lora_files.py checks for every linear layer of the 1.3B and 14B).
BLOCK_MODULES = {
    "attn1.to_q": "self_attn.q",
    "attn1.to_k": "self_attn.k",
    "attn1.to_v": "self_attn.v",
    "attn1.to_out.0": "self_attn.o",
    "attn2.to_q": "cross_attn.q",
    "attn2.to_k": "cross_attn.k",
    "attn2.to_v": "cross_attn.v",
    "attn2.to_out.0": "cross_attn.o",
    "attn2.add_k_proj": "cross_attn.k_img",  # image-to-video models
    "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0",
    "ffn.net.2": "ffn.2",
}
# The linear layers outside the blocks.
TOP_MODULES = {
    "condition_embedder.time_embedder.linear_1": "time_embedding.0",
    "condition_embedder.time_embedder.linear_2": "time_embedding.2",
    "condition_embedder.text_embedder.linear_1": "text_embedding.0",
    "condition_embedder.text_embedder.linear_2": "text_embedding.2",
    "condition_embedder.time_proj": "time_projection.1",
    "proj_out": "head.head",
}
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")
_KOHYA_BLOCK = re.compile(r"blocks_(\d+)_(.+)")


FILE_NAMES = {
    LoraFormat.diffusers: "pytorch_lora_weights.safetensors",  # the name diffusers looks for in a folder
    LoraFormat.comfyui: "comfyui_lora.safetensors",
    LoraFormat.kohya: "kohya_lora.safetensors",
}


class LoraFileError(ValueError):
    """A LoRA file this code cannot read or write faithfully (one line, naming the key)."""


@dataclass
class Adapter:
    """One module's LoRA: its weight changes by (alpha / rank) * up @ down."""

    down: torch.Tensor
    """A [rank, in_features]"""
    up: torch.Tensor
    """B [out_features, rank]"""
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The change of the module's weight, [out, in], in fp32."""
        return self.scale * self.up.float() @ self.down.float()


LoraWeights = dict[str, Adapter]
"""Adapters by the diffusers name of the module they change."""


def native_name(module: str) -> str:
    """diffusers module name -> Wan's native name (`blocks.3.attn1.to_q` -> `blocks.3.self_attn.q`)."""
    if match := _BLOCK.fullmatch(module):
        block, inner = match.groups()
        if inner in BLOCK_MODULES:
            return f"blocks.{block}.{BLOCK_MODULES[inner]}"
    elif module in TOP_MODULES:
        return TOP_MODULES[module]
    raise LoraFileError(f"no Wan native name for module {module!r} (known: a block's {', '.join(BLOCK_MODULES)})")


_FROM_NATIVE_BLOCK = {v: k for k, v in BLOCK_MODULES.items()}
_FROM_NATIVE_TOP = {v: k for k, v in TOP_MODULES.items()}
# kohya joins a native name's parts with "_", which native names also contain (self_attn): the
# reverse mapping looks each underscored name up rather than splitting it.
_FROM_KOHYA_BLOCK = {v.replace(".", "_"): k for k, v in BLOCK_MODULES.items()}
_FROM_KOHYA_TOP = {v.replace(".", "_"): k for k, v in TOP_MODULES.items()}


def from_native(name: str) -> str | None:
    """Wan native module name -> diffusers', or None if unknown."""
    if match := _BLOCK.fullmatch(name):
        block, inner = match.groups()
        return f"blocks.{block}.{_FROM_NATIVE_BLOCK[inner]}" if inner in _FROM_NATIVE_BLOCK else None
    return _FROM_NATIVE_TOP.get(name)


def from_kohya(name: str) -> str | None:
    """kohya module name (without `lora_unet_`) -> diffusers', or None if unknown."""
    if match := _KOHYA_BLOCK.fullmatch(name):
        block, inner = match.groups()
        return f"blocks.{block}.{_FROM_KOHYA_BLOCK[inner]}" if inner in _FROM_KOHYA_BLOCK else None
    return _FROM_KOHYA_TOP.get(name)


def kohya_name(module: str) -> str:
    """diffusers module name -> kohya's (`lora_unet_blocks_3_self_attn_q`)."""
    return KOHYA_PREFIX + native_name(module).replace(".", "_")


# --- writing ---


def to_state_dict(weights: LoraWeights, fmt: LoraFormat) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, format-specific safetensors metadata) of `weights` in `fmt`."""
    fmt = LoraFormat(fmt)
    if not weights:
        raise LoraFileError("no adapters to write")
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for module in sorted(weights):
        a = weights[module]
        down, up = a.down.detach().to("cpu", torch.float32), a.up.detach().to("cpu", torch.float32)
        alpha = torch.tensor(float(a.alpha))
        if fmt == LoraFormat.diffusers:
            base = DIFFUSERS_PREFIX + module
            tensors[f"{base}.lora_A.weight"] = down.contiguous()
            tensors[f"{base}.lora_B.weight"] = (up * a.scale).contiguous()
        elif fmt == LoraFormat.comfyui:
            base = COMFYUI_PREFIX + native_name(module)
            tensors |= {f"{base}.lora_A.weight": down, f"{base}.lora_B.weight": up, f"{base}.alpha": alpha}
        else:
            base = kohya_name(module)
            tensors |= {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up, f"{base}.alpha": alpha}
    ranks = {a.rank for a in weights.values()}
    if fmt == LoraFormat.diffusers:
        if len(ranks) > 1:
            raise LoraFileError(
                f"adapters of different ranks {sorted(ranks)}: the diffusers format here takes one rank"
            )
        (rank,) = ranks
        # Read by diffusers' load_lora_weights into peft's LoraConfig; alpha = r because B
        # carries alpha / r. Full module names, so the adapters go exactly where they were.
        peft = {"r": rank, "lora_alpha": rank, "target_modules": sorted(weights), "lora_dropout": 0.0, "bias": "none"}
        metadata["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in peft.items()}, sort_keys=True)
    elif fmt == LoraFormat.kohya and len(ranks) == 1:
        alphas = {a.alpha for a in weights.values()}
        metadata |= {"ss_network_module": "networks.lora", "ss_network_dim": str(ranks.pop())}
        if len(alphas) == 1:
            metadata["ss_network_alpha"] = f"{alphas.pop():g}"
    return tensors, metadata


def save_lora(weights: LoraWeights, path: str | Path, fmt: LoraFormat, info: dict[str, str] | None = None) -> Path:
    """Write `weights` to `path` in `fmt`, with `info` (rank, alpha, base model, ...) in the
    safetensors metadata beside what the format itself needs."""
    from safetensors.torch import save_file

    tensors, metadata = to_state_dict(weights, fmt)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": "pt", **(info or {}), **metadata})
    return path.resolve()


# --- reading ---


def _key_format(key: str) -> LoraFormat | None:
    if key.startswith(COMFYUI_PREFIX):
        return LoraFormat.comfyui
    if key.startswith(KOHYA_PREFIX):
        return LoraFormat.kohya
    if key.startswith((DIFFUSERS_PREFIX, "blocks.", "condition_embedder.", "proj_out.")):
        return LoraFormat.diffusers  # peft's own keys have no prefix
    return None


def detect_format(keys) -> LoraFormat:
    """Which of the three formats a file's keys are in; LoraFileError for none or a mix."""
    kinds = {key: _key_format(key) for key in keys}
    if not kinds:
        raise LoraFileError("no tensors in the file")
    odd = [key for key, kind in kinds.items() if kind is None]
    if odd:
        raise LoraFileError(f"not a Wan LoRA in the diffusers, ComfyUI or kohya format (a key: {odd[0]!r})")
    found = set(kinds.values())
    if len(found) > 1:
        raise LoraFileError(f"keys of several LoRA formats in one file ({', '.join(sorted(k.value for k in found))})")
    return found.pop()


def _known(module: str) -> str | None:
    """`module` if it is a diffusers name this code maps, else None."""
    try:
        native_name(module)
    except LoraFileError:
        return None
    return module


_PARTS = {
    "lora_A.weight": "down",
    "lora_down.weight": "down",
    "lora_B.weight": "up",
    "lora_up.weight": "up",
    "alpha": "alpha",
}


def _split(key: str) -> tuple[str, str]:
    """`<module>.<part>` -> (module, part) for the parts a LoRA file holds; else LoraFileError."""
    for suffix, part in _PARTS.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], part
    raise LoraFileError(
        f"{key!r}: not a LoRA down/up weight or alpha (LyCORIS, bias diffs and full-weight diffs are not read)"
    )


def diffusers_alpha(metadata: dict[str, str], rank: int) -> float:
    """alpha of a diffusers-format file: peft's `lora_alpha` from its metadata, else rank (what
    diffusers and peft assume without one)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return float(rank)
    peft = json.loads(raw)
    if peft.get("transformer.alpha_pattern") or peft.get("transformer.rank_pattern"):
        raise LoraFileError("diffusers LoRA with per-module rank_pattern / alpha_pattern: not read")
    return float(peft.get("transformer.lora_alpha", rank))


def from_state_dict(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> tuple[LoraWeights, LoraFormat]:
    """The adapters of a LoRA state dict in any of the three formats, and the format it was in."""
    metadata = metadata or {}
    fmt = detect_format(tensors)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, part = _split(key)
        if fmt == LoraFormat.comfyui:
            module = from_native(name.removeprefix(COMFYUI_PREFIX))
        elif fmt == LoraFormat.kohya:
            module = from_kohya(name.removeprefix(KOHYA_PREFIX))
        else:
            module = _known(name.removeprefix(DIFFUSERS_PREFIX))
        if module is None:
            raise LoraFileError(
                f"{key!r}: not a linear layer of Wan's transformer (its module names: models/lora_files.py)"
            )
        parts.setdefault(module, {})[part] = value
    weights: LoraWeights = {}
    for module, p in parts.items():
        if "down" not in p or "up" not in p:
            raise LoraFileError(f"module {module}: {'up' if 'down' in p else 'down'} weight missing")
        down, up = p["down"], p["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise LoraFileError(
                f"module {module}: down {tuple(down.shape)} and up {tuple(up.shape)} do not make a LoRA"
            )
        if fmt == LoraFormat.diffusers:
            if "alpha" in p:
                raise LoraFileError(f"module {module}: an .alpha tensor in a diffusers-format file")
            alpha = diffusers_alpha(metadata, down.shape[0])
        else:
            # No .alpha: ComfyUI, musubi and diffusers all take alpha = rank.
            alpha = float(p["alpha"].item()) if "alpha" in p else float(down.shape[0])
        weights[module] = Adapter(down=down.float(), up=up.float(), alpha=alpha)
    return weights, fmt


def load_lora(path: str | Path) -> tuple[LoraWeights, LoraFormat, dict[str, str]]:
    """(adapters, format, safetensors metadata) of a LoRA file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as err:
        raise LoraFileError(f"{path}: not a safetensors file ({err})") from None
    try:
        weights, fmt = from_state_dict(tensors, metadata)
    except LoraFileError as err:
        raise LoraFileError(f"{path}: {err}") from None
    return weights, fmt, metadata
