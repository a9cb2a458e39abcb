"""The concepts of a toy world, drawn from a world seed: names, looks, and a control object per concept.

A concept is a two-colour look from the half the generic world never draws (`world.held_out`): a shape with checks
in two named colours, a combination the base model never saw, though it saw every one of its parts (the shape, the
texture, the colour pair) on generic objects. Concepts are checked only (`CONCEPT_PATTERNS`, world v2.3): in v2.2 each
concept's own LoRA reached a mean accuracy of 0.98 with checks (7 concepts, 0.89-1.00), 0.82 with dots and 0.69 with
stripes (0.39-0.94), on the same base model and settings (toy README, "Learnability").

Every world has 10 concepts: four same-shape pairs (the two differ in both colours) and two concepts of their own
shape, so telling a pair apart takes more than the class word. Each concept has a control: the closest one-colour
generic object (same shape and texture, one of its two colours), which prompting for must not produce the concept.

World seed 0 keeps the first world's names, shapes, colours and order (see `SEED_0`). Other seeds draw everything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cidm.backends.diffusers_backend import SENTINEL_WORDS

from . import world
from .world import Look, Sample

PAIRS, SINGLES = 4, 2  # same-shape pairs and concepts of their own shape: 10 concepts
CONCEPT_PATTERNS = ("checked",)  # the two-colour textures a concept can have: those learned alone at 32x32
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
    return Look(look.shape, look.pattern, str(rng.choice([look.colour, look.second])))


def _name(rng: np.random.Generator, taken: set[str]) -> str:
    while True:
        name = "".join(str(rng.choice(list(letters))) for letters in (CONSONANTS, VOWELS, CONSONANTS, CONSONANTS))
        if name not in taken:
            return name


def draw_world(seed: int) -> ConceptWorld:
    """Ten concepts drawn from `seed`: four same-shape pairs whose two members differ in both colours, then two
    singles, each a shape and a colour pair whose look with one of `CONCEPT_PATTERNS` is in the held-out half, in the
    first world's order (a pair's members are consecutive tasks, so the first two tasks are a same-shape pair)."""
    rng = np.random.default_rng([seed, 7])
    shapes = [str(s) for s in rng.permutation(world.SHAPES)]
    colour_pairs = world.colour_pairs()
    taken = {*world.vocabulary(), *SENTINEL_WORDS}
    looks: list[Look] = []
    for index, shape in enumerate(shapes[:PAIRS + SINGLES]):
        members: list[Look] = []
        while len(members) < (2 if index < PAIRS else 1):
            first, second = colour_pairs[int(rng.integers(len(colour_pairs)))]
            textures = [t for t in CONCEPT_PATTERNS if world.held_out(Look(shape, t, first, second))]
            if textures and all(first not in (m.colour, m.second) and second not in (m.colour, m.second)
                                for m in members):
                members.append(Look(shape, str(rng.choice(textures)), first, second))
        looks.extend(members)
    concepts = []
    for look in looks:
        name = _name(rng, taken)
        taken.add(name)
        concepts.append(Concept(name, look, _control(look, rng)))
    return ConceptWorld(seed, tuple(concepts))


# The first world's names, shapes, colours and task order, checked (world v2.3). Second colours changed since v1 so
# that every look is in the held-out half and a pair still differs in both colours: zarp purple -> blue, quil cyan ->
# green, tesk yellow -> green, pell red -> orange (v2.1); fent yellow -> green, grop green -> cyan (v2.3, when their
# dots became checks). v2.4 swaps fent's two colours (pink on green -> green on pink): the first colour fills the
# checks at the object's centre, and v2.3's pink-first fent reached 0.72 of 72 samples alone, while world seed 1's
# dufm, the same look green-first, reached 0.93, both worlds' oracles agreeing sample by sample (toy README,
# "Learnability").
SEED_0 = ConceptWorld(0, (
    Concept("zarp", Look("star", "checked", "yellow", "blue"), Look("star", "checked", "yellow")),
    Concept("quil", Look("star", "checked", "red", "green"), Look("star", "checked", "red")),
    Concept("bulo", Look("circle", "checked", "red", "yellow"), Look("circle", "checked", "red")),
    Concept("mirt", Look("circle", "checked", "green", "orange"), Look("circle", "checked", "green")),
    Concept("tesk", Look("hexagon", "checked", "blue", "green"), Look("hexagon", "checked", "blue")),
    Concept("lomb", Look("hexagon", "checked", "purple", "cyan"), Look("hexagon", "checked", "purple")),
    Concept("pell", Look("triangle", "checked", "blue", "orange"), Look("triangle", "checked", "blue")),
    Concept("fent", Look("triangle", "checked", "green", "pink"), Look("triangle", "checked", "pink")),
    Concept("dask", Look("square", "checked", "cyan", "pink"), Look("square", "checked", "cyan")),
    Concept("grop", Look("cross", "checked", "orange", "cyan"), Look("cross", "checked", "orange")),
))


def make_world(seed: int) -> ConceptWorld:
    return SEED_0 if seed == 0 else draw_world(seed)


def concept_samples(concept: Concept, backgrounds: list[str], seed: int, per_background: int = 1) -> list[Sample]:
    """`concept` on each background, each placed at random (seeded by the world seed and the concept)."""
    rng = np.random.default_rng([seed, 2, *concept.name.encode()])
    return [Sample(world.render(concept.look, bg, world.random_placement(rng)), concept.look, bg)
            for bg in backgrounds for _ in range(per_background)]
