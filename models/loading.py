"""Load a diffusers-format video model by name, with each component in its configured dtype."""

from __future__ import annotations

from pathlib import Path

import torch

from radial_lora.configs.schema import ConfigError, ModelConfig

# Small random models built on the spot: model id -> (module of models/ that builds it, preset).
# tiny_wan: the demo's latent-space Wan; pixel_wan: a pixel-space Wan (identity VAE) for
# experiments scored against a simulator (docs/length_extension.md).
TINY_MODELS = {
    "tiny-wan": ("tiny_wan", "tiny"),
    "tiny-wan-gpu": ("tiny_wan", "gpu"),
    "tiny-wan2.2-ti2v": ("tiny_wan", "ti2v"),
    "tiny-wan2.2-a14b": ("tiny_wan", "a14b"),
    "tiny-wan2.1-i2v": ("tiny_wan", "i2v"),
    "tiny-wan2.2-i2v-a14b": ("tiny_wan", "a14b_i2v"),
    "pixel-wan": ("pixel_wan", "sprites"),
    "pixel-wan-toy": ("pixel_wan", "toy"),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name) -> torch.dtype:
    """torch dtype for a config dtype name (an enum member or its string value)."""
    return _DTYPES[getattr(name, "value", name)]


def model_source(cfg: ModelConfig) -> str:
    """The folder or hub id that `from_pretrained` reads; builds the tiny demo model if needed."""
    if cfg.id in TINY_MODELS:
        if not cfg.path:
            raise ValueError(f"model.path must name a folder for model.id={cfg.id} (it is built there)")
        module, preset = TINY_MODELS[cfg.id]
        if module == "pixel_wan":
            from radial_lora.models.pixel_wan import build_pixel_wan as build
        else:
            from radial_lora.models.tiny_wan import build_tiny_wan as build
        return str(build(cfg.path, preset=preset))
    if cfg.path:
        if not Path(cfg.path, "model_index.json").exists():
            raise FileNotFoundError(f"model.path={cfg.path} is not a diffusers model folder (no model_index.json)")
        return cfg.path
    return cfg.id


def weights_fingerprint(cfg: ModelConfig) -> str | None:
    """A cheap fingerprint of the base model's weights: for each weight file of the local folder
    (model.path, or the hub id's cached snapshot), its relative path, size and a hash of its first
    MiB (the safetensors header: every tensor's name, dtype, shape and offsets, then data). It tells
    another checkpoint of the same architecture from the trained one without reading GBs. None
    when there is no local folder (random init, or a hub model not cached yet)."""
    import hashlib

    if cfg.init == "random":
        return None
    folder = Path(cfg.path) if cfg.path else None
    if folder is None:
        from huggingface_hub import try_to_load_from_cache

        index = try_to_load_from_cache(cfg.id, "model_index.json")
        folder = Path(index).parent if isinstance(index, str) else None
    if folder is None or not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pth") and p.is_file()):
        with open(path, "rb") as f:
            head = f.read(2**20)
        digest.update(f"{path.relative_to(folder)}:{path.stat().st_size}:".encode() + hashlib.sha256(head).digest())
    return digest.hexdigest()[:16]


def _not_found(source: str, err: Exception) -> FileNotFoundError:
    why = str(err).splitlines()[0] if str(err) else type(err).__name__
    return FileNotFoundError(
        f"cannot load model {source!r} ({why[:160]}). Without network access, download it elsewhere "
        f"(`hf download {source} --local-dir DIR`) and set model.path=DIR"
    )


def check_model_available(cfg: ModelConfig, cache_dir: str | None = None) -> None:
    """Fail at once (before data is scanned) if the model cannot be had: a hub model neither cached
    nor reachable, or a tiny demo model whose folder is missing outside `cache_dir` (it is built
    only there: a mistyped model.path must not become a random model written somewhere)."""
    if cfg.id in TINY_MODELS and cfg.path and not Path(cfg.path, "model_index.json").exists():
        inside = cache_dir and Path(cfg.path).resolve().is_relative_to(Path(cache_dir).resolve())
        if not inside:
            raise FileNotFoundError(
                f"model.path={cfg.path} holds no model (no model_index.json); the tiny demo model "
                f"is built only under cache_dir={cache_dir}"
            )
    if cfg.path or cfg.init == "random" or cfg.id in TINY_MODELS:
        return
    from huggingface_hub import HfApi, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(cfg.id, "model_index.json"), str):
        return  # in the local Hugging Face cache
    try:
        HfApi().model_info(cfg.id, timeout=15)
    except Exception as err:  # offline, unknown id, no access: all mean no download
        raise _not_found(cfg.id, err) from None


def load_pipeline(
    cfg: ModelConfig, transformer: bool = True, device=None, text_encoder: bool = True, both_experts: bool = False
):
    """The model's pipeline (`WanPipeline`, or `WanImageToVideoPipeline` for an image-to-video
    model) with the transformer, VAE and text encoder in their configured dtypes.

    Loading the whole pipeline (rather than each class by hand) keeps training on exactly the
    path users take for inference, and gives us its `encode_prompt`. `transformer=False` leaves
    the transformer out (encoding-only work such as the latent cache); `text_encoder=False` leaves
    the text encoder and the CLIP image encoder out (training from a latent cache, whose prompts
    and images are already embedded: UMT5-XXL has 5.68B parameters, on every process). With
    `model.init=random` the architecture is built with random weights on `device`
    (models/random_init.py). A two-expert model loads model.expert alone as `transformer`
    (training), or with `both_experts` both, as diffusers generates with them (`transformer` high
    noise, `transformer_2` low noise).
    """

    dtypes = {
        "transformer": torch_dtype(cfg.transformer_dtype),
        "vae": torch_dtype(cfg.vae_dtype),
        "text_encoder": torch_dtype(cfg.text_encoder_dtype),
        "default": torch.float32,
    }
    expert = getattr(cfg.expert, "value", cfg.expert)
    if cfg.init == "random":
        from radial_lora.models.random_init import random_pipeline

        return random_pipeline(
            cfg.id, dtypes, device or "cpu", transformer=transformer, text_encoder=text_encoder, expert=expert,
            both_experts=both_experts,
        )  # fmt: skip
    source = model_source(cfg)
    # A pixel-space model's folder names its identity VAE class (models/pixel_wan.py); diffusers
    # loads a class of another library only once its module is imported.
    import radial_lora.models.pixel_wan  # noqa: F401

    try:
        folder = pipeline_config(source)
        pipeline = pipeline_class(folder.get("_class_name"), source)
        two_experts = folder.get("transformer_2", [None])[0] is not None
        one_expert = two_experts and not both_experts  # loaded by hand below, alone
        if not (two_experts and both_experts):
            check_expert(cfg.id, expert, two_experts)
        wanted = {
            "transformer": transformer and not one_expert,
            "transformer_2": transformer and two_experts and not one_expert,
            "text_encoder": text_encoder,
        }
        if folder.get("image_encoder", [None])[0] is not None:
            wanted["image_encoder"] = text_encoder  # the CLIP image encoder goes with the text encoder
        pipe = pipeline.from_pretrained(
            source, dtype=dtypes, **{name: None for name, keep in wanted.items() if not keep}
        )
        if one_expert and transformer:  # only the trained expert, as the pipeline's `transformer`
            from diffusers import WanTransformer3DModel

            folder = EXPERT_FOLDERS[expert]
            pipe.transformer = WanTransformer3DModel.from_pretrained(
                source, subfolder=folder, torch_dtype=dtypes["transformer"]
            )
        return pipe
    except Exception as err:
        if cfg.path or isinstance(err, ConfigError):  # a local folder that fails to load is not a download problem
            raise
        raise _not_found(source, err) from None


PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
"""The diffusers pipeline classes a model folder may name (model_index.json's _class_name)."""


def pipeline_config(source: str) -> dict:
    """The model folder's (or hub id's) model_index.json."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(source)


def pipeline_class(name: str | None, source: str):
    """The diffusers class of a model folder's pipeline; a ConfigError for classes not supported."""
    import diffusers

    if name not in PIPELINES:
        raise ConfigError(f"{source}: a {name} model; supported pipelines: {', '.join(PIPELINES)}")
    return getattr(diffusers, name)


EXPERT_FOLDERS = {"high_noise": "transformer", "low_noise": "transformer_2"}
"""Where a two-expert pipeline keeps each expert (diffusers' WanPipeline)."""


def check_expert(model_id: str, expert: str | None, two_experts: bool) -> None:
    """model.expert is required for a two-expert model and refused for any other."""
    if two_experts and expert is None:
        raise ConfigError(
            f"{model_id} has two experts (transformer: high noise, transformer_2: low noise): set "
            "model.expert=high_noise or model.expert=low_noise (one LoRA each, one run each)"
        )
    if not two_experts and expert is not None:
        raise ConfigError(f"model.expert={expert}: {model_id} has one transformer")


def expert_sigma_range(pipe, expert: str | None) -> tuple[float, float]:
    """The noise levels [lo, hi) an expert denoises: at and above the pipeline's boundary_ratio
    for the high-noise expert, below it for the low-noise one; (0, 1) without experts."""
    if expert is None:
        return 0.0, 1.0
    boundary = pipe.config.boundary_ratio
    return (boundary, 1.0) if getattr(expert, "value", expert) == "high_noise" else (0.0, boundary)
