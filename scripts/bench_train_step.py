"""One LoRA training step of Wan2.1 (random init) at 1x, 2x and 4x length, per attention backend.

    python scripts/bench_train_step.py                           # 1.3B, 480p, 81/161/321 frames, every backend
    python scripts/bench_train_step.py --model Wan-AI/Wan2.1-T2V-14B-Diffusers --frames 81
    python scripts/bench_train_step.py --compile                 # torch.compile of the transformer blocks
    python scripts/bench_train_step.py --keep-attention -1       # checkpointing keeps self-attention outputs
    torchrun --nproc_per_node 2 scripts/bench_train_step.py --sequence-parallel 2 \
        --model Wan-AI/Wan2.1-T2V-14B-Diffusers --frames 321       # one clip's tokens over 2 GPUs
    python scripts/bench_train_step.py --preset tiny --device cpu --backends dense reference --frames 9 --steps 2

A step is what the training loop does per micro-batch once clips are encoded (the wan_4x recipe
caches latents and text embeddings): the transformer's forward and backward with gradient
checkpointing in bf16, LoRA r128 on attention q, k, v, o, and an AdamW step. Inputs are random
latents [1, 16, F, 60, 104] (480x832) and a 512-token text embedding. Reports the median step time
after warm-up and the peak GPU memory, as markdown and JSON under --out.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from radial_lora.configs.schema import (
    KERNEL_ENVIRONMENT,
    AttentionConfig,
    GluonKernels,
    KernelConfig,
    LoraConfig,
    ModelConfig,
    TimestepConfig,
    TmaLoads,
)
from radial_lora.models.attention import describe
from radial_lora.models.setup import prepare_transformer
from radial_lora.scripts.report import RECORDS, record_stem, write_report
from radial_lora.train.step import flow_matching_loss, sample_sigmas


def transformer_for(model: str, preset: str | None, device, dtype):
    """The random-init transformer to time: a published architecture, or a models/tiny_wan.py preset."""
    from radial_lora.models.random_init import TRANSFORMERS, build_transformer

    if preset:
        from radial_lora.models.tiny_wan import PRESETS

        arch = dict(
            patch_size=(1, 2, 2),
            in_channels=16,
            out_channels=16,
            text_dim=4096,
            rope_max_seq_len=1024,
            **PRESETS[preset],
        )
    else:
        arch = TRANSFORMERS[model]
    return build_transformer(arch, dtype, device)


def sequence_parallel_group(args):
    """The process group of `--sequence-parallel P` (torchrun must have started P processes)."""
    if args.sequence_parallel == 1:
        return None
    if int(os.environ.get("WORLD_SIZE", "1")) != args.sequence_parallel:
        raise SystemExit(
            f"--sequence-parallel {args.sequence_parallel} runs under torchrun --nproc_per_node "
            f"{args.sequence_parallel}"
        )
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    return dist.group.WORLD


def one_config(args, backend: str, frames: int, group) -> dict:
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    transformer = transformer_for(args.model, args.preset, device, dtype)
    attention = AttentionConfig(
        backend=backend,
        block_size=args.block_size,
        decay=args.decay,
        dense_layers=1,
        kernels=KernelConfig(gluon=args.gluon, tma=args.tma),
    )
    # What training does with the same settings (models/setup.py): checkpointing always on.
    model = ModelConfig(
        id=args.preset or args.model,
        gradient_checkpointing=True,
        checkpoint_keep_attention=args.keep_attention,
        compile_blocks=args.compile,
    )
    params = prepare_transformer(transformer, model, attention, LoraConfig(rank=args.rank, alpha=args.rank), group)
    transformer.train()
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    latent_frames = (frames - 1) // 4 + 1
    h, w = args.height // 8, args.width // 8
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(1, 16, latent_frames, h, w, generator=g, device=device)
    noise = torch.randn(latents.shape, generator=g, device=device)
    text = torch.randn(1, 512, 4096, generator=g, device=device, dtype=dtype)
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        sigmas = sample_sigmas(TimestepConfig(), 1, g, device)
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            loss = flow_matching_loss(transformer, latents, text, sigmas, noise, dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    tokens = latent_frames * (h // 2) * (w // 2)
    peak = torch.tensor(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)
    if group is not None:  # the busiest GPU of the group
        peak = peak.to(device)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
    row = {
        "model": args.preset or args.model,
        "backend": backend,
        "video_frames": frames,
        "tokens": tokens,
        "step_s": round(statistics.median(times), 3),
        "peak_gb": round(float(peak), 2) if device.type == "cuda" else None,
        "compile": args.compile,
        "keep_attention": args.keep_attention,
        "sequence_parallel": args.sequence_parallel,
        "layers": describe(transformer),
    }
    if group is None or dist.get_rank() == 0:
        print(row, flush=True)
    del transformer, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Wan-AI/Wan2.1-T2V-1.3B-Diffusers")
    parser.add_argument("--preset", choices=["tiny", "gpu"], help="a models/tiny_wan.py preset instead of --model")
    parser.add_argument("--backends", nargs="+", default=["dense", "flex", "triton"], help="attention backends")
    parser.add_argument("--frames", type=int, nargs="+", default=[81, 161, 321], help="video frames (1x, 2x, 4x)")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--decay", type=float, default=0.2)
    # The triton backend's kernels (attention.kernels), defaulting as a training run does: the
    # config's default unless RADIAL_GLUON / RADIAL_TRITON_TMA override it.
    parser.add_argument(
        "--gluon",
        choices=[m.value for m in GluonKernels],
        default=os.environ.get(KERNEL_ENVIRONMENT["gluon"], KernelConfig().gluon.value),
    )
    parser.add_argument(
        "--tma",
        choices=[m.value for m in TmaLoads],
        default=os.environ.get(KERNEL_ENVIRONMENT["tma"], KernelConfig().tma.value),
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks")
    parser.add_argument(
        "--keep-attention",
        type=int,
        default=0,
        help="blocks (-1: all) that keep self-attention outputs under checkpointing",
    )
    parser.add_argument(
        "--sequence-parallel",
        type=int,
        default=1,
        help="split each clip's tokens over this many GPUs (run under torchrun with as many)",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=RECORDS)
    args = parser.parse_args()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as training sets it
    group = sequence_parallel_group(args)
    rows = [one_config(args, b, f, group) for f in args.frames for b in args.backends]
    if group is not None:
        # Every process leaves the group together (as torch asks: destroy_process_group before
        # exit). Before, rank 1 returned while rank 0 still held its gloo connection, and rank 0
        # sometimes aborted at exit ("terminate called without an active exception"): 2 of 45
        # CPU runs of the test, one of them in CI.
        rank = dist.get_rank()
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    # Settings that change what fits or how fast (the 14B at 4x on 2 GPUs needed expandable
    # segments), written into the command.
    env = "".join(f"{name}={os.environ[name]} " for name in ("PYTORCH_CUDA_ALLOC_CONF",) if name in os.environ)
    meta = {
        "device": device,
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "command": env + "python " + " ".join(sys.argv),
        "kernels": {"gluon": args.gluon, "tma": args.tma},
    }
    spread = (
        f", each clip over {args.sequence_parallel} GPUs (peak memory: the busiest)"
        if args.sequence_parallel > 1
        else ""
    )
    lines = [
        f"# LoRA training step: {device}{spread}, {meta['date']}",
        "",
        f"Command: `{meta['command']}`",
        "",
        "| model | video frames | tokens | backend | step (s) | peak GPU memory (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['video_frames']} | {r['tokens']:,} | {r['backend']} | {r['step_s']} | {r['peak_gb']} |"
        )
    model = "14b" if "14B" in args.model else "1.3b" if not args.preset else args.preset
    stem = record_stem(
        "train_step",
        device,
        meta["date"],
        model,
        "-".join(f"{f}f" for f in args.frames),
        "-".join(args.backends),
        "compiled" if args.compile else "eager",
        f"keep{args.keep_attention}" if args.keep_attention else "",
        f"sp{args.sequence_parallel}" if args.sequence_parallel > 1 else "",
    )
    write_report(args.out, stem, meta, rows, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
