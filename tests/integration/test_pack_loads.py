"""The pack inside a real ComfyUI server: registration, a pack node in a sampling workflow, a clean log."""

import pytest

from comfy_host import PACK_FOLDER_NAME, Graph, pack_tracebacks, sample_image
from synthetic import synthesize_library

pytestmark = pytest.mark.integration

PACK_NODES = {
    "CIDM_LoadConceptLibrary": "Load Concept Library",
    "CIDM_TrainConceptIncrement": "Train Concept Increment",
    "CIDM_ConceptTrainingOptions": "Concept Training Options",
    "CIDM_ExportConceptLoRA": "Export Concept LoRA",
    "CIDM_LoadConceptAsLoRA": "Load Concept as LoRA",
    "CIDM_TextEncode": "CIDM Text Encode",
    "CIDM_ElasticAggregateLoRAs": "Elastic Aggregate LoRAs",
    "CIDM_InspectAggregationWeights": "Inspect Aggregation Weights",
    "CIDM_RegionCondition": "Region Condition",
    "CIDM_ContextControlledKSampler": "Context-Controlled KSampler",
    "CIDM_EvaluateConceptLibrary": "Evaluate Concept Library",
    "CIDM_LoadEvaluationBackbone": "Load Evaluation Backbone",
}


def test_nodes_registered_with_categories_and_tooltips(comfy):
    info = comfy.object_info()
    for node_id, display in PACK_NODES.items():
        assert node_id in info, f"{node_id} missing from /object_info"
        node = info[node_id]
        assert node["display_name"] == display
        assert node["category"].startswith("CIDM/")
        assert node["description"]
    train_inputs = info["CIDM_TrainConceptIncrement"]["input"]["required"]
    assert "tooltip" in train_inputs["steps"][1] or "tooltip" in train_inputs["method"][1]
    assert set(train_inputs["method"][1]["options"] if isinstance(train_inputs["method"][1], dict)
               and "options" in train_inputs["method"][1] else train_inputs["method"][0]) \
        >= {"cidm", "cidm-official", "c-lora", "finetune"}


def test_every_input_of_every_pack_node_has_a_tooltip(comfy):
    pack = {node_id: node for node_id, node in comfy.object_info().items()
            if node.get("python_module") == f"custom_nodes.{PACK_FOLDER_NAME}"}
    assert set(PACK_NODES) <= set(pack)
    untold = [f"{node_id}.{name}" for node_id, node in pack.items()
              for section in ("required", "optional") for name, spec in node["input"].get(section, {}).items()
              if len(spec) < 2 or not spec[1].get("tooltip")]
    assert untold == []


def test_pack_node_in_sampling_workflow_writes_png(comfy):
    library_root = comfy.workspace / "models" / "cidm" / "pack-loads"
    synthesize_library(comfy.workspace / "models" / "checkpoints" / "cidm_mini_sd15.safetensors", library_root,
                       ["dog", "cat"])
    graph = Graph()
    checkpoint = graph.add("CheckpointLoaderSimple", ckpt_name="cidm_mini_sd15.safetensors")
    library = graph.add("CIDM_LoadConceptLibrary", library="pack-loads")
    aggregated = graph.add("CIDM_ElasticAggregateLoRAs", model=checkpoint[0], library=library[0], tasks="all",
                           scale=0.8, mode="elastic", weights="", uncond_weights="match cond")
    save = sample_image(graph, aggregated[0], checkpoint[1], checkpoint[2], "a photo of a dog", prefix="pack_loads")
    entry = comfy.run(graph.prompt())
    files = comfy.output_files(entry)
    assert files and files[0].suffix == ".png" and files[0].stat().st_size > 0
    assert entry["outputs"][save.id]["images"]


def test_server_log_has_no_pack_traceback(comfy):
    # Other tests provoke clear input errors on purpose; loading is everything before the server starts serving.
    log = comfy.log().split("To see the GUI go to")[0]
    assert "Import times for custom nodes" in log and "comfyui-cidm" in log
    # Core extras such as nodes_audio fail without torchaudio; only our pack's lines matter here.
    assert not [line for line in log.splitlines() if "IMPORT FAILED" in line and "cidm" in line.lower()]
    assert pack_tracebacks(log) == []
