"""UI-format workflows (what the ComfyUI frontend saves and the Templates dialog opens) to API-format prompts
(what `/prompt` runs), and the CPU-sized overrides the demo and the tests apply at run time.

No ComfyUI import: the widget order comes from the server's `/object_info`. The rules follow the frontend that
ComfyUI v0.3.75 pins (comfyui-frontend-package 1.32.9, `graphToPrompt` and the widget constructors):
- a node's `widgets_values` lists one value per widget input, in the order of `/object_info`'s required then
  optional inputs, whether or not a link now feeds that input;
- an INT or COMBO input with a "control after generate" widget (its spec says `control_after_generate`, or it
  is an INT named `seed`/`noise_seed` and the spec does not say false) stores one more value right after it;
- a link `[id, origin node, origin slot, target node, target slot, type]` feeds the input of the target node's
  `inputs[target slot]`;
- frontend-only nodes (Note, MarkdownNote) are not part of the prompt; muted (mode 2) and bypassed (mode 4)
  nodes are refused here rather than guessed.
"""

from __future__ import annotations

import copy

VIRTUAL_NODES = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


class WorkflowFormatError(ValueError):
    pass


def ordered_inputs(node_info: dict) -> list[tuple[str, list]]:
    spec = node_info["input"]
    return [*spec.get("required", {}).items(), *spec.get("optional", {}).items()]


def is_widget(spec: list) -> bool:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput", False)


def has_control_widget(name: str, spec: list) -> bool:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    control = options.get("control_after_generate")
    if control is not None:
        return bool(control)
    return kind == "INT" and name in ("seed", "noise_seed")


def widget_layout(node_info: dict) -> list[tuple[str, bool]]:
    """(input name, followed by a control value) for every widget, in `widgets_values` order."""
    return [(name, has_control_widget(name, spec)) for name, spec in ordered_inputs(node_info) if is_widget(spec)]


def to_api(workflow: dict, object_info: dict) -> dict:
    """The API prompt of a UI-format workflow. Raises WorkflowFormatError naming the node on any mismatch."""
    if "nodes" not in workflow or "version" not in workflow:
        raise WorkflowFormatError("not a UI-format workflow (no 'nodes' or 'version')")
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind, label = node["type"], f"node {node['id']} ({node['type']})"
        if kind in VIRTUAL_NODES:
            continue
        if kind not in object_info:
            raise WorkflowFormatError(f"{label}: the server has no such node")
        if node.get("mode", 0) != 0:
            raise WorkflowFormatError(f"{label}: muted or bypassed nodes are not supported")
        layout = widget_layout(object_info[kind])
        values = list(node.get("widgets_values", []))
        expected = sum(2 if control else 1 for _, control in layout)
        if len(values) != expected:
            raise WorkflowFormatError(f"{label}: {len(values)} widget values for {expected} widget slots "
                                      f"({', '.join(name for name, _ in layout)}); re-save the workflow")
        inputs = {}
        for name, control in layout:
            inputs[name] = values.pop(0)
            if control:
                values.pop(0)
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            link = links[slot["link"]]
            inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs,
                                   "_meta": {"title": node.get("title") or object_info[kind]["display_name"]}}
    return prompt


def notes(workflow: dict) -> list[str]:
    return [node["widgets_values"][0] for node in workflow["nodes"] if node["type"] in VIRTUAL_NODES]


PIXEL_BOX_INPUTS = ("x", "y", "width", "height", "canvas_width", "canvas_height")


def with_overrides(prompt: dict, overrides: dict[str, dict], scale_sizes: int = 1) -> dict:
    """A copy of an API prompt with `overrides[class_type][input] = value` applied to every node of that class
    (only to inputs the node has as values, never to links), and integer width/height inputs divided by
    `scale_sizes` (rounded to multiples of 8, at least 64). A node whose `units` are "pixels" (a Region Condition
    box) has its box and canvas divided by `scale_sizes` exactly, so the box stays where it was on the canvas. An
    override `"class_type": other` swaps the node's class for `other`, which must have the same inputs and outputs
    (a test checkpoint's loader for the stock one)."""
    changed = copy.deepcopy(prompt)
    for node in changed.values():
        inputs = node["inputs"]
        kind = node["class_type"]
        for name, value in overrides.get(kind, {}).items():
            if name == "class_type":
                node["class_type"] = value
            elif name in inputs and not isinstance(inputs[name], list):
                inputs[name] = value
        if scale_sizes > 1 and inputs.get("units") == "pixels":
            for name in PIXEL_BOX_INPUTS:
                value = inputs.get(name)
                if isinstance(value, (int, float)):  # an integer canvas stays an integer
                    inputs[name] = value // scale_sizes if isinstance(value, int) else value / scale_sizes
        elif scale_sizes > 1:
            for name in ("width", "height"):
                if isinstance(inputs.get(name), int):
                    inputs[name] = max(64, inputs[name] // scale_sizes // 8 * 8)
    return changed


def cpu_overrides(checkpoint: str, training_steps: int = 2, sampling_steps: int = 2,
                  resolution: int = 64, loader: str | None = None) -> dict[str, dict]:
    """The run-time settings that make the shipped workflows run in CPU minutes on a test checkpoint, loaded by
    `loader` in place of CheckpointLoaderSimple when given (SDXL test checkpoints:
    CIDMTest_SmallTowerCheckpointLoader, for their small text towers)."""
    sampler = {"steps": sampling_steps}
    swap = {"class_type": loader} if loader else {}
    return {"CheckpointLoaderSimple": {"ckpt_name": checkpoint, **swap},
            "CIDM_TrainConceptIncrement": {"steps": training_steps},
            "CIDM_ConceptTrainingOptions": {"resolution": resolution, "save_every": 0, "preview_every": 0},
            "KSampler": sampler, "CIDM_ContextControlledKSampler": sampler,
            "CIDM_EvaluateConceptLibrary": {**sampler, "size": resolution, "samples_per_prompt": 1}}
