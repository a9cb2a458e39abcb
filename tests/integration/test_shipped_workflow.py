"""The example workflow that users drop onto the canvas (and that the demo runs) works on the pinned host."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_host import stage
from pack_workflows import library_root

WORKFLOW = Path(__file__).resolve().parents[2] / "workflows" / "continual_concepts_api.json"

pytestmark = pytest.mark.integration


def test_example_workflow_trains_aggregates_and_composes(comfy):
    workflow = json.loads(WORKFLOW.read_text())
    folders = {node["inputs"]["folder"] for node in workflow.values()
               if node["class_type"] == "CIDM_TrainConceptIncrement"}
    assert folders == {stage(comfy.workspace, "dog"), stage(comfy.workspace, "duck_toy")}
    entry = comfy.run(workflow, timeout=1200)

    library = workflow["2"]["inputs"]["library"]
    manifest = json.loads((library_root(comfy, library) / "manifest.json").read_text())
    assert [task["concept"] for task in manifest["tasks"]] == ["dog", "duck"]
    composition = next(p for p in comfy.output_files(entry) if p.name.startswith("composition"))
    latent = workflow["12"]["inputs"]
    assert Image.open(composition).size == (latent["width"], latent["height"])
    assert np.asarray(Image.open(composition)).std() > 0
    table = entry["outputs"]["16"]["text"][0]  # Inspect Aggregation Weights
    assert "dog" in table and "duck" in table
    steps, preview_every = workflow["3"]["inputs"]["steps"], workflow["19"]["inputs"]["preview_every"]
    assert len(entry["outputs"]["3"]["images"]) == steps // preview_every
