"""Issue 34: Evaluate Concept Library in the real server, with CLIP vision models of random weights made at test
time (CIDMTest_SmallClipVision: ComfyUI's own ClipVisionModel on a small config)."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from safetensors.torch import save_file

from comfy_host import Graph, WorkflowFailed
from pack_workflows import CKPT, library_root
from synthetic import clip_checkpoint, dino_checkpoint, synthesize_library

pytestmark = pytest.mark.integration

LIBRARY = "evaluated"
EVALUATE = dict(concepts="all", prompts="a photo of a <TOK>\na <TOK> in the forest", held_out="held_out",
                samples_per_prompt=1, seed=2024, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
                scale=0.8, size=64)


def write_held_out(comfy, concept: str, seed: int, count: int = 3) -> None:
    """`count` random images in input/held_out/<concept> (the folder name in any case)."""
    folder = comfy.workspace / "input" / "held_out" / concept
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(count):
        Image.fromarray(rng.integers(0, 256, (80, 72, 3), dtype=np.uint8)).save(folder / f"{number}.png")


@pytest.fixture(scope="module")
def library(comfy):
    """dog, duck and cat (random LoRAs that visibly act); held-out images for dog and duck only (duck's folder named
    in another case: concepts match in any case)."""
    synthesize_library(comfy.workspace / "models" / "checkpoints" / CKPT, library_root(comfy, LIBRARY),
                       ["dog", "duck", "cat"], lora_std=0.2)
    write_held_out(comfy, "dog", 1)
    write_held_out(comfy, "Duck", 2)
    return library_root(comfy, LIBRARY)


def evaluation_graph(library_name: str = LIBRARY, dino: bool = False, sdxl: str | None = None,
                     projection_dim: int = 32, paper: tuple[str, str] | None = None, **overrides):
    """Evaluate Concept Library on the mini checkpoint (or `sdxl`) with small random CLIP vision models, or with
    the `paper` backbones (CLIP and DINO files in models/cidm_eval) through Load Evaluation Backbone."""
    graph = Graph()
    checkpoint = graph.add("CIDMTest_SmallTowerCheckpointLoader", ckpt_name=sdxl) if sdxl \
        else graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library_name)
    if paper:
        vision, dino_model = (graph.add("CIDM_LoadEvaluationBackbone", backbone=name) for name in paper)
        extra = {"dino": dino_model[0]}
    else:
        vision = graph.add("CIDMTest_SmallClipVision", clip_name="", seed=0, projection_dim=projection_dim)
        extra = {"dino": graph.add("CIDMTest_SmallClipVision", clip_name="", seed=1, projection_dim=16)[0]} \
            if dino else {}
    node = graph.add("CIDM_EvaluateConceptLibrary", model=checkpoint[0], clip=checkpoint[1], vae=checkpoint[2],
                     library=lib[0], clip_vision=vision[0], **{**EVALUATE, **overrides}, **extra)
    graph.add("PreviewImage", images=node[1])
    return graph, node


def history(root) -> list[dict]:
    return json.loads((root / "evaluations.json").read_text())["evaluations"]


def test_a_three_task_library_is_scored_a_concept_without_references_skipped_and_a_fourth_task_grows_the_history(
        comfy, library):
    graph, node = evaluation_graph(dino=True)
    entry = comfy.run(graph.prompt())
    (report,) = entry["outputs"][node.id]["text"]
    assert entry["outputs"][node.id]["images"], "the forgetting plot is previewed"
    preview = next(outputs for key, outputs in entry["outputs"].items() if key != node.id)
    assert len(preview["images"]) == 3 * 2, "every concept's samples come out, the skipped one's too"
    assert "skipped cat: no reference images" in report and "held_out/cat" in report
    assert "not comparable to the paper" in report and "TA: not computed" in report
    first = history(library)
    assert len(first) == 1 and first[0]["tasks"] == 3 and set(first[0]["scores"]) == {"dog", "duck"}
    assert "cat" in first[0]["skipped"]
    for scores in first[0]["scores"].values():
        assert -1 <= scores["IA"] <= 1 and -1 <= scores["DINO"] <= 1 and scores["TA"] is None
        assert scores["samples"] == 2 and scores["references"].startswith("3 held-out")
    assert first[0]["scores"]["dog"]["IA"] != first[0]["scores"]["duck"]["IA"]
    assert first[0]["key"]["revision"] == json.loads((library / "manifest.json").read_text())["revision"]

    synthesize_library(comfy.workspace / "models" / "checkpoints" / CKPT, library, ["bear"], lora_std=0.2, seed=7)
    write_held_out(comfy, "bear", 3)
    graph, node = evaluation_graph(dino=True)
    (report,) = comfy.run(graph.prompt())["outputs"][node.id]["text"]
    grown = history(library)
    assert len(grown) == 2 and grown[0] == first[0] and grown[1]["tasks"] == 4
    assert set(grown[1]["scores"]) == {"dog", "duck", "bear"}
    assert "| IA | after 3 tasks | after 4 tasks | forgetting |" in report
    assert "| bear | – |" in report
    # unchanged sampling of an unchanged concept: the same images, so the same score and no forgetting
    assert grown[1]["scores"]["dog"]["IA"] == pytest.approx(first[0]["scores"]["dog"]["IA"], abs=1e-6)

    graph, node = evaluation_graph(seed=7, dino=True)  # another seed: another series, kept apart
    (report,) = comfy.run(graph.prompt())["outputs"][node.id]["text"]
    assert len(history(library)) == 3 and "| IA | after 4 tasks | forgetting |" in report
    # held-out images for cat arrive: the same prompt runs again (not served from ComfyUI's cache), and cat joins
    # the same entry while the others keep their scores
    write_held_out(comfy, "cat", 5)
    comfy.run(graph.prompt())
    latest = history(library)
    assert len(latest) == 3 and set(latest[-1]["scores"]) == {"dog", "duck", "bear", "cat"}
    assert "cat" not in latest[-1]["skipped"]


def test_an_interrupt_leaves_the_library_and_its_history_readable(comfy, library):
    before = (library / "evaluations.json").read_bytes() if (library / "evaluations.json").exists() else None
    manifest = (library / "manifest.json").read_bytes()
    graph, _ = evaluation_graph(steps=30, seed=11, samples_per_prompt=2,
                                prompts="a <TOK>\na <TOK> at night\na <TOK> in snow\na <TOK> on grass")
    prompt_id = comfy.submit(graph.prompt())
    comfy.wait_for_log("CIDM evaluate 'dog': prompt 1/4")
    comfy.interrupt()
    with pytest.raises(WorkflowFailed):
        comfy.wait(prompt_id)
    assert (library / "manifest.json").read_bytes() == manifest
    after = (library / "evaluations.json").read_bytes() if (library / "evaluations.json").exists() else None
    assert after == before
    if after is not None:
        assert json.loads(after)["format"] == "cidm-evaluation-history"
    assert not [p.name for p in library.iterdir() if p.name.endswith(".tmp")]


def test_bad_prompts_and_a_missing_held_out_folder_are_refused_by_name(comfy, library):
    graph, _ = evaluation_graph(prompts="a photo of a dog")
    assert "prompts" in comfy.run_expecting_error(graph.prompt())
    graph, _ = evaluation_graph(held_out="no_such_folder")
    error = comfy.run_expecting_error(graph.prompt())
    assert "held_out" in error and "no_such_folder" in error


def test_sdxl_scores_text_alignment_against_clip_g_where_the_vision_width_matches(comfy, sdxl_checkpoint):
    """On SDXL the pooled CLIP-G output is projected (1280 wide), so a vision model of that width gives TA; one of
    another width does not, and says why."""
    root = library_root(comfy, "evaluated-sdxl")
    synthesize_library(comfy.workspace / "models" / "checkpoints" / sdxl_checkpoint, root, ["dog", "duck"],
                       lora_std=0.2)
    write_held_out(comfy, "duck", 4)
    graph, node = evaluation_graph("evaluated-sdxl", sdxl=sdxl_checkpoint, projection_dim=1280, concepts="duck")
    (report,) = comfy.run(graph.prompt())["outputs"][node.id]["text"]
    (entry,) = history(root)
    scores = entry["scores"]["duck"]
    assert set(entry["scores"]) == {"duck"} and entry["key"]["sampler"]["size"] == 64
    # random towers: the cosines may all be negative, so TA may be clipped to 0 (tests/unit/test_evaluation.py)
    assert scores["TA"] is not None and 0 <= scores["TA"] <= 2.5 and "TA: not computed" not in report
    assert "| TA | after 2 tasks | forgetting |" in report
    graph, node = evaluation_graph("evaluated-sdxl", sdxl=sdxl_checkpoint, projection_dim=32, concepts="duck")
    (report,) = comfy.run(graph.prompt())["outputs"][node.id]["text"]
    assert "TA: not computed" in report and history(root)[-1]["scores"]["duck"]["TA"] is None


def test_the_papers_backbones_load_from_models_cidm_eval_and_give_ta_on_sd15(comfy, library):
    """Random weights in the layouts of openai/clip-vit-base-patch32 and DINO's dino_vits16, made at test time: the
    report says the backbones are the paper's, TA comes from the CLIP's own text tower (SD1.5 has none in the
    vision space), and a file of neither layout is refused naming the input."""
    folder = comfy.workspace / "models" / "cidm_eval"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(clip_checkpoint(seed=1), folder / "clip-vit-base-patch32.safetensors")
    save_file(dino_checkpoint(seed=2), folder / "dino_vits16.safetensors")
    save_file({"weight": torch.zeros(3)}, folder / "other.safetensors")
    graph, node = evaluation_graph(paper=("clip-vit-base-patch32.safetensors", "dino_vits16.safetensors"),
                                   concepts="dog", seed=5)
    (report,) = comfy.run(graph.prompt())["outputs"][node.id]["text"]
    assert "backbones as in the paper (CLIP ViT-B/32 and DINO ViT-S/16)" in report
    assert "TA: not computed" not in report and "| TA | after" in report and "| DINO | after" in report
    scores = history(library)[-1]["scores"]["dog"]
    assert scores["TA"] is not None and 0 <= scores["TA"] <= 2.5 and -1 <= scores["DINO"] <= 1
    assert re.fullmatch(r"CLIP ViT-B/32 #\w{10} \+ DINO ViT-S/16 #\w{10}", history(library)[-1]["key"]["backbone"])
    graph, _ = evaluation_graph(paper=("other.safetensors", "dino_vits16.safetensors"), concepts="dog")
    error = comfy.run_expecting_error(graph.prompt())
    assert "backbone" in error and "other.safetensors is neither a CLIP checkpoint" in error
