"""Evaluation node: Evaluate Concept Library (issue 34). Samples each concept with fixed seeds, scores the samples
with cidm.evaluation's metrics through ComfyUI's CLIP vision models, and keeps a forgetting history with the
library."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui
from safetensors.torch import load_file

from ..cidm.data import load_concept_folder
from ..cidm.errors import CIDMInputError
from ..cidm.evaluation import (Evaluation, EvaluationKey, forgetting_table, image_alignment, parse_prompts,
                               prompt_pairs, text_alignment)
from ..cidm.names import name_key
from ..cidm.plots import heatmap
from ..cidm.routing import PROMPT_KEY
from .aggregation_nodes import LibraryPromptEncoder, aggregate, select_tasks
from .common import EVAL_FOLDER, input_root, input_subfolder, register_library_folder
from .host.eval_backbones import load_backbone
from .library_nodes import ConceptLibraryType

CATEGORY = "CIDM/evaluation"
PAPER_BACKBONES = ("CLIP ViT-B/32", "DINO ViT-S/16")  # JiahuaDong/CIFC@9819aa84 evaluate.py


def comparability(clip_vision, dino) -> str:
    """Whether the scores use the paper's backbones (Load Evaluation Backbone), for the report."""
    used = (getattr(clip_vision, "paper_name", None), None if dino is None else getattr(dino, "paper_name", None))
    if used[0] == PAPER_BACKBONES[0] and (dino is None or used[1] == PAPER_BACKBONES[1]):
        return ("backbones as in the paper (" + " and ".join(filter(None, used)) + "); the numbers match CIDM's "
                "only with its prompts (CIFC's evaluation_prompts), 50 DPM-Solver steps at cfg 7.5 and 50 samples "
                "per prompt")
    return ("not comparable to the paper's numbers: CIDM scores with CLIP ViT-B/32 and DINO ViT-S/16 "
            "(JiahuaDong/CIFC evaluate.py); load them with Load Evaluation Backbone from models/cidm_eval")


def backbone_name(clip_vision) -> str:
    """A CLIP_VISION model's name in the history: the paper backbone it is, or its class and input size; then a
    digest of its weights, so that two checkpoints never share a series."""
    digest = hashlib.sha256()
    for tensor in list(clip_vision.model.state_dict().values())[:8]:
        digest.update(tensor.detach().float().cpu().numpy().tobytes()[:1 << 16])
    kind = getattr(clip_vision, "paper_name", None) or f"{type(clip_vision.model).__name__} {clip_vision.image_size}px"
    return f"{kind} #{digest.hexdigest()[:10]}"


EMBED_CHUNK = 16  # images per CLIP vision / DINO call: a paper-sized run (1000 per concept) fits any GPU


def image_embeddings(clip_vision, images: torch.Tensor) -> torch.Tensor:
    """[N, D] `image_embeds` of IMAGE [N, H, W, 3] (ComfyUI's preprocessing: shortest side to the model's size,
    centre crop), EMBED_CHUNK images at a time."""
    return torch.cat([clip_vision.encode_image(images[start:start + EMBED_CHUNK], crop=True)["image_embeds"]
                      .float().cpu() for start in range(0, len(images), EMBED_CHUNK)])


@dataclasses.dataclass
class References:
    """A concept's reference images (None: it has none), what they are, and a digest of the files (`id`): scores
    against other references never share a row of the forgetting table."""
    images: list[torch.Tensor] | None
    note: str
    id: str | None = None


def reference_folders(task, held_out: str) -> list[tuple[Path, str]]:
    """The folders that may hold `task`'s references, preferred first: the subfolder of `held_out` named as the
    concept (in any case, as the library matches names), then the training folder the task recorded."""
    candidates = []
    root = input_subfolder(held_out, "held_out")
    if root is not None and root.is_dir():
        named = [p for p in root.iterdir() if p.is_dir() and name_key(p.name) == name_key(task.concept)]
        candidates.append((named[0] if named else root / task.concept, "held-out"))
    trained_from = task.hyperparameters.get("folder") or ""
    if trained_from:
        candidates.append((input_subfolder(trained_from, "library"), "training images (they reward copying)"))
    return candidates


def references(task, held_out: str) -> References:
    """The first existing folder of `reference_folders`. The library itself keeps no image.

    Raises CIDMInputError naming `held_out` (or `library` for a recorded training folder) when a folder holds a
    file that is not an image, or no image."""
    candidates = reference_folders(task, held_out)
    for folder, kind in candidates:
        if folder.is_dir():
            examples = load_concept_folder(folder, "held_out" if kind == "held-out" else "library",
                                           root=input_root())
            digest = hashlib.sha256(kind.encode())
            for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
                digest.update(path.name.encode() + path.read_bytes())
            return References([e.image for e in examples], f"{len(examples)} {kind} from {folder.name}",
                              digest.hexdigest()[:16])
    tried = ", ".join(str(folder) for folder, _ in candidates) or "no folder (none given, none recorded)"
    return References(None, f"no reference images: tried {tried}")


def reference_fingerprint(library, held_out: str) -> str | float:
    """ComfyUI's cache key part for the reference images: every candidate folder's files (names, sizes, times), so
    that adding held-out images re-runs the node; NaN (always re-run) when the library or a folder cannot be read
    now, for the run to name the problem."""
    try:
        tasks = library.open().tasks
        folders = [folder for task in tasks for folder, _ in reference_folders(task, held_out)]
    except CIDMInputError:
        return float("nan")
    digest = hashlib.sha256()
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                stat = path.stat()
                digest.update(f"{path} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def class_text(task) -> str:
    """What replaces the concept in TA's prompt: the class words the task was trained with, else its name."""
    return " ".join(word for word in task.hyperparameters.get("class_words") or [] if word) or task.concept


class Evaluator:
    """Samples, embeds and scores concepts for one evaluation run of the node; `progress` counts sampled images."""

    def __init__(self, model, clip, vae, lib, clip_vision, dino, templates: list[str], samples_per_prompt: int,
                 seed: int, sampler: dict, node_id: str | None, total: int):
        self.model = aggregate(model, lib, lib.tasks, sampler["scale"], "named", node="Evaluate Concept Library")
        self.clip, self.vae, self.lib = clip, vae, lib
        self.encode = LibraryPromptEncoder(clip, lib)
        self.clip_vision, self.dino = clip_vision, dino
        self.templates, self.samples_per_prompt, self.seed, self.sampler = templates, samples_per_prompt, seed, sampler
        self.negative = self.conditioning("")
        self.progress = comfy.utils.ProgressBar(total, node_id=node_id)

    def conditioning(self, text: str):
        """CIDM Text Encode's conditioning of `text`, with the sampled size for SDXL's size conditioning (as
        CLIPTextEncodeSDXL sets it; a plain prompt would say 768)."""
        ordinary, pooled, prompt, _ = self.encode(text, "prompts")
        size = self.sampler["size"]
        return [[ordinary, {"pooled_output": pooled, PROMPT_KEY: prompt, "width": size, "height": size,
                            "target_width": size, "target_height": size}]]

    def sample(self, text: str) -> torch.Tensor:
        """IMAGE [samples_per_prompt, H, W, 3] of `text`, from the same seed for every prompt (as CIFC
        inference.py re-seeds per prompt)."""
        cells = self.sampler["size"] // self.lib.family.vae_downscale
        latent = comfy.sample.fix_empty_latent_channels(self.model, torch.zeros(self.samples_per_prompt, 4, cells,
                                                                                cells))
        noise = comfy.sample.prepare_noise(latent, self.seed)
        samples = comfy.sample.sample(self.model, noise, self.sampler["steps"], self.sampler["cfg"],
                                      self.sampler["sampler"], self.sampler["scheduler"], self.conditioning(text),
                                      self.negative, latent, seed=self.seed, disable_pbar=True)
        images = self.vae.decode(samples).float().cpu()
        self.progress.update(len(images))
        return images

    def text_embeddings(self, texts: list[str], width: int) -> torch.Tensor | None:
        """[N, D] embeddings of `texts` in the vision model's space: its own text tower's (a CLIP loaded by Load
        Evaluation Backbone), else the pooled CLIP outputs where the family projects them there at width `width`
        (SDXL's CLIP-G); None elsewhere (SD1.5 with a stock CLIP vision model)."""
        own = getattr(self.clip_vision, "encode_text", None)
        if own is not None:
            return own(texts)
        if not self.lib.family.pooled_projected or self.lib.family.pooled_width != width:
            return None
        pooled = [self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)[1] for text in texts]
        return torch.cat(pooled).float().cpu()

    def score(self, task, refs: References) -> tuple[dict | None, str, torch.Tensor]:
        """(metrics, or None when the concept has no references or its samples are not finite; a note; the
        samples)."""
        pairs = prompt_pairs(self.templates, task.concept, class_text(task), self.samples_per_prompt)
        images = []
        for number, start in enumerate(range(0, len(pairs), self.samples_per_prompt), 1):
            comfy.model_management.throw_exception_if_processing_interrupted()
            images.append(self.sample(pairs[start][0]))
            logging.info("CIDM evaluate '%s': prompt %d/%d", task.concept, number, len(self.templates))
        images = torch.cat(images)
        if refs.images is None:
            return None, refs.note, images
        embedded = image_embeddings(self.clip_vision, images)
        reference_embeddings = torch.cat([image_embeddings(self.clip_vision, r[None]) for r in refs.images])
        text = self.text_embeddings([ta for _, ta in pairs], embedded.shape[1])
        scores = {"IA": image_alignment(embedded, reference_embeddings),
                  "TA": None if text is None else text_alignment(embedded, text),
                  "DINO": None if self.dino is None else image_alignment(
                      image_embeddings(self.dino, images),
                      torch.cat([image_embeddings(self.dino, r[None]) for r in refs.images])),
                  "references": refs.note, "references_id": refs.id, "samples": len(images)}
        if not all(math.isfinite(v) for v in (scores["IA"], scores["TA"] or 0.0, scores["DINO"] or 0.0)):
            return None, "its samples or their embeddings are not finite (NaN); try the VAE in fp32", images
        return scores, refs.note, images


def sample_size(size: int, lib) -> int:
    """The square side sampled: `size`, or the family's native one for 0, as a whole number of latent cells.

    Raises CIDMInputError("size") below 64 pixels or off the VAE's grid."""
    size = size or lib.family.resolution
    if size < 64 or size % lib.family.vae_downscale:
        raise CIDMInputError("size", f"{size} px: give 0 (the family's size) or a multiple of "
                                     f"{lib.family.vae_downscale} of at least 64")
    return size


def evaluate_library(model, clip, vae, library, clip_vision, dino, concepts: str, prompts: str, held_out: str,
                     samples_per_prompt: int, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
                     scale: float, size: int, node_id: str | None) -> tuple[torch.Tensor, str, torch.Tensor]:
    """Scores the chosen concepts, records the evaluation in the library's history (only once every concept is
    done: an interrupted run records nothing), and returns (samples, report, plot). Every input, reference folder
    and the history are checked before the first sample."""
    lib = library.open()
    chosen = select_tasks(lib, concepts, "concepts")
    templates = parse_prompts(prompts)
    held_out_folder = input_subfolder(held_out, "held_out")
    if held_out_folder is not None and not held_out_folder.is_dir():
        raise CIDMInputError("held_out", f"folder {held_out_folder} does not exist; give a folder under ComfyUI's "
                                         "input folder with one subfolder per concept, or leave it empty")
    sampler = {"steps": steps, "cfg": cfg, "sampler": sampler_name, "scheduler": scheduler, "scale": scale,
               "size": sample_size(size, lib), "samples_per_prompt": samples_per_prompt, "prompts": templates}
    refs = {task.concept: references(task, held_out) for task in chosen}
    lib.evaluation_history()  # an unreadable history is named now, not after the sampling
    evaluator = Evaluator(model, clip, vae, lib, clip_vision, dino, templates, samples_per_prompt, seed, sampler,
                          node_id, len(chosen) * len(templates) * samples_per_prompt)
    scores, skipped, samples = {}, {}, []
    for task in chosen:
        result, note, images = evaluator.score(task, refs[task.concept])
        samples.append(images)
        if result is None:
            skipped[task.concept] = note
            logging.warning("CIDM evaluation: skipped '%s': %s", task.concept, note)
        else:
            scores[task.concept] = result
    backbone = backbone_name(clip_vision) + ("" if dino is None else f" + {backbone_name(dino)}")
    evaluation = Evaluation(key=EvaluationKey(revision=lib.revision, backbone=backbone, sampler=sampler, seed=seed),
                            tasks=len(lib.tasks), scores=scores, skipped=skipped,
                            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    history = lib.record_evaluation(evaluation) if scores else lib.evaluation_history()
    return torch.cat(samples), *report(history, evaluation, comparability(clip_vision, dino))


def report(history: list[Evaluation], evaluation: Evaluation, comparable: str) -> tuple[str, torch.Tensor]:
    """(markdown: this run's scores, the concept × evaluation table of each metric of its series with forgetting,
    skipped concepts; plot: the IA table with a forgetting column)."""
    series = evaluation.key.series()
    lines = [f"library revision {evaluation.key.revision} ({evaluation.tasks} task{'s' * (evaluation.tasks != 1)}), "
             f"backbone {evaluation.key.backbone}, seed {evaluation.key.seed}; {comparable}", ""]
    for concept, note in evaluation.skipped.items():
        lines.append(f"skipped {concept}: {note}")
    tables = [forgetting_table(history, series, metric) for metric in ("IA", "TA", "DINO")]
    for table in tables:
        if table.concepts:
            lines += ["", table.markdown()]
    if not any(s.get("TA") is not None for s in evaluation.scores.values()):
        lines += ["", "TA: not computed; it needs a text tower in the vision model's space (a CLIP from Load "
                      "Evaluation Backbone, or an SDXL-family CLIP with a CLIP vision model of its pooled width, "
                      "1280: ViT-bigG)"]
    for concept, s in evaluation.scores.items():
        lines.append(f"{concept}: references {s['references']}")
    ia = tables[0]
    forgetting = ia.forgetting()
    matrix = torch.cat([ia.scores, torch.tensor([[forgetting[c]] for c in ia.concepts], dtype=torch.float64)], 1) \
        if ia.concepts else torch.zeros(0, 1)
    plot = heatmap(matrix.float(), ia.concepts, [f"after {t}" for t in ia.tasks] + ["forgetting"],
                   "IA per concept after each evaluated library revision")
    return "\n".join(lines), plot


SAMPLES_TOOLTIP = ("Images per prompt and concept. Cost: concepts × prompts × this many images of `steps` steps "
                   "each, about that many KSampler runs of one image (3 concepts × 4 prompts × 2 = 24), plus one "
                   "CLIP vision pass per image and reference.")


class EvaluateConceptLibrary(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_EvaluateConceptLibrary", display_name="Evaluate Concept Library", category=CATEGORY,
            is_output_node=True,
            description="Samples every chosen concept with fixed seeds and scores the samples as CIDM does: IA (mean "
                        "cosine over all sample × reference pairs), TA (2.5 · max(cos, 0) against the prompt with "
                        "the class word in place of the concept) and DINO. Each run is kept with the library, so "
                        "evaluating after every new task shows what each concept still holds and its forgetting "
                        "(peak minus now).",
            inputs=[io.Model.Input("model", tooltip="The library's base model, without the library applied: the node "
                                                    "applies every task under `named` routing, as sampling does."),
                    io.Clip.Input("clip", tooltip="The CLIP of the library's base model."),
                    io.Vae.Input("vae", tooltip="The VAE of the library's base model: decodes the samples."),
                    ConceptLibraryType.Input("library", tooltip="The library to evaluate."),
                    io.ClipVision.Input("clip_vision", tooltip="Image embeddings for IA (Load CLIP Vision: ViT-L, "
                                        "ViT-H or ViT-bigG). ViT-bigG with an SDXL-family checkpoint also gives "
                                        "TA."),
                    io.String.Input("concepts", default="all", tooltip="'all', or task numbers / concept names, "
                                    "comma separated."),
                    io.String.Input("prompts", multiline=True, default="",
                                    tooltip="One prompt template per line with <TOK> where the concept goes. Empty: "
                                            "four CIDM-style templates. For the paper's prompt set paste CIFC's "
                                            "evaluation_prompts/test_*.txt."),
                    io.String.Input("held_out", default="", tooltip="A folder under ComfyUI's input folder with one "
                                    "subfolder of held-out images per concept, named as the concept (preferred). A "
                                    "concept without one is scored against its training folder if it still "
                                    "exists (that rewards copying), else skipped with a message."),
                    io.Int.Input("samples_per_prompt", default=2, min=1, max=64, tooltip=SAMPLES_TOOLTIP),
                    io.Int.Input("seed", default=2024, min=0, max=0xffffffffffffffff,
                                 tooltip="Every prompt starts from this seed (CIDM's evaluation uses 2024)."),
                    io.Int.Input("steps", default=20, min=1, max=200,
                                 tooltip="Sampling steps per image (CIDM's evaluation: 50)."),
                    io.Float.Input("cfg", default=7.5, min=0.0, max=30.0, step=0.1,
                                   tooltip="CIDM's evaluation samples at 7.5."),
                    io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="dpmpp_2m",
                                   tooltip="As in KSampler (CIDM's evaluation uses DPM-Solver++ multistep)."),
                    io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="karras",
                                   tooltip="As in KSampler."),
                    io.Float.Input("scale", default=0.8, min=0.0, max=4.0, step=0.05,
                                   tooltip="LoRA scale, as in Elastic Aggregate LoRAs (CIDM samples at 0.8)."),
                    io.Int.Input("size", default=0, min=0, max=4096, step=8,
                                 tooltip="Side of the square samples in pixels; 0: the model family's native size "
                                         "(SD1.5 512, SDXL 1024). Scores of different sizes are kept apart."),
                    io.ClipVision.Input("dino", optional=True, tooltip="A DINOv2 model (Load CLIP Vision) for the "
                                        "DINO score; none: DINO is not computed.")],
            outputs=[ConceptLibraryType.Output(display_name="library",
                                               tooltip="The same library, unchanged (the history is kept beside "
                                                       "it): wire the next Train Concept Increment here so that "
                                                       "it runs after this evaluation."),
                     io.Image.Output(display_name="samples", tooltip="Every sampled image, concept by concept."),
                     io.String.Output(display_name="report", tooltip="The scores of this series after every "
                                      "evaluated revision, with forgetting (peak minus now)."),
                     io.Image.Output(display_name="plot", tooltip="IA per concept after each evaluated revision, "
                                     "and its forgetting.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def fingerprint_inputs(cls, library, held_out, **_):
        return reference_fingerprint(library, held_out)

    @classmethod
    def execute(cls, model, clip, vae, library, clip_vision, concepts, prompts, held_out, samples_per_prompt, seed,
                steps, cfg, sampler_name, scheduler, scale, size, dino=None):
        samples, text, plot = evaluate_library(model, clip, vae, library, clip_vision, dino, concepts, prompts,
                                               held_out, samples_per_prompt, seed, steps, cfg, sampler_name,
                                               scheduler, scale, size, cls.hidden.unique_id)
        return io.NodeOutput(library, samples, text, plot, ui={**ui.PreviewText(text).as_dict(),
                                                      **ui.PreviewImage(plot, cls=cls).as_dict()})


def backbone_files() -> list[str]:
    register_library_folder()
    return folder_paths.get_filename_list(EVAL_FOLDER)


class LoadEvaluationBackbone(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_LoadEvaluationBackbone", display_name="Load Evaluation Backbone", category=CATEGORY,
            description="Loads one of the paper's evaluation backbones from models/cidm_eval as a CLIP_VISION for "
                        "Evaluate Concept Library: CLIP ViT-B/32 (openai/clip-vit-base-patch32's "
                        "model.safetensors: both towers, so it also gives TA) or DINO ViT-S/16 (timm's "
                        "vit_small_patch16_224.dino model.safetensors). With both, the scores use CIDM's backbones.",
            inputs=[io.Combo.Input("backbone", options=backbone_files(),
                                   tooltip="A .safetensors file in models/cidm_eval (press R after adding one).")],
            outputs=[io.ClipVision.Output(display_name="clip_vision")])

    @classmethod
    def execute(cls, backbone):
        path = folder_paths.get_full_path_or_raise(EVAL_FOLDER, backbone)
        return io.NodeOutput(load_backbone(load_file(path), backbone))


NODES = [EvaluateConceptLibrary, LoadEvaluationBackbone]
