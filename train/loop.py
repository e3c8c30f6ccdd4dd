"""The training loop: one function, read top to bottom.

set up (accelerate, data, model, LoRA, optimizer) -> resume -> for each optimizer step:
micro-batches (encode clips and captions, flow-matching loss, backward) -> clip, step, schedule ->
log -> checkpoint; then export the LoRA. The same code runs one process or many (accelerate).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from tqdm.auto import tqdm

from radial_lora.configs.schema import AttentionBackend, Config, ConfigError, TrainConfig
from radial_lora.data.dataset import BucketBatchSampler, ClipDataset, collate
from radial_lora.data.policy import REASONS, RejectCounts
from radial_lora.data.setup import catalog_for, usable_clips
from radial_lora.models.attention import describe, triton_kernels
from radial_lora.models.loading import check_model_available, load_pipeline, torch_dtype, weights_fingerprint
from radial_lora.models.lora import check_targets_exist, export_lora
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
from radial_lora.train.preemption import ignore_stop_signals, note_preemption, stop_signals
from radial_lora.train.step import encode_captions, flow_matching_loss, noisy_inputs, posterior_params, sample_generator
from radial_lora.train.tracking import peak_memory_gb, start_tracking

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


def check_finite(accelerator, step: int, step_losses: torch.Tensor, grad_norm, run_dir: Path) -> None:
    """Stop every process together (a collective) when any has a non-finite loss or gradient norm.

    From such a step on the LoRA weights can't be trusted, and saving would rotate the last good
    checkpoints out (train.keep_last): stopping first leaves the newest checkpoint from before it.
    """
    norm = torch.as_tensor(float(grad_norm) if grad_norm is not None else 0.0, device=step_losses.device)
    bad = (~torch.isfinite(step_losses).all() | ~torch.isfinite(norm)).float()
    if accelerator.reduce(bad, reduction="sum").item() > 0:
        kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))  # none yet: empty
        restart = (f"Newest checkpoint: {kept[-1]}; resume from it (train.resume=latest)" if kept else
                   "No checkpoint yet; start again")  # fmt: skip
        raise TrainingDiverged(
            f"non-finite loss or gradient at step {step} (loss {step_losses.tolist()}, grad norm {float(norm):.3g}); "
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


def train(cfg: Config, resolved_config: dict, resume_from: Path | None = None, notes: list[str] = (),
          choices: dict | None = None) -> RunResult:  # fmt: skip
    """Run training as configured, from `resume_from` (a checkpoint folder) if given; `notes` are
    lines for the log (what a resume changed). `resolved_config` goes into W&B and, with `choices`
    (the config group options), into every checkpoint."""
    from diffusers.optimization import get_scheduler

    run_dir = Path(cfg.output_root, cfg.name).resolve()
    stop = stop_signals()  # installed by the entry point already; a signal during set-up is kept
    accelerator = make_accelerator(cfg, run_dir)
    device, main = accelerator.device, accelerator.is_main_process
    if cfg.attention.backend == AttentionBackend.flex and device.type != "cuda":
        raise ConfigError("attention.backend=flex: PyTorch's FlexAttention has no backward on CPU; train with "
                          "attention.backend=triton (its CPU interpreter, TRITON_INTERPRET=1) or reference")  # fmt: skip

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
    check_targets_exist(list(cfg.lora.target_modules))
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
    buckets = ", ".join(f"{f}x{h}x{w}: {n}" for (f, h, w), n in catalog.bucket_counts().items())
    from_cache = f"; latents from {cfg.data.cache}" if cache else ""
    say(f"data: {len(clips)} clips ({buckets}); rejected: {catalog.counts.summary()}{from_cache}")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        counts = [[*bucket, n] for bucket, n in catalog.bucket_counts().items()]
        Path(run_dir, CLIPS_FILE).write_text(json.dumps({"buckets_frames_height_width_count": counts}) + "\n")
    dataset = ClipDataset(
        clips, fps=cfg.data.fps, seed=cfg.train.seed, on_error=cfg.data.on_error.value,
        decode_threads=cfg.data.decode_threads, random_window=cache is None, cache=cache,
    )  # fmt: skip

    # --- model: pretrained pipeline, our self-attention, LoRA on the transformer ---
    with accelerator.main_process_first():  # rank 0 builds the tiny demo model if it is missing
        # From a latent cache the prompts come embedded: the text encoder is not loaded at all.
        pipe = load_pipeline(cfg.model, device=device, text_encoder=cache is None)
    fingerprint = fingerprint or weights_fingerprint(cfg.model)  # the demo's tiny model exists only now
    pipe.vae.requires_grad_(False).eval()
    if pipe.text_encoder is not None:
        pipe.text_encoder.requires_grad_(False).eval()
    check_rotary_covers(pipe, cfg.data.frames, cfg.data.sizes)
    transformer = pipe.transformer
    params = prepare_transformer(transformer, cfg.model, cfg.attention, cfg.lora, sp_group)
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
    transformer.train()
    model_dtype = torch_dtype(cfg.model.transformer_dtype)

    optimizer = torch.optim.AdamW(
        params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps
    )
    # Stepped by hand once per optimizer step (not prepared: accelerate would step it once per process).
    lr_scheduler = get_scheduler(
        cfg.optim.scheduler.value, optimizer, num_warmup_steps=cfg.optim.warmup_steps, num_training_steps=cfg.train.steps
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
            say(f"optim.lr={cfg.optim.lr} from now on (the learning rate is {lr_scheduler._last_lr[0]:.3g} at this step)")

    sampler = BucketBatchSampler(
        [c.bucket for c in clips], cfg.data.batch_size, cfg.train.seed, data_rank,
        data_ranks, start=state.batches_seen, sources=[c.source for c in clips],
        weights=[s.weight for s in cfg.data.sources()],
    )  # fmt: skip
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

    def export(folder: Path) -> Path:
        """Write the LoRA (every process calls this: under ZeRO-3 the adapters are gathered first)."""
        with gathered(accelerator, params):
            return export_lora(accelerator.unwrap_model(transformer), folder, is_main_process=main)

    start_tracking(accelerator, cfg.logger, cfg.name, run_dir, resolved_config)
    accelerator.log({f"data/rejected/{r}": n for r, n in catalog.counts.items()} | {"data/clips": len(clips)}, step=0)
    skipped = RejectCounts()  # clips that failed to decode mid-run (replaced by the next of their bucket)

    def total_skipped() -> RejectCounts:
        """Mid-run skips summed over processes (a collective: every process calls it together)."""
        counts = accelerator.reduce(torch.tensor([skipped[r] for r in REASONS], device=device), reduction="sum")
        return RejectCounts({r: n for r, n in zip(REASONS, counts.tolist()) if n})

    accum = cfg.trainer.gradient_accumulation_steps
    samples_per_step = cfg.data.batch_size * accum * data_ranks
    max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else math.inf
    progress = tqdm(total=cfg.train.steps, initial=state.step, desc="train", disable=not main, dynamic_ncols=True)
    last_log_time, last_log_step = time.perf_counter(), state.step
    losses, grad_norm, step_times = [], torch.zeros((), device=device), []

    stop_at = min(cfg.train.steps, cfg.train.stop_after_step or cfg.train.steps)
    result = RunResult(step=state.step, steps=cfg.train.steps)

    def stopped_early() -> None:
        """Record the stop and leave the batch script its requeue note (rank 0)."""
        result.stopped_by = stop.received or "a signal to another process"
        if main:
            note_preemption(state.step, stop.received or "signal")

    if stop.should_stop(accelerator):  # a signal during set-up: nothing new to save
        stopped_early()
        say(f"Stopped by {result.stopped_by} before the first step; nothing trained in this start")
        stop_at = state.step
    while state.step < stop_at:
        # --- one optimizer step = `accum` micro-batches ---
        for _ in range(accum):
            batch = next(batches)
            for _, reason in batch["skipped"]:
                skipped.add(reason)
            if "latent_params" in batch:  # from the cache
                posteriors, text = batch["latent_params"], batch["text"].to(device)
            else:
                posteriors = posterior_params(pipe.vae, batch["frames"])
                text = encode_captions(pipe, batch["captions"], cfg.model.max_text_tokens, device)
            first = data_rank * cfg.data.batch_size  # this slice's place in the global batch
            gens = [sample_generator(cfg.train.seed, state.batches_seen, first + j, device)
                    for j in range(posteriors.shape[0])]  # fmt: skip
            state.batches_seen += 1
            latents, sigmas, noise = noisy_inputs(pipe.vae, posteriors, gens, cfg.train.timesteps, device)
            with accelerator.accumulate(transformer):
                loss = flow_matching_loss(transformer, latents, text, sigmas, noise, model_dtype)
                # Gradients are averaged over all processes, but the `sp` processes of a group
                # each hold part of one clip's gradient: x sp makes the average their sum.
                accelerator.backward(loss * sp if sp > 1 else loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, max_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        check_finite(accelerator, state.step + 1, torch.stack(losses[-accum:]), grad_norm, run_dir)
        lr_scheduler.step()
        state.step += 1
        progress.update(1)

        # --- log: averaged over the micro-batches since the last log and over processes ---
        if state.step % cfg.logger.log_every == 0 or state.step == stop_at:
            mean_loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean").item()
            now, steps_done = time.perf_counter(), state.step - last_log_step
            step_time = (now - last_log_time) / steps_done
            metrics = {
                "loss": mean_loss,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "step_time_s": step_time,
                "samples_per_s": samples_per_step / step_time,
                "peak_memory_gb": peak_memory_gb(device),
            }
            metrics |= {f"data/skipped/{r}": n for r, n in total_skipped().items()}
            accelerator.log(metrics, step=state.step)
            if main:
                log.info("step %d/%d: %s", state.step, cfg.train.steps,
                         ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))  # fmt: skip
            step_times.append(step_time)
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{metrics['lr']:.2e}")
            losses, last_log_time, last_log_step = [], now, state.step

        # --- checkpoint (resumable state + a LoRA export), always at the last step or on a stop signal ---
        every = cfg.train.checkpoint_every
        stopping = stop.should_stop(accelerator) and state.step < stop_at
        if (every > 0 and state.step % every == 0) or state.step == stop_at or stopping:
            train_state = {"train_state": state.state_dict(), "lr_scheduler": lr_scheduler.state_dict()}
            result.checkpoint = save_checkpoint(accelerator, run_dir, state.step, cfg.train.keep_last, train_state,
                                                export=export, config=resolved_config, choices=choices,
                                                model_fingerprint=fingerprint, **save_kwargs)  # fmt: skip
        if stopping:
            stopped_early()
            break
    progress.close()
    if len(step_times) > 2:  # the first steps include compilation, autotuning and warm-up
        median = sorted(step_times[2:])[len(step_times[2:]) // 2]
        memory = "GPU memory allocated" if device.type == "cuda" else "resident memory"
        say(f"throughput: {samples_per_step / median:.3f} samples/s on {accelerator.num_processes} processes "
            f"(median step {median:.3f} s after the first 2 logged); peak {memory} {peak_memory_gb(device):.2f} GB "
            f"on rank 0")  # fmt: skip
    say(f"data: clips failing to decode mid-run (each replaced by another): {total_skipped().summary()}")
    result.step = state.step
    if result.stopped_by is None:  # an interrupted run has its LoRA in the checkpoint, not in lora/
        error = None
        try:
            result.lora_file = export(run_dir / "lora")
        except (OSError, SafetensorError) as err:  # on rank 0, which writes; the others learn of it here
            error = io_error(err)
        raise_if_any_failed(accelerator, error, "the final LoRA", run_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
