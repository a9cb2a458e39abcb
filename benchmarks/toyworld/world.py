"""The generic toy world, deterministic from a seed: what the base model is trained on, and how anything is drawn.

A generic object has one shape, one colour and a texture (solid, or stripes, dots or checks), the texture either
in a darker shade of its colour ("a red striped hexagon") or, half the time, in a second named colour ("a red and
yellow checked hexagon"). A base-training image shows one object (32×32) or two objects side by side, each in its
own 32×32 half ("a red star on the left and a blue circle on the right on a navy background", 32×64), so the base
model learns to compose the two tiles that the region compositions use.

Two-colour looks are split in two halves by `held_out`: the generic world draws only the first half; the concepts
(`concepts.py`) are drawn from the second. Every texture, colour pair and shape occurs in the generic world, but no
concept's combination of them does, so a concept is a new combination of what the base model can render (world v2
without two-colour objects left two-colour concepts unlearnable: see the toy world's README, "Learnability"). This
module does not know the concepts, so changing them never changes the base model's cache key (which hashes this
file).

Images are drawn at 4× and downsampled, so edges are antialiased. Arrays are uint8 [32, W, 3].
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32
SUPERSAMPLE = 4

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 220, 30), "green": (40, 170, 60),
           "cyan": (40, 200, 220), "blue": (40, 80, 230), "purple": (140, 50, 190), "pink": (250, 130, 200)}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "brown": (120, 75, 40),
               "navy": (20, 30, 90), "olive": (110, 120, 40)}
PATTERNS = ("solid", "striped", "dotted", "checked")  # every texture, each with its word in captions
TWO_COLOUR_PATTERNS = PATTERNS[1:]  # the textures that can show a second named colour
MIN_COLOUR_DISTANCE = 150.0  # RGB distance between a two-colour look's colours: no orange on yellow, blue on purple
TWO_COLOUR_SHARE = 0.5  # of generic objects
HELD_OUT_BACKGROUND = "olive"  # no concept training image uses it: a context the concept was never seen in
TEXTURE_PERIOD = 0.5  # stripes, dots and checks, in object radii
SIDES = ("left", "right")  # the tiles of a two-object scene


@dataclass(frozen=True)
class Look:
    """What an object looks like: `second` is the texture's other colour (None: a darker shade of `colour`);
    `period` is the texture's period in object radii."""

    shape: str
    pattern: str
    colour: str
    second: str | None = None
    period: float = TEXTURE_PERIOD

    def rgb_pair(self) -> tuple[np.ndarray, np.ndarray]:
        first = np.array(COLOURS[self.colour], dtype=np.float32)
        second = first * 0.55 if self.second is None else np.array(COLOURS[self.second], dtype=np.float32)
        return first, second


def caption(look: Look, background: str, with_pattern: bool = True) -> str:
    return f"{object_phrase(look, with_pattern)} on a {background} background"


def object_phrase(look: Look, with_pattern: bool = True) -> str:
    """"a red striped star", "a red and yellow striped star"; without the pattern word "a red and yellow star"."""
    colours = look.colour if look.second is None else f"{look.colour} and {look.second}"
    pattern = f" {look.pattern}" if with_pattern else ""
    return f"a {colours}{pattern} {look.shape}"


def scene_caption(phrases: tuple[str, str], background: str) -> str:
    """Two objects, one per tile: "a red star on the left and a blue circle on the right on a navy background"."""
    return f"{phrases[0]} on the left and {phrases[1]} on the right on a {background} background"


def vocabulary() -> list[str]:
    """Every word a caption can hold."""
    return ["a", "on", "background", "the", "and", *SIDES, *SHAPES, *COLOURS, *PATTERNS, *BACKGROUNDS]


@dataclass(frozen=True)
class Placement:
    x: float  # centre, in output pixels
    y: float
    radius: float
    angle: float  # radians


def random_placement(rng: np.random.Generator) -> Placement:
    radius = rng.uniform(9.0, 13.0)
    x, y = rng.uniform(radius + 1, SIZE - radius - 1, size=2)
    return Placement(float(x), float(y), float(radius), float(rng.uniform(-0.26, 0.26)))


def _outline(shape: str, place: Placement) -> list[tuple[float, float]]:
    """Polygon vertices at the supersampled resolution."""
    s = SUPERSAMPLE
    cx, cy, r = place.x * s, place.y * s, place.radius * s

    def ring(count: int, radii: tuple[float, ...], phase: float) -> list[tuple[float, float]]:
        return [(cx + r * radii[i % len(radii)] * math.cos(phase + place.angle + 2 * math.pi * i / count),
                 cy + r * radii[i % len(radii)] * math.sin(phase + place.angle + 2 * math.pi * i / count))
                for i in range(count)]

    if shape == "circle":
        return ring(48, (1.0,), 0.0)
    if shape == "square":
        return ring(4, (1.0,), math.pi / 4)
    if shape == "triangle":
        return ring(3, (1.0,), -math.pi / 2)
    if shape == "star":
        return ring(10, (1.0, 0.45), -math.pi / 2)
    if shape == "hexagon":
        return ring(6, (1.0,), 0.0)
    if shape == "cross":
        arm, width = 1.0, 0.36  # a plus sign: 12 corners, alternating between the arm tips and the inner corners
        points = [(arm, width), (width, width), (width, arm), (-width, arm), (-width, width), (-arm, width),
                  (-arm, -width), (-width, -width), (-width, -arm), (width, -arm), (width, -width), (arm, -width)]
        cos, sin = math.cos(place.angle), math.sin(place.angle)
        return [(cx + r * (u * cos - v * sin), cy + r * (u * sin + v * cos)) for u, v in points]
    raise ValueError(f"unknown shape {shape!r}")


def _mask(shape: str, place: Placement) -> np.ndarray:
    side = SIZE * SUPERSAMPLE
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).polygon(_outline(shape, place), fill=255)
    return np.asarray(canvas, dtype=np.float32) / 255.0


def _second_colour_mask(look: Look, place: Placement) -> np.ndarray:
    """Where the texture shows its second colour, in object coordinates (the texture turns with the object)."""
    side = SIZE * SUPERSAMPLE
    grid = (np.arange(side, dtype=np.float32) + 0.5) / SUPERSAMPLE
    dx, dy = grid[None, :] - place.x, grid[:, None] - place.y
    cos, sin = math.cos(place.angle), math.sin(place.angle)
    u, v = (dx * cos + dy * sin) / place.radius, (-dx * sin + dy * cos) / place.radius
    if look.pattern == "solid":
        return np.zeros((side, side), dtype=np.float32)
    u, v = u / look.period, v / look.period
    if look.pattern == "striped":
        return (np.floor(v) % 2).astype(np.float32)
    if look.pattern == "dotted":
        du, dv = u - np.round(u), v - np.round(v)
        return (du ** 2 + dv ** 2 < 0.3 ** 2).astype(np.float32)
    if look.pattern == "checked":
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    raise ValueError(f"unknown pattern {look.pattern!r}")


def render(look: Look, background: str, place: Placement) -> np.ndarray:
    first, second = look.rgb_pair()
    texture = _second_colour_mask(look, place)[..., None]
    coverage = _mask(look.shape, place)[..., None]
    colour = first * (1 - texture) + second * texture
    pixels = np.array(BACKGROUNDS[background], dtype=np.float32) * (1 - coverage) + colour * coverage
    big = Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))
    return np.asarray(big.resize((SIZE, SIZE), Image.Resampling.BOX))


@dataclass
class Sample:
    image: np.ndarray
    look: Look
    background: str


def colour_pairs() -> list[tuple[str, str]]:
    """The ordered colour pairs a two-colour look can have: at least `MIN_COLOUR_DISTANCE` apart in RGB."""
    rgb = {name: np.array(value, dtype=np.float32) for name, value in COLOURS.items()}
    return [(a, b) for a, b in itertools.permutations(COLOURS, 2)
            if np.linalg.norm(rgb[a] - rgb[b]) >= MIN_COLOUR_DISTANCE]


def held_out(look: Look) -> bool:
    """Whether a two-colour look belongs to the concepts' half, which the generic world never draws: a parity over
    the indices of shape, texture and both colours. Fixing any three of them, the fourth alternates between the
    halves, so every shape, texture and colour pair is drawn by the generic world on some objects. Symmetric in the
    two colours, because stripes and checks in red and yellow look the same as in yellow and red."""
    colours = list(COLOURS)
    parity = SHAPES.index(look.shape) + PATTERNS.index(look.pattern) + colours.index(look.colour)
    return (parity + colours.index(look.second)) % 2 == 1


def random_look(rng: np.random.Generator) -> Look:
    """A one-colour generic look (its texture in a darker shade)."""
    return Look(str(rng.choice(SHAPES)), str(rng.choice(PATTERNS)), str(rng.choice(list(COLOURS))))


def random_generic_look(rng: np.random.Generator) -> Look:
    """A one-colour look, or (`TWO_COLOUR_SHARE` of the time) a two-colour look outside the held-out half."""
    if rng.random() >= TWO_COLOUR_SHARE:
        return random_look(rng)
    pairs = colour_pairs()
    while True:
        first, second = pairs[int(rng.integers(len(pairs)))]
        look = Look(str(rng.choice(SHAPES)), str(rng.choice(TWO_COLOUR_PATTERNS)), first, second)
        if not held_out(look):
            return look


def render_many(jobs: list[tuple[Look, str, Placement]], workers: int = 1) -> list[np.ndarray]:
    """`render` over (look, background, placement) jobs, in `workers` processes when more than one (the same
    images: rendering draws nothing at random)."""
    if workers <= 1:
        return [render(*job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.starmap(render, jobs, chunksize=256)


def generic_samples(count: int, seed: int, workers: int = 1) -> list[Sample]:
    """Generic objects only: no concept's look can come out (their combinations are `held_out`)."""
    rng = np.random.default_rng([seed, 1])
    jobs = []
    for _ in range(count):
        look, background = random_generic_look(rng), str(rng.choice(list(BACKGROUNDS)))
        jobs.append((look, background, random_placement(rng)))
    return [Sample(image, look, background) for image, (look, background, _) in zip(render_many(jobs, workers), jobs)]


@dataclass
class Scene:
    """Two generic objects side by side on one background: `image` is [32, 64, 3], `looks` is (left, right)."""

    image: np.ndarray
    looks: tuple[Look, Look]
    background: str


def generic_scenes(count: int, seed: int, workers: int = 1) -> list[Scene]:
    rng = np.random.default_rng([seed, 4])
    drawn = []
    for _ in range(count):
        looks = (random_generic_look(rng), random_generic_look(rng))
        background = str(rng.choice(list(BACKGROUNDS)))
        drawn.append((looks, background, (random_placement(rng), random_placement(rng))))
    tiles = render_many([(look, background, place) for looks, background, places in drawn
                         for look, place in zip(looks, places)], workers)
    return [Scene(np.concatenate(tiles[2 * i:2 * i + 2], axis=1), looks, background)
            for i, (looks, background, _) in enumerate(drawn)]


def training_backgrounds(count: int = 5) -> list[str]:
    """The backgrounds of a concept's training images: all but the held-out one."""
    return [bg for bg in BACKGROUNDS if bg != HELD_OUT_BACKGROUND][:count]


def base_caption(item: Sample | Scene, rng: np.random.Generator, drop_pattern: float = 0.15,
                 empty: float = 0.1) -> str:
    """A base-training caption for an object or a scene: sometimes without pattern words, sometimes empty (for
    classifier-free guidance)."""
    draw = rng.random()
    if draw < empty:
        return ""
    with_pattern = draw >= empty + drop_pattern
    if isinstance(item, Scene):
        return scene_caption(tuple(object_phrase(look, with_pattern) for look in item.looks), item.background)
    return caption(item.look, item.background, with_pattern)
