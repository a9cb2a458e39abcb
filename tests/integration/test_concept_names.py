"""Names as users write them, in the real server (issue 29, kinds 3 and 5): a concept named with a space is named
in prompts, markers and library names ignore case, a marker may sit past the first 75 tokens, and the files an OS
leaves in a training folder are skipped."""

import json

import numpy as np
import pytest

from comfy_host import Graph, draw_concept, sample_image
from pack_workflows import CKPT, library_root, pixels, train_graph

pytestmark = pytest.mark.integration

LIBRARY = "Names"
LONG = "a photo of " + "a very " * 40 + "good <my dog> on the grass"  # the marker sits past token 75


@pytest.fixture(scope="module")
def library(comfy):
    """`my dog`, one step, from a folder that also holds what Windows Explorer leaves in it."""
    folder = comfy.workspace / "input" / "my_dog_pictures"
    folder.mkdir(parents=True)
    draw_concept(folder, "dog", count=1)
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 thumbnail cache")
    (folder / "desktop.ini").write_text("[.ShellClassInfo]\r\nIconResource=C:\\dog.ico\r\n")
    comfy.run(train_graph(LIBRARY, "my dog", "my_dog_pictures", steps=1).prompt())
    return LIBRARY


def named_weight(comfy, library_name: str, text: str) -> float:
    """The mean weight Inspect Aggregation Weights (`named`) gives the task `my dog` for `text`."""
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library_name)
    inspect = graph.add("CIDM_InspectAggregationWeights", clip=checkpoint[1], library=lib[0], text=text, mode="named")
    (table,) = comfy.run(graph.prompt())["outputs"][inspect.id]["text"]
    assert "1:my dog" in table
    return float(next(line for line in table.splitlines() if line.strip().startswith("mean |")).split("|")[1])


def test_a_concept_named_with_a_space_is_named_by_its_marker(comfy, library):
    manifest = json.loads((library_root(comfy, library) / "manifest.json").read_text())
    assert manifest["tasks"][0]["tokens"] == ["<my_dog#1>", "<my_dog#2>"]
    assert manifest["tasks"][0]["hyperparameters"]["images"] == 1  # Thumbs.db and desktop.ini were skipped
    assert named_weight(comfy, library, "a photo of <my dog>") == 1.0
    assert named_weight(comfy, library, "a photo of a dog") == 0.0


def test_markers_and_library_names_ignore_case(comfy, library):
    assert named_weight(comfy, "NAMES", "a photo of <My Dog>") == 1.0
    assert named_weight(comfy, "names", "a photo of <MY_DOG#2>") == 1.0
    assert sorted(p.name for p in library_root(comfy, "").iterdir() if p.name.lower() == "names") == [LIBRARY]


def test_a_marker_past_the_first_75_tokens_names_its_concept(comfy, library):
    assert named_weight(comfy, library, LONG) == 1.0
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name=CKPT)
    lib = graph.add("CIDM_LoadConceptLibrary", library=library)
    patched = graph.add("CIDM_ElasticAggregateLoRAs", model=checkpoint[0], library=lib[0], tasks="all", scale=1.0,
                        mode="named", weights="", uncond_weights="match cond")
    positive = graph.add("CIDM_TextEncode", clip=checkpoint[1], library=lib[0], text=LONG)
    sample_image(graph, patched[0], checkpoint[1], checkpoint[2], positive_cond=positive[0], prefix="long_prompt")
    image = pixels(comfy, comfy.run(graph.prompt()))
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
