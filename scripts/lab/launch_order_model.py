"""How much the kernels' launch order should matter: a list-scheduling model of one GPU.

    python -m scripts.lab.launch_order_model                       # the wan_4x shape, 12 heads
    python -m scripts.lab.launch_order_model --heads 40 --frames 21

Each program (one mask block of one head) holds one of the GPU's SMs (the Hopper kernels use
192-224 KB of shared memory) for a time proportional to its kept count plus a small fixed cost;
the next program in launch order starts on the first SM that frees. Prints the makespan over the
ideal (total work / SMs) for the grid's block order and for compact_mask's heavy-first order, for
the key-block programs (dK/dV, one-kernel backward: q_order) and the query-block ones (forward,
dQ: kv_order). A model, not a measurement: docs/radial_attention.md (what we tried) has the timings.
"""

from __future__ import annotations

import argparse
import heapq

from radial_lora.kernels.compact_mask import compact_mask
from radial_lora.kernels.radial_mask import radial_block_mask


def makespan(costs, sms: int) -> float:
    """Finish time of the last program when programs start in the given order on `sms` SMs."""
    free_at = [0.0] * sms
    for cost in costs:
        heapq.heappush(free_at, heapq.heappop(free_at) + cost)
    return max(free_at)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=81, help="latent frames (81: 321 video frames)")
    parser.add_argument("--tokens-per-frame", type=int, default=30 * 52)
    parser.add_argument("--heads", type=int, default=12, help="times batch")
    parser.add_argument("--sms", type=int, default=132, help="H100 SXM: 132")
    parser.add_argument("--fixed-cost", type=float, default=2.0, help="per program, in kept-block units")
    args = parser.parse_args()

    for decay in (1.0, 0.2):
        mask = radial_block_mask(args.frames, args.tokens_per_frame, decay=decay)
        kv_count, _, kv_order, q_count, _, q_order = compact_mask(mask)
        for name, count, order in (
            ("key blocks (dK/dV, one kernel)", q_count, q_order),
            ("query blocks (forward, dQ)", kv_count, kv_order),
        ):
            cost = [float(c) + args.fixed_cost for c in count.tolist()]
            block_order = [c for _ in range(args.heads) for c in cost]
            heavy_first = [cost[i] for _ in range(args.heads) for i in order.tolist()]
            ideal = sum(block_order) / args.sms
            full = int((count == len(count)).sum())  # blocks kept by every row or column: the sink
            print(
                f"decay {decay} {name:32s} {full} full, max/mean kept {max(cost) / (sum(cost) / len(cost)):.1f}x  "
                f"block order {makespan(block_order, args.sms) / ideal - 1:6.1%} over ideal, "
                f"heavy first {makespan(heavy_first, args.sms) / ideal - 1:6.1%}"
            )


if __name__ == "__main__":
    main()
