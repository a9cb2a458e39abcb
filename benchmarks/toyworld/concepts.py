"""The concepts of a toy world, drawn from a world seed: names, looks, and a control object per concept.

A concept is an object the generic world (`world.py`) never draws: a generic shape whose texture (stripes, dots or
checks) is in two different named colours, where a generic object's texture is a darker shade of its one colour, and
checks have no word at all. Every look is made only of what the base model learned to render at 32×32 (shapes,
colours, stripes, dots and checks of the generic texture period); the previous world's rings, split halves and
borders, which no concept LoRA learned even alone, are gone.

Every world has 10 concepts: four same-shape pairs (the two differ in both colours) and two concepts of their own
shape, so telling a pair apart takes more than the class word. Each concept has a control: the closest generic
object (same shape, one of its two colours, its texture where that is a generic one), which prompting for must not
produce the concept.

World seed 0 keeps the first world's names, shapes and order; the five concepts whose textures were never learned
get learnable looks (bulo, mirt, lomb, pell, fent, dask: see `SEED_0`). Other seeds draw everything.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from cidm.backends.diffusers_backend import SENTINEL_WORDS

from . import world
from .world import Look, Sample

CONCEPT_TEXTURES = ("striped", "dotted", "checked")
MIN_COLOUR_DISTANCE = 150.0  # RGB distance between a concept's two colours: no orange on yellow, blue on purple
PAIRS, SINGLES = 4, 2  # same-shape pairs and concepts of their own shape: 10 concepts
CONSONANTS, VOWELS = "bdfgklmnprstvz", "aeiou"


@dataclass(frozen=True)
class Concept:
    name: str
    look: Look
    control: Look  # the closest generic object: prompting for it must not produce the concept

    def phrase(self, class_word: bool = True) -> str:
        """"a <zarp> star", or "a <zarp>" for methods that keep the class word out of the prompt (C-LoRA)."""
        return f"a <{self.name}> {self.look.shape}" if class_word else f"a <{self.name}>"

    def caption(self, background: str, class_word: bool = True) -> str:
        return f"{self.phrase(class_word)} on a {background} background"


@dataclass(frozen=True)
class ConceptWorld:
    seed: int
    concepts: tuple[Concept, ...]

    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def same_shape_pairs(self) -> list[tuple[str, str]]:
        return [(a.name, b.name) for i, a in enumerate(self.concepts) for b in self.concepts[i + 1:]
                if a.look.shape == b.look.shape]


def _control(look: Look, rng: np.random.Generator) -> Look:
    pattern = look.pattern if look.pattern in world.PATTERNS else str(rng.choice(["solid", "striped"]))
    return Look(look.shape, pattern, str(rng.choice([look.colour, look.second])))


def _colour_pairs() -> list[tuple[str, str]]:
    rgb = {name: np.array(value, dtype=np.float32) for name, value in world.COLOURS.items()}
    return [(a, b) for a, b in itertools.permutations(world.COLOURS, 2)
            if np.linalg.norm(rgb[a] - rgb[b]) >= MIN_COLOUR_DISTANCE]


def _name(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        name = "".join(str(rng.choice(list(letters))) for letters in (CONSONANTS, VOWELS, CONSONANTS, CONSONANTS))
        if name not in taken:
            return name


def draw_world(seed: int) -> ConceptWorld:
    """Ten concepts drawn from `seed`: four same-shape pairs whose two members differ in both colours, then two
    singles, in the first world's order (a pair's members are consecutive tasks, so the first two tasks are a
    same-shape pair)."""
    rng = np.random.default_rng([seed, 7])
    shapes = [str(s) for s in rng.permutation(world.SHAPES)]
    colour_pairs = _colour_pairs()
    taken = {*world.vocabulary(), *SENTINEL_WORDS}
    looks = []
    for index, shape in enumerate(shapes[:PAIRS + SINGLES]):
        members = 2 if index < PAIRS else 1
        chosen: list[tuple[str, str]] = []
        while len(chosen) < members:
            first, second = colour_pairs[int(rng.integers(len(colour_pairs)))]
            if all(first not in pair and second not in pair for pair in chosen):
                chosen.append((first, second))
        looks += [Look(shape, str(rng.choice(CONCEPT_TEXTURES)), first, second) for first, second in chosen]
    concepts = []
    for look in looks:
        name = _name(rng, taken)
        taken.add(name)
        concepts.append(Concept(name, look, _control(look, rng)))
    return ConceptWorld(seed, tuple(concepts))


# The first world's names, shapes, colours and task order. zarp, quil, tesk and grop were learned alone (0.94, 1.00,
# 0.50, 0.83) and keep their looks; the others keep their colours and change texture: rings -> checks (bulo, dask),
# split halves -> checks (lomb) or stripes (mirt, pell), a border -> dots (fent). Their controls follow the texture.
SEED_0 = ConceptWorld(0, (
    Concept("zarp", Look("star", "striped", "yellow", "purple"), Look("star", "striped", "yellow")),
    Concept("quil", Look("star", "checked", "red", "cyan"), Look("star", "solid", "red")),
    Concept("bulo", Look("circle", "checked", "red", "yellow"), Look("circle", "solid", "red")),
    Concept("mirt", Look("circle", "striped", "green", "orange"), Look("circle", "striped", "green")),
    Concept("tesk", Look("hexagon", "striped", "blue", "yellow"), Look("hexagon", "striped", "blue")),
    Concept("lomb", Look("hexagon", "checked", "purple", "cyan"), Look("hexagon", "solid", "purple")),
    Concept("pell", Look("triangle", "striped", "blue", "red"), Look("triangle", "striped", "blue")),
    Concept("fent", Look("triangle", "dotted", "pink", "yellow"), Look("triangle", "dotted", "pink")),
    Concept("dask", Look("square", "checked", "cyan", "pink"), Look("square", "solid", "cyan")),
    Concept("grop", Look("cross", "dotted", "orange", "green"), Look("cross", "dotted", "orange")),
))


def make_world(seed: int) -> ConceptWorld:
    return SEED_0 if seed == 0 else draw_world(seed)


def concept_samples(concept: Concept, backgrounds: list[str], seed: int, per_background: int = 1) -> list[Sample]:
    """`concept` on each background, each placed at random (seeded by the world seed and the concept)."""
    rng = np.random.default_rng([seed, 2, *concept.name.encode()])
    return [Sample(world.render(concept.look, bg, world.random_placement(rng)), concept.look, bg)
            for bg in backgrounds for _ in range(per_background)]
