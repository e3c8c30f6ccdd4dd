"""The length-extension experiment's video world: bouncing sprites behind a tunnel.

Clips are rendered on the fly (CPU or GPU, batched) from a few numbers drawn per clip, so the data
is endless, costs no loader time, and every frame comes with its ground truth: where each sprite
is, how much of it shows, when it hides behind the bar and where it must come out.

- 64x64 RGB in [-1, 1]; a constant background (black or one of 3 dark tints).
- 1-3 anti-aliased discs of radius 4-6 px, each a distinct colour of a 6-colour palette, moving
  at 1.0-2.5 px a frame (|vx| >= 0.4), reflecting elastically off the walls and passing through
  one another in a fixed depth order (sprite 0 at the back).
- In 60% of clips a static mid-gray bar, 20 px wide, its left edge on the 4-px token grid, in front
  of every sprite: a sprite behind it is hidden for (20 - 2r) / |vx| frames, 3 to 30, and comes
  out where the physics puts it. No sprite touches the bar in frame 0.

Each clip is drawn from its own generator, seeded by (world seed, stream, index): the training and
evaluation streams never share a clip, and clip i of a stream is the same clip on any device, in
any batch.

Shapes: B clips, T frames, N = 3 sprite slots (absent slots have `present` False), H = W = 64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SIZE = 64
MAX_SPRITES = 3
BAR_WIDTH = 20
BAR_PROBABILITY = 0.6
TOKEN = 4  # the model's patch side: the bar's edges sit on token edges

# Colours in [0, 1]; frames are rendered at 2x - 1 in [-1, 1].
PALETTE = torch.tensor(
    [
        [1.00, 0.15, 0.15],  # red
        [0.15, 1.00, 0.15],  # green
        [0.20, 0.35, 1.00],  # blue
        [1.00, 0.90, 0.10],  # yellow
        [1.00, 0.20, 0.90],  # magenta
        [0.10, 0.95, 1.00],  # cyan
    ]
)
BACKGROUNDS = torch.tensor([[0.0, 0.0, 0.0], [0.12, 0.05, 0.05], [0.05, 0.12, 0.05], [0.05, 0.05, 0.14]])
BAR_COLOUR = torch.tensor([0.5, 0.5, 0.5])

HIDDEN_PX = 0.5
"""A sprite with less than this many px showing counts as hidden."""

STREAMS = {"train": 0, "eval": 1, "pilot": 2}
"""Disjoint seed streams: training clips, held-out evaluation clips, and the learning-rate pilot."""


@dataclass
class ClipParams:
    """What one clip is made of (numpy, drawn on the CPU; everything else follows from these)."""

    background: int
    bar_left: int
    """The bar's left edge in px, or -1 for no bar."""
    colours: np.ndarray  # [N] palette index, -1 where absent
    radius: np.ndarray  # [N] px
    start: np.ndarray  # [N, 2] centre (x, y) at frame 0
    velocity: np.ndarray  # [N, 2] px per frame at frame 0


def clip_params(seed: int, stream: str, index: int) -> ClipParams:
    """Draw clip `index` of `stream` (deterministic in (seed, stream, index))."""
    rng = np.random.default_rng([seed, STREAMS[stream], index])
    count = int(rng.integers(1, MAX_SPRITES + 1))
    bar_left = int(rng.integers(2, (SIZE - BAR_WIDTH) // TOKEN - 1)) * TOKEN if rng.random() < BAR_PROBABILITY else -1
    colours = np.full(MAX_SPRITES, -1)
    colours[:count] = rng.choice(len(PALETTE), size=count, replace=False)
    radius = np.zeros(MAX_SPRITES)
    start = np.zeros((MAX_SPRITES, 2))
    velocity = np.zeros((MAX_SPRITES, 2))
    for i in range(count):
        r = rng.uniform(4.0, 6.0)
        speed = rng.uniform(1.0, 2.5)
        while True:  # a direction with |vx| >= 0.4, so every sprite crosses the bar in finite time
            angle = rng.uniform(0, 2 * np.pi)
            if abs(speed * np.cos(angle)) >= 0.4:
                break
        while True:  # frame 0 shows every sprite whole: none touches the bar
            x, y = rng.uniform(r, SIZE - r, size=2)
            if bar_left < 0 or x + r <= bar_left or x - r >= bar_left + BAR_WIDTH:
                break
        radius[i], start[i], velocity[i] = r, (x, y), (speed * np.cos(angle), speed * np.sin(angle))
    return ClipParams(int(rng.integers(len(BACKGROUNDS))), bar_left, colours, radius, start, velocity)


def fold(position: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Unbounded straight-line positions folded into [low, high]: elastic reflection off both walls."""
    span = high - low
    u = torch.remainder(position - low, 2 * span)
    return low + torch.where(u <= span, u, 2 * span - u)


@dataclass
class Clips:
    """A batch of rendered clips and their ground truth."""

    frames: torch.Tensor
    """[B, T, H, W, 3] float in [-1, 1]."""
    centres: torch.Tensor
    """[B, T, N, 2] each sprite's centre (x, y) in px (pixel centres at i + 0.5)."""
    visible_area: torch.Tensor
    """[B, T, N] px of each sprite that show (0 when hidden or absent)."""
    visible_centroid: torch.Tensor
    """[B, T, N, 2] the centroid of the part that shows (the centre where nothing shows)."""
    behind_bar: torch.Tensor
    """[B, T, N] the bar alone hides the whole sprite (other sprites aside)."""
    overlapped: torch.Tensor
    """[B, T, N] a nearer sprite covers more than 1 px of it (its colour then shows as a crescent
    or not at all: such frames are left out of the per-sprite checks)."""
    full_area: torch.Tensor
    """[B, N] px of the whole disc (as rendered, anti-aliased)."""
    colours: torch.Tensor
    """[B, N] palette index, -1 where absent."""
    radius: torch.Tensor  # [B, N]
    speed: torch.Tensor
    """[B, N] px per frame (constant: reflections keep it)."""
    bar_left: torch.Tensor  # [B], -1: no bar
    background: torch.Tensor  # [B] index into BACKGROUNDS

    @property
    def present(self) -> torch.Tensor:
        """[B, N] the slot holds a sprite."""
        return self.colours >= 0

    def video(self) -> torch.Tensor:
        """[B, 3, T, H, W]: the model's layout (pixels are the latents: no VAE)."""
        return self.frames.permute(0, 4, 1, 2, 3)


def render(params: list[ClipParams], frames: int, device="cpu", start_frame: int = 0) -> Clips:
    """Render `frames` frames of each clip from frame `start_frame` on, with ground truth."""
    dev = torch.device(device)
    f32 = dict(dtype=torch.float32, device=dev)
    colours = torch.tensor(np.stack([p.colours for p in params]), device=dev)
    radius = torch.tensor(np.stack([p.radius for p in params]), **f32)
    start = torch.tensor(np.stack([p.start for p in params]), **f32)
    velocity = torch.tensor(np.stack([p.velocity for p in params]), **f32)
    bar_left = torch.tensor([p.bar_left for p in params], device=dev)
    background = torch.tensor([p.background for p in params], device=dev)
    present = colours >= 0

    t = torch.arange(start_frame, start_frame + frames, **f32).view(1, -1, 1, 1)
    r = radius.view(-1, 1, MAX_SPRITES, 1)
    centres = fold(start.unsqueeze(1) + velocity.unsqueeze(1) * t, r, SIZE - r)  # [B, T, N, 2]

    grid = torch.arange(SIZE, **f32) + 0.5
    gx = grid.view(1, 1, 1, 1, SIZE)
    gy = grid.view(1, 1, 1, SIZE, 1)
    dist = torch.sqrt((gx - centres[..., 0, None, None]) ** 2 + (gy - centres[..., 1, None, None]) ** 2)
    alpha = (radius.view(-1, 1, MAX_SPRITES, 1, 1) + 0.5 - dist).clamp(0, 1) * present.view(-1, 1, MAX_SPRITES, 1, 1)

    bar = torch.zeros(len(params), SIZE, **f32)
    for b, left in enumerate(bar_left.tolist()):
        if left >= 0:
            bar[b, left : left + BAR_WIDTH] = 1.0
    bar = bar.view(-1, 1, 1, SIZE)  # [B, 1, 1, W]: the same in every row and frame

    # Composite back to front: background, sprites in depth order, the bar on top.
    image = BACKGROUNDS.to(dev)[background].view(-1, 1, 1, 1, 3).expand(-1, frames, SIZE, SIZE, 3).clone()
    palette = PALETTE.to(dev)
    cover = torch.ones_like(alpha[:, :, 0])  # what of each pixel is not yet covered by a nearer layer
    visible = torch.zeros_like(alpha)
    in_front = torch.ones_like(cover)  # what nearer sprites leave uncovered
    overlapped = torch.zeros(alpha.shape[:3], dtype=torch.bool, device=dev)
    cover = cover * (1 - bar)
    for i in reversed(range(MAX_SPRITES)):  # front to back, for the visible fractions
        visible[:, :, i] = alpha[:, :, i] * cover
        overlapped[:, :, i] = (alpha[:, :, i] * (1 - in_front)).sum(dim=(-1, -2)) > 1.0
        cover = cover * (1 - alpha[:, :, i])
        in_front = in_front * (1 - alpha[:, :, i])
    for i in range(MAX_SPRITES):
        colour = palette[colours[:, i].clamp(min=0)].view(-1, 1, 1, 1, 3)
        a = alpha[:, :, i, ..., None]
        image = image * (1 - a) + colour * a
    b = bar[..., None]
    image = image * (1 - b) + BAR_COLOUR.to(dev) * b

    area = visible.sum(dim=(-1, -2))
    weight = visible / area.clamp(min=1e-6)[..., None, None]
    centroid = torch.stack([(weight * gx).sum(dim=(-1, -2)), (weight * gy).sum(dim=(-1, -2))], dim=-1)
    centroid = torch.where((area > 1e-6)[..., None], centroid, centres)
    behind_bar = ((alpha * (1 - bar)[:, :, None]).sum(dim=(-1, -2)) < HIDDEN_PX) & present[:, None]
    speed = velocity.norm(dim=-1)
    full = alpha[:, :1].sum(dim=(-1, -2))[:, 0]  # frame-independent: a whole disc's rendered area
    return Clips(
        frames=image * 2 - 1,
        centres=centres,
        visible_area=area,
        visible_centroid=centroid,
        behind_bar=behind_bar,
        overlapped=overlapped,
        full_area=full,
        colours=colours,
        radius=radius,
        speed=speed,
        bar_left=bar_left,
        background=background,
    )


def render_clips(seed: int, stream: str, indices, frames: int, device="cpu") -> Clips:
    """Clips `indices` of `stream`, `frames` long."""
    return render([clip_params(seed, stream, int(i)) for i in indices], frames, device)


@dataclass
class Occlusion:
    """One sprite's passage behind the bar: hidden from frame `hidden_from` for `duration` frames."""

    clip: int
    sprite: int
    hidden_from: int
    duration: int

    @property
    def reappears(self) -> int:
        """The first frame it shows again."""
        return self.hidden_from + self.duration


def occlusions(clips: Clips) -> list[Occlusion]:
    """Every complete passage behind the bar: a run of frames where the bar hides the whole sprite,
    with frames before and after it (a run cut by the clip's end is not an event: where the sprite
    comes out is not in the clip)."""
    hidden = clips.behind_bar
    events = []
    B, T, N = hidden.shape
    for b in range(B):
        for i in range(N):
            if not clips.present[b, i]:
                continue
            run_start = None
            for t, h in enumerate(hidden[b, :, i].tolist()):
                if h and run_start is None:
                    run_start = t
                elif not h and run_start is not None:
                    if run_start > 0:
                        events.append(Occlusion(b, i, run_start, t - run_start))
                    run_start = None
    return events


# --- the world as a training data source: data.root=world:sprites ---

WORLD_SOURCE = "world:sprites"
EPOCH_CLIPS = 4096
"""Clips per length in the catalog of `world:sprites`: an epoch's worth for the batch sampler. Each
(epoch, clip) renders a clip of its own (drawn from the key's generator), so no two epochs repeat."""


def is_world(path: str) -> bool:
    """Is this data source (or clip path) the procedural world rather than files?"""
    return str(path).startswith("world:")


def world_clip_names(source: str, frames: list[int], sizes: list[tuple[int, int]]) -> list[tuple[str, tuple]]:
    """(clip name, bucket) of every catalog entry of a world source: EPOCH_CLIPS per clip length,
    all 64x64. Raises ValueError for an unknown world or sizes without 64x64."""
    if source != WORLD_SOURCE:
        raise ValueError(f"unknown world {source!r}: the one there is is {WORLD_SOURCE}")
    if (SIZE, SIZE) not in [tuple(s) for s in sizes]:
        raise ValueError(f"{source} renders {SIZE}x{SIZE} clips: data.sizes must hold [{SIZE}, {SIZE}] (got {sizes})")
    return [(f"{source}/{f}/{i}", (f, SIZE, SIZE)) for f in sorted(frames, reverse=True) for i in range(EPOCH_CLIPS)]


def render_world_clip(name: str, num_frames: int, rng: np.random.Generator | None, seed: int = 0) -> torch.Tensor:
    """uint8 [T, 64, 64, 3] for a world clip name. In training (`rng` given, drawn from the
    sampler's key) a fresh clip of the training stream; without (held-out clips, scored at fixed
    noise) clip i of the evaluation stream, the same every time."""
    index = int(name.rsplit("/", 1)[1])
    if rng is not None:
        params = clip_params(seed, "train", int(rng.integers(2**62)))
    else:
        params = clip_params(seed, "eval", index)
    frames = render([params], num_frames).frames[0]
    return ((frames + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
