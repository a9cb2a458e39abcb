"""The generic toy world, deterministic from a seed: what the base model is trained on, and how anything is drawn.

A generic object has one shape, one colour and a generic texture (solid, or stripes/dots in a darker shade of its
colour); a base-training image shows one object ("a red striped hexagon on a navy background", 32×32) or two
objects side by side, each in its own 32×32 half ("a red star on the left and a blue circle on the right on a navy
background", 32×64), so the base model learns to compose the two tiles that the region compositions use.

`render` draws any `Look`, including looks the generic world never produces: a second colour that is not the darker
shade, or the wordless "checked" texture. Those are what concepts (`concepts.py`) are made of. This module does not
know the concepts, so changing them never changes the base model's cache key (which hashes this file).

Images are drawn at 4× and downsampled, so edges are antialiased. Arrays are uint8 [32, W, 3].
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
TEXTURES = (*PATTERNS, "checked")  # what `render` can draw; "checked" has no word and no generic object uses it
HELD_OUT_BACKGROUND = "olive"  # no concept training image uses it: a context the concept was never seen in
TEXTURE_PERIOD = 0.5  # stripes, dots and checks, in object radii
SIDES = ("left", "right")  # the tiles of a two-object scene


@dataclass(frozen=True)
class Look:
    """What an object looks like: `second` is the texture's other colour (generic: a darker shade of `colour`);
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
    pattern = f" {look.pattern}" if with_pattern else ""
    return f"a {look.colour}{pattern} {look.shape}"


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


@dataclass
class Scene:
    """Two generic objects side by side on one background: `image` is [32, 64, 3], `looks` is (left, right)."""

    image: np.ndarray
    looks: tuple[Look, Look]
    background: str


def render_scene(looks: tuple[Look, Look], background: str, places: tuple[Placement, Placement]) -> np.ndarray:
    """Each look drawn in its own 32×32 tile (left, right) on the shared background: [32, 64, 3]."""
    return np.concatenate([render(look, background, place) for look, place in zip(looks, places)], axis=1)


def generic_scenes(count: int, seed: int) -> list[Scene]:
    rng = np.random.default_rng([seed, 4])
    scenes = []
    for _ in range(count):
        looks, background = (random_look(rng), random_look(rng)), str(rng.choice(list(BACKGROUNDS)))
        scenes.append(Scene(render_scene(looks, background, (random_placement(rng), random_placement(rng))),
                            looks, background))
    return scenes


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
