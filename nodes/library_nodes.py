"""Concept library nodes: Load Concept Library, Train Concept Increment, Export Concept LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import comfy.sd
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..cidm.consolidation import METHODS
from ..cidm.errors import CIDMInputError
from ..cidm.export import EXPORT_NOTE, standard_lora_state_dict, write_export
from ..cidm.library import validate_name
from .common import existing_library_names, library_fingerprint, library_ref, one_value
from .host.model import check_library_model, check_not_applied, mark_applied
from .training import train_concept_increment
from .training_options import DEFAULTS, ConceptTrainingOptions, TrainingOptionsType

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
                                    tooltip="Library name (folder under models/cidm/; case is ignored, as on "
                                            "Windows and macOS). A new name starts an empty library. Existing: "
                                            + (", ".join(existing_library_names()) or "none"))],
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
                        "never modified and no old images are replayed. The method's hyperparameters come from "
                        "the optional options input (Concept Training Options).",
            is_output_node=True,
            # The whole image list of a dataset node (e.g. Load Image Dataset from Folder) is one task.
            is_input_list=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model, SD1.5 or SDXL family (the same one for every task)."),
                io.Clip.Input("clip", tooltip="The base model's CLIP text encoder; the concept tokens are learned "
                                              "in its embedding space."),
                io.Vae.Input("vae", tooltip="The base model's VAE; encodes the training images to latents."),
                ConceptLibraryType.Input("library", tooltip="The library the concept is appended to (from Load "
                                                            "Concept Library or the previous Train Concept "
                                                            "Increment)."),
                io.String.Input("concept", default="dog", tooltip="Concept name: letters and digits of any script, "
                                "'_', '-', '.' and spaces; case is ignored. Prompts write it as <name>. Also the word "
                                "replaced by the tokens in captions."),
                io.Combo.Input("method", options=list(METHODS), default="cidm",
                               tooltip="cidm: orthogonal + shared-basis consolidation (the paper's intent). "
                                       "cidm-official: the released code's loss. c-lora: overlap penalty with "
                                       "sequential merging. finetune: no regularizer."),
                io.Int.Input("steps", default=800, min=1, max=100000,
                             tooltip="Optimizer steps (the paper trains about 800 per concept on one GPU)."),
                io.Image.Input("images", optional=True, tooltip="Training images: an IMAGE batch, or the image "
                               "list of a dataset node, trained as one task (or use folder)."),
                io.String.Input("folder", default="", optional=True, tooltip="Folder under ComfyUI's input "
                                "directory with images and same-name .txt captions."),
                TrainingOptionsType.Input("options", optional=True, tooltip="Hyperparameters from Concept "
                                          "Training Options; without it the defaults apply."),
            ],
            outputs=[ConceptLibraryType.Output(display_name="library",
                                               tooltip="The library with the new task (its new revision)."),
                     io.Image.Output(display_name="loss_plot", tooltip="The diffusion loss per step.")],
            hidden=[io.Hidden.unique_id])

    @classmethod
    def execute(cls, model, clip, vae, library, concept, method, steps, images=None, folder=None, options=None):
        single = {name: one_value(name, values) for name, values in
                  dict(model=model, clip=clip, vae=vae, library=library, concept=concept, method=method,
                       steps=steps, folder=folder or [""], options=options or [DEFAULTS]).items()}
        opts = single["options"]
        updated, plot, previews = train_concept_increment(
            single["model"], single["clip"], single["vae"], single["library"].name, single["concept"], opts.tokens,
            opts.class_words, images or [], single["folder"], opts.config(single["method"], single["steps"]),
            opts.resolution, opts.resume, opts.preview_every, cls.hidden.unique_id, opts.token_slots)
        shown = ui.PreviewImage(torch.cat(previews), cls=cls) if previews else None
        return io.NodeOutput(updated, plot, ui=shown)


def concept_lora(library, concept: str) -> tuple[str, dict, dict[str, torch.Tensor]]:
    """(library name, task record, standard LoRA state dict with the library family's key names) of the library's
    task named `concept`."""
    lib = library.open()
    task = lib.concept_task(concept.strip())
    if task is None:
        raise CIDMInputError("concept", f"no concept '{concept}' in library '{lib.name}'; known (any case): "
                                        + ", ".join(t.concept for t in lib.tasks))
    data = lib.load_task(task.index)
    return lib.name, task, standard_lora_state_dict(data.lora, lib.base_model["layer_paths"], task.multiplier,
                                                    lib.family)


class ExportConceptLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_ExportConceptLoRA", display_name="Export Concept LoRA", category=CATEGORY,
            description="Writes one task as a standard LoRA into models/loras for the stock LoraLoader. "
                        + EXPORT_NOTE + ".",
            is_output_node=True,
            inputs=[ConceptLibraryType.Input("library", tooltip="The library that holds the concept."),
                    io.String.Input("concept", default="dog", tooltip="The concept (task) to export."),
                    io.String.Input("filename", default="", tooltip="File name in models/loras; empty: "
                                    "<library>_<concept>.safetensors. An existing file is never overwritten, "
                                    "except this pack's own export of the same task.")],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The name LoraLoader lists (after "
                                      "Refresh). To use the concept in the same graph, use Load Concept as LoRA.")])

    @classmethod
    def execute(cls, library, concept, filename=""):
        library_name, task, state = concept_lora(library, concept)
        name = validate_name((filename.strip() or f"{library_name}_{task.concept}").removesuffix(".safetensors"),
                             "filename") + ".safetensors"
        target = Path(folder_paths.get_folder_paths("loras")[0]) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        replaced = write_export(target, state, library_name, task)
        note = (f"wrote {target}: '{task.concept}' (task {task.index} of library '{library_name}')"
                + (", replacing this same task's earlier export" if replaced else ""))
        logging.info("CIDM: %s", note)
        return io.NodeOutput(name, ui=ui.PreviewText(note))


class LoadConceptAsLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_LoadConceptAsLoRA", display_name="Load Concept as LoRA", category=CATEGORY,
            description="Applies one library concept to a MODEL as the standard LoRA that Export Concept LoRA "
                        "writes, as LoraLoaderModelOnly would load that file: export and use in one graph. "
                        + EXPORT_NOTE + ".",
            inputs=[io.Model.Input("model", tooltip="The base model (SD1.5 or SDXL family) the library was "
                                                    "trained on."),
                    ConceptLibraryType.Input("library", tooltip="The library that holds the concept."),
                    io.String.Input("concept", default="dog", tooltip="The concept (task) to apply."),
                    io.Float.Input("strength_model", default=1.0, min=-10.0, max=10.0, step=0.01,
                                   tooltip="LoRA strength, as LoraLoader's strength_model (1: as trained).")],
            outputs=[io.Model.Output(display_name="model", tooltip="A patched clone of the model; prompt with "
                                     "the concept's class word, the tokens do not travel with a plain LoRA.")])

    @classmethod
    def execute(cls, model, library, concept, strength_model):
        check_library_model(library.open(), model)
        library_name, task, state = concept_lora(library, concept)
        check_not_applied(model, [task], "concept")
        patched, _ = comfy.sd.load_lora_for_models(model, None, state, strength_model, 0)
        mark_applied(patched, library_name, [task], "Load Concept as LoRA")
        return io.NodeOutput(patched)


NODES = [LoadConceptLibrary, TrainConceptIncrement, ConceptTrainingOptions, ExportConceptLoRA, LoadConceptAsLoRA]
