"""Concept library nodes: Load Concept Library, Train Concept Increment, Export Concept LoRA."""

from __future__ import annotations

from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io, ui
from safetensors.torch import save_file

from ..cidm.consolidation import METHODS, ConsolidationWeights
from ..cidm.errors import CIDMInputError
from ..cidm.export import EXPORT_NOTE, standard_lora_state_dict
from ..cidm.library import validate_name
from ..cidm.train import TrainingConfig
from .common import existing_library_names, library_fingerprint, library_ref
from .training import train_concept_increment

ConceptLibraryType = io.Custom("CIDM_LIBRARY")
CATEGORY = "CIDM/library"


class LoadConceptLibrary(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_LoadConceptLibrary", display_name="Load Concept Library", category=CATEGORY,
            description="Picks a concept library under models/cidm/, or names a new one that the first "
                        "Train Concept Increment creates.",
            inputs=[io.String.Input("library", default="my-concepts",
                                    tooltip="Library name (folder under models/cidm/). A new name starts an empty "
                                            "library. Existing: " + (", ".join(existing_library_names()) or "none"))],
            outputs=[ConceptLibraryType.Output(display_name="library",
                                               tooltip="The library as it is on disk now.")])

    @classmethod
    def fingerprint_inputs(cls, library):
        return library_fingerprint(library)

    @classmethod
    def execute(cls, library):
        return io.NodeOutput(library_ref(library))


class TrainConceptIncrement(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_TrainConceptIncrement", display_name="Train Concept Increment", category=CATEGORY,
            description="Teaches one new concept and appends it to the library as the next task. Old tasks are "
                        "never modified and no old images are replayed.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5 base model (the same one for every task)."),
                io.Clip.Input("clip"),
                io.Vae.Input("vae"),
                ConceptLibraryType.Input("library"),
                io.String.Input("concept", default="dog", tooltip="Concept name; prompts write it as <name>. "
                                "Also the word replaced by the tokens in captions."),
                io.String.Input("tokens", default="", tooltip="Concept tokens, e.g. '<dog1> <dog2>'. Empty: "
                                "<name1> <name2>."),
                io.String.Input("class_words", default="dog", tooltip="Words that initialise tokens 2.. (token 1 "
                                "starts random), e.g. 'teddy bear' for three tokens."),
                io.Combo.Input("method", options=list(METHODS), default="cidm",
                               tooltip="cidm: orthogonal + shared-basis consolidation (the paper's intent). "
                                       "cidm-official: the released code's loss. c-lora: overlap penalty with "
                                       "sequential merging (Smith et al.). finetune: no regularizer."),
                io.Combo.Input("template", options=["object", "style"], default="object",
                               tooltip="Caption templates: objects ('a photo of a ...') or styles."),
                io.Int.Input("steps", default=400, min=1, max=100000, tooltip="Optimizer steps."),
                io.Float.Input("lora_lr", default=1e-4, min=0.0, max=1.0, step=1e-5),
                io.Float.Input("embedding_lr", default=1e-3, min=0.0, max=1.0, step=1e-4),
                io.Int.Input("rank", default=4, min=1, max=128),
                io.Float.Input("alpha", default=1.0, min=0.0, max=16.0, step=0.05,
                               tooltip="LoRA multiplier: h = Wx + alpha·BAx."),
                io.Float.Input("orthogonal_weight", default=0.1, min=0.0, max=100.0, step=0.01,
                               tooltip="cidm: task-specific orthogonality weight."),
                io.Float.Input("shared_weight", default=0.01, min=0.0, max=100.0, step=0.001,
                               tooltip="cidm: task-shared basis weight."),
                io.Float.Input("clora_lambda", default=ConsolidationWeights.clora, min=0.0, max=1.0e6, step=0.01,
                               tooltip="c-lora: overlap penalty weight, normalised by the old updates' size, "
                                       "so the same value works at any learning rate (trains only attn2 "
                                       "key/value; tokens start random; keep the class word out of captions)."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Int.Input("save_every", default=100, min=0, max=100000,
                             tooltip="Save a resumable state every N steps (0: never)."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from the saved state of this concept "
                                 "if one exists."),
                io.Boolean.Input("gradient_checkpointing", default=False, tooltip="Less memory, more time."),
                io.Image.Input("images", optional=True, tooltip="Training images (or use folder)."),
                io.String.Input("folder", default="", optional=True, tooltip="Folder under ComfyUI's input "
                                "directory with images and same-name .txt captions."),
                # Last and optional, so workflows saved before this input existed still load and validate.
                io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                             tooltip="Every N steps, sample the concept with the weights so far and show it on "
                                     "the node (0: never). Each preview costs about 24 model passes."),
            ],
            outputs=[ConceptLibraryType.Output(display_name="library"),
                     io.Image.Output(display_name="loss_plot")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, clip, vae, library, concept, tokens, class_words, method, template, steps, lora_lr,
                embedding_lr, rank, alpha, orthogonal_weight, shared_weight, clora_lambda, resolution, batch_size,
                seed, save_every, resume, gradient_checkpointing, images=None, folder="", preview_every=0):
        config = TrainingConfig(
            steps=steps, method=method, rank=rank, alpha=alpha, lora_lr=lora_lr, embedding_lr=embedding_lr,
            batch_size=batch_size, template=template, seed=seed, save_every=save_every,
            gradient_checkpointing=gradient_checkpointing,
            consolidation=ConsolidationWeights(orthogonal=orthogonal_weight, shared=shared_weight,
                                               clora=clora_lambda))
        updated, plot, previews = train_concept_increment(model, clip, vae, library.name, concept, tokens,
                                                          class_words, images, folder or "", config, resolution,
                                                          resume, preview_every, cls.hidden.unique_id)
        shown = ui.PreviewImage(torch.cat(previews), cls=cls) if previews else None
        return io.NodeOutput(updated, plot, ui=shown)


class ExportConceptLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_ExportConceptLoRA", display_name="Export Concept LoRA", category=CATEGORY,
            description="Writes one task as a standard LoRA into models/loras for the stock LoraLoader. "
                        + EXPORT_NOTE + ".",
            is_output_node=True,
            inputs=[ConceptLibraryType.Input("library"),
                    io.String.Input("concept", default="dog", tooltip="The concept (task) to export."),
                    io.String.Input("filename", default="", tooltip="File name in models/loras; empty: "
                                    "<library>_<concept>.safetensors.")],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The name LoraLoader lists.")])

    @classmethod
    def execute(cls, library, concept, filename=""):
        lib = library.open()
        matches = [task for task in lib.tasks if task.concept == concept.strip()]
        if not matches:
            raise CIDMInputError("concept", f"no concept '{concept}' in library '{lib.name}'; known: "
                                            + ", ".join(t.concept for t in lib.tasks))
        task = matches[0]
        name = validate_name((filename.strip() or f"{lib.name}_{task.concept}").removesuffix(".safetensors"),
                             "filename") + ".safetensors"
        data = lib.load_task(task.index)
        state = standard_lora_state_dict(data.lora, lib.base_model["layer_paths"], task.alpha)
        target = Path(folder_paths.get_folder_paths("loras")[0]) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{name}.partial")
        save_file(state, str(partial), metadata={"cidm.library": lib.name, "cidm.concept": task.concept,
                                                  "cidm.note": EXPORT_NOTE})
        partial.replace(target)
        return io.NodeOutput(name)


NODES = [LoadConceptLibrary, TrainConceptIncrement, ExportConceptLoRA]
