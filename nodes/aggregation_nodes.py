"""Aggregation nodes: CIDM Text Encode, Elastic Aggregate LoRAs, Inspect Aggregation Weights."""

from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..cidm.adapters import LayerLoRABank
from ..cidm.aggregation import MODES, UNCOND_POLICIES, ElasticRouter, make_router
from ..cidm.errors import CIDMInputError, require_finite
from ..cidm.layers import PROJECTIONS
from ..cidm.plots import heatmap
from ..cidm.tokens import vocabulary_from_tasks
from .host.attention import object_patch_attn2
from .host.model import model_fingerprint
from .host.text_encoder import TOKENS_PER_LAYER, ComfyLayerwiseEncoder
from .library_nodes import ConceptLibraryType

CATEGORY = "CIDM/aggregation"


def select_tasks(library, selection: str):
    """'all', or task numbers / concept names separated by commas."""
    tasks = library.tasks
    if not tasks:
        raise CIDMInputError("library", f"library '{library.name}' has no concepts yet")
    if selection.strip().lower() in ("", "all"):
        return tasks
    chosen = []
    for item in (part.strip() for part in selection.split(",") if part.strip()):
        match = [t for t in tasks if str(t.index) == item or t.concept == item]
        if not match:
            raise CIDMInputError("tasks", f"'{item}' is not a task number or concept of '{library.name}'; known: "
                                          + ", ".join(f"{t.index}:{t.concept}" for t in tasks))
        chosen.extend(t for t in match if t not in chosen)
    return chosen


def encode_layerwise(clip, library, text: str, input_name: str = "text"):
    """([1, L·77, D] packed conditioning, pooled, expanded text) for a prompt naming the library's concepts."""
    datas = library.load_all()
    vocabulary = vocabulary_from_tasks([t.concept for t in library.tasks], [t.tokens for t in library.tasks],
                                       [d.embeddings for d in datas])
    expanded = vocabulary.expand(text, input_name)
    encoder = ComfyLayerwiseEncoder(clip, library.num_layers)
    layers, pooled = encoder.encode_with_pooled(expanded, vocabulary.embeddings)
    return layers.reshape(1, -1, layers.shape[-1]), pooled, expanded


class CIDMTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_TextEncode", display_name="CIDM Text Encode", category=CATEGORY,
            description="Encodes a prompt with the library's layer-wise concept tokens: one context per "
                        "cross-attention layer, packed along the token axis. Use it for the negative prompt too, "
                        "so positive and negative batch together. Without Elastic Aggregate the model still "
                        "samples (it attends over all layer contexts).",
            inputs=[io.Clip.Input("clip", tooltip="The base model's CLIP text encoder."),
                    ConceptLibraryType.Input("library", tooltip="The library whose concepts the prompt names."),
                    io.String.Input("text", multiline=True, default="a photo of a <dog>",
                                    tooltip="Name concepts as <name> (or by their tokens).")],
            outputs=[io.Conditioning.Output(display_name="conditioning")])

    @classmethod
    def execute(cls, clip, library, text):
        packed, pooled, _ = encode_layerwise(clip, library.open(), text)
        return io.NodeOutput([[packed, {"pooled_output": pooled, "cidm_layers": packed.shape[1] // TOKENS_PER_LAYER}]])


class ElasticAggregateLoRAs(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_ElasticAggregateLoRAs", display_name="Elastic Aggregate LoRAs", category=CATEGORY,
            description="Puts every concept of the library into one model. Each cross-attention layer mixes the "
                        "tasks' LoRAs per sample, weighted by how closely the prompt matches each concept.",
            inputs=[io.Model.Input("model", tooltip="The SD1.5 base model the library was trained on."),
                    ConceptLibraryType.Input("library", tooltip="The concept library whose tasks are aggregated."),
                    io.String.Input("tasks", default="all", tooltip="'all', or task numbers / concept names, "
                                    "comma separated."),
                    io.Float.Input("scale", default=0.8, min=0.0, max=4.0, step=0.05,
                                   tooltip="LoRA scale (the official CIDM code samples with 0.8)."),
                    io.Combo.Input("mode", options=list(MODES), default="elastic",
                                   tooltip="elastic: CIDM's similarity weights (cos → max → mean → ^4 → L1). "
                                           "one-hot: only the best-matching task. fixed: the weights below."),
                    io.String.Input("weights", default="", tooltip="fixed mode: one weight per selected task, "
                                    "comma separated."),
                    io.Combo.Input("uncond_weights", options=list(UNCOND_POLICIES), default="match cond",
                                   tooltip="match cond: negative rows reuse the paired positive row's weights "
                                           "(as the official CIDM code does). own: every row is routed from its own prompt.")],
            outputs=[io.Model.Output(display_name="model")])

    @classmethod
    def execute(cls, model, library, tasks, scale, mode, weights, uncond_weights):
        require_finite(scale=scale)
        lib = library.open()
        lib.check_base_model(model_fingerprint(model), lib.num_layers)
        chosen = select_tasks(lib, tasks)
        datas = [lib.load_task(t.index) for t in chosen]
        fixed = None
        if mode == "fixed":
            try:
                fixed = [float(w) for w in weights.split(",") if w.strip()]
            except ValueError:
                raise CIDMInputError("weights", f"expected numbers separated by commas, got {weights!r}") from None
        router = make_router(mode, [d.features for d in datas], uncond=uncond_weights, fixed_weights=fixed)
        banks = {layer: LayerLoRABank([{p: d.lora[(layer, p)] for p in PROJECTIONS} for d in datas], scale)
                 for layer in range(lib.num_layers)}
        return io.NodeOutput(object_patch_attn2(model, banks, router))


class InspectAggregationWeights(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="CIDM_InspectAggregationWeights", display_name="Inspect Aggregation Weights",
            category=CATEGORY, is_output_node=True,
            description="Shows, for a prompt, the elastic weight of every task in every cross-attention layer: "
                        "why a concept won or lost.",
            inputs=[io.Clip.Input("clip", tooltip="The base model's CLIP text encoder."),
                    ConceptLibraryType.Input("library", tooltip="The library whose concepts the prompt names."),
                    io.String.Input("text", multiline=True, default="a photo of a <dog>",
                                    tooltip="The prompt to inspect; name concepts as <name>."),
                    io.Combo.Input("mode", options=["elastic", "one-hot"], default="elastic",
                                   tooltip="elastic: CIDM's similarity weights. one-hot: only the best-matching "
                                           "task per layer.")],
            outputs=[io.String.Output(display_name="table"), io.Image.Output(display_name="plot")])

    @classmethod
    def execute(cls, clip, library, text, mode):
        lib = library.open()
        packed, _, expanded = encode_layerwise(clip, lib, text)
        router = ElasticRouter([d.features for d in lib.load_all()], one_hot=mode == "one-hot")
        contexts = packed.reshape(lib.num_layers, TOKENS_PER_LAYER, -1)
        weights = torch.cat([router(layer, contexts[layer:layer + 1], None) for layer in range(lib.num_layers)])
        names = [f"{t.index}:{t.concept}" for t in lib.tasks]
        lines = [f"prompt: {expanded}", "layer | " + " | ".join(names)]
        lines += [f"{layer:5d} | " + " | ".join(f"{w:.3f}" for w in row.tolist()) for layer, row in enumerate(weights)]
        lines.append(" mean | " + " | ".join(f"{w:.3f}" for w in weights.mean(0).tolist()))
        plot = heatmap(weights, [f"layer {i}" for i in range(lib.num_layers)], names, f"{mode} weights")
        table = "\n".join(lines)
        return io.NodeOutput(table, plot, ui={**ui.PreviewText(table).as_dict(),
                                              **ui.PreviewImage(plot, cls=cls).as_dict()})


NODES = [CIDMTextEncode, ElasticAggregateLoRAs, InspectAggregationWeights]
