"""What a concept library still remembers: CIDM's image and text alignment, and a forgetting history per concept.

Metrics (Dong et al., NeurIPS 2024, section 5.1; computed as JiahuaDong/CIFC@9819aa84 `evaluate.py` lines 181-224
does, on L2-normalised embeddings):
- IA (image alignment, CLIP-I) and DINO: the mean of the full samples × references cosine matrix;
- TA (text alignment, CLIPScore): the mean over samples of 2.5 · max(cos(image, text), 0), each sample against its
  own prompt with the concept's tokens replaced by its class word (CIFC `inference.py` lines 196-218).
Forgetting of concept j (grrrml/continualhyper@06e349eb `src/cifc_metrics.py`): the peak of its score over the
evaluations after it was learned, minus its latest score.

The history lives beside the library's manifest (`ConceptLibrary.evaluation_history`); it never changes a task, and
the library keeps no training image for it. The embeddings can come from any image model: ComfyUI's CLIP vision
models in the node, the toy world's oracle in `benchmarks/toyworld/evaluation.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math

import torch

from .errors import CIDMInputError

PLACEHOLDER = "<TOK>"  # where the concept goes in a prompt template, as in CIFC's evaluation_prompts files
# Templates in the spirit of CIFC's (a place, a style, an object beside it, a view); not its exact files, which a
# user can paste into the node's `prompts` input (one template per line) for the paper's prompt set.
DEFAULT_PROMPTS = ("a photo of a <TOK>", "a <TOK> in the forest", "a watercolor painting of a <TOK>",
                   "a <TOK> on a wooden table")
TA_SCALE = 2.5  # CLIPScore's w (Hessel et al., 2021), as CIFC evaluate.py applies it
METRICS = ("IA", "TA", "DINO")
HISTORY_FORMAT = "cidm-evaluation-history"
HISTORY_VERSION = 1


def parse_prompts(text: str) -> list[str]:
    """The templates of a `prompts` input: one per non-empty line, each naming the concept as `<TOK>`; blank text
    gives DEFAULT_PROMPTS.

    Raises:
        CIDMInputError: ("prompts") naming the first line without `<TOK>`.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if PLACEHOLDER not in line:
            raise CIDMInputError("prompts", f"every line needs {PLACEHOLDER} where the concept goes; {line!r} has "
                                            "none")
    return lines or list(DEFAULT_PROMPTS)


def fill(template: str, text: str) -> str:
    """`template` with every `<TOK>` replaced by `text` (the concept as a prompt names it, or its class word)."""
    return template.replace(PLACEHOLDER, text)


def prompt_pairs(templates: list[str], concept: str, class_text: str,
                 samples_per_prompt: int) -> list[tuple[str, str]]:
    """(sampling prompt, TA text) per sample, in sampling order: each template `samples_per_prompt` times, naming
    the concept as `<concept>` for sampling and by `class_text` for TA (CIFC inference.py lines 196-218)."""
    return [(fill(t, f"<{concept}>"), fill(t, class_text)) for t in templates for _ in range(samples_per_prompt)]


def _unit(embeddings: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(embeddings.double().flatten(1), dim=1)


def image_alignment(samples: torch.Tensor, references: torch.Tensor) -> float:
    """IA (or DINO, with DINO embeddings): the mean cosine over all N·M pairs of `samples` [N, D] and
    `references` [M, D] (CIFC evaluate.py lines 181-201)."""
    return float((_unit(samples) @ _unit(references).T).mean())


def text_alignment(images: torch.Tensor, texts: torch.Tensor) -> float:
    """TA: the mean over the N rows of 2.5 · max(cos(images[i], texts[i]), 0), for `images` [N, D] and the
    embeddings of each image's class-word prompt `texts` [N, D] in the same space (CIFC evaluate.py lines
    123-178)."""
    cosine = (_unit(images) * _unit(texts)).sum(dim=1)
    return float(TA_SCALE * cosine.clamp_min(0).mean())


@dataclasses.dataclass(frozen=True)
class EvaluationKey:
    """What makes two evaluations comparable, besides the library revision: the image backbone (and the text tower
    TA used, if any), the sampler settings (steps, cfg, sampler, scheduler, scale, size, samples per prompt and the
    prompt templates) and the seed."""
    revision: int
    backbone: str
    sampler: dict
    seed: int

    def series(self) -> str:
        """The key without the revision: evaluations of one series differ only in when they were made."""
        return json.dumps({"backbone": self.backbone, "sampler": self.sampler, "seed": self.seed}, sort_keys=True)


@dataclasses.dataclass
class Evaluation:
    """One run of the node: `scores` maps a concept to its metrics (METRICS names, None where not computed), the
    references used ('held-out' or 'training', and how many) and the number of samples; `skipped` maps a concept to
    why it was not scored. `tasks` is how many tasks the library held."""
    key: EvaluationKey
    tasks: int
    scores: dict[str, dict]
    skipped: dict[str, str]
    created: str

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "key": dataclasses.asdict(self.key)}

    @classmethod
    def from_json(cls, entry: dict) -> Evaluation:
        return cls(key=EvaluationKey(**entry["key"]), tasks=entry["tasks"], scores=entry["scores"],
                   skipped=entry["skipped"], created=entry["created"])


def history_json(evaluations: list[Evaluation]) -> bytes:
    """The history file's bytes. Raises ValueError for a non-finite score (a NaN would read back as a string)."""
    return (json.dumps({"format": HISTORY_FORMAT, "version": HISTORY_VERSION,
                        "evaluations": [e.to_json() for e in evaluations]}, indent=1, allow_nan=False)
            + "\n").encode("utf-8")


def history_from_json(text: str, where: str) -> list[Evaluation]:
    """The evaluations of a history file's text.

    Raises:
        CIDMInputError: ("library") naming `where` when the text is not a history of this version.
    """
    try:
        data = json.loads(text)
    except ValueError as error:
        data, problem = None, f"not JSON: {error}"
    else:
        problem = None if isinstance(data, dict) and data.get("format") == HISTORY_FORMAT \
            and data.get("version") == HISTORY_VERSION else "not a cidm evaluation history of version 1"
    if problem is None:
        try:
            return [Evaluation.from_json(entry) for entry in data["evaluations"]]
        except (KeyError, TypeError, AttributeError) as error:
            problem = f"an entry is incomplete ({error!r})"
    raise CIDMInputError("library", f"the evaluation history {where} cannot be read ({problem}); move it away to "
                                    "start a new one (the library's tasks do not depend on it)")


def with_evaluation(evaluations: list[Evaluation], new: Evaluation) -> list[Evaluation]:
    """The history with `new` added. An earlier evaluation under the same key (the same library revision, backbone,
    sampler settings and seed) is merged with it concept by concept, `new`'s concepts (scored or skipped) winning,
    so a re-run never doubles an entry and a run on some concepts keeps the others' scores."""
    old = next((e for e in evaluations if e.key == new.key), None)
    if old is not None:
        kept = set(new.scores) | set(new.skipped)
        new = dataclasses.replace(new, scores={**{c: s for c, s in old.scores.items() if c not in kept}, **new.scores},
                                  skipped={**{c: n for c, n in old.skipped.items() if c not in kept}, **new.skipped})
    return [e for e in evaluations if e.key != new.key] + [new]


@dataclasses.dataclass
class ForgettingTable:
    """One series' scores of one metric: `scores` [concepts, evaluations] (NaN where a concept was not yet learned,
    not scored, or scored against other reference images than its latest score), columns in revision order,
    labelled by the number of tasks the library held."""
    metric: str
    concepts: list[str]
    tasks: list[int]
    scores: torch.Tensor

    def forgetting(self) -> dict[str, float]:
        """Per concept scored in the latest evaluation: its peak score minus that latest one (CIDM's F_j; 0 when
        never lower). A concept the latest evaluation did not score has no forgetting to show."""
        return {concept: float(row[~row.isnan()].max() - row[-1]) for concept, row in zip(self.concepts, self.scores)
                if not row[-1].isnan()}

    def markdown(self) -> str:
        forgetting = self.forgetting()
        lines = [f"| {self.metric} | " + " | ".join(f"after {t} task{'s' * (t != 1)}" for t in self.tasks)
                 + " | forgetting |",
                 "|---" * (len(self.tasks) + 2) + "|"]
        for concept, row in zip(self.concepts, self.scores):
            cells = ["–" if math.isnan(v) else f"{v:.3f}" for v in row.tolist()]
            lost = f"{forgetting[concept]:.3f}" if concept in forgetting else "–"
            lines.append(f"| {concept} | " + " | ".join(cells) + f" | {lost} |")
        return "\n".join(lines)


def forgetting_table(evaluations: list[Evaluation], series: str, metric: str) -> ForgettingTable:
    """The table of `metric` over the evaluations of `series` (EvaluationKey.series), concepts in the order they
    were first scored.

    Raises:
        ValueError: for a metric not in METRICS.
    """
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r}: expected one of {METRICS}")
    chosen = sorted((e for e in evaluations if e.key.series() == series), key=lambda e: e.key.revision)
    concepts = list(dict.fromkeys(c for e in chosen for c, s in e.scores.items() if s.get(metric) is not None))
    latest = {c: next(e.scores[c].get("references_id") for e in reversed(chosen) if c in e.scores)
              for c in concepts}
    scores = torch.full((len(concepts), len(chosen)), math.nan, dtype=torch.float64)
    for column, evaluation in enumerate(chosen):
        for row, concept in enumerate(concepts):
            score = evaluation.scores.get(concept, {})
            if score.get(metric) is not None and score.get("references_id") == latest[concept]:
                scores[row, column] = score[metric]
    return ForgettingTable(metric, concepts, [e.tasks for e in chosen], scores)
