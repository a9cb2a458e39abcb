"""Aggregation nodes: CIDM Text Encode, Elastic Aggregate LoRAs, Inspect Aggregation Weights."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..cidm.adapters import LayerLoRABank
from ..cidm.aggregation import MODES, make_router
from ..cidm.errors import CIDMInputError, require_finite
from ..cidm.layers import PROJECTIONS
from ..cidm.names import name_key
from ..cidm.plots import heatmap
from ..cidm.tokens import vocabulary_from_tasks
from ..cidm.routing import PROMPT_KEY, UNCOND_POLICIES, LayerwisePrompt, ordinary_context
from .host.attention import add_library_patch
from .host.model import check_library_model, check_not_applied, mark_applied
from .host.text_encoder import ComfyLayerwiseEncoder, check_text_encoder, text_encoder_fingerprint
from .library_nodes import ConceptLibraryType

CATEGORY = "CIDM/aggregation"


def select_tasks(library, selection: str, input_name: str = "tasks"):
    """'all', or task numbers / concept names separated by commas. Raises CIDMInputError naming `library` for a
    library with no task, or `input_name` for an item that is no task."""
    tasks = library.tasks
    if not tasks:
        raise CIDMInputError("library", f"library '{library.name}' has no concepts yet")
    if selection.strip().lower() in ("", "all"):
        return tasks
    chosen = []
    for item in (part.strip() for part in selection.split(",") if part.strip()):
        match = [t for t in tasks if str(t.index) == item or name_key(t.concept) == name_key(item)]
        if not match:
            raise CIDMInputError(input_name, f"'{item}' is not a task number or concept of '{library.name}'; known: "
                                          + ", ".join(f"{t.index}:{t.concept}" for t in tasks))
        chosen.extend(t for t in match if t not in chosen)
    return chosen


class LibraryPromptEncoder:
    """Encodes prompts naming one library's concepts: the library's tasks are read and the CLIP's layer-wise encoder
    built once, for any number of prompts."""

    def __init__(self, clip, library):
        self.library = library
        datas = library.load_all()
        self.vocabulary = vocabulary_from_tasks([t.concept for t in library.tasks], [t.tokens for t in library.tasks],
                                                [d.embeddings for d in datas])
        self.encoder = ComfyLayerwiseEncoder(clip, library.num_layers, library.token_slots)
        self.fingerprint = text_encoder_fingerprint(self.encoder)

    def __call__(self, text: str, input_name: str = "text"):
        """(ordinary conditioning [1, k·77, D], pooled, LayerwisePrompt, expanded text) for a prompt naming the
        library's concepts, in k 77-token chunks as ComfyUI's CLIPTextEncode makes them (cidm.routing describes the
        transport). Raises CIDMInputError naming `input_name` for an unknown concept, or `clip` when the CLIP is not
        the one the library was trained with."""
        expanded = self.vocabulary.expand(text, input_name)
        check_text_encoder(self.library, self.fingerprint)
        layers, pooled = self.encoder.encode_with_pooled(expanded, self.vocabulary.embeddings)
        tokens = tuple(self.vocabulary.tokens_in(expanded))
        concepts = self.vocabulary.named_concepts(expanded, self.encoder.token_positions(
            expanded, self.vocabulary.embeddings))
        prompt = LayerwisePrompt(contexts=layers.float() if tokens else None, tokens=tokens,
                                 library=self.library.name, concepts=concepts)
        ordinary = ordinary_context(layers) if tokens else layers[:1]
        return ordinary, pooled, prompt, expanded


def encode_layerwise(clip, library, text: str, input_name: str = "text"):
    """One prompt through a LibraryPromptEncoder (its call says what comes back and what is raised)."""
    return LibraryPromptEncoder(clip, library)(text, input_name)


class CIDMTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_TextEncode", display_name="CIDM Text Encode", category=CATEGORY,
            description="Encodes a prompt with the library's layer-wise concept tokens. The output is an ordinary "
                        "prompt (the mean of the layer contexts, so any model and any negative work with it); the "
                        "context of every cross-attention layer and the concepts the prompt names ride with it for "
                        "Elastic Aggregate LoRAs. A stock negative prompt is fine.",
            inputs=[io.Clip.Input("clip", tooltip="The CLIP of the library's base model (checked)."),
                    ConceptLibraryType.Input("library", tooltip="The library whose concepts the prompt names."),
                    io.String.Input("text", multiline=True, default="a photo of a <dog>",
                                    tooltip="Name concepts as <name> in any case, spaces included (<my dog>), or by "
                                            "their tokens. Any length: long prompts are encoded in 77-token "
                                            "chunks, as CLIPTextEncode does.")],
            outputs=[io.Conditioning.Output(display_name="conditioning")])

    @classmethod
    def execute(cls, clip, library, text):
        ordinary, pooled, prompt, _ = encode_layerwise(clip, library.open(), text)
        return io.NodeOutput([[ordinary, {"pooled_output": pooled, PROMPT_KEY: prompt}]])


def parse_fixed_weights(mode: str, weights: str) -> list[float] | None:
    if mode != "fixed":
        return None
    try:
        return [float(w) for w in weights.split(",") if w.strip()]
    except ValueError:
        raise CIDMInputError("weights", f"expected numbers separated by commas, got {weights!r}") from None


def library_router(lib, chosen, datas, mode: str, weights: str, uncond_weights: str = "match cond"):
    return make_router(mode, [d.features for d in datas], uncond=uncond_weights,
                       fixed_weights=parse_fixed_weights(mode, weights), task_tokens=[t.tokens for t in chosen])


MODE_TOOLTIP = ("named: every concept the prompt names at full strength (its multiplier × scale), the others off "
                "and not computed. named-elastic: only the named concepts, mixed by CIDM's similarity weights. "
                "elastic: CIDM's similarity weights over all tasks (cos → max → mean → ^4 → L1). one-hot: only "
                "the best-matching task. fixed: the weights below.")


class ElasticAggregateLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_ElasticAggregateLoRAs", display_name="Elastic Aggregate LoRAs", category=CATEGORY,
            description="Puts the library's concepts into one model. By default a prompt (from CIDM Text Encode) "
                        "gets exactly the concepts it names; a prompt naming none samples as the base model. "
                        "Chain several nodes to use several libraries.",
            inputs=[io.Model.Input("model", tooltip="The base model the library was trained on (an SD1.5- or "
                                                    "SDXL-family checkpoint)."),
                    ConceptLibraryType.Input("library", tooltip="The concept library whose tasks are aggregated."),
                    io.String.Input("tasks", default="all", tooltip="'all', or task numbers / concept names, "
                                    "comma separated."),
                    io.Float.Input("scale", default=0.8, min=0.0, max=4.0, step=0.05,
                                   tooltip="LoRA scale, times each task's multiplier (the official CIDM code "
                                           "samples with 0.8)."),
                    io.Combo.Input("mode", options=list(MODES), default="named", tooltip=MODE_TOOLTIP),
                    io.String.Input("weights", default="", tooltip="fixed mode: one weight per selected task, "
                                    "comma separated."),
                    io.Combo.Input("uncond_weights", options=list(UNCOND_POLICIES), default="match cond",
                                   tooltip="match cond: the negative prompt gets the weights of the positive it is "
                                           "paired with (as the official CIDM code does). own: every prompt is "
                                           "routed from itself (a stock negative names no concept).")],
            outputs=[io.Model.Output(display_name="model")])

    @classmethod
    def execute(cls, model, library, tasks, scale, mode, weights, uncond_weights):
        require_finite(scale=scale)  # named before anything is read
        lib = library.open()
        return io.NodeOutput(aggregate(model, lib, select_tasks(lib, tasks), scale, mode, weights, uncond_weights,
                                       "Elastic Aggregate LoRAs"))


def aggregate(model, lib, chosen, scale: float, mode: str, weights: str = "", uncond_weights: str = "match cond",
              node: str = "Elastic Aggregate LoRAs"):
    """A clone of `model` that applies the `chosen` tasks of `lib` under `mode`, as Elastic Aggregate LoRAs does
    (`node` names the node in a later one's refusal). Raises CIDMInputError naming `model` or `library` for a base
    model the library was not trained on or tasks the model already applies, `scale` when it is not finite."""
    require_finite(scale=scale)
    check_library_model(lib, model)
    check_not_applied(model, chosen, "library")
    datas = [lib.load_task(t.index) for t in chosen]
    router = library_router(lib, chosen, datas, mode, weights, uncond_weights)
    banks = {layer: LayerLoRABank([{p: d.lora[(layer, p)] for p in PROJECTIONS} for d in datas], scale)
             for layer in range(lib.num_layers)}
    multipliers = torch.tensor([t.multiplier for t in chosen], dtype=torch.float32)
    patched = add_library_patch(model, banks, router, multipliers, uncond_weights)
    mark_applied(patched, lib.name, chosen, node)
    return patched


class InspectAggregationWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_InspectAggregationWeights", display_name="Inspect Aggregation Weights",
            category=CATEGORY, is_output_node=True,
            description="Shows, for a prompt, the weight each selected task gets in every cross-attention layer "
                        "under the chosen mode (times the task's multiplier, before the node scale): why a concept "
                        "won or lost.",
            inputs=[io.Clip.Input("clip", tooltip="The base model's CLIP text encoder."),
                    ConceptLibraryType.Input("library", tooltip="The library whose concepts the prompt names."),
                    io.String.Input("text", multiline=True, default="a photo of a <dog>",
                                    tooltip="The prompt to inspect; name concepts as <name>."),
                    io.Combo.Input("mode", options=list(MODES), default="named", tooltip=MODE_TOOLTIP),
                    io.String.Input("tasks", default="all", optional=True,
                                    tooltip="'all', or task numbers / concept names, comma separated."),
                    io.String.Input("weights", default="", optional=True,
                                    tooltip="fixed mode: one weight per selected task, comma separated.")],
            outputs=[io.String.Output(display_name="table"), io.Image.Output(display_name="plot")])

    @classmethod
    def execute(cls, clip, library, text, mode, tasks="all", weights=""):
        lib = library.open()
        ordinary, _, prompt, expanded = encode_layerwise(clip, lib, text)
        chosen = select_tasks(lib, tasks)
        datas = [lib.load_task(t.index) for t in chosen]
        router = library_router(lib, chosen, datas, mode, weights)
        multipliers = torch.tensor([t.multiplier for t in chosen], dtype=torch.float32)
        table_weights = router.route(prompt, ordinary[0].float(), lib.num_layers) * multipliers
        names = [f"{t.index}:{t.concept}" for t in chosen]
        lines = [f"prompt: {expanded}", f"mode: {mode}", "layer | " + " | ".join(names)]
        lines += [f"{layer:5d} | " + " | ".join(f"{w:.3f}" for w in row.tolist())
                  for layer, row in enumerate(table_weights)]
        lines.append(" mean | " + " | ".join(f"{w:.3f}" for w in table_weights.mean(0).tolist()))
        plot = heatmap(table_weights, [f"layer {i}" for i in range(lib.num_layers)], names, f"{mode} weights")
        table = "\n".join(lines)
        return io.NodeOutput(table, plot, ui={**ui.PreviewText(table).as_dict(),
                                              **ui.PreviewImage(plot, cls=cls).as_dict()})


NODES = [CIDMTextEncode, ElasticAggregateLoRAs, InspectAggregationWeights]
