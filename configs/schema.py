"""Typed schemas for every config group.

Hydra composes `configs/train.yaml` on top of `Config` (registered below as `train_schema`, the first
entry of the defaults list), so every group file, experiment file and command-line override is
checked against these dataclasses as it is merged: an unknown key or a value of the wrong type
stops the run before anything is loaded. `OmegaConf.to_object` then turns the result into plain
dataclass instances, which is what the rest of the code receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class Precision(str, Enum):
    """Mixed precision of the forward/backward (accelerate's `mixed_precision`)."""

    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class DType(str, Enum):
    """Storage dtype of a frozen model component."""

    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class TimestepSampling(str, Enum):
    """How the flow-matching noise level sigma is drawn per sample."""

    uniform = "uniform"
    logit_normal = "logit_normal"
    shifted = "shifted"


class LoggerMode(str, Enum):
    """W&B mode; the WANDB_MODE environment variable, when set, wins over the config."""

    offline = "offline"
    online = "online"
    disabled = "disabled"


class Strategy(str, Enum):
    """How processes share the work (all through accelerate, launched by `accelerate launch`,
    `torchrun` or scripts/slurm/train.sbatch): `single` (one process), `ddp` (data parallel),
    `zero2` / `zero3` (DeepSpeed ZeRO stage 2 / 3)."""

    single = "single"
    ddp = "ddp"
    zero2 = "zero2"
    zero3 = "zero3"


class ModelInit(str, Enum):
    """Where the transformer's weights come from."""

    pretrained = "pretrained"
    random = "random"


class TooShort(str, Enum):
    """What a video shorter than the longest clip length gets."""

    shorter = "shorter"
    skip = "skip"


# `raise` is a keyword, hence the functional form (OmegaConf matches enum values by member name).
OnError = Enum("OnError", {"skip": "skip", "raise": "raise"}, type=str)
OnError.__doc__ = """A clip failing to decode mid-run: skip it (counted) or stop the run."""

# diffusers' get_scheduler names (diffusers.optimization.SchedulerType), listed here so a bad name
# fails at start without importing diffusers; tests/test_config.py checks the two lists agree.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "piecewise_constant",
)
Scheduler = Enum("Scheduler", {name: name for name in SCHEDULERS}, type=str)
Scheduler.__doc__ = """A learning-rate schedule of diffusers' `get_scheduler`."""


class AttentionBackend(str, Enum):
    """Which implementation computes the transformer's self-attention (attn1).

    `dense`: exact full attention everywhere (torch SDPA). The others compute radial attention's
    kept blocks: `triton` (our kernels, forward and backward; CUDA, or the CPU interpreter with
    TRITON_INTERPRET=1), `flex` (PyTorch FlexAttention, compiled; forward-only on CPU),
    `reference` (plain PyTorch, O(S^2) memory: small inputs and tests).
    """

    dense = "dense"
    reference = "reference"
    flex = "flex"
    triton = "triton"


class Expert(str, Enum):
    """Which expert of a two-expert model (Wan2.2-A14B) a run trains."""

    high_noise = "high_noise"
    low_noise = "low_noise"


@dataclass
class ModelConfig:
    """The pretrained video diffusion model (diffusers format) to fine-tune."""

    id: str = MISSING
    """Hub id of a diffusers-format model, or `tiny-wan` for the demo's tiny random model."""
    path: str | None = None
    """Local diffusers-format folder; loaded instead of the hub. For `tiny-wan` it is built here once,
    and only if it lies under cache_dir (a mistyped path is an error, not a new random model)."""
    init: ModelInit = ModelInit.pretrained
    """`pretrained` loads the weights; `random` builds the same architecture with random weights
    (models/random_init.py), for speed and memory work where no weights can be downloaded."""
    transformer_dtype: DType = DType.float32
    """Storage dtype of the frozen transformer weights (LoRA weights are always fp32)."""
    vae_dtype: DType = DType.float32
    """Storage dtype of the frozen VAE: float32, float16 or bfloat16."""
    text_encoder_dtype: DType = DType.float32
    """Storage dtype of the frozen text encoder: float32, float16 or bfloat16."""
    max_text_tokens: int = 512
    """Prompt length the text encoder pads/truncates to (Wan: 512)."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block in the backward to save activation memory."""
    checkpoint_keep_attention: int = 0
    """With gradient_checkpointing: the first N blocks (-1: all) keep their self-attention outputs
    rather than recompute attention in the backward (models/checkpointing.py): one attention
    forward less per block and step, for S x hidden x 2 bytes more memory per block (bf16). Kept
    for the triton and dense backends, eager or with compile_blocks. Measured at wan_4x's shape on
    an H100: docs/recipes.md."""
    compile_blocks: bool = False
    """torch.compile the transformer blocks (one graph serves the blocks alike), fusing the
    elementwise work around the matrix products (norms, rotary embedding, modulation). With
    gradient_checkpointing the checkpoint is compiled with each block (models/checkpointing.py),
    else diffusers' `compile_repeated_blocks`. The first steps are slower while it compiles.
    Attention backends work inside the compiled blocks on GPU; on CPU the triton backend
    (interpreter) cannot be compiled. On in the wan experiments (at 4x on an H100, 24% off the
    step); why not everywhere: docs/recipes.md."""
    expert: Expert | None = None
    """Two-expert models (Wan2.2-A14B: `transformer` denoises the noise levels at and above the
    model's boundary_ratio, `transformer_2` those below): the one this run loads and trains a LoRA
    on, `high_noise` or `low_noise`; its noise levels are the only ones drawn. Train the other
    expert in a second run (name=...): each expert gets its own LoRA, loaded on its own
    transformer. Required for such models, refused for others."""
    compile_backend: str = "inductor"
    """torch.compile backend for compile_blocks (`aot_eager` traces the same graphs without
    generating code: the tests use it)."""


@dataclass
class DatasetSource:
    """One dataset of a mix."""

    path: str = MISSING
    """A folder of videos with .txt captions, a metadata.csv or a metadata.jsonl."""
    weight: float = 1.0
    """Relative share of each epoch's samples drawn from this dataset."""


@dataclass
class DataConfig:
    """Training clips: where they are, how they are cut, and what happens to bad ones."""

    root: str | None = None
    """A folder (searched recursively) of videos, each with a same-named .txt caption."""
    metadata: str | None = None
    """A metadata.csv (columns video, caption) or metadata.jsonl; paths relative to it."""
    mix: list[DatasetSource] = field(default_factory=list)
    """Several datasets with weights, instead of root / metadata."""
    demo: bool = False
    """Generate the demo dataset (small synthetic H.264 clips with captions) into `root`, which
    must lie under cache_dir: the project writes generated data nowhere else."""
    fps: float | None = 16.0
    """Frame rate clips are sampled at, by timestamps (Wan: 16); null takes the source's own frames."""
    frames: list[int] = field(default_factory=lambda: [81])
    """Clip lengths (4n+1 frames). A video gets the longest it is long enough for (see too_short)."""
    sizes: list[list[int]] = field(default_factory=lambda: [[480, 832], [832, 480], [624, 624]])
    """[height, width] buckets (multiples of 16); a video gets the one closest to its aspect ratio,
    is resized to cover it and centre-cropped. Default: Wan's 480p landscape, portrait and square."""
    too_short: TooShort = TooShort.shorter
    """A video shorter than the longest clip: `shorter` falls to the longest clip it fits, `skip`
    rejects it."""
    on_error: OnError = OnError.skip
    """A clip failing to decode mid-run: `skip` (replace it, count it) or `raise` (stop)."""
    batch_size: int = 1
    """Clips per micro-batch on each process (one bucket per batch)."""
    num_workers: int = 4
    """DataLoader worker processes decoding videos (0 decodes in the training process)."""
    prefetch_factor: int = 2
    """Batches each worker decodes ahead."""
    decode_threads: int = 1
    """Threads decord may use per worker; bounded so workers don't oversubscribe the cores."""
    cache: str | None = None
    """Folder of precomputed latents and text embeddings (`python -m scripts.precompute`); null
    encodes on the fly."""
    cache_dtype: DType = DType.bfloat16
    """Storage dtype of cached latents and embeddings."""
    val_clips: int = 0
    """Clips of each length (data.frames) set apart from training and scored by the held-out loss
    (validation.*): chosen by train.seed, never trained on. A length with fewer clips than this
    plus one keeps all but one for training."""
    require_cache: bool = False
    """Refuse to train without `cache`: for models whose VAE and text encoder, kept on every GPU to
    encode on the fly, would not leave room for the step (the 14B at 4x)."""

    def sources(self) -> list[DatasetSource]:
        """The datasets of this config: `mix`, or the one of root / metadata."""
        if self.mix:
            return list(self.mix)
        return [DatasetSource(path=p) for p in (self.root, self.metadata) if p]


GluonKernels = Enum(
    "GluonKernels",
    {n: n for n in ("auto", "auto_split", "auto_fwd", "all", "fwd", "fwd_dkdv", "fwd_dq", "fused", "none")},
    type=str,
)
GluonKernels.__doc__ = """Which attention kernels run in Gluon on Hopper (kernels/kernel_choice.py)."""
TmaLoads = Enum("TmaLoads", {n: n for n in ("backward", "all", "none")}, type=str)
TmaLoads.__doc__ = """Which Triton attention kernels load through Hopper's TMA (kernels/kernel_choice.py)."""


@dataclass
class KernelConfig:
    """Which kernels the triton backend runs (kernels/kernel_choice.py has what each choice means).
    Recorded with the run; RADIAL_GLUON / RADIAL_TRITON_TMA in the environment override them, and
    the run logs and records the value they set."""

    gluon: GluonKernels = GluonKernels.auto
    """auto: on an H100/H200 the Gluon forward and one-kernel backward (the split pair while
    deterministic algorithms are on), Triton elsewhere; auto_split, auto_fwd: fewer Gluon kernels;
    all, fwd, fwd_dkdv, fwd_dq, fused: those Gluon kernels or an error; none: Triton throughout."""
    tma: TmaLoads = TmaLoads.backward
    """Which Triton kernels stream their tiles through TMA on sm_90+: backward (measured 2-4% faster
    there, the forward no faster), all or none."""


# Environment variables that override attention.kernels.<key> (for a benchmark sweep without
# editing its command); the trainer logs the override and records the value it sets.
KERNEL_ENVIRONMENT = {"gluon": "RADIAL_GLUON", "tma": "RADIAL_TRITON_TMA"}


class MaskPattern(str, Enum):
    """Which static block-sparse mask the sparse backends run: Radial Attention's, or a local
    window of frames (kernels/local_mask.py), the control of the same density."""

    radial = "radial"
    local = "local"


@dataclass
class AttentionConfig:
    """Self-attention: dense, or Radial Attention's static block-sparse mask (arXiv 2506.19852)."""

    backend: AttentionBackend = AttentionBackend.dense
    """dense (exact, SDPA), triton (our kernels), flex (FlexAttention, CUDA only for training) or
    reference (plain PyTorch, small inputs)."""
    block_size: int = 128
    """Side of the mask's square blocks, in tokens."""
    decay: float = 1.0
    """Scales the band width of frame pairs 2+ apart (the paper uses 0.2 for Wan at 1x length)."""
    sink: bool = True
    """Every frame attends the first latent frame in full (Wan)."""
    legacy_adjacent: bool = False
    """Adjacent frames attend a half-frame band instead of the whole frame (an older variant)."""
    pattern: MaskPattern = MaskPattern.radial
    """`radial` (the paper's mask, decay/sink/legacy_adjacent below) or `local`: each frame sees
    the frames within local_window of it in full, and the first frame with sink: a sliding window
    to compare the radial shape with at equal density."""
    local_window: int = 6
    """For pattern=local: how many frames each side a frame attends."""
    dense_layers: int = 0
    """The first N transformer blocks keep dense attention (the paper: 1 for Wan)."""
    dense_timesteps: int = 0
    """Generation: the first N denoising steps use dense attention in every block."""
    train_dense_above_sigma: float | None = None
    """Training: samples with noise level sigma >= this use dense attention; null (the default)
    never does, so the LoRA learns to work with the sparse pattern at every noise level."""
    kernels: KernelConfig = field(default_factory=KernelConfig)


class LoraFormat(str, Enum):
    """A LoRA file format (models/lora_files.py): `diffusers` (WanPipeline.load_lora_weights),
    `comfyui` (Wan's native names, ComfyUI's LoRA loader) or `kohya` (kohya-ss / musubi-tuner)."""

    diffusers = "diffusers"
    comfyui = "comfyui"
    kohya = "kohya"


@dataclass
class LoraConfig:
    """peft LoRA adapters on the transformer."""

    rank: int = 16
    """Rank r of each adapter's down/up matrices."""
    alpha: float = 16.0
    """Scale: the adapter adds (alpha / rank) * B A x."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    """Module names (peft's matching rules) that get adapters."""
    init_from: str | None = None
    """A Wan LoRA file (diffusers, ComfyUI or kohya format) the adapters start from instead of
    peft's initialisation: someone else's LoRA, or a 1x LoRA to extend to 4x. Its rank and adapted
    modules must match rank and target_modules. Read at a fresh start; a resume takes the
    checkpoint's adapters."""
    formats: list[LoraFormat] = field(default_factory=lambda: [LoraFormat.diffusers, LoraFormat.comfyui])
    """Files every export writes (lora/ and each checkpoint): diffusers, comfyui, kohya."""


@dataclass
class OptimConfig:
    """AdamW and the learning-rate schedule."""

    lr: float = 1e-4
    """Peak learning rate (after warm-up). The one setting of the optimizer a resume may change."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW's moment decay rates."""
    weight_decay: float = 1e-4
    """AdamW's decoupled weight decay."""
    eps: float = 1e-8
    """AdamW's denominator epsilon."""
    scheduler: Scheduler = Scheduler.constant_with_warmup
    """The learning-rate schedule after warm-up (diffusers' `get_scheduler`)."""
    warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""


@dataclass
class TrainerConfig:
    """How the run is spread over processes and which precision it uses (accelerate)."""

    strategy: Strategy = Strategy.single
    """single, ddp, zero2 or zero3 (DeepSpeed ZeRO stage 2 / 3)."""
    mixed_precision: Precision = Precision.no
    """Autocast of the forward/backward: no, fp16 or bf16."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    offload_optimizer: bool = False
    """zero2 / zero3: keep optimizer state in CPU memory (DeepSpeed offload)."""
    offload_params: bool = False
    """zero3: keep parameters in CPU memory between uses (DeepSpeed offload)."""
    sequence_parallel: int = 1
    """Split each clip's tokens over this many processes (Ulysses: all-to-all around
    self-attention; models/sequence_parallel.py), for clips whose activations don't fit one GPU.
    Groups are consecutive ranks (one node); it must divide the process count and the model's
    attention heads. The global batch is batch_size x accumulation x processes / this."""


@dataclass
class LoggerConfig:
    """Experiment tracking with Weights & Biases."""

    mode: LoggerMode = LoggerMode.offline
    """offline (synced later with `wandb sync`), online or disabled; WANDB_MODE wins."""
    project: str = "radial-lora"
    """W&B project."""
    entity: str | None = None
    """W&B team or user; null: your default."""
    log_every: int = 1
    """Log metrics every N optimizer steps."""


@dataclass
class TimestepConfig:
    """Noise-level sampling of the flow-matching objective."""

    sampling: TimestepSampling = TimestepSampling.shifted
    """uniform, logit_normal or shifted."""
    logit_mean: float = 0.0
    """For `logit_normal`: mean of the normal whose sigmoid is sigma."""
    logit_std: float = 1.0
    """For `logit_normal`: its standard deviation."""
    shift: float = 3.0
    """For `shifted`: sigma' = shift*sigma / (1 + (shift-1)*sigma), weighting noisier levels (Wan: 3.0
    at 480p, 5.0 at 720p)."""
    min_sigma: float = 0.0
    """Noise levels are drawn from [min_sigma, max_sigma) only (the scheme's distribution cut to the
    range): one expert's share of a two-expert model (model.expert sets it), or a curriculum."""
    max_sigma: float = 1.0
    """See min_sigma."""


class TrainMode(str, Enum):
    """What trains: LoRA adapters on the frozen transformer, or every transformer weight."""

    lora = "lora"
    full = "full"


@dataclass
class TrainConfig:
    """The training loop."""

    mode: TrainMode = TrainMode.lora
    """`lora`: adapters per lora.* on the frozen transformer, exported as LoRA files. `full`: every
    transformer weight trains (pretraining from scratch with model.init=random, or full
    fine-tuning), exported as a whole diffusers model folder, `model/` (weights in shards of at most
    16 MiB), that model.path can load."""
    condition_frames: int = 0
    """Frame conditioning: in a share `condition_probability` of the samples the first N latent
    frames are given clean (timestep 0 on their tokens, Wan2.2 TI2V style) and left out of the
    loss, so one model learns both to generate and to continue given frames. 0: off."""
    condition_probability: float = 0.5
    """Share of samples conditioned on their first condition_frames latent frames."""
    steps: int = 100
    """Optimizer steps (each is gradient_accumulation_steps micro-batches)."""
    seed: int = 0
    """Seeds the data order, the noise, the timesteps and the LoRA's initialisation."""
    deterministic: bool = False
    """PyTorch's deterministic algorithms (torch.use_deterministic_algorithms, warning instead of
    stopping at ops that have none; CUBLAS_WORKSPACE_CONFIG set for cuBLAS unless already set):
    with a fixed seed, bitwise-repeatable gradients where the kernels allow. The attention op then
    runs the split Gluon backward on Hopper instead of the one-kernel one, whose dQ adds land in
    varying order (4% slower on an H100; docs/radial_attention.md, attention.kernels.gluon)."""
    checkpoint_every: int = 50
    """Save a resumable checkpoint (and a LoRA export) every N steps; 0 only saves at the end."""
    keep_last: int = 2
    """Checkpoints kept in the run directory; older ones are deleted."""
    resume: str | None = None
    """null: start fresh; `latest`: continue from the newest checkpoint of this run (an error if
    there is none); `auto`: the same, or start fresh if there is none (what the Slurm script
    passes); or a checkpoint folder. A resumed run keeps its saved config: only train.steps,
    stop_after_step, checkpoint_every, keep_last, logger.*, data loader speed settings and
    cache_dir may change (train/run_config.py)."""
    stop_after_step: int | None = None
    """End this invocation (with a checkpoint) once this step is reached, leaving `steps` and the LR
    schedule as they are; `resume=latest` continues later. For jobs shorter than the run."""
    ema_decay: float = 0.0
    """An exponential moving average of the trainable weights (diffusers' EMAModel, its decay
    warming up as (1+n)/(10+n) to this value), kept in fp32 beside them and saved in every
    checkpoint; validation and every export then use the averaged weights, which give cleaner
    samples than the last step's. 0: off. e.g. 0.999 averages over about the last 1,000 steps."""
    timesteps: TimestepConfig = field(default_factory=TimestepConfig)


@dataclass
class ValidationConfig:
    """What a run shows while it trains: sample videos and the held-out loss per clip length."""

    every: int = 0
    """Validate every N optimizer steps and at the last step; 0 never."""
    prompts: list[str] = field(default_factory=list)
    """Sample videos' prompts; empty: the captions of the held-out clips (data.val_clips)."""
    samples: int = 2
    """At most this many sample videos each time (prompts in order, seed `seed + i` for the i-th);
    0 keeps only the held-out loss."""
    seed: int = 0
    """Seed of the first sample video's noise."""
    frames: int | None = None
    """Sample length (4n+1); null: the run's longest, data.frames' maximum."""
    size: list[int] | None = None
    """Sample [height, width]; null: data.sizes' first."""
    steps: int = 30
    """Denoising steps per sample (scripts.generate's default is 50: samples here are a preview)."""
    guidance: float = 5.0
    """Classifier-free guidance scale."""
    negative_prompt: str = ""
    sigmas: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75])
    """Noise levels the held-out loss is measured at (fixed noise per clip): a mean over levels
    that show structure (low), motion (middle) and layout (high)."""


@dataclass
class Config:
    """One training run."""

    name: str = "tiny"
    """Run name; the run directory is `{output_root}/{name}`. No timestamp, so every rank of a
    multi-process run (and a restarted job) finds the same directory."""
    output_root: str = "outputs"
    """Folder of run directories."""
    cache_dir: str = ".cache"
    """Where generated data goes, and nowhere else: the demo's videos and tiny model, kept between
    runs."""
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    attention: AttentionConfig = MISSING
    lora: LoraConfig = MISSING
    optim: OptimConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


# The Hydra tree, as an absolute path: this folder, configs/, in a checkout (editable install)
# and radial_lora/configs in a built one. Absolute, because Hydra resolves a relative config_path
# against the importing package when the entry point is a console script, and `radial_lora` is a
# namespace package that importlib.resources cannot list in an editable install.
CONFIG_DIR = str(Path(__file__).resolve().parent)


def register_configs() -> None:
    """Register the root schema so `train.yaml` can name it first in its defaults list."""
    ConfigStore.instance().store(name="train_schema", node=Config)


class ConfigError(ValueError):
    """A config value that type checking cannot catch (a range, a divisibility, a combination)."""


def typed_config(cfg: DictConfig) -> Config:
    """The composed config as `Config` dataclasses; raises ConfigError naming a bad key.

    Merged once more onto the schema because Hydra lets a `+key=value` override add keys the
    schema does not have (a misspelled `+optim.lr_warmup=…` would otherwise be silently ignored).
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg, resolve=False))
        missing = sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(
                f"{missing[0]}: Missing mandatory value (set it on the command line, e.g. {missing[0]}=...)"
            )
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        msg = str(getattr(err, "msg", err)).splitlines()[0]
        raise ConfigError(f"{key}: {msg}" if key else msg) from None


def _inside(path: str | None, folder: str) -> bool:
    return bool(path) and Path(path).resolve().is_relative_to(Path(folder).resolve())


def validate(cfg: Config) -> None:
    """Check what the schema's types cannot; raises ConfigError naming the key."""
    checks = [
        (
            cfg.data.cache is not None or not cfg.data.require_cache,
            "data.cache is required here (data.require_cache): encode the clips once with `python -m scripts.precompute "
            "<the same overrides> data.cache=DIR`, then train with data.cache=DIR",
        ),
        (
            bool(cfg.data.frames) and all(f >= 1 and (f - 1) % 4 == 0 for f in cfg.data.frames),
            f"data.frames={cfg.data.frames} must be 4n+1 each (e.g. 17, 33, 81): Wan's VAE keeps the first frame "
            "and compresses the rest 4x in time",
        ),
        (
            bool(cfg.data.sizes)
            and all(len(hw) == 2 and hw[0] % 16 == 0 and hw[1] % 16 == 0 and min(hw) > 0 for hw in cfg.data.sizes),
            f"data.sizes={cfg.data.sizes} must be [height, width] pairs, multiples of 16 (VAE 8x, then 2x2 patches)",
        ),
        (
            len(cfg.data.sources()) >= 1
            and not (cfg.data.mix and (cfg.data.root or cfg.data.metadata))
            and not (cfg.data.root and cfg.data.metadata),
            "data: set exactly one of data.root, data.metadata or data.mix",
        ),
        (all(s.weight > 0 for s in cfg.data.mix), "data.mix weights must be > 0"),
        (cfg.data.fps is None or cfg.data.fps > 0, f"data.fps={cfg.data.fps} must be > 0 (or null)"),
        (cfg.data.batch_size >= 1, f"data.batch_size={cfg.data.batch_size} must be >= 1"),
        (cfg.data.num_workers >= 0, f"data.num_workers={cfg.data.num_workers} must be >= 0"),
        (cfg.data.prefetch_factor >= 1, f"data.prefetch_factor={cfg.data.prefetch_factor} must be >= 1"),
        (
            not cfg.data.demo or _inside(cfg.data.root, cfg.cache_dir),
            f"data.demo=true generates clips, only under cache_dir={cfg.cache_dir} (data.root={cfg.data.root}); "
            "for your own videos use data=videos data.root=DIR",
        ),
        (cfg.train.steps >= 1, f"train.steps={cfg.train.steps} must be >= 1"),
        (cfg.train.checkpoint_every >= 0, f"train.checkpoint_every={cfg.train.checkpoint_every} must be >= 0"),
        (cfg.train.keep_last >= 0, f"train.keep_last={cfg.train.keep_last} must be >= 0"),
        (
            cfg.trainer.gradient_accumulation_steps >= 1,
            f"trainer.gradient_accumulation_steps={cfg.trainer.gradient_accumulation_steps} must be >= 1",
        ),
        (cfg.lora.rank >= 1, f"lora.rank={cfg.lora.rank} must be >= 1"),
        (cfg.lora.alpha > 0, f"lora.alpha={cfg.lora.alpha} must be > 0 (0 makes the LoRA a no-op)"),
        (0 <= cfg.lora.dropout < 1, f"lora.dropout={cfg.lora.dropout} must be in [0, 1)"),
        (bool(cfg.lora.target_modules), "lora.target_modules must name at least one module"),
        (cfg.optim.lr > 0, f"optim.lr={cfg.optim.lr} must be > 0"),
        (cfg.optim.eps > 0, f"optim.eps={cfg.optim.eps} must be > 0"),
        (cfg.optim.weight_decay >= 0, f"optim.weight_decay={cfg.optim.weight_decay} must be >= 0"),
        (all(0 <= b < 1 for b in cfg.optim.betas), f"optim.betas={cfg.optim.betas} must each be in [0, 1)"),
        (cfg.optim.warmup_steps >= 0, f"optim.warmup_steps={cfg.optim.warmup_steps} must be >= 0"),
        (cfg.optim.max_grad_norm >= 0, f"optim.max_grad_norm={cfg.optim.max_grad_norm} must be >= 0 (0: no clipping)"),
        (cfg.trainer.sequence_parallel >= 1, f"trainer.sequence_parallel={cfg.trainer.sequence_parallel} must be >= 1"),
        (len(cfg.optim.betas) == 2, f"optim.betas={cfg.optim.betas} must be two numbers"),
        (
            cfg.model.checkpoint_keep_attention == 0 or cfg.model.gradient_checkpointing,
            "model.checkpoint_keep_attention needs model.gradient_checkpointing=true (without checkpointing every "
            "activation is kept anyway)",
        ),
        (
            cfg.model.checkpoint_keep_attention >= -1,
            f"model.checkpoint_keep_attention={cfg.model.checkpoint_keep_attention} must be a block count or -1 (all)",
        ),
        (cfg.attention.block_size >= 16, f"attention.block_size={cfg.attention.block_size} must be >= 16"),
        (cfg.attention.decay > 0, f"attention.decay={cfg.attention.decay} must be > 0"),
        (cfg.attention.dense_layers >= 0, f"attention.dense_layers={cfg.attention.dense_layers} must be >= 0"),
        (cfg.attention.local_window >= 0, f"attention.local_window={cfg.attention.local_window} must be >= 0"),
        (cfg.data.val_clips >= 0, f"data.val_clips={cfg.data.val_clips} must be >= 0"),
        (cfg.validation.every >= 0, f"validation.every={cfg.validation.every} must be >= 0 (0: never)"),
        (cfg.validation.samples >= 0, f"validation.samples={cfg.validation.samples} must be >= 0"),
        (cfg.validation.steps >= 1, f"validation.steps={cfg.validation.steps} must be >= 1"),
        (
            cfg.validation.frames is None or (cfg.validation.frames - 1) % 4 == 0 and cfg.validation.frames >= 1,
            f"validation.frames={cfg.validation.frames} must be 4n+1",
        ),
        (
            cfg.validation.size is None
            or len(cfg.validation.size) == 2
            and all(v > 0 and v % 16 == 0 for v in cfg.validation.size),
            f"validation.size={cfg.validation.size} must be [height, width], multiples of 16",
        ),
        (all(0 < s < 1 for s in cfg.validation.sigmas), f"validation.sigmas={cfg.validation.sigmas} must be in (0, 1)"),
        (cfg.train.condition_frames >= 0, f"train.condition_frames={cfg.train.condition_frames} must be >= 0"),
        (
            0 <= cfg.train.condition_probability <= 1,
            f"train.condition_probability={cfg.train.condition_probability} must be in [0, 1]",
        ),
        (
            cfg.train.mode != TrainMode.full or cfg.trainer.strategy not in (Strategy.zero3,),
            "train.mode=full is not supported with trainer=zero3 (exporting a sharded full model is not built); "
            "use single, ddp or zero2",
        ),
        (
            cfg.train.mode != TrainMode.full or not cfg.lora.init_from,
            "lora.init_from starts LoRA adapters; train.mode=full trains no adapters",
        ),
        (
            0 <= cfg.train.timesteps.min_sigma < cfg.train.timesteps.max_sigma <= 1,
            f"train.timesteps.min_sigma={cfg.train.timesteps.min_sigma} and max_sigma={cfg.train.timesteps.max_sigma} "
            "must satisfy 0 <= min_sigma < max_sigma <= 1",
        ),
        (0 <= cfg.train.ema_decay < 1, f"train.ema_decay={cfg.train.ema_decay} must be in [0, 1) (0: off)"),
        (
            cfg.train.ema_decay == 0 or cfg.trainer.strategy not in (Strategy.zero2, Strategy.zero3),
            "train.ema_decay needs each process to hold the trainable weights whole and in fp32: use trainer=single "
            "or ddp (not DeepSpeed)",
        ),
        (
            cfg.train.condition_frames == 0 or cfg.trainer.sequence_parallel == 1,
            "train.condition_frames is not supported with trainer.sequence_parallel > 1 (the per-token timesteps "
            "are not split over the group)",
        ),
        (cfg.logger.log_every >= 1, f"logger.log_every={cfg.logger.log_every} must be >= 1"),
        ("/" not in cfg.name and cfg.name not in ("", ".", ".."), f"name={cfg.name!r} must be a plain folder name"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
