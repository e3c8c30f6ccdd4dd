"""The training loop: one function, read top to bottom.

build (accelerate, data, model, LoRA, optimizer, resume) -> for each optimizer step: train_step
(micro-batches: encode clips and captions, flow-matching loss, backward; clip, step, schedule; one
collective for divergence and stop signals) -> log -> checkpoint; then export the LoRA. The same
code runs one process or many (accelerate). `build` and `train_step` can be called on their own
(tests/test_train_step.py runs steps in the test process).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from radial_lora.configs.schema import AttentionBackend, Config, ConfigError, TimestepConfig, TrainConfig, TrainMode
from radial_lora.data.dataset import BucketBatchSampler, ClipDataset, collate
from radial_lora.data.policy import REASONS, RejectCounts
from radial_lora.data.setup import catalog_for, split_held_out, usable_clips
from radial_lora.models.attention import describe, triton_kernels
from radial_lora.models.loading import (
    check_model_available,
    expert_sigma_range,
    load_pipeline,
    torch_dtype,
    weights_fingerprint,
)
from radial_lora.models.lora import check_targets_exist, export_lora, export_model, init_lora_from
from radial_lora.models.lora_files import LoraFileError, load_lora
from radial_lora.models.setup import check_rotary_covers, prepare_transformer
from radial_lora.train.checkpoint import (
    TrainState,
    check_same_base_model,
    install_hooks,
    io_error,
    load_checkpoint,
    raise_if_any_failed,
    save_checkpoint,
)
from radial_lora.train.distributed import (
    autocast_dtype,
    checkpoint_kwargs,
    gathered,
    make_accelerator,
    model_input_dtype,
    sequence_parallel_group,
)
from radial_lora.train.ema import WeightAverage
from radial_lora.train.preemption import ignore_stop_signals, note_preemption, stop_signals
from radial_lora.train.step import (
    cached_first_frame_inputs,
    conditioned_frames,
    encode_captions,
    first_frame_inputs,
    flow_matching_loss,
    noisy_inputs,
    posterior_params,
    sample_generator,
)
from radial_lora.train.tracking import peak_memory_gb, start_tracking
from radial_lora.train.validation import (
    HeldOutClip,
    check_image_samples,
    check_validation,
    encode_held_out,
    validate_run,
)

# The run's own lines go to the terminal (print) and to {run dir}/train.log through this logger,
# which configs/train.yaml routes to Hydra's file handler only.
log = logging.getLogger("radial_lora.run")
CLIPS_FILE = "clips.json"
"""In the run folder: the clips' buckets and counts, so generation can use a size the run trained on."""


class TrainingDiverged(RuntimeError):
    """The loss or the gradient stopped being finite: the run stops before saving anything."""


@dataclass
class RunResult:
    """How a run ended: finished (its LoRA exported), or stopped early by a signal."""

    step: int
    steps: int
    lora_file: Path | None = None
    """The final LoRA (None when stopped early: the newest checkpoint holds its LoRA)."""
    stopped_by: str | None = None
    """The signal that stopped the run early (SIGINT, SIGTERM, SIGUSR1), or None."""
    checkpoint: Path | None = None
    """The newest checkpoint saved by this invocation, if any."""


def step_checks(accelerator, step_losses: torch.Tensor, grad_norm, stop_received: bool) -> tuple[bool, bool]:
    """(any process diverged, any process got a stop signal): the step's one collective.

    Divergence (a non-finite loss or gradient norm) stops every process together: from such a step
    on the LoRA weights can't be trusted, and saving would rotate the last good checkpoints out
    (train.keep_last). A stop signal may reach processes at different moments, so it is summed too,
    and every process stops after the same step.
    """
    norm = torch.as_tensor(float(grad_norm) if grad_norm is not None else 0.0, device=step_losses.device)
    bad = (~torch.isfinite(step_losses).all() | ~torch.isfinite(norm)).float()
    flags = torch.stack([bad, torch.tensor(float(stop_received), device=step_losses.device)])
    diverged, stop = accelerator.reduce(flags, reduction="sum").tolist()
    return diverged > 0, stop > 0


def diverged_error(step: int, step_losses: torch.Tensor, grad_norm, run_dir: Path) -> TrainingDiverged:
    """The one line a diverged run ends with: where it stopped and how to go on."""
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))  # none yet: empty
    restart = (
        f"Newest checkpoint: {kept[-1]}; resume from it (train.resume=latest)"
        if kept
        else "No checkpoint yet; start again"
    )
    norm = float(grad_norm) if grad_norm is not None else 0.0
    return TrainingDiverged(
        f"non-finite loss or gradient at step {step} (loss {step_losses.tolist()}, grad norm {norm:.3g}); "
        f"stopped without saving. {restart} with a lower optim.lr, or bf16 instead of fp16"
    )


def seed_everything(train_cfg: TrainConfig) -> None:
    """Seed Python, NumPy and torch (accelerate's set_seed) and, with train.deterministic, turn on
    PyTorch's deterministic algorithms: warn-only, so an op without a deterministic version warns
    instead of stopping a long run; cuBLAS needs its workspace setting before its first use."""
    from accelerate.utils import set_seed

    set_seed(train_cfg.seed)
    if train_cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


@dataclass
class Run:
    """A run as `build` made it: what every step and the loop around it use."""

    cfg: Config
    run_dir: Path
    accelerator: Any
    pipe: Any
    """The diffusers pipeline: its VAE and text encoder encode clips (none when latents are cached)."""
    transformer: Any
    """pipe.transformer as accelerate prepared it (DDP / DeepSpeed engine around it)."""
    params: list
    """The trainable parameters: the LoRA adapters, or every transformer weight (train.mode=full)."""
    optimizer: Any
    lr_scheduler: Any
    state: TrainState
    batches: Iterator[dict]
    """Micro-batches from the loader, in the run's order from state.batches_seen on."""
    model_dtype: torch.dtype
    data_rank: int
    data_ranks: int
    catalog: Any
    clips: list
    fingerprint: str | None
    save_kwargs: dict
    stop: Any
    """The process's StopSignals (train/preemption.py)."""
    say: Callable[[str], None]
    skipped: RejectCounts = field(default_factory=RejectCounts)
    """Clips that failed to decode mid-run on this process (each replaced by the next of its bucket)."""
    held_out: list[HeldOutClip] = field(default_factory=list)
    """The clips set apart for the held-out loss (data.val_clips), encoded."""
    timesteps: TimestepConfig | None = None
    """train.timesteps as this run draws them: cut to its expert's noise levels (model.expert)."""
    ema: WeightAverage | None = None
    """The average of the trainable weights (train.ema_decay), or None."""

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def full(self) -> bool:
        return self.cfg.train.mode == TrainMode.full

    def averaged(self):
        """A context with the averaged weights swapped in (train.ema_decay), or a no-op."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def export(self, folder: Path) -> Path:
        """Write the LoRA files, or with train.mode=full the whole model folder (every process
        calls this: under ZeRO-3 the adapters are gathered first), from the averaged weights if
        train.ema_decay is on."""
        with self.averaged():
            return self._export(folder)

    def checkpoint_files(self, folder: Path) -> None:
        """What a checkpoint holds beyond accelerate's state: the export and the weight average."""
        self.export(folder)
        if self.ema is not None and self.main:
            self.ema.save(folder)

    def _export(self, folder: Path) -> Path:
        if self.full:
            return export_model(self.pipe, folder, info=lora_file_info(self.cfg), is_main_process=self.main)
        with gathered(self.accelerator, self.params):
            return export_lora(
                self.accelerator.unwrap_model(self.transformer),
                folder,
                formats=self.cfg.lora.formats,
                info=lora_file_info(self.cfg),
                is_main_process=self.main,
            )

    def total_skipped(self) -> RejectCounts:
        """Mid-run skips summed over processes (a collective: every process calls it together)."""
        local = torch.tensor([self.skipped[r] for r in REASONS], device=self.accelerator.device)
        counts = self.accelerator.reduce(local, reduction="sum")
        return RejectCounts({r: n for r, n in zip(REASONS, counts.tolist()) if n})


def expert_timesteps(cfg: Config, pipe) -> TimestepConfig:
    """train.timesteps cut to the noise levels of the run's expert (model.expert); refuses
    validation that would leave them (held-out loss at other levels, or samples, which need both
    experts)."""
    from dataclasses import replace

    lo, hi = expert_sigma_range(pipe, cfg.model.expert)
    t = cfg.train.timesteps
    timesteps = replace(t, min_sigma=max(t.min_sigma, lo), max_sigma=min(t.max_sigma, hi))
    if cfg.model.expert is None:
        return timesteps
    if timesteps.min_sigma >= timesteps.max_sigma:
        raise ConfigError(
            f"train.timesteps.min_sigma/max_sigma leave no noise level of model.expert={cfg.model.expert.value} "
            f"([{lo:g}, {hi:g}))"
        )
    outside = [s for s in cfg.validation.sigmas if not lo <= s < hi]
    if cfg.data.val_clips and outside:
        raise ConfigError(
            f"validation.sigmas {outside} lie outside the noise levels model.expert={cfg.model.expert.value} "
            f"denoises ([{lo:g}, {hi:g})): set validation.sigmas within them"
        )
    if cfg.validation.every and cfg.validation.samples:
        raise ConfigError(
            f"validation.samples: model.expert={cfg.model.expert.value} loads one of the two experts, and a "
            "sample needs both; set validation.samples=0 (the held-out loss still runs)"
        )
    return timesteps


def check_image_inputs(cfg: Config, pipe, cache) -> None:
    """An image-to-video model trains on its first-frame inputs: a latent cache must hold them
    (built for this model by scripts/precompute.py), and sample videos need held-out clips."""
    from radial_lora.models.image_conditioning import takes_first_frame

    if cache is not None and takes_first_frame(pipe) and not cache.meta.get("first_frame"):
        raise ConfigError(
            f"data.cache={cfg.data.cache} holds no first-frame inputs, which this image-to-video model trains "
            "on: rebuild it with `python -m scripts.precompute`"
        )
    check_image_samples(cfg, pipe)


def lora_file_info(cfg: Config) -> dict[str, str]:
    """What every exported LoRA file (or full model's training.json) states about how it was trained."""
    a = cfg.attention
    attention = {"backend": a.backend.value, "decay": a.decay, "dense_layers": a.dense_layers}
    info = {
        "radial_lora.mode": cfg.train.mode.value,
        "radial_lora.base_model": cfg.model.id,
        "radial_lora.frames": json.dumps(sorted(cfg.data.frames, reverse=True)),
        "radial_lora.sizes": json.dumps([list(s) for s in cfg.data.sizes]),
        "radial_lora.attention": json.dumps(attention),
    }
    if cfg.model.expert is not None:
        info["radial_lora.expert"] = cfg.model.expert.value  # which transformer of the pipeline it goes on
    if cfg.train.mode == TrainMode.lora:
        info["radial_lora.target_modules"] = json.dumps(list(cfg.lora.target_modules))
        info["radial_lora.trained_alpha"] = f"{cfg.lora.alpha:g}"
    return info


@dataclass
class StepResult:
    """What one optimizer step left for the loop: its losses, gradient norm and the stop flag."""

    losses: torch.Tensor
    """[micro-batches] this process's loss of each micro-batch (detached)."""
    grad_norm: torch.Tensor
    stop: bool
    """Some process got a stop signal: every process saves and stops after this step."""


def build(cfg: Config, resolved_config: dict, resume_from: Path | None = None, notes: list[str] = ()) -> Run:
    """Set a run up as configured: accelerate, data, model with our attention and LoRA, optimizer,
    schedule, loader, tracking; and load `resume_from` (a checkpoint folder) if given. `notes` are
    lines for the log (what a resume changed); `resolved_config` goes into W&B."""
    from diffusers.optimization import get_scheduler

    run_dir = Path(cfg.output_root, cfg.name).resolve()
    stop = stop_signals()  # installed by the entry point already; a signal during set-up is kept
    accelerator = make_accelerator(cfg, run_dir)
    device, main = accelerator.device, accelerator.is_main_process
    if cfg.attention.backend == AttentionBackend.flex and device.type != "cuda":
        raise ConfigError(
            "attention.backend=flex: PyTorch's FlexAttention has no backward on CPU; train with "
            "attention.backend=triton (its CPU interpreter, TRITON_INTERPRET=1) or reference"
        )

    def say(message: str) -> None:
        """Print once per run (accelerator.print prints once per node), and keep it in train.log."""
        if main:
            print(message, flush=True)
            log.info(message)

    for note in notes:
        say(note)
    # Sequence parallelism: each group of `sp` processes shares one clip (its tokens split), so
    # data is sharded over groups (data ranks), not processes.
    sp = cfg.trainer.sequence_parallel
    sp_group, data_rank, data_ranks = sequence_parallel_group(sp)
    check_model_available(cfg.model, cache_dir=cfg.cache_dir)
    if cfg.train.mode == TrainMode.lora:
        check_targets_exist(list(cfg.lora.target_modules))
    init_weights = None
    if cfg.lora.init_from and resume_from is None:  # read before the data scan: a bad file fails at once
        try:
            init_weights, init_format, _ = load_lora(cfg.lora.init_from)
        except LoraFileError as err:
            raise ConfigError(f"lora.init_from: {err}") from None
    fingerprint = weights_fingerprint(cfg.model)
    if resume_from is not None:
        check_same_base_model(resume_from, fingerprint, f"model.path={cfg.model.path or cfg.model.id}")
    seed_everything(cfg.train)
    if cfg.train.deterministic:
        say("deterministic: torch.use_deterministic_algorithms on (train.deterministic)")

    # --- data: every process lists and checks the same clips; rejects are counted, not fatal ---
    with accelerator.main_process_first():  # the demo's videos are generated once, by rank 0
        catalog = catalog_for(cfg.data, seed=cfg.train.seed)
    clips, cache = usable_clips(cfg, catalog)
    if (note := check_validation(cfg, text_encoder_loaded=cache is None)) is not None:
        say(note)
    clips, held_out_clips = split_held_out(clips, cfg.data.val_clips, cfg.train.seed)
    buckets = ", ".join(f"{f}x{h}x{w}: {n}" for (f, h, w), n in catalog.bucket_counts().items())
    from_cache = f"; latents from {cfg.data.cache}" if cache else ""
    held_note = f"; {len(held_out_clips)} held out for validation (data.val_clips)" if held_out_clips else ""
    say(f"data: {len(clips)} clips ({buckets}){held_note}; rejected: {catalog.counts.summary()}{from_cache}")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        counts = [[*bucket, n] for bucket, n in catalog.bucket_counts().items()]
        Path(run_dir, CLIPS_FILE).write_text(json.dumps({"buckets_frames_height_width_count": counts}) + "\n")
    dataset = ClipDataset(
        clips,
        fps=cfg.data.fps,
        seed=cfg.train.seed,
        on_error=cfg.data.on_error.value,
        decode_threads=cfg.data.decode_threads,
        random_window=cache is None,
        cache=cache,
    )

    # --- model: pretrained pipeline, our self-attention, LoRA on the transformer ---
    with accelerator.main_process_first():  # rank 0 builds the tiny demo model if it is missing
        # From a latent cache the prompts come embedded: the text encoder is not loaded at all.
        pipe = load_pipeline(cfg.model, device=device, text_encoder=cache is None)
    fingerprint = fingerprint or weights_fingerprint(cfg.model)  # the demo's tiny model exists only now
    timesteps = expert_timesteps(cfg, pipe)
    if cfg.model.expert is not None:
        say(
            f"expert: {cfg.model.expert.value} (noise levels [{timesteps.min_sigma:g}, {timesteps.max_sigma:g}) "
            "of the model's two experts)"
        )
    pipe.vae.requires_grad_(False).eval()
    if pipe.text_encoder is not None:
        pipe.text_encoder.requires_grad_(False).eval()
    check_rotary_covers(pipe, cfg.data.frames, cfg.data.sizes)
    check_image_inputs(cfg, pipe, cache)
    transformer = pipe.transformer
    params = prepare_transformer(transformer, cfg.model, cfg.attention, cfg.lora, sp_group, mode=cfg.train.mode)
    if cfg.train.mode == TrainMode.full:
        say(
            f"training every transformer weight (train.mode=full): {sum(p.numel() for p in params) / 1e6:.1f}M parameters"
        )
    if init_weights is not None:
        init_lora_from(transformer, init_weights, cfg.lora, cfg.lora.init_from)
        say(f"LoRA: starts from {cfg.lora.init_from} ({init_format.value} format, {len(init_weights)} adapters)")
    say(describe(transformer))
    # What the attention inputs will be: the autocast dtype under mixed precision, else the weights'.
    attention_dtype = autocast_dtype(cfg) or torch_dtype(cfg.model.transformer_dtype)
    if (kernels := triton_kernels(transformer, device, attention_dtype)) is not None:
        say(f"triton kernels: {kernels}")
    if sp_group is not None:
        say(f"sequence parallel: tokens of each clip split over {sp} processes, {data_ranks} clips per step")
    if cfg.model.compile_blocks:
        say(f"transformer blocks: torch.compile, backend {cfg.model.compile_backend}")
    pipe.to(device)
    held_out = encode_held_out(pipe, held_out_clips, cfg, cache, device, say) if held_out_clips else []
    transformer.train()
    model_dtype = torch_dtype(cfg.model.transformer_dtype)

    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps
    )
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    lr_scheduler = get_scheduler(
        cfg.optim.scheduler.value,
        optimizer,
        num_warmup_steps=cfg.optim.warmup_steps,
        num_training_steps=cfg.train.steps,
    )
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    model_dtype = model_input_dtype(cfg, accelerator, model_dtype)
    save_kwargs, load_kwargs = checkpoint_kwargs(accelerator)
    state = TrainState()  # saved as JSON with the scheduler's state: nothing registered to be pickled
    install_hooks(accelerator)
    if resume_from is not None:
        saved = load_checkpoint(accelerator, resume_from, **load_kwargs)
        state.load_state_dict(saved["train_state"])
        lr_scheduler.load_state_dict(saved["lr_scheduler"])
        say(f"Resumed from {resume_from} at step {state.step}")
        if lr_scheduler.base_lrs != [cfg.optim.lr] * len(lr_scheduler.base_lrs):
            # The scheduler's saved base rate would win over the config's: a resume "with a lower
            # optim.lr" (the advice after a divergence) must get that rate, at the schedule's point.
            lr_scheduler.base_lrs = [cfg.optim.lr] * len(lr_scheduler.base_lrs)
            for group, lr in zip(optimizer.param_groups, lr_scheduler.get_lr()):
                group["lr"] = lr
            lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
            say(
                f"optim.lr={cfg.optim.lr} from now on (the learning rate is {lr_scheduler._last_lr[0]:.3g} at this step)"
            )

    ema = None
    if cfg.train.ema_decay > 0:
        names = {id(p): n for n, p in accelerator.unwrap_model(transformer).named_parameters()}
        ema = WeightAverage(params, [names[id(p)] for p in params], cfg.train.ema_decay)
        if resume_from is not None and not ema.load(resume_from):
            say(f"weight average (train.ema_decay): {resume_from.name} holds none; it starts from these weights")
        say(f"weight average: decay {cfg.train.ema_decay}, {ema.steps} updates so far; validation and exports use it")

    sampler = BucketBatchSampler(
        [c.bucket for c in clips],
        cfg.data.batch_size,
        cfg.train.seed,
        data_rank,
        data_ranks,
        start=state.batches_seen,
        sources=[c.source for c in clips],
        weights=[s.weight for s in cfg.data.sources()],
    )
    workers = cfg.data.num_workers
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=cfg.data.prefetch_factor if workers > 0 else None,
        worker_init_fn=ignore_stop_signals if workers > 0 else None,
    )
    batches = iter(loader)
    # Workers ignore stop signals (Slurm's SIGTERM to the group must not kill them mid-step), so
    # multiprocessing's exit, which terminates them and then joins them, would wait for them
    # forever after an error. Registered after multiprocessing's own exit hook, this runs first and
    # ends them the way the iterator does when it is released (a no-op if that happened already).
    atexit.register(getattr(batches, "_shutdown_workers", lambda: None))

    start_tracking(accelerator, cfg.logger, cfg.name, run_dir, resolved_config)
    accelerator.log({f"data/rejected/{r}": n for r, n in catalog.counts.items()} | {"data/clips": len(clips)}, step=0)
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        accelerator=accelerator,
        pipe=pipe,
        transformer=transformer,
        params=params,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        state=state,
        batches=batches,
        model_dtype=model_dtype,
        data_rank=data_rank,
        data_ranks=data_ranks,
        catalog=catalog,
        clips=clips,
        fingerprint=fingerprint,
        save_kwargs=save_kwargs,
        stop=stop,
        say=say,
        held_out=held_out,
        timesteps=timesteps,
        ema=ema,
    )


def train_step(run: Run, micro_batches: list[dict]) -> StepResult:
    """One optimizer step over `micro_batches` (trainer.gradient_accumulation_steps of them): encode
    each, flow-matching loss, backward; clip, optimizer step, schedule. Then the step's one
    collective (step_checks): a divergence on any process raises TrainingDiverged on every one,
    before the schedule moves or anything is saved."""
    cfg, accelerator, device, state = run.cfg, run.accelerator, run.accelerator.device, run.state
    sp = cfg.trainer.sequence_parallel
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf
    losses, grad_norm = [], torch.zeros((), device=device)
    for batch in micro_batches:
        for _, reason in batch["skipped"]:
            run.skipped.add(reason)
        if "latent_params" in batch:  # from the cache
            posteriors, text = batch["latent_params"], batch["text"].to(device)
            image = cached_first_frame_inputs(batch, device)
        else:
            posteriors = posterior_params(run.pipe.vae, batch["frames"])
            text = encode_captions(run.pipe, batch["captions"], cfg.model.max_text_tokens, device)
            image = first_frame_inputs(run.pipe, run.transformer, batch["frames"], device)
        first = run.data_rank * cfg.data.batch_size  # this slice's place in the global batch
        gens = [
            sample_generator(cfg.train.seed, state.batches_seen, first + j, device) for j in range(posteriors.shape[0])
        ]
        state.batches_seen += 1
        latents, sigmas, noise = noisy_inputs(
            run.pipe.vae, posteriors, gens, run.timesteps or cfg.train.timesteps, device
        )
        clean = conditioned_frames(gens, cfg.train.condition_frames, cfg.train.condition_probability, device)
        with accelerator.accumulate(run.transformer):
            loss = flow_matching_loss(run.transformer, latents, text, sigmas, noise, run.model_dtype, clean, **image)
            # Gradients are averaged over all processes, but the `sp` processes of a group
            # each hold part of one clip's gradient: x sp makes the average their sum.
            accelerator.backward(loss * sp if sp > 1 else loss)
            if accelerator.sync_gradients:
                grad_norm = accelerator.clip_grad_norm_(run.params, max_norm)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    step_losses = torch.stack(losses)
    diverged, stop = step_checks(accelerator, step_losses, grad_norm, run.stop.received is not None)
    if diverged:
        raise diverged_error(state.step + 1, step_losses, grad_norm, run.run_dir)
    run.lr_scheduler.step()
    if run.ema is not None:
        run.ema.update()
    state.step += 1
    return StepResult(losses=step_losses, grad_norm=grad_norm, stop=stop)


def train(
    cfg: Config,
    resolved_config: dict,
    resume_from: Path | None = None,
    notes: list[str] = (),
    choices: dict | None = None,
) -> RunResult:
    """Run training as configured, from `resume_from` (a checkpoint folder) if given; `notes` are
    lines for the log (what a resume changed). `resolved_config` goes into W&B and, with `choices`
    (the config group options), into every checkpoint."""
    run = build(cfg, resolved_config, resume_from, notes)
    accelerator, state, say, device = run.accelerator, run.state, run.say, run.accelerator.device
    accum = cfg.trainer.gradient_accumulation_steps
    samples_per_step = cfg.data.batch_size * accum * run.data_ranks
    progress = tqdm(total=cfg.train.steps, initial=state.step, desc="train", disable=not run.main, dynamic_ncols=True)
    last_log_time, last_log_step = time.perf_counter(), state.step
    losses, step_times = [], []

    stop_at = min(cfg.train.steps, cfg.train.stop_after_step or cfg.train.steps)
    result = RunResult(step=state.step, steps=cfg.train.steps)

    def stopped_early() -> None:
        """Record the stop and leave the batch script its requeue note (rank 0)."""
        result.stopped_by = run.stop.received or "a signal to another process"
        if run.main:
            note_preemption(state.step, run.stop.received or "signal")

    if run.stop.should_stop(accelerator):  # a signal during set-up: nothing new to save
        stopped_early()
        say(f"Stopped by {result.stopped_by} before the first step; nothing trained in this start")
        stop_at = state.step
    while state.step < stop_at:
        step = train_step(run, [next(run.batches) for _ in range(accum)])
        losses.append(step.losses)
        progress.update(1)

        # --- log: averaged over the micro-batches since the last log and over processes ---
        if state.step % cfg.logger.log_every == 0 or state.step == stop_at:
            mean_loss = accelerator.reduce(torch.cat(losses).mean(), reduction="mean").item()
            now, steps_done = time.perf_counter(), state.step - last_log_step
            step_time = (now - last_log_time) / steps_done
            metrics = {
                "loss": mean_loss,
                "lr": run.lr_scheduler.get_last_lr()[0],
                "grad_norm": float(step.grad_norm),
                "step_time_s": step_time,
                "samples_per_s": samples_per_step / step_time,
                "peak_memory_gb": peak_memory_gb(device),
            }
            metrics |= {f"data/skipped/{r}": n for r, n in run.total_skipped().items()}
            accelerator.log(metrics, step=state.step)
            if run.main:
                log.info(
                    "step %d/%d: %s", state.step, cfg.train.steps, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
                )
            step_times.append(step_time)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{metrics['lr']:.2e}")
            losses, last_log_time, last_log_step = [], now, state.step

        stopping = step.stop and state.step < stop_at
        # --- validation: held-out loss per length and sample videos, every N steps and at the end ---
        v_every = cfg.validation.every
        if v_every > 0 and not stopping and (state.step % v_every == 0 or state.step == cfg.train.steps):
            with run.averaged():
                validate_run(run, run.held_out)

        # --- checkpoint (resumable state + a LoRA export), always at the last step or on a stop signal ---
        every = cfg.train.checkpoint_every
        if (every > 0 and state.step % every == 0) or state.step == stop_at or stopping:
            train_state = {"train_state": state.state_dict(), "lr_scheduler": run.lr_scheduler.state_dict()}
            result.checkpoint = save_checkpoint(
                accelerator,
                run.run_dir,
                state.step,
                cfg.train.keep_last,
                train_state,
                export=run.checkpoint_files,
                config=resolved_config,
                choices=choices,
                model_fingerprint=run.fingerprint,
                **run.save_kwargs,
            )
        if stopping:
            stopped_early()
            break
    progress.close()
    if len(step_times) > 2:  # the first steps include compilation, autotuning and warm-up
        median = sorted(step_times[2:])[len(step_times[2:]) // 2]
        memory = "GPU memory allocated" if device.type == "cuda" else "resident memory"
        say(
            f"throughput: {samples_per_step / median:.3f} samples/s on {accelerator.num_processes} processes "
            f"(median step {median:.3f} s after the first 2 logged); peak {memory} {peak_memory_gb(device):.2f} GB "
            f"on rank 0"
        )
    say(f"data: clips failing to decode mid-run (each replaced by another): {run.total_skipped().summary()}")
    result.step = state.step
    if result.stopped_by is None:  # an interrupted run has its LoRA in the checkpoint, not in lora/
        error = None
        try:
            result.lora_file = run.export(run.run_dir / ("model" if run.full else "lora"))
        except (OSError, SafetensorError) as err:  # on rank 0, which writes; the others learn of it here
            error = io_error(err)
        raise_if_any_failed(accelerator, error, "the final LoRA", run.run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
