"""The length-extension experiment's statistics and its decision rules, exactly as
docs/length_extension.md registers them before any GPU run: paired bootstrap confidence intervals,
the seed-to-seed noise floor, non-inferiority and recovery, the validity gates, and the verdict
(confirmed / refuted / inconclusive). `decide` is the only place the rules live; the report prints
what it returns.

Metrics are "lower is better" (the primary endpoints are all losses or errors); every array holds
one value per evaluation clip, the same clips in the same order for every arm (paired).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PRIMARY = ("heldout_loss", "position_error", "physics_residual", "identity_failure")
"""The four pre-registered primary endpoints (lower is better)."""

BOOTSTRAP = 10_000
CONFIDENCE = 0.95


def paired_ci(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, lower, upper): the paired bootstrap 95% interval over clips (clips whose
    value is NaN in either arm are left out of both)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    keep = ~(np.isnan(a) | np.isnan(b))
    diff = a[keep] - b[keep]
    if diff.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(BOOTSTRAP, diff.size))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    return float(diff.mean()), float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def mean_ci(a: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """(mean, lower, upper): bootstrap 95% interval of one arm's mean."""
    return paired_ci(a, np.zeros_like(np.asarray(a, dtype=float)), seed)


@dataclass
class Gates:
    """The validity gates' measured inputs (docs/length_extension.md, "Validity gates")."""

    base_position_error: float
    """G1: the base model's conditional position error at L, px."""
    base_identity_failure: float
    """G1: share of the base model's clips at L with an identity failure."""
    base_physics_residual: float
    """G1: the base model's physics residual at L, px."""
    radial_mass_at_L: float | None
    """G2: mean attention mass the radial mask keeps in the base model at L (None: not measured)."""
    temporal_fit_r2: float | None
    """G2: R^2 of the exponential fit of attention against temporal distance (None: not measured)."""


GATE_LIMITS = {
    "base_position_error": 1.0,
    "base_identity_failure": 0.05,
    "base_physics_residual": 0.75,
    "radial_mass_at_L": 0.9,
    "temporal_fit_r2": 0.9,
}


@dataclass
class Verdict:
    """What the rules concluded, and every intermediate a reader needs to check it."""

    verdict: str  # "confirmed" | "refuted" | "inconclusive"
    reasons: list[str] = field(default_factory=list)
    table: dict = field(default_factory=dict)


def non_inferior(d: np.ndarray, c: np.ndarray, margin: float, seed: int = 0) -> tuple[bool, tuple]:
    """Radial LoRA (d) is non-inferior to dense LoRA (c) when the upper bound of mean(d - c) is at
    most `margin`."""
    ci = paired_ci(d, c, seed)
    return bool(ci[2] <= margin), ci


def decide(arms: dict[str, dict[str, np.ndarray]], gates: Gates, step_time: dict[str, float]) -> Verdict:
    """Apply the registered rules. `arms` maps an arm name to its per-clip primary metrics:
    "a" (untuned dense), "b" (untuned radial), "c0"/"c1" (dense LoRA, two seeds), "d0"/"d1"
    (radial LoRA, two seeds); `step_time` holds the measured LoRA step time of "c0" and "d0"."""
    out = Verdict("inconclusive")
    limits_ok = True
    for name, limit in GATE_LIMITS.items():
        value = getattr(gates, name)
        if value is None or value != value:  # not measured (NaN): the gate cannot pass
            out.table[f"gate {name}"] = (None, limit, False)
            limits_ok = False
            out.reasons.append(f"gate not measured: {name}")
            continue
        passed = value >= limit if name in ("radial_mass_at_L", "temporal_fit_r2") else value <= limit
        out.table[f"gate {name}"] = (value, limit, passed)
        if not passed:
            limits_ok = False
            out.reasons.append(f"gate failed: {name} = {value:.4g} (limit {limit})")

    # G3: there is something to fix: untuned dense is worse than dense LoRA on >= 2 endpoints.
    worse = 0
    for m in PRIMARY:
        gap_ci = paired_ci(arms["a"][m], arms["c0"][m])
        out.table[f"G3 {m}: a - c0"] = gap_ci
        worse += gap_ci[1] > 0
    if worse < 2:
        limits_ok = False
        out.reasons.append(f"gate G3 failed: untuned dense is worse than dense LoRA on {worse} of 4 endpoints")

    # G4: tuning works: dense LoRA improves on untuned dense on average over the endpoints.
    recovered = [np.nanmean(arms["a"][m]) - np.nanmean(arms["c0"][m]) > 0 for m in PRIMARY]
    if sum(recovered) < 2:
        limits_ok = False
        out.reasons.append("gate G4 failed: dense LoRA does not improve on untuned dense")

    failures_by_seed = []
    all_non_inferior, all_recovery = True, True
    for seed in ("0", "1"):
        c, d = arms[f"c{seed}"], arms[f"d{seed}"]
        failures = 0
        for m in PRIMARY:
            floor = abs(np.nanmean(arms["c0"][m]) - np.nanmean(arms["c1"][m]))
            gap = np.nanmean(arms["a"][m]) - np.nanmean(arms["c0"][m])
            margin = max(floor, 0.1 * gap)
            ok, ci = non_inferior(d[m], c[m], margin)
            recovery = (np.nanmean(arms["a"][m]) - np.nanmean(d[m])) / gap if gap > 0 else float("nan")
            out.table[f"seed {seed} {m}: d - c"] = (*ci, margin, ok, recovery)
            failures += not ok and ci[1] > floor  # beyond the noise floor
            all_non_inferior &= ok
            all_recovery &= bool(recovery >= 0.8)
        failures_by_seed.append(failures)

    beats_b = sum(paired_ci(arms["d0"][m], arms["b"][m])[2] < 0 for m in PRIMARY)
    faster = step_time["d0"] < step_time["c0"]
    out.table["d0 beats b on endpoints"] = beats_b
    out.table["step time c0, d0 (s)"] = (step_time["c0"], step_time["d0"])

    if not limits_ok:
        return out
    if all_non_inferior and all_recovery and beats_b >= 1 and faster:
        out.verdict = "confirmed"
        out.reasons.append(
            "radial LoRA is non-inferior to dense LoRA on all 4 endpoints in both seeds, recovers >= 0.8, beats untuned radial, and trains faster"
        )
    elif all(f >= 2 for f in failures_by_seed):
        out.verdict = "refuted"
        out.reasons.append(
            f"radial LoRA fails non-inferiority beyond the seed noise floor on {failures_by_seed} endpoints (seeds 0, 1)"
        )
    else:
        out.reasons.append("neither rule holds: the evidence does not decide at this scale")
    return out
