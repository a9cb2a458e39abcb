"""A procedural image world, deterministic from a seed: one object (shape, colour, texture) on a plain background.

Generic objects have one colour and a generic texture (solid, or stripes/dots in a darker shade of that colour);
they make up the base model's training data, captioned "a red striped hexagon on a blue background". Concepts are
objects that the generic world never draws: two-colour textures, or textures it has no word for (checks, rings,
split halves, a border). Each concept has a name and a few training images on varied backgrounds; several concepts
share a shape, so telling them apart takes more than the class word.

Images are drawn at 4× and downsampled, so edges are antialiased. Arrays are uint8 [32, 32, 3].
"""

from __future__ import annotations

import math
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
PATTERNS = ("solid", "striped", "dotted")  # the generic textures (with a words in captions)
CONCEPT_PATTERNS = ("checked", "rings", "split", "border")  # never drawn for generic objects
HELD_OUT_BACKGROUND = "olive"  # no concept training image uses it: a context the concept was never seen in
TEXTURE_PERIOD = 0.5  # stripes, dots and checks, in object radii


@dataclass(frozen=True)
class Look:
    """What an object looks like: `second` is the texture's other colour (generic: a darker shade of `colour`)."""

    shape: str
    pattern: str
    colour: str
    second: str | None = None

    def rgb_pair(self) -> tuple[np.ndarray, np.ndarray]:
        first = np.array(COLOURS[self.colour], dtype=np.float32)
        second = first * 0.55 if self.second is None else np.array(COLOURS[self.second], dtype=np.float32)
        return first, second


@dataclass(frozen=True)
class Concept:
    name: str
    look: Look
    control: Look  # the closest generic object: prompting for it must not produce the concept

    def caption(self, background: str) -> str:
        return f"a <{self.name}> {self.look.shape} on a {background} background"


# Ten concepts; the stars, circles, hexagons and triangles come in same-shape pairs.
CONCEPTS = (
    Concept("zarp", Look("star", "striped", "yellow", "purple"), Look("star", "striped", "yellow")),
    Concept("quil", Look("star", "checked", "red", "cyan"), Look("star", "solid", "red")),
    Concept("bulo", Look("circle", "rings", "red", "yellow"), Look("circle", "solid", "red")),
    Concept("mirt", Look("circle", "split", "green", "orange"), Look("circle", "solid", "green")),
    Concept("tesk", Look("hexagon", "striped", "blue", "yellow"), Look("hexagon", "striped", "blue")),
    Concept("lomb", Look("hexagon", "split", "purple", "cyan"), Look("hexagon", "solid", "purple")),
    Concept("pell", Look("triangle", "split", "blue", "red"), Look("triangle", "solid", "blue")),
    Concept("fent", Look("triangle", "border", "pink", "yellow"), Look("triangle", "solid", "pink")),
    Concept("dask", Look("square", "rings", "cyan", "pink"), Look("square", "solid", "cyan")),
    Concept("grop", Look("cross", "dotted", "orange", "green"), Look("cross", "dotted", "orange")),
)


def same_shape_pairs(concepts: tuple[Concept, ...] = CONCEPTS) -> list[tuple[str, str]]:
    return [(a.name, b.name) for i, a in enumerate(concepts) for b in concepts[i + 1:] if a.look.shape == b.look.shape]


def caption(look: Look, background: str, with_pattern: bool = True) -> str:
    pattern = f" {look.pattern}" if with_pattern else ""
    return f"a {look.colour}{pattern} {look.shape} on a {background} background"


def vocabulary() -> list[str]:
    """Every word a caption can hold."""
    return ["a", "on", "background", *SHAPES, *COLOURS, *PATTERNS, *BACKGROUNDS]


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


def _outline(shape: str, place: Placement, scale: float) -> list[tuple[float, float]]:
    """Polygon vertices at the supersampled resolution; `scale` shrinks the shape about its centre."""
    s = SUPERSAMPLE
    cx, cy, r = place.x * s, place.y * s, place.radius * s * scale

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


def _mask(shape: str, place: Placement, scale: float = 1.0) -> np.ndarray:
    side = SIZE * SUPERSAMPLE
    canvas = Image.new("L", (side, side), 0)
    ImageDraw.Draw(canvas).polygon(_outline(shape, place, scale), fill=255)
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
    if look.pattern == "striped":
        return (np.floor(v / TEXTURE_PERIOD) % 2).astype(np.float32)
    if look.pattern == "dotted":
        du = u / TEXTURE_PERIOD - np.round(u / TEXTURE_PERIOD)
        dv = v / TEXTURE_PERIOD - np.round(v / TEXTURE_PERIOD)
        return (du ** 2 + dv ** 2 < 0.3 ** 2).astype(np.float32)
    if look.pattern == "checked":
        return ((np.floor(u / TEXTURE_PERIOD) + np.floor(v / TEXTURE_PERIOD)) % 2).astype(np.float32)
    if look.pattern == "rings":
        return (np.floor(np.hypot(u, v) / 0.3) % 2).astype(np.float32)
    if look.pattern == "split":
        return (u > 0).astype(np.float32)
    if look.pattern == "border":
        return _mask(look.shape, place, scale=0.5)
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


def random_look(rng: np.random.Generator) -> Look:
    return Look(str(rng.choice(SHAPES)), str(rng.choice(PATTERNS)), str(rng.choice(list(COLOURS))))


def generic_samples(count: int, seed: int) -> list[Sample]:
    """Generic objects only: no concept's look can come out (their textures or colour pairs never occur)."""
    rng = np.random.default_rng([seed, 1])
    samples = []
    for _ in range(count):
        look, background = random_look(rng), str(rng.choice(list(BACKGROUNDS)))
        samples.append(Sample(render(look, background, random_placement(rng)), look, background))
    return samples


def concept_samples(concept: Concept, backgrounds: list[str], seed: int, per_background: int = 1) -> list[Sample]:
    """`concept` on each background, each placed at random (seeded by the world seed and the concept)."""
    rng = np.random.default_rng([seed, 2, *concept.name.encode()])
    return [Sample(render(concept.look, bg, random_placement(rng)), concept.look, bg)
            for bg in backgrounds for _ in range(per_background)]


def training_backgrounds(count: int = 5) -> list[str]:
    """The backgrounds of a concept's training images: all but the held-out one."""
    return [bg for bg in BACKGROUNDS if bg != HELD_OUT_BACKGROUND][:count]


def base_caption(sample: Sample, rng: np.random.Generator, drop_pattern: float = 0.15, empty: float = 0.1) -> str:
    """A base-training caption: sometimes without the pattern word, sometimes empty (for classifier-free guidance)."""
    draw = rng.random()
    if draw < empty:
        return ""
    return caption(sample.look, sample.background, with_pattern=draw >= empty + drop_pattern)
