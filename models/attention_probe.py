"""Measuring the premise of Radial Attention in a model: how attention mass falls with temporal and
spatial distance (the paper's "spatiotemporal energy decay", its Fig. 4), and how much of it a
block mask keeps.

`install_probe` puts an `EnergyProbe` on every block's self-attention. In each forward it lets
attention run dense (so the model computes what it always does) and, for a sample of query tokens
(stratified over frames, seeded), computes their exact post-softmax rows against all keys in fp32,
a few heads at a time, and records per layer, head and noise level:

- the two profiles of the paper: the score of the key at the same spatial position against the
  temporal distance, and the score of keys in the same frame against their 2-D grid distance;
- the attention mass per temporal distance, and the share of it in the query's own frame (a head
  with at least half its mass there is labelled "spatial", else "temporal": SVG's distinction);
- for each block mask given (radial at the configured decay, a local window, ...): the mass m it
  keeps, and the relative error of the output when attention is renormalized inside it. For the
  renormalized masked softmax p' of p, ||p' - p||_1 = 2 (1 - m) exactly: the error bound of the
  paper is a function of m alone.

`fit_exponential` fits y = exp(-a x + b) to a profile (least squares on log y) and reports the R^2
of the fit in linear space. Shapes: B batch (sample 0 is probed), H heads, S tokens, D head dim,
F latent frames, s = h x w tokens a frame, Q sampled queries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from radial_lora.configs.schema import ConfigError
from radial_lora.kernels.dispatch import attention
from radial_lora.models.attention import set_self_attention
from radial_lora.models.families import family_of
from radial_lora.models.families.wan import WanSelfAttnProcessor


def fit_exponential(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """{a, b, r2}: y ~ exp(-a x + b), fitted on the points with y > 0; r2 in linear space."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(y) & (y > 0)
    if keep.sum() < 2:
        return {"a": float("nan"), "b": float("nan"), "r2": float("nan")}
    slope, intercept = np.polyfit(x[keep], np.log(y[keep]), 1)
    fitted = np.exp(slope * x[keep] + intercept)
    total = ((y[keep] - y[keep].mean()) ** 2).sum()
    r2 = 1 - ((y[keep] - fitted) ** 2).sum() / total if total > 0 else 1.0
    return {"a": float(-slope), "b": float(intercept), "r2": float(r2)}


def sample_queries(frames: int, tokens_per_frame: int, count: int, seed: int) -> torch.Tensor:
    """[Q] token indices: the same number of queries in every frame (as near as `count` allows),
    at seeded random positions."""
    rng = np.random.default_rng(seed)
    per_frame = max(1, count // frames)
    picks = [
        f * tokens_per_frame + rng.choice(tokens_per_frame, size=min(per_frame, tokens_per_frame), replace=False)
        for f in range(frames)
    ]
    return torch.as_tensor(np.sort(np.concatenate(picks)))


def binned_mean(values: torch.Tensor, bins: torch.Tensor, n: int) -> np.ndarray:
    """Mean of `values` per integer bin in [0, n) (NaN where a bin is empty)."""
    total = torch.zeros(n, dtype=torch.float64).index_add_(0, bins.flatten(), values.flatten().double())
    count = torch.zeros(n, dtype=torch.float64).index_add_(
        0, bins.flatten(), torch.ones_like(values.flatten(), dtype=torch.float64)
    )
    return (total / count).numpy()  # 0/0: NaN where empty


def head_statistics(
    scores: torch.Tensor,
    values: torch.Tensor,
    queries: torch.Tensor,
    grid: tuple[int, int, int],
    masks: dict[str, torch.Tensor],
    block_size: int,
) -> list[dict]:
    """The statistics of each head from its exact attention rows.

    scores [H, Q, S] post-softmax (fp32) for the query tokens `queries` [Q]; values [H, S, D];
    grid (F, h, w); masks: name -> block mask [nb, nb]."""
    F_, h, w = grid
    s = h * w
    H, Q, S = scores.shape
    q_frame, q_pos = queries // s, queries % s
    frame_ids = torch.arange(F_)
    # Temporal profile: the key at the query's own position in every frame.
    same_pos = frame_ids[None, :] * s + q_pos[:, None]  # [Q, F]
    distance_t = (q_frame[:, None] - frame_ids[None, :]).abs()  # [Q, F]
    # Spatial profile: every key of the query's own frame, by grid distance.
    pos = torch.arange(s)
    qy, qx = q_pos // w, q_pos % w
    distance_s = (
        torch.sqrt(((pos // w)[None] - qy[:, None]) ** 2 + ((pos % w)[None] - qx[:, None]) ** 2.0).round().long()
    )
    own_frame = q_frame[:, None] * s + pos[None]  # [Q, s]
    max_r = int(distance_s.max()) + 1
    key_frame = torch.arange(S) // s
    mass_by_frame = torch.zeros(H, Q, F_).index_add_(2, key_frame[:S], scores)  # [H, Q, F]
    kept = {
        name: mask[queries // block_size].repeat_interleave(block_size, dim=1)[:, :S] for name, mask in masks.items()
    }
    out = []
    for head in range(H):
        p = scores[head]
        mass_t = binned_mean(mass_by_frame[head], distance_t, F_)  # a frame's share, by its distance
        row = {
            "temporal_profile": binned_mean(p.gather(1, same_pos), distance_t, F_).tolist(),
            "spatial_profile": binned_mean(p.gather(1, own_frame), distance_s, max_r).tolist(),
            "mass_by_distance": mass_t.tolist(),
            "own_frame_mass": float(mass_by_frame[head].gather(1, q_frame[:, None]).mean()),
        }
        row["label"] = "spatial" if row["own_frame_mass"] >= 0.5 else "temporal"
        exact = p @ values[head]  # [Q, D]
        for name, keep in kept.items():
            m = (p * keep).sum(dim=1)  # [Q]
            masked = (p * keep) / m.clamp(min=1e-30)[:, None]
            error = (masked @ values[head] - exact).norm(dim=1) / exact.norm(dim=1).clamp(min=1e-30)
            row[f"kept_mass_{name}"] = float(m.mean())
            row[f"output_error_{name}"] = float(error.mean())
            row[f"l1_{name}"] = float((masked - p).abs().sum(dim=1).mean())
        out.append(row)
    return out


@dataclass
class Recorder:
    """Where the probes write: one row per (layer, head, noise level)."""

    queries: int = 256
    seed: int = 0
    head_chunk: int = 4
    masks: dict[str, Callable[[int, int], torch.Tensor]] = field(default_factory=dict)
    """name -> (latent frames F, tokens per frame s) -> block mask."""
    block_size: int = 128
    sigma: float = 0.0
    grid: tuple[int, int, int] | None = None
    rows: list[dict] = field(default_factory=list)

    def record(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        F_, h, w = self.grid
        s = h * w
        queries = sample_queries(F_, s, self.queries, self.seed + layer)
        masks = {name: make(F_, s).cpu() for name, make in self.masks.items()}
        scale = 1 / math.sqrt(q.shape[-1])
        for start in range(0, q.shape[1], self.head_chunk):
            heads = slice(start, start + self.head_chunk)
            logits = (q[0, heads, queries.to(q.device)].float() @ k[0, heads].float().transpose(-1, -2)) * scale
            scores = torch.softmax(logits, dim=-1).cpu()
            stats = head_statistics(scores, v[0, heads].float().cpu(), queries, self.grid, masks, self.block_size)
            for offset, row in enumerate(stats):
                self.rows.append({"layer": layer, "head": start + offset, "sigma": self.sigma, **row})


class EnergyProbe(WanSelfAttnProcessor):
    """Dense self-attention, its statistics recorded for sampled queries (see the module)."""

    def __init__(self, layer: int, routing, recorder: Recorder):
        super().__init__(layer, routing)
        self.recorder = recorder

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.recorder.record(self.layer, q, k, v)
        return attention(q, k, v, backend="dense")


def install_probe(transformer, attention_cfg, recorder: Recorder) -> None:
    """Put an EnergyProbe on every block's self-attention (the transformer's attention config
    otherwise as given, dense in every layer), and keep the recorder's grid per forward."""
    from dataclasses import replace

    family = family_of(transformer)
    if family.name != "wan":
        raise ConfigError(f"the attention energy probe is built for Wan's self-attention, not {family.name} yet")
    routing = set_self_attention(transformer, replace(attention_cfg, backend="dense"), mode="generate")
    for layer, block in enumerate(transformer.blocks):
        block.attn1.set_processor(EnergyProbe(layer, routing, recorder))
    p_t, p_h, p_w = transformer.config.patch_size

    def read_grid(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = hidden.shape
        recorder.grid = (frames // p_t, height // p_h, width // p_w)

    transformer.register_forward_pre_hook(read_grid, with_kwargs=True)


def summarize(rows: list[dict]) -> dict:
    """Means over layers, heads and noise levels: kept mass and output error per mask, the
    exponential fits of the mean profiles, the share of spatial heads."""
    out: dict = {"heads_probed": len(rows)}
    for key in rows[0]:
        if key.startswith(("kept_mass_", "output_error_", "l1_")):
            out[key] = float(np.mean([r[key] for r in rows]))
    for profile in ("temporal_profile", "spatial_profile"):
        width = min(len(r[profile]) for r in rows)
        mean = np.nanmean(np.array([r[profile][:width] for r in rows]), axis=0)
        out[profile] = mean.tolist()
        out[f"{profile}_fit"] = fit_exponential(np.arange(width), mean)
        per_head = [fit_exponential(np.arange(len(r[profile])), np.array(r[profile]))["r2"] for r in rows]
        out[f"{profile}_r2_median"] = float(np.nanmedian(per_head))
    out["spatial_heads"] = float(np.mean([r["label"] == "spatial" for r in rows]))
    return out
