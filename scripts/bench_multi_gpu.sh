#!/usr/bin/env bash
# Multi-GPU check and scaling on one host of 2 or more GPUs (e.g. 2 x H100):
#   1. the CPU demo's tiny model on 2 GPUs with ZeRO-2 and ZeRO-3 (the GPU/NCCL path end to end);
#   2. throughput of a compute-bound config (model=tiny_wan_gpu: Wan2.1-1.3B blocks, 10 layers,
#      480x832 x 33 frames = 14,040 tokens per sample, radial attention on our Triton kernels,
#      bf16, gradient checkpointing, batch 1 per GPU) on 1 GPU and on 2 GPUs with ZeRO-2, DDP and
#      ZeRO-3 (parameters partitioned, the LoRA gathered for export), and sequence parallel (each
#      clip's tokens split over the 2 GPUs: half the clips per step, the all-to-alls' cost).
#   3. last, the ZeRO-2 line with compiled blocks (it failed inside inductor on 2026-11-27; the
#      whole log of each run is kept so a failure can be read).
# Usage: scripts/bench_multi_gpu.sh OUT_DIR
#   writes OUT_DIR/multi_gpu.log (the summary lines) and OUT_DIR/run_N.log (each run's whole output); W&B off
set -uo pipefail
out=${1:?usage: bench_multi_gpu.sh OUT_DIR}
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
runs=0
run() {
  local start=$SECONDS
  runs=$((runs + 1))
  echo "=== $* (whole output: run_$runs.log)" | tee -a "$out/multi_gpu.log"
  "$@" 2>&1 | tr '\r' '\n' | tee "$out/run_$runs.log" \
    | grep -E "throughput|LoRA exported|self-attention|data:|Error|error" | tee -a "$out/multi_gpu.log"
  echo "--- $((SECONDS - start)) s wall (start-up, tuning and every step)" | tee -a "$out/multi_gpu.log"
}
# The newest lines first, so that a run cut short by a time limit still measures them.
gpu="model=tiny_wan_gpu attention=radial data.sizes=[[480,832]] data.frames=[33] data.batch_size=1 data.num_workers=2 train.steps=14 train.checkpoint_every=0 trainer.mixed_precision=bf16"
run torchrun --nproc_per_node 1 -m train name=gpu_1 trainer=single $gpu
run torchrun --nproc_per_node 2 -m train name=gpu_2_z3 trainer=zero3 $gpu
run torchrun --nproc_per_node 2 -m train name=gpu_2_sp trainer=ddp trainer.sequence_parallel=2 $gpu
run torchrun --nproc_per_node 2 -m train name=gpu_2 trainer=zero2 $gpu
run torchrun --nproc_per_node 2 -m train name=gpu_2_ddp trainer=ddp $gpu
demo="train.steps=6 train.checkpoint_every=3 data.batch_size=1"
run torchrun --nproc_per_node 2 -m train name=demo_z2 trainer=zero2 trainer.mixed_precision=no $demo
run torchrun --nproc_per_node 2 -m train name=demo_z3 trainer=zero3 trainer.mixed_precision=no $demo
run torchrun --nproc_per_node 2 -m train name=gpu_2_compiled trainer=zero2 model.compile_blocks=true $gpu
