"""Shapes: a procedural, captioned image data set that needs no download (stage 1).

Each image shows 1 to 3 coloured shapes, each on its own cell of a 3x3 grid, over a dark,
softly textured background. Every image comes with a caption ("a big red circle at the top left
and a tiny blue square in the center"), per-object attribute labels, a class label and a
per-pixel semantic mask, so later stages can condition on labels, text or layouts and we can
check whether generated images show what was asked for.

Image i is a pure function of (seed, i): its few random scalars come from a NumPy generator
seeded with [seed, i], so it is the same alone or inside a batch, on CPU or GPU.

Rendering uses signed distance functions (SDFs): sdf(p) < 0 inside a shape, > 0 outside, and
|sdf| is the distance to the edge. With the SDF in pixels, the fraction of a pixel a shape covers
is close to  coverage = clamp(0.5 - sdf, 0, 1)  (a one-pixel linear ramp across the edge: cheap
anti-aliasing), and shapes are painted in order:  image = image * (1 - coverage) + colour * coverage.
All of it is elementwise torch over the whole batch, on any device.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch.utils.data import Dataset

from minildm import distributed
from minildm.device import to_device

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "ring")
COLOURS = {  # name -> RGB in [0, 1]; saturated, so they stand out on the dark background
    "red": (0.90, 0.12, 0.12),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.98, 0.92, 0.15),
    "green": (0.15, 0.75, 0.25),
    "blue": (0.15, 0.35, 0.95),
    "purple": (0.62, 0.20, 0.85),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
SIZE_RADIUS = (0.08, 0.14)  # every shape fits in a disc of this radius (fraction of the image side)
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
JITTER = 0.02  # max offset from the cell centre; radius + jitter < 1/6, so shapes never overlap or leave
MAX_OBJECTS = 3
NUM_CLASSES = len(SHAPES) * len(COLOURS)  # class label = shape * n_colours + colour of the first object
MIN_IMAGE_SIZE = 16

# The caption grammar: [prefix] object {joiner object}, object = "a SIZE COLOUR SHAPE PREP the POSITION".
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
PREPOSITIONS = ("at", "in", "on")
JOINERS = ("and", "with", "plus")
PREFIXES = ("", "there is ", "a picture of ", "an image of ")


@dataclass(frozen=True)
class ShapesConfig:
    """What to generate. Images of `image_size` px, 1 to 3 objects, all determined by `seed`.

    `exclude_pairs`: (colour, shape) pairs that never appear, e.g. (("blue", "triangle"),). An object drawn with an
    excluded pair gets a pair drawn uniformly from the allowed ones instead (its size, place and the caption's
    wording stay as drawn), so no image and no caption of this config contains the pair: a model trained on it
    has seen "blue" and "triangle", never a blue triangle (notebook 09 tests whether it composes them). Images
    without an excluded pair are exactly those of the config without the option.
    """

    image_size: int = 64
    seed: int = 0
    min_objects: int = 1
    max_objects: int = MAX_OBJECTS
    exclude_pairs: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        check_image_size(self.image_size)
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(f"ShapesConfig needs 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, "
                             f"got min_objects={self.min_objects}, max_objects={self.max_objects}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"ShapesConfig.seed must be a non-negative int, got {self.seed!r}")
        pairs = tuple(tuple(pair) for pair in self.exclude_pairs)  # lists from a JSON config become tuples
        for pair in pairs:
            if len(pair) != 2 or pair[0] not in COLOURS or pair[1] not in SHAPES:
                raise ValueError(f"ShapesConfig.exclude_pairs holds (colour, shape) names, e.g. ('blue', "
                                 f"'triangle'), with colours {COLOUR_NAMES} and shapes {SHAPES}; got {pair!r}")
        if len(set(pairs)) >= len(COLOURS) * len(SHAPES):
            raise ValueError("ShapesConfig.exclude_pairs excludes every (colour, shape) pair: nothing left to draw")
        object.__setattr__(self, "exclude_pairs", tuple(sorted(set(pairs))))


@dataclass(frozen=True)
class ShapeObject:
    """One shape: indices into SHAPES, COLOURS, SIZES, POSITIONS, and a small offset (x, y)."""

    shape: int
    colour: int
    size: int
    position: int
    jitter: tuple[float, float] = (0.0, 0.0)

    @property
    def center(self) -> tuple[float, float]:
        """(x, y) in [0, 1] image coordinates, y pointing down: the grid cell's centre plus jitter."""
        row, col = divmod(self.position, 3)
        return (col + 0.5) / 3 + self.jitter[0], (row + 0.5) / 3 + self.jitter[1]


@dataclass(frozen=True)
class Background:
    """base RGB + sum of waves  amplitude * sin(2 pi (kx x + ky y) + phase), with x, y in [0, 1]."""

    base: tuple[float, float, float] = (0.2, 0.2, 0.2)
    waves: tuple[tuple[float, float, float, float], ...] = ()  # (amplitude, kx, ky, phase)


@dataclass(frozen=True)
class Scene:
    """Everything needed to draw and describe one image. Objects are painted in order."""

    objects: tuple[ShapeObject, ...]
    background: Background = field(default_factory=Background)
    caption: str = ""


def check_image_size(image_size) -> None:
    """Raise a clear ValueError unless image_size is an int >= MIN_IMAGE_SIZE."""
    if not isinstance(image_size, int) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"Shapes images must be an int size >= {MIN_IMAGE_SIZE} px (e.g. 32 or 64), got "
                         f"{image_size!r}: below that the small shapes are only a few pixels wide")


def class_name(label: int) -> str:
    """The class of label = shape * len(COLOURS) + colour, in words: 7 -> "orange square"."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"Shapes class labels run from 0 to {NUM_CLASSES - 1}, got {label}")
    shape, colour = divmod(int(label), len(COLOURS))
    return f"{COLOUR_NAMES[colour]} {SHAPES[shape]}"


# ---------------------------------------------------------------- sampling scenes and captions

class _Uniforms:
    """Uniform numbers from one generator, drawn in a single NumPy call and handed out one at a time
    (dozens of small NumPy calls per image would make sampling several times slower)."""

    def __init__(self, rng: np.random.Generator, count: int):
        self.values = rng.random(count).tolist()

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.values.pop()

    def integer(self, n: int) -> int:  # uniform on {0, ..., n - 1}
        return int(self.values.pop() * n)


@functools.lru_cache(maxsize=16)
def _allowed_pairs(excluded: tuple[tuple[str, str], ...]) -> list[tuple[int, int]]:
    """(shape, colour) indices of every pair not excluded, in a fixed order."""
    return [(s, c) for s in range(len(SHAPES)) for c in range(len(COLOURS))
            if (COLOUR_NAMES[c], SHAPES[s]) not in excluded]


def sample_scene(index: int, cfg: ShapesConfig) -> Scene:
    """Draw image `index`'s attributes, background and caption from a generator seeded by (seed, index)."""
    rng = np.random.default_rng([cfg.seed, index])
    u = _Uniforms(rng, 32)  # enough for 3 objects and the background
    n = cfg.min_objects + u.integer(cfg.max_objects - cfg.min_objects + 1)
    free_cells, objects, redraw = list(range(len(POSITIONS))), [], None
    for _ in range(n):
        position = free_cells.pop(u.integer(len(free_cells)))  # distinct cells
        shape, colour, size = u.integer(len(SHAPES)), u.integer(len(COLOURS)), u.integer(len(SIZES))
        if cfg.exclude_pairs and (COLOUR_NAMES[colour], SHAPES[shape]) in cfg.exclude_pairs:
            # redraw from a generator of its own, so the draws after this one (and the caption) stay as they were
            redraw = redraw or np.random.default_rng([cfg.seed, index, 1])
            allowed = _allowed_pairs(cfg.exclude_pairs)
            shape, colour = allowed[int(redraw.random() * len(allowed))]
        jitter = (u.uniform(-JITTER, JITTER), u.uniform(-JITTER, JITTER))
        objects.append(ShapeObject(shape, colour, size, position, jitter))
    # Dark grey with a slight tint, plus two gentle waves of 0.5 to 1.5 cycles per image.
    grey = u.uniform(0.18, 0.38)
    base = tuple(grey + u.uniform(-0.03, 0.03) for _ in range(3))
    waves = []
    for _ in range(2):
        amplitude, angle, cycles = u.uniform(0.02, 0.06), u.uniform(0, 2 * math.pi), u.uniform(0.5, 1.5)
        waves.append((amplitude, cycles * math.cos(angle), cycles * math.sin(angle), u.uniform(0, 2 * math.pi)))
    scene = Scene(tuple(objects), Background(base, tuple(waves)))
    return replace(scene, caption=caption(scene, rng))


def sample_scenes(indices: Sequence[int], cfg: ShapesConfig) -> list[Scene]:
    """Scenes for many indices (attributes only, no pixels)."""
    indices = [int(i) for i in indices]
    if any(i < 0 for i in indices):
        raise ValueError(f"Shapes indices must be >= 0, got {min(indices)}")
    return [sample_scene(i, cfg) for i in indices]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Describe every object, in painting order, with wording picked by `rng`."""
    u = _Uniforms(rng, 3 * len(scene.objects))

    def pick(options):
        return options[u.integer(len(options))]

    phrases = [f"a {pick(SIZE_WORDS[SIZES[o.size]])} {COLOUR_NAMES[o.colour]} {SHAPES[o.shape]} "
               f"{pick(PREPOSITIONS)} the {POSITIONS[o.position]}" for o in scene.objects]
    text = phrases[0]
    for phrase in phrases[1:]:
        text += f" {pick(JOINERS)} {phrase}"
    return pick(PREFIXES) + text


def vocabulary() -> list[str]:
    """Every word a caption can contain (captions are lower case, words separated by single spaces)."""
    pieces = [*SHAPES, *COLOURS, *POSITIONS, *PREPOSITIONS, *JOINERS, *PREFIXES, "a the"]
    pieces += [w for words in SIZE_WORDS.values() for w in words]
    return sorted({word for piece in pieces for word in piece.split()})


# ---------------------------------------------------------------- signed distance functions

def _regular_normals(n: int, first_angle: float) -> list[tuple[float, float]]:
    return [(math.cos(first_angle + 2 * math.pi * k / n), math.sin(first_angle + 2 * math.pi * k / n))
            for k in range(n)]


_RHOMBUS = [(sx / math.hypot(1.0, 0.7), sy * 0.7 / math.hypot(1.0, 0.7)) for sx in (1, -1) for sy in (1, -1)]
# A convex polygon is the intersection of half-planes n_k . p <= a (unit edge normals n_k, apothem a),
# so sdf(p) = max_k (n_k . p) - a: exact inside and along the edges, slightly small beyond corners.
# name -> (edge normals, apothem / r, downward shift of the centre / r); y points down.
POLYGONS = {
    "square": (_regular_normals(4, 0.0), 0.8, 0.0),
    "triangle": (_regular_normals(3, math.pi / 2), 0.575, 0.2875),  # circumradius 1.15 r, box-centred
    "diamond": (_RHOMBUS, 0.7 / math.hypot(1.0, 0.7), 0.0),          # half-width 0.7 r, half-height r
    "hexagon": (_regular_normals(6, 0.0), math.cos(math.pi / 6), 0.0),
}


def shape_sdf(name: str, px: torch.Tensor, py: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """SDF of shape `name` of size r at offsets (px, py) from its centre; all broadcast to (N, H, W)."""
    if name == "circle":
        return torch.hypot(px, py) - r
    if name == "ring":  # outer radius r, inner radius 0.4 r
        return (torch.hypot(px, py) - 0.7 * r).abs() - 0.3 * r
    normals, apothem, shift = POLYGONS[name]
    py = py - shift * r
    distance = normals[0][0] * px + normals[0][1] * py  # (N, H, W)
    for nx, ny in normals[1:]:
        distance = torch.maximum(distance, nx * px + ny * py)
    return distance - apothem * r


# ---------------------------------------------------------------- rendering

def _pack(scenes: Sequence[Scene], device: torch.device) -> dict[str, torch.Tensor]:
    """Scene attributes as padded tensors: absent objects get shape -1 and draw nothing."""
    B, n_waves = len(scenes), max(len(s.background.waves) for s in scenes)
    shape, centre = np.full((B, MAX_OBJECTS), -1), np.zeros((B, MAX_OBJECTS, 2))
    radius, rgb = np.zeros((B, MAX_OBJECTS)), np.zeros((B, MAX_OBJECTS, 3))
    base, waves = np.zeros((B, 3)), np.zeros((B, n_waves, 4))
    for b, scene in enumerate(scenes):
        base[b] = scene.background.base
        if scene.background.waves:
            waves[b, :len(scene.background.waves)] = scene.background.waves
        for k, o in enumerate(scene.objects):
            shape[b, k], centre[b, k], radius[b, k] = o.shape, o.center, SIZE_RADIUS[o.size]
            rgb[b, k] = COLOURS[COLOUR_NAMES[o.colour]]
    arrays = {"shape": shape, "centre": centre, "radius": radius, "rgb": rgb, "base": base, "waves": waves}
    # Which objects have which shape is decided here, on the host: torch.nonzero on the device would make the CPU
    # wait for the GPU. Copies go through pinned memory (`to_device`), so the host never waits for them either.
    for s in range(len(SHAPES)):
        b, k = np.nonzero(shape == s)
        arrays[f"where_{s}"] = np.stack([b, k])  # (2, number of objects of shape s)
    return {k: to_device(torch.as_tensor(v, dtype=torch.long if k == "shape" or k.startswith("where")
                                         else torch.float32), device)
            for k, v in arrays.items()}


def render(scenes: Sequence[Scene], image_size: int = 64, device=None) -> dict[str, torch.Tensor]:
    """Draw scenes: image (B, 3, H, W) float32 in [-1, 1], mask (B, H, W) int64 (0 = background,
    1 + shape index where a shape covers at least half the pixel; later objects win)."""
    check_image_size(image_size)
    if len(scenes) == 0:
        raise ValueError("render got no scenes; pass a non-empty list")
    S, device = image_size, torch.device(device or "cpu")
    t = _pack(scenes, device)
    grid = (torch.arange(S, device=device, dtype=torch.float32) + 0.5) / S  # pixel centres in [0, 1]
    x, y = grid.view(1, 1, S), grid.view(1, S, 1)

    a, kx, ky, phase = (w[:, :, None, None] for w in t["waves"].unbind(-1))  # each (B, n_waves, 1, 1)
    angle = (2 * math.pi * kx * x + phase) + 2 * math.pi * ky * y  # (B, n_waves, S, S)
    image = t["base"][:, :, None, None] + (a * angle.sin_()).sum(1, keepdim=True)  # (B, 3, S, S)

    coverage = torch.zeros(len(scenes), MAX_OBJECTS, S, S, device=device)
    for s, name in enumerate(SHAPES):  # all objects of one shape at once, whichever image they are in
        b, k = t[f"where_{s}"]
        cx, cy = t["centre"][b, k].unbind(-1)
        px, py, r = (x - cx[:, None, None]) * S, (y - cy[:, None, None]) * S, t["radius"][b, k, None, None] * S
        sdf = shape_sdf(name, px, py, r)  # (N, S, S), in pixels
        coverage[b, k] = (0.5 - sdf).clamp_(0, 1)  # anti-aliased coverage

    mask = torch.zeros(len(scenes), S, S, dtype=torch.long, device=device)
    for k in range(MAX_OBJECTS):
        alpha = coverage[:, k:k + 1]  # (B, 1, S, S)
        image.lerp_(t["rgb"][:, k, :, None, None], alpha)  # image * (1 - alpha) + rgb * alpha
        mask = torch.where(coverage[:, k] >= 0.5, t["shape"][:, k, None, None] + 1, mask)
    return {"image": image.mul_(2).sub_(1).clamp_(-1, 1), "mask": mask}


def attributes(scenes: Sequence[Scene]) -> torch.Tensor:
    """(B, MAX_OBJECTS, 4) int64: shape, colour, size, position of each object; -1 rows for absent ones."""
    rows = [[[o.shape, o.colour, o.size, o.position] for o in scene.objects]
            + [[-1] * 4] * (MAX_OBJECTS - len(scene.objects)) for scene in scenes]
    return torch.tensor(rows, dtype=torch.long)


# ---------------------------------------------------------------- data set and batches

class ShapesDataset(Dataset):
    """`length` Shapes images; items are dicts: image (3, H, W), caption, attributes (3, 4), label, mask (H, W).

    The data set is procedural: any index >= 0 is a valid image, `length` only sets what an epoch is.
    Use a different seed for held-out data.
    """

    def __init__(self, cfg: ShapesConfig | None = None, length: int = 50_000):
        self.cfg = cfg or ShapesConfig()
        if length < 1:
            raise ValueError(f"ShapesDataset length must be >= 1, got {length}")
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for a ShapesDataset of length {self.length}")
        item = {k: v[0] for k, v in self.batch([index]).items()}
        item["label"] = int(item["label"])
        return item

    def batch(self, indices: Sequence[int], device=None) -> dict:
        """Images `indices` as one batch, drawn directly on `device` (fast: use it to feed a GPU)."""
        return make_batch(sample_scenes(indices, self.cfg), self.cfg.image_size, device)


def make_batch(scenes: Sequence[Scene], image_size: int, device=None) -> dict:
    """Draw scenes and gather their labels: image, caption (list of str), attributes, label, mask."""
    drawn = render(scenes, image_size, device)
    attrs = to_device(attributes(scenes), drawn["image"].device)
    label = attrs[:, 0, 0] * len(COLOURS) + attrs[:, 0, 1]  # shape and colour of the first object
    return {"image": drawn["image"], "caption": [s.caption for s in scenes], "attributes": attrs,
            "label": label, "mask": drawn["mask"]}


def shapes_batch_at(cfg: ShapesConfig, batch_size: int, device=None, rank: int | None = None,
                    world_size: int | None = None) -> Callable[[int], dict]:
    """The Shapes batch feeder: `batch_at(step)` draws images step * batch_size ... (step + 1) * batch_size - 1.

    A pure function of the step, so a resumed run sees exactly the batches the interrupted one would have seen
    (the `Trainer` calls it with its step number). Sampling scenes is Python on the CPU, so after each call the
    next step's scenes are sampled in a background thread while the caller trains on this batch (it runs
    whenever the caller waits for the GPU); a call for any other step samples its scenes directly.

    Data parallel (torchrun): batch_size is the global batch and rank r of world_size draws only its contiguous
    part of it, images step * batch_size + r * b ... + (r + 1) * b - 1 with b = batch_size / world_size: the ranks'
    parts are disjoint and together are the batch one process draws. rank and world_size default to this
    process's place in the process group (rank 0 of 1 without torchrun).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mine = distributed.rank_slice(batch_size, rank, world_size)  # this rank's part of each global batch
    pool = ThreadPoolExecutor(max_workers=1)
    upcoming: dict[int, Future] = {}

    def scenes_of(step: int) -> list[Scene]:
        return sample_scenes(range(step * batch_size + mine.start, step * batch_size + mine.stop), cfg)

    def batch_at(step: int) -> dict:
        if step < 0:
            raise ValueError(f"batch_at needs a step >= 0, got {step}")
        ready = upcoming.pop(step, None)
        scenes = ready.result() if ready is not None else scenes_of(step)
        upcoming.clear()
        upcoming[step + 1] = pool.submit(scenes_of, step + 1)
        return make_batch(scenes, cfg.image_size, device)

    weakref.finalize(batch_at, pool.shutdown, wait=False)  # the thread goes when the feeder does
    return batch_at
