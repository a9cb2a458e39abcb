"""Writes the shipped UI-format workflows in workflows/ from the graphs below, with widget order, socket types and
defaults taken from a real server's /object_info (so a node gaining an input means re-running this script).

    ~/.cache/cidm-comfyui/venv/bin/python scripts/make_workflows.py

The files are the source of truth afterwards: the demo and the tests convert them to API format at run time
(scripts/workflow_format.py) and the browser test opens them from the Templates dialog. Values here are the real
SD1.5 ones (512 px, 800 training steps per concept, a stock SD1.5 checkpoint name); the CPU-sized settings of the
tests are applied at run time and never written. The SDXL versions (`<name>_sdxl`) carry SDXL's: 1024 px, a stock
SDXL checkpoint name and its own library. The thumbnails beside them (<name>.jpg, which the Templates dialog shows)
are crops of the browser test's screenshots (tests/browser/screenshots/<name>.png).
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comfy_host import REPO, ComfyServer, ensure_checkpoint  # noqa: E402
from workflow_format import is_widget, ordered_inputs, widget_layout  # noqa: E402

OUT = REPO / "workflows"
COLUMN_WIDTH = 460
TITLE_HEIGHT = 30  # LiteGraph draws a node's title bar above its pos
CLEARANCE = 30  # free canvas between two nodes: the frontend draws a node's source badge above its title bar
ROW_GAP = TITLE_HEIGHT + CLEARANCE
# LiteGraph draws a title after the collapse dot (one title height) and cuts it at the node's edge; at its 14 px
# title font a wide sans (DejaVu Sans, the Debian default) averages about 8.5 px a character, so a node is made wide
# enough for 9 px a character and a 10 px margin, whatever the browser's font
TITLE_PX_PER_CHARACTER = 9
NEGATIVE = "blurry, low quality, deformed"


@dataclass(frozen=True)
class FamilySettings:
    """What a shipped workflow sets for one model family (cidm.family holds the family's own numbers)."""

    label: str  # in titles and notes
    suffix: str  # of the workflow file name
    checkpoint: str  # a stock checkpoint of the family, as its users name it
    resolution: int  # training and generation, in pixels
    cfg: float
    library: str


SD15 = FamilySettings("SD1.5", "", "v1-5-pruned-emaonly.safetensors", 512, 7.5, "my-concepts")
# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 ships sd_xl_base_1.0.safetensors), at its native 1024 px;
# a lower CFG than SD1.5's, as SDXL users run it. Any SDXL-family checkpoint (Pony, Illustrious, NoobAI) fits.
SDXL = FamilySettings("SDXL", "_sdxl", "sd_xl_base_1.0.safetensors", 1024, 6.0, "my-sdxl-concepts")


def sampling(family: FamilySettings) -> dict:
    return dict(steps=30, cfg=family.cfg, sampler_name="dpmpp_2m", scheduler="karras", denoise=1.0)

CONCEPTS = [  # (concept, CIFC folder, tokens, class words); CIFC: Dong et al.'s continual customization benchmark
    ("dog", "cifc/dog", "<dog1> <dog2>", "dog"),
    ("duck", "cifc/duck_toy", "<duck1> <duck2> <duck3>", "duck toy"),
    ("cat", "cifc/cat", "<cat1> <cat2>", "cat"),
]


class Slot:
    def __init__(self, node: "Node", index: int):
        self.node, self.index = node, index


class Node:
    def __init__(self, graph: "Workflow", node_id: int, kind: str):
        self.graph, self.id, self.kind = graph, node_id, kind

    def __getitem__(self, index: int) -> Slot:
        return Slot(self, index)


class Workflow:
    """Places nodes in columns, top to bottom, and serialises them the way the frontend saves a graph."""

    def __init__(self, info: dict):
        self.info = info
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.column_bottom: dict[int, float] = {}

    def _place(self, column: int, height: float, width: float) -> list[float]:
        top = self.column_bottom.get(column, 0.0)
        self.column_bottom[column] = top + height + ROW_GAP
        return [column * COLUMN_WIDTH * 1.0, top]

    def note(self, column: int, text: str, title: str = "Note", width: float = 360, height: float = 260) -> None:
        self.nodes.append({"id": len(self.nodes) + 1, "type": "Note", "pos": self._place(column, height, width),
                           "size": [width, height], "flags": {}, "order": len(self.nodes), "mode": 0,
                           "inputs": [], "outputs": [], "title": title, "properties": {},
                           "widgets_values": [text], "color": "#432", "bgcolor": "#653"})

    def add(self, kind: str, column: int, title: str | None = None, node_width: float = 360, **values) -> Node:
        spec = self.info[kind]
        node_id = len(self.nodes) + 1
        inputs, widgets = [], []
        for name, input_spec in ordered_inputs(spec):
            value = values.pop(name, None)
            if is_widget(input_spec):
                default = input_spec[1].get("default") if len(input_spec) > 1 else None
                if isinstance(input_spec[0], list) and input_spec[0] and default is None:
                    default = input_spec[0][0]  # a model list is empty on the server that writes these files
                widgets.append((name, default if value is None or isinstance(value, Slot) else value))
                if isinstance(value, Slot):
                    inputs.append(self._link(value, node_id, len(inputs), name, widget=True))
            elif isinstance(value, Slot):
                inputs.append(self._link(value, node_id, len(inputs), name))
            elif name in spec["input"]["required"]:
                raise ValueError(f"{kind}: required input {name} is not connected")
            else:
                inputs.append({"name": name, "type": input_spec[0], "link": None})
        if values:
            raise ValueError(f"{kind} has no inputs {sorted(values)}")
        widgets_values = []
        for (name, value), (_, control) in zip(widgets, widget_layout(spec)):
            widgets_values.append(value)
            if control:
                widgets_values.append("fixed")
        outputs = [{"name": output_name, "type": output_type, "links": []}
                   for output_name, output_type in zip(spec["output_name"], spec["output"])]
        sockets = max(len([i for i in inputs if "widget" not in i]), len(outputs))
        multiline = sum(1 for name, input_spec in ordered_inputs(spec)
                        if is_widget(input_spec) and len(input_spec) > 1 and input_spec[1].get("multiline"))
        height = 50 + 24 * sockets + 26 * len(widgets) + 100 * multiline
        node_width = max(node_width, TITLE_HEIGHT + TITLE_PX_PER_CHARACTER * len(title or "") + 10)
        if node_width > COLUMN_WIDTH - CLEARANCE:
            raise ValueError(f"{kind}: title {title!r} needs a node {node_width} px wide, wider than a column")
        node = {"id": node_id, "type": kind, "pos": self._place(column, height, node_width),
                "size": [node_width, height],
                "flags": {}, "order": node_id - 1, "mode": 0, "inputs": inputs, "outputs": outputs,
                "properties": {"Node name for S&R": kind}, "widgets_values": widgets_values}
        if title:
            node["title"] = title
        self.nodes.append(node)
        return Node(self, node_id, kind)

    def _link(self, source: Slot, target_id: int, target_slot: int, name: str, widget: bool = False) -> dict:
        link_id = len(self.links) + 1
        kind = self.info[source.node.kind]["output"][source.index]
        self.links.append([link_id, source.node.id, source.index, target_id, target_slot, kind])
        self.nodes[source.node.id - 1]["outputs"][source.index]["links"].append(link_id)
        entry = {"name": name, "type": kind, "link": link_id}
        if widget:
            entry["widget"] = {"name": name}
        return entry

    def save(self, name: str) -> Path:
        graph = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-cidm/{name}")), "revision": 0,
                 "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                 "links": self.links, "groups": [], "config": {},
                 "extra": {"ds": {"scale": 0.55, "offset": [40, 40]}}, "version": 0.4}
        path = OUT / f"{name}.json"
        path.write_text(json.dumps(graph, indent=1) + "\n")
        return path


def checkpoint(wf: Workflow, family: FamilySettings, column: int = 0) -> Node:
    return wf.add("CheckpointLoaderSimple", column, ckpt_name=family.checkpoint)


def train_task(wf: Workflow, ckpt: Node, library: Node, column: int, method: str, index: int, concept: str,
               folder: str, options) -> Node:
    """Train Concept Increment for task `index` (from 0), appending to `library` (a node whose first output is one)."""
    return wf.add("CIDM_TrainConceptIncrement", column, title=f"Task {index + 1}: {concept} ({method})",
                  node_width=380, model=ckpt[0], clip=ckpt[1], vae=ckpt[2], library=library[0], concept=concept,
                  method=method, steps=800, folder=folder, options=options[concept][0])


def train_sequence(wf: Workflow, ckpt: Node, library: Node, column: int, method: str, concepts, options) -> Node:
    """One Train Concept Increment per concept, each appending to the library the previous one returned."""
    for index, (concept, folder, _, _) in enumerate(concepts):
        library = train_task(wf, ckpt, library, column, method, index, concept, folder, options)
    return library


def concept_options(wf: Workflow, family: FamilySettings, column: int, concepts) -> dict[str, Node]:
    return {concept: wf.add("CIDM_ConceptTrainingOptions", column, title=f"Options: {concept}", tokens=tokens,
                            class_words=words, training_seed=index, resolution=family.resolution)
            for index, (concept, _, tokens, words) in enumerate(concepts)}


def generate(wf: Workflow, family: FamilySettings, ckpt: Node, model: Node, library: Node, column: int, prompt: str,
             prefix: str, seed: int = 2024) -> None:
    """CIDM Text Encode (prompt and negative) → KSampler at the family's square size → VAE Decode → Save Image."""
    positive = wf.add("CIDM_TextEncode", column, title=f"Prompt: {prompt}", clip=ckpt[1], library=library[0],
                      text=prompt)
    negative = wf.add("CIDM_TextEncode", column, title="Negative prompt", clip=ckpt[1], library=library[0],
                      text=NEGATIVE)
    latent = wf.add("EmptyLatentImage", column, width=family.resolution, height=family.resolution, batch_size=1)
    sampled = wf.add("KSampler", column, model=model[0], positive=positive[0], negative=negative[0],
                     latent_image=latent[0], seed=seed, **sampling(family))
    decoded = wf.add("VAEDecode", column, samples=sampled[0], vae=ckpt[2])
    wf.add("SaveImage", column, images=decoded[0], filename_prefix=prefix)


CONTINUAL_TIME = {SD15: "800 steps per concept at 512 px, as the paper trains; about 10 minutes per concept on a "
                         "recent GPU",
                  SDXL: "800 steps per concept at SDXL's 1024 px (the paper's SD1.5 step count; its SDXL settings were "
                        "never released). Each concept token has one embedding per transformer stack (11), the "
                        "SDXL default of Concept Training Options"}


def continual_customization(info: dict, family: FamilySettings = SD15) -> Workflow:
    wf = Workflow(info)
    wf.note(0, f"Continual customization ({family.label})\n\nThree concepts are taught one after the other into "
               f"one library (models/cidm/{family.library}). Each Train Concept Increment appends the next task "
               "and never changes the old ones; no old image is replayed.\n\nPut each concept's images (and "
               "optional same-name .txt captions) in a folder under ComfyUI/input, e.g. input/cifc/dog, or change "
               f"the folder widgets. Prompts name a concept as <dog>.\n\n{CONTINUAL_TIME[family]}. Queue again "
               "unchanged and the trained tasks are reused.", title="Read me", height=360)
    ckpt = checkpoint(wf, family)
    library = wf.add("CIDM_LoadConceptLibrary", 0, library=family.library)
    options = concept_options(wf, family, 1, CONCEPTS)
    trained = train_sequence(wf, ckpt, library, 2, "cidm", CONCEPTS, options)
    model = wf.add("CIDM_ElasticAggregateLoRAs", 2, model=ckpt[0], library=trained[0])
    wf.add("CIDM_InspectAggregationWeights", 2, node_width=420, clip=ckpt[1], library=trained[0],
           text="a photo of a <duck> on a beach")
    for column, (concept, *_rest) in enumerate(CONCEPTS, start=3):
        generate(wf, family, ckpt, model, trained, column, f"a photo of a <{concept}> on a beach",
                 f"cidm/{concept}{family.suffix}", seed=2024 + column)
    return wf


def method_comparison(info: dict) -> Workflow:
    concepts = CONCEPTS[:2]
    wf = Workflow(info)
    wf.note(0, "Method comparison\n\nThe same two concepts (dog, then duck toy), with the same options, trained "
               "in sequence by three methods, each into its own library: cidm (consolidation loss; each prompt "
               "gets the concepts it names), c-lora (Smith et al.: overlap penalty, old tasks merged) and finetune (no "
               "regularizer). Each column then samples one prompt naming both concepts with the same seed.\n\n"
               "c-lora and finetune were trained with the old tasks summed into the model, so they are sampled "
               "that way (fixed weights 1, 1); cidm applies the concepts the prompt names (named routing).", title="Read me", height=300)
    ckpt = checkpoint(wf, SD15)
    options = concept_options(wf, SD15, 1, concepts)
    for column, method in enumerate(("cidm", "c-lora", "finetune"), start=2):
        library = wf.add("CIDM_LoadConceptLibrary", column, title=f"Library: compare-{method}",
                         library=f"compare-{method}")
        trained = train_sequence(wf, ckpt, library, column, method, concepts, options)
        routing = {} if method == "cidm" else dict(mode="fixed", weights="1, 1")
        model = wf.add("CIDM_ElasticAggregateLoRAs", column, model=ckpt[0], library=trained[0], **routing)
        generate(wf, SD15, ckpt, model, trained, column, "a <dog> next to a <duck> on a beach",
                 f"cidm/compare_{method}")
    return wf


def export_concept_lora(info: dict) -> Workflow:
    wf = Workflow(info)
    wf.note(0, "Export a concept as a standard LoRA\n\nRun Continual customization first (it fills the library "
               "my-concepts).\n\nExport Concept LoRA writes models/loras/my-concepts_dog.safetensors: any workflow "
               "can load it with the stock Load LoRA node (refresh with R to see it in the list).\n\nLoad Concept "
               "as LoRA applies the same LoRA in this graph, so a plain CLIPTextEncode + KSampler workflow uses it "
               "at once. A standard LoRA cannot carry the layer-wise concept tokens: prompt with the class word "
               "('a photo of a dog').", title="Read me", height=320)
    ckpt = checkpoint(wf, SD15)
    library = wf.add("CIDM_LoadConceptLibrary", 0, library=SD15.library)
    wf.add("CIDM_ExportConceptLoRA", 1, library=library[0], concept="dog")
    model = wf.add("CIDM_LoadConceptAsLoRA", 1, model=ckpt[0], library=library[0], concept="dog")
    positive = wf.add("CLIPTextEncode", 2, title="Prompt", text="a photo of a dog on a beach", clip=ckpt[1])
    negative = wf.add("CLIPTextEncode", 2, title="Negative prompt", text=NEGATIVE, clip=ckpt[1])
    latent = wf.add("EmptyLatentImage", 2, width=512, height=512, batch_size=1)
    sampled = wf.add("KSampler", 3, model=model[0], positive=positive[0], negative=negative[0],
                     latent_image=latent[0], seed=7, **sampling(SD15))
    decoded = wf.add("VAEDecode", 3, samples=sampled[0], vae=ckpt[2])
    wf.add("SaveImage", 3, images=decoded[0], filename_prefix="cidm/exported_dog")
    return wf


def composition_inputs(wf: Workflow, family: FamilySettings, title: str, prompt: str) -> tuple[Node, ...]:
    """(checkpoint, library, aggregated model, positive, negative) of a composition workflow: the family's library
    on its checkpoint, the prompt and the negative encoded with it."""
    ckpt = checkpoint(wf, family)
    library = wf.add("CIDM_LoadConceptLibrary", 0, library=family.library)
    model = wf.add("CIDM_ElasticAggregateLoRAs", 1, model=ckpt[0], library=library[0])
    positive = wf.add("CIDM_TextEncode", 1, title=title, clip=ckpt[1], library=library[0], text=prompt)
    negative = wf.add("CIDM_TextEncode", 1, title="Negative prompt", clip=ckpt[1], library=library[0],
                      text=NEGATIVE)
    return ckpt, library, model, positive, negative


def region_composition(info: dict, family: FamilySettings = SD15) -> Workflow:
    """Two concepts side by side on a 3:2 canvas whose short side is the family's resolution."""
    height = family.resolution
    width = height * 3 // 2
    wf = Workflow(info)
    wf.note(0, f"Multi-concept composition in regions ({family.label})\n\nRun Continual customization "
               f"{'' if family is SD15 else f'({family.label}) '}first (it fills the library {family.library} with "
               "dog, duck and cat).\n\nThe global prompt names every concept; each Region Condition gives one part "
               f"of the image its own prompt (a box here, in pixels of the {width}×{height} canvas; connect a MASK "
               "instead to paint it). Inside each region the Context-Controlled KSampler "
               "lets the image follow that region's prompt through only its concepts (region-aware "
               "cross-attention); outside, the global prompt. alpha below 1 adds CIDM's region noise estimation "
               "(the paper uses 0.1). The layout preview on the last Region Condition shows the regions with the "
               "concepts they name.", title="Read me",
            height=360)
    ckpt, library, model, positive, negative = composition_inputs(
        wf, family, "Global prompt", "a photo of a <dog> and a <cat> sitting in a garden")
    regions = None
    for index, (concept, x) in enumerate((("dog", 0), ("cat", width // 2))):
        prompt = wf.add("CIDM_TextEncode", 2, title=f"Region prompt: {concept}", clip=ckpt[1], library=library[0],
                        text=f"a photo of a <{concept}>")
        chained = {} if regions is None else {"regions": regions[0]}
        regions = wf.add("CIDM_RegionCondition", 2, title=f"Region {index + 1}: {concept}", node_width=400,
                         conditioning=prompt[0], x=x, y=0, width=width // 2, height=height, units="pixels",
                         canvas_width=width, canvas_height=height, **chained)
    latent = wf.add("EmptyLatentImage", 3, width=width, height=height, batch_size=1)
    sampled = wf.add("CIDM_ContextControlledKSampler", 3, model=model[0], positive=positive[0],
                     negative=negative[0], regions=regions[0], latent_image=latent[0], seed=2024,
                     **sampling(family))
    decoded = wf.add("VAEDecode", 3, samples=sampled[0], vae=ckpt[2])
    wf.add("SaveImage", 3, images=decoded[0], filename_prefix=f"cidm/composition{family.suffix}")
    return wf


def region_composition_auto(info: dict, family: FamilySettings = SD15) -> Workflow:
    """Two concepts on a 3:2 canvas with no region drawn: each finds its own place (automatic regions)."""
    height = family.resolution
    width = height * 3 // 2
    wf = Workflow(info)
    wf.note(0, f"Multi-concept composition, no drawing ({family.label})\n\nRun Continual customization first (it "
               f"fills the library {family.library} with dog, duck and cat).\n\nThe prompt names two concepts and "
               "no Region Condition is wired: in the first steps of the run (probe_steps, 20 %) the "
               "Context-Controlled KSampler reads where each concept's tokens draw attention, gives each concept "
               "that part of the image, and samples the rest of the run with each part under its own concept only. "
               "No extra steps. The masks and the layout come out of the sampler (previews on the right). If the "
               "probe cannot tell the concepts apart, the node says so and samples without regions. To place one "
               "concept yourself, wire a Region Condition for it: the other stays automatic.", title="Read me",
            height=380)
    ckpt, _, model, positive, negative = composition_inputs(
        wf, family, "Prompt", "a photo of a <dog> on the left and a <cat> on the right, sitting in a garden")
    latent = wf.add("EmptyLatentImage", 2, width=width, height=height, batch_size=1)
    sampled = wf.add("CIDM_ContextControlledKSampler", 2, model=model[0], positive=positive[0],
                     negative=negative[0], latent_image=latent[0], seed=2024, auto_regions=True,
                     **sampling(family))
    decoded = wf.add("VAEDecode", 3, samples=sampled[0], vae=ckpt[2])
    wf.add("SaveImage", 3, images=decoded[0], filename_prefix=f"cidm/composition_auto{family.suffix}")
    wf.add("PreviewImage", 3, title="Layout: where each concept went", images=sampled[2])
    wf.add("MaskPreview", 3, title="Automatic masks", mask=sampled[1])
    return wf


def continual_evaluation(info: dict) -> Workflow:
    """Three tasks, each followed by Evaluate Concept Library on the library it returned."""
    wf = Workflow(info)
    wf.note(0, "Continual customization with an evaluation after every task (SD1.5)\n\nThe three concepts of "
               "Continual customization are taught one after the other into the library my-concepts-evaluated; "
               "after each task, Evaluate Concept Library samples every concept learned so far with fixed seeds "
               "and scores it as CIDM does (IA: image alignment over all sample × reference pairs). Each "
               "evaluation is kept with the library, so the report and the plot of the last one show every "
               "concept after each later task and its forgetting (peak minus now).\n\nLoad CLIP Vision: any "
               "ViT-L/H/bigG (e.g. the IP-Adapter ViT-H). References: by default each concept's training folder "
               "(that rewards copying); better, put held-out photos in input/held_out/<concept> and set held_out "
               "to held_out. Cost per evaluation: concepts × 4 prompts × 2 samples images (24 after the third "
               "task).", title="Read me", height=400)
    ckpt = checkpoint(wf, SD15)
    vision = wf.add("CLIPVisionLoader", 0, clip_name="CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors")
    library = wf.add("CIDM_LoadConceptLibrary", 0, library="my-concepts-evaluated")
    options = concept_options(wf, SD15, 1, CONCEPTS)
    for index, (concept, folder, _, _) in enumerate(CONCEPTS):
        column = 2 + 2 * index
        trained = train_task(wf, ckpt, library, column, "cidm", index, concept, folder, options)
        library = wf.add("CIDM_EvaluateConceptLibrary", column + 1, title=f"Evaluate after task {index + 1}",
                         node_width=380, model=ckpt[0], clip=ckpt[1], vae=ckpt[2], library=trained[0],
                         clip_vision=vision[0])
        wf.add("PreviewImage", column + 1, title=f"Samples after task {index + 1}", images=library[1])
    wf.add("PreviewImage", 8, title="Forgetting: IA per concept after each task", images=library[3])
    return wf


WORKFLOWS = {"continual_customization": continual_customization, "method_comparison": method_comparison,
             "export_concept_lora": export_concept_lora, "region_composition": region_composition,
             "continual_customization_sdxl": lambda info: continual_customization(info, SDXL),
             "region_composition_sdxl": lambda info: region_composition(info, SDXL),
             "region_composition_auto": region_composition_auto, "continual_evaluation": continual_evaluation}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="cidm-make-workflows-") as workspace:
        server = ComfyServer(Path(workspace), {"cidm_mini_sd15.safetensors": ensure_checkpoint("mini")}).start()
        try:
            info = server.object_info()
        finally:
            server.stop()
    for name, build in WORKFLOWS.items():
        print(build(info).save(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
