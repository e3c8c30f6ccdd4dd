"""What the length-extension experiment measures in a video, with no learned weights: a
deterministic colour detector (validated against the world's ground truth, tests) and the metrics
built on it.

Every metric is 0 (or 1 for recall, 1 for the speed ratio) on simulated clips, and grows with its
own corruption: a teleport or a mid-air turn raises the physics residual, a colour swap the
identity failures, duplicated frames halve the speed ratio, noise raises the flicker
(tests/test_length_extension.py checks each, and that each grows monotonically).

Shapes: frames [B, T, H, W, 3] in [-1, 1]; K = 6 palette colours; N = 3 sprite slots.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from radial_lora.data.sprite_world import BAR_COLOUR, PALETTE, SIZE, Clips, Occlusion

MATCH = 0.6
"""A pixel counts towards colour k with weight 1 - |pixel - colour_k| / MATCH (in [-1, 1] units):
palette colours lie at least 1.2 apart, so no pixel counts for two; an anti-aliased rim pixel
counts only where the sprite covers more than about 60% of it."""
SHOWN_PX = 20.0
"""A sprite with at least this much showing must be found (the detector's recall is checked above it)."""
FOUND_PX = 6.0
"""Detected area above which a colour counts as present."""
MISS_PX = 16.0
"""The position error a missed sprite counts as (a quarter of the frame)."""
RECALL_PX = 3.0
RECALL_FRAMES = 3
HIDE_BINS = ((1, 4), (5, 8), (9, 16), (17, 32))


@dataclass
class Detections:
    """Per frame and palette colour: how much of it there is and where."""

    area: torch.Tensor  # [B, T, K] px (weighted)
    centroid: torch.Tensor  # [B, T, K, 2] (x, y) px
    spread: torch.Tensor
    """[B, T, K] RMS distance of the colour's pixels from its centroid: about r / sqrt(2) for one
    disc, much more when the colour is in two places."""

    @property
    def found(self) -> torch.Tensor:
        return self.area >= FOUND_PX


def detect(frames: torch.Tensor, background: torch.Tensor | None = None) -> Detections:
    """Find each palette colour in each frame: its area and spread by soft colour matching, its
    centroid refined on the anti-aliased coverage (each pixel's share of the colour over the
    clip's background, `background` [B, 3] or estimated) within the sprite's reach of the coarse
    centroid, so a moving disc's centroid follows its true centre to a few hundredths of a px."""
    frames = frames.float()
    palette = (PALETTE.to(frames.device) * 2 - 1).view(1, 1, 1, 1, -1, 3)
    offset = frames.unsqueeze(-2) - palette  # [B, T, H, W, K, 3]
    weight = (1 - offset.norm(dim=-1) / MATCH).clamp(min=0)
    area = weight.sum(dim=(2, 3))
    grid = torch.arange(SIZE, device=frames.device, dtype=torch.float32) + 0.5
    gx, gy = grid.view(1, 1, 1, SIZE, 1), grid.view(1, 1, SIZE, 1, 1)

    def moments(w):
        total = w.sum(dim=(2, 3)).clamp(min=1e-6)
        cx, cy = (w * gx).sum(dim=(2, 3)) / total, (w * gy).sum(dim=(2, 3)) / total
        return cx, cy, total

    cx, cy, total = moments(weight)
    x2 = (weight * gx**2).sum(dim=(2, 3)) / total
    y2 = (weight * gy**2).sum(dim=(2, 3)) / total
    spread = (x2 - cx**2 + y2 - cy**2).clamp(min=0).sqrt()

    # Coverage: where a pixel lies on the segment from the background to colour k, and how far
    # along (a rim pixel of alpha a is a * colour + (1 - a) * background).
    bg = background_colour(frames) if background is None else background
    axis = palette - bg.view(-1, 1, 1, 1, 1, 3)  # [B, 1, 1, 1, K, 3]
    rel = frames.unsqueeze(-2) - bg.view(-1, 1, 1, 1, 1, 3)
    along = (rel * axis).sum(dim=-1) / (axis * axis).sum(dim=-1)
    off_axis = (rel - along.unsqueeze(-1) * axis).norm(dim=-1)
    coverage = torch.where((off_axis < 0.35) & (along > 0.05), along.clamp(max=1), torch.zeros_like(along))
    reach = (area / torch.pi).sqrt() + 2.5  # [B, T, K]
    near = ((gx - cx[:, :, None, None]) ** 2 + (gy - cy[:, :, None, None]) ** 2) <= reach[:, :, None, None] ** 2
    fx, fy, covered = moments(coverage * near)
    refined = covered > 1.0
    centroid = torch.stack([torch.where(refined, fx, cx), torch.where(refined, fy, cy)], dim=-1)
    return Detections(area, centroid, spread)


def shown_alone(clips: Clips) -> torch.Tensor:
    """[B, T, N] the sprite shows at least SHOWN_PX and no nearer sprite overlaps it: where the
    detector must find it, where it is."""
    return (clips.visible_area >= SHOWN_PX) & clips.present[:, None] & ~clips.overlapped


def _sprite_view(det: Detections, clips: Clips):
    """The detections of each ground-truth sprite's colour: area [B, T, N], centroid [B, T, N, 2]."""
    index = clips.colours.clamp(min=0)  # [B, N]
    T = det.area.shape[1]
    idx = index[:, None, :].expand(-1, T, -1)
    area = det.area.gather(2, idx)
    centroid = det.centroid.gather(2, idx[..., None].expand(-1, -1, -1, 2))
    return area, centroid


def position_error(det: Detections, reference: Detections, clips: Clips, from_frame: int = 2):
    """(per clip [B], per frame [T]) mean distance in px between where each sprite is found in the
    video and where the same detector finds it in the simulated clip (`reference`), over the frames
    from `from_frame` on where the sprite shows alone; a sprite not found counts MISS_PX. 0 for the
    simulation itself."""
    area, centroid = _sprite_view(det, clips)
    _, truth = _sprite_view(reference, clips)
    shown = shown_alone(clips)
    shown[:, :from_frame] = False
    error = (centroid - truth).norm(dim=-1).clamp(max=MISS_PX)
    error = torch.where(area >= FOUND_PX, error, torch.full_like(error, MISS_PX)) * shown
    per_clip = error.sum(dim=(1, 2)) / shown.sum(dim=(1, 2)).clamp(min=1)
    per_frame = error.sum(dim=(0, 2)) / shown.sum(dim=(0, 2)).clamp(min=1)
    return per_clip, per_frame


def _tracks(det: Detections):
    """Per clip and colour, the frames where the colour shows whole (area within 5% of its whole
    area, the 90th percentile of its found areas: not partly behind the bar or another sprite), and
    its radius from that area."""
    found = det.found
    area = torch.where(found, det.area, torch.full_like(det.area, float("nan")))
    typical = area.nanquantile(0.9, dim=1)  # [B, K]
    whole = found & (det.area >= 0.95 * typical[:, None]) & (det.area <= 1.05 * typical[:, None])
    radius = (typical / torch.pi).sqrt()
    return whole, radius


def physics_residual(det: Detections) -> torch.Tensor:
    """[B] RMS in px of each whole sprite's acceleration (second difference of its centroid) away
    from the walls: constant velocity makes it 0; a mid-air turn, a teleport or a jitter does not.
    Frames where any of the three is partly hidden or within reach of a wall are left out. NaN for
    a clip with no such triple."""
    whole, radius = _tracks(det)
    c = det.centroid
    step = (c[:, 1:] - c[:, :-1]).norm(dim=-1)  # [B, T-1, K]
    reach = radius[:, None] + step.nan_to_num(0).amax(dim=1, keepdim=True).clamp(max=4) + 1.0  # [B, 1, K]
    inside = ((c > reach[..., None]) & (c < SIZE - reach[..., None])).all(dim=-1)
    ok = whole & inside
    triple = ok[:, :-2] & ok[:, 1:-1] & ok[:, 2:]
    accel = (c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2]).norm(dim=-1)
    sq = (accel**2 * triple).sum(dim=(1, 2))
    n = triple.sum(dim=(1, 2))
    return torch.where(n > 0, (sq / n.clamp(min=1)).sqrt(), torch.full_like(sq, float("nan")))


def mean_speed(det: Detections) -> torch.Tensor:
    """[B] mean px a frame that whole sprites move (NaN for a clip with no whole pair)."""
    whole, _ = _tracks(det)
    pair = whole[:, 1:] & whole[:, :-1]
    step = (det.centroid[:, 1:] - det.centroid[:, :-1]).norm(dim=-1)
    n = pair.sum(dim=(1, 2))
    return torch.where(
        n > 0, (step * pair).sum(dim=(1, 2)) / n.clamp(min=1), torch.full_like(n, float("nan"), dtype=torch.float32)
    )


def speed_ratio(det: Detections, reference: Detections) -> torch.Tensor:
    """[B] mean speed over the reference's (the simulated clips through the same detector, so its
    bias cancels): 1 for true motion, 0.5 for a video slowed to half, 0 for a still one."""
    return mean_speed(det) / mean_speed(reference)


def identity_failures(det: Detections, clips: Clips | None = None, longest_hiding: int = 32) -> torch.Tensor:
    """[B] bool: the clip's cast changes. A colour that is not in the cast shows for 2 frames in a
    row (a swap or a new sprite), a colour shows in two places at once, or a cast member goes
    missing: with ground truth, not found for 3 frames in a row while it shows; without (an
    unconditional sample, whose cast is what its first frame shows), missing longer than any hiding
    behind the bar can last."""
    found = det.found  # [B, T, K]
    B, T, K = found.shape
    if clips is not None:
        cast = torch.zeros(B, K, dtype=torch.bool, device=found.device)
        for i in range(clips.colours.shape[1]):
            cast |= F.one_hot(clips.colours[:, i].clamp(min=0), K).bool() & clips.present[:, i : i + 1]
    else:
        cast = found[:, 0]
    stranger = found & ~cast[:, None]
    spawn = (stranger[:, 1:] & stranger[:, :-1]).any(dim=(1, 2))
    # One disc's pixels lie within r of its centroid: a colour spread wider than that, over at least
    # half its whole area (a crescent around a nearer sprite can come in two pieces), is in two places.
    _, radius = _tracks(det)
    big = det.area >= 0.5 * torch.pi * radius[:, None] ** 2
    doubled = (found & big & (det.spread > 1.15 * radius[:, None] + 1.5)).any(dim=(1, 2))
    if clips is not None:
        area, _ = _sprite_view(det, clips)
        lost = shown_alone(clips) & (area < FOUND_PX)
        vanish = _longest_run(lost) >= 3
    else:
        vanish = _longest_run(~found & cast[:, None]) > longest_hiding
    return spawn | doubled | vanish


def _longest_run(flags: torch.Tensor) -> torch.Tensor:
    """[B] the longest run of True along dim 1 of [B, T, X], over X."""
    run = torch.zeros_like(flags[:, 0], dtype=torch.long)
    best = torch.zeros_like(run)
    for t in range(flags.shape[1]):
        run = (run + 1) * flags[:, t]
        best = torch.maximum(best, run)
    return best.amax(dim=1)


def occlusion_recall(det: Detections, clips: Clips, events: list[Occlusion]) -> dict[str, tuple[int, int]]:
    """Per hidden-duration bin ("1-4", ...): (sprites that came out right, events). Right: within
    its first RECALL_FRAMES frames showing again (>= SHOWN_PX), its colour is found within
    RECALL_PX of where the simulation puts its visible part."""
    area, centroid = _sprite_view(det, clips)
    result = {f"{lo}-{hi}": [0, 0] for lo, hi in HIDE_BINS}
    T = area.shape[1]
    for e in events:
        bin_ = next((f"{lo}-{hi}" for lo, hi in HIDE_BINS if lo <= e.duration <= hi), None)
        if bin_ is None:
            continue
        alone = shown_alone(clips)[e.clip, :, e.sprite]
        frames = [t for t in range(e.reappears, T) if alone[t]]
        frames = frames[:RECALL_FRAMES]
        if not frames:
            continue
        result[bin_][1] += 1
        right = any(
            area[e.clip, t, e.sprite] >= FOUND_PX
            and (centroid[e.clip, t, e.sprite] - clips.visible_centroid[e.clip, t, e.sprite]).norm() <= RECALL_PX
            for t in frames
        )
        result[bin_][0] += int(right)
    return {k: (v[0], v[1]) for k, v in result.items()}


def background_colour(frames: torch.Tensor) -> torch.Tensor:
    """[B, 3] each clip's background: the median colour of its first frame's pixels that are not the
    bar's gray (the background is most of what is left)."""
    first = frames[:, 0].reshape(frames.shape[0], -1, 3).float()
    gray = BAR_COLOUR.to(frames.device) * 2 - 1
    median = []
    for pixels in first:
        keep = (pixels - gray).norm(dim=-1) > 0.3
        median.append((pixels[keep] if keep.any() else pixels).median(dim=0).values)
    return torch.stack(median)


def flicker(frames: torch.Tensor, background: torch.Tensor | None = None) -> torch.Tensor:
    """[B] mean |frame t - frame t-1| over pixels that are background in both frames (within 0.3 of
    the clip's background colour): 0 for a steady background."""
    frames = frames.float()
    bg = background_colour(frames) if background is None else background
    near = (frames - bg.view(-1, 1, 1, 1, 3)).norm(dim=-1) < 0.3  # [B, T, H, W]
    both = near[:, 1:] & near[:, :-1]
    change = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=-1)
    return (change * both).sum(dim=(1, 2, 3)) / both.sum(dim=(1, 2, 3)).clamp(min=1)


def off_palette_rate(frames: torch.Tensor) -> torch.Tensor:
    """[B] share of flat pixels (their 3x3 neighbourhood varies by < 0.25) whose colour is none of
    the world's (palette, the clip's background, the bar): a blur and artefact proxy, 0 when
    simulated (the anti-aliased rims are not flat)."""
    frames = frames.float()
    B, T, H, W, _ = frames.shape
    x = frames.permute(0, 1, 4, 2, 3).reshape(B * T, 3, H, W)
    high = F.max_pool2d(x, 3, 1, 1)
    low = -F.max_pool2d(-x, 3, 1, 1)
    flat = ((high - low).amax(dim=1) < 0.25).view(B, T, H, W)
    colours = torch.cat(
        [
            (PALETTE.to(frames.device) * 2 - 1).expand(B, -1, -1),
            background_colour(frames)[:, None],
            (BAR_COLOUR.to(frames.device) * 2 - 1).expand(B, 1, 3),
        ],
        dim=1,
    )  # [B, K+2, 3]
    nearest = (frames.unsqueeze(-2) - colours.view(B, 1, 1, 1, -1, 3)).norm(dim=-1).amin(dim=-1)
    off = flat & (nearest > 0.3)
    return off.sum(dim=(1, 2, 3)) / flat.sum(dim=(1, 2, 3)).clamp(min=1)


def psnr(frames: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] PSNR in dB over the clip, for frames in [-1, 1] (peak-to-peak 2)."""
    mse = ((frames.float() - target.float()) ** 2).mean(dim=(1, 2, 3, 4))
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


def ssim(frames: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] mean SSIM over frames and channels (Gaussian window 11, sigma 1.5; data range 2)."""
    B, T, H, W, C = frames.shape
    x = frames.float().permute(0, 1, 4, 2, 3).reshape(-1, 1, H, W)
    y = target.float().permute(0, 1, 4, 2, 3).reshape(-1, 1, H, W)
    g = torch.exp(-((torch.arange(11, device=x.device) - 5.0) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).view(1, 1, 1, 11)
    blur = lambda z: F.conv2d(F.conv2d(z, g), g.transpose(2, 3))  # noqa: E731
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.view(B, -1).mean(dim=1)
