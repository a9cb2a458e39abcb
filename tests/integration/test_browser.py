"""The shipped workflows in the real frontend (comfyui-frontend-package pinned by ComfyUI v0.3.75), in Debian's
chromium driven by puppeteer-core (tests/browser/check_workflows.mjs; scripts/setup_browser.sh installs both).

Every workflow is opened from the Templates dialog as a user would; the frontend must create every node and its own
graphToPrompt must equal our conversion of the file. Then the continual customization workflow is queued from the
page with CPU-sized widget values (set in the page, never stored) and the progress bar must move. Screenshots go
to tests/browser/screenshots/ (git-ignored; README's copies are in docs/screenshots/)."""

import json
import shutil
import subprocess

import pytest

from comfy_host import PACK_FOLDER_NAME, REPO, WORKFLOWS, shipped_workflow, stage
from pack_workflows import CKPT
from workflow_format import cpu_overrides, to_api

pytestmark = pytest.mark.integration

BROWSER_DIR = REPO / "tests" / "browser"
SCREENSHOTS = BROWSER_DIR / "screenshots"
QUEUED = "continual_customization"
# The frontend asks the comfy.org registry about every node type it shows; the network is closed (and the page's
# CSP refuses it), so these lookups fail for core and pack nodes alike. They are the frontend's, not the pack's.
REGISTRY = "https://api.comfy.org/"


def queued_widgets() -> dict[str, dict]:
    """Widget values the page sets before queueing: CPU-sized, and a library of its own."""
    overrides = cpu_overrides(CKPT, training_steps=4)
    overrides["CIDM_LoadConceptLibrary"] = {"library": "browser-concepts"}
    overrides["EmptyLatentImage"] = {"width": 64, "height": 64}
    return {str(node["id"]): overrides[node["type"]] for node in shipped_workflow(QUEUED)["nodes"]
            if node["type"] in overrides}


def from_the_pack(text: str) -> bool:
    return REGISTRY not in text and ("cidm" in text.lower() or PACK_FOLDER_NAME in text)


@pytest.fixture(scope="module")
def browser_report(comfy):
    chromium = shutil.which("chromium")
    if not chromium or not (BROWSER_DIR / "node_modules" / "puppeteer-core").is_dir():
        pytest.fail("chromium or puppeteer-core is missing: run scripts/setup_browser.sh (scripts/test.sh does)")
    for concept in ("dog", "duck_toy", "cat"):
        stage(comfy.workspace, concept)
    if SCREENSHOTS.exists():
        shutil.rmtree(SCREENSHOTS)
    SCREENSHOTS.mkdir(parents=True)
    names = sorted(path.stem for path in WORKFLOWS.glob("*.json"))
    config = {"url": comfy.url + "/", "module": PACK_FOLDER_NAME, "workflows": names, "out": str(SCREENSHOTS),
              "chromium": chromium, "queue": {"workflow": QUEUED, "widgets": queued_widgets(), "timeout_s": 1500}}
    config_path = SCREENSHOTS / "config.json"
    config_path.write_text(json.dumps(config))
    subprocess.run(["node", str(BROWSER_DIR / "check_workflows.mjs"), str(config_path)], cwd=BROWSER_DIR,
                   check=True, timeout=2400)
    report = json.loads((SCREENSHOTS / "report.json").read_text())
    assert not report.get("fatal"), report["fatal"]
    return names, report


def test_every_workflow_opens_from_templates_with_no_missing_node(comfy, browser_report):
    names, report = browser_report
    info = comfy.object_info()
    for name in names:
        graph = report["workflows"][name]
        stored = shipped_workflow(name)
        assert [node["type"] for node in graph["nodes"] if node["missing"]] == [], name
        assert sorted(node["id"] for node in graph["nodes"]) == sorted(node["id"] for node in stored["nodes"])
        assert not any("missing" in dialog.lower() for dialog in graph["dialogs"]), graph["dialogs"]
        frontend = {node_id: (node["class_type"], node["inputs"]) for node_id, node in graph["prompt"].items()}
        ours = {node_id: (node["class_type"], node["inputs"]) for node_id, node in to_api(stored, info).items()}
        assert frontend == ours, name


def test_node_titles_fit_their_nodes(browser_report):
    names, report = browser_report
    # LiteGraph draws the title after the collapse dot (one title height, 30 px) and cuts what passes the edge.
    cut = [(name, node["title"]) for name in names for node in report["workflows"][name]["nodes"]
           if 30 + node["titleWidth"] + 10 > node["width"]]
    assert cut == []


# Free canvas between two nodes: the frontend draws a node's source badge ("comfyui-cidm") in about 24 px above its
# title bar, so nodes closer than this look stacked on each other.
CLEARANCE = 30


def crowded(boxes: dict[int, list[float]], clearance: float) -> list[tuple[int, int]]:
    """The pairs of node ids whose boxes [x, y, width, height] are less than `clearance` apart on both axes, that is,
    that overlap once each box grows by `clearance` on its right and bottom."""
    def near(a, b):
        return (min(a[0] + a[2], b[0] + b[2]) + clearance > max(a[0], b[0])
                and min(a[1] + a[3], b[1] + b[3]) + clearance > max(a[1], b[1]))
    ids = sorted(boxes)
    return [(i, j) for n, i in enumerate(ids) for j in ids[n + 1:] if near(boxes[i], boxes[j])]


def test_crowded_finds_the_nodes_closer_than_the_clearance_only():
    boxes = {1: [0, 0, 10, 10], 2: [15, 0, 10, 10], 3: [0, 20, 10, 10], 4: [40, 40, 1, 1]}
    assert crowded(boxes, 0) == [] and crowded(boxes, 6) == [(1, 2)] and crowded(boxes, 11) == [(1, 2), (1, 3), (2, 3)]


def test_nodes_keep_clear_of_each_other_as_the_frontend_lays_them_out(browser_report):
    """Each node's box includes its title bar (above `pos`) and the size the frontend gives it, which grows a node
    whose widgets need more room than the workflow file says."""
    names, report = browser_report
    found = {name: crowded({node["id"]: node["box"] for node in report["workflows"][name]["nodes"]}, CLEARANCE)
             for name in names}
    assert {name: pairs for name, pairs in found.items() if pairs} == {}


def test_console_shows_no_error_from_the_pack(browser_report):
    _, report = browser_report
    errors = [entry for entry in report["console"] if entry["type"] in ("error", "pageerror")
              and (from_the_pack(entry["text"]) or from_the_pack(entry["url"]))]
    failed = [request for request in report["failedRequests"] if from_the_pack(request["url"])]
    assert errors == [] and failed == []


def test_queued_workflow_moves_the_progress_bar(browser_report):
    _, report = browser_report
    queue = report["queue"]
    assert queue["done"] == "success", queue["errors"]
    trainers = {str(node["id"]) for node in shipped_workflow(QUEUED)["nodes"]
                if node["type"] == "CIDM_TrainConceptIncrement"}
    seen = {}
    for event in queue["nodeProgress"]:
        seen.setdefault(str(event["id"]), set()).add(round(event["progress"], 3))
    moving = [node for node, values in seen.items() if node in trainers and len(values) >= 2]
    assert moving, seen
    assert (SCREENSHOTS / "queued-progress.png").is_file() and (SCREENSHOTS / "templates-dialog.png").is_file()


def test_inspect_shows_its_table_on_the_node(browser_report):
    _, report = browser_report
    inspect = report["queue"]["inspect"]
    assert inspect and inspect["table"], inspect
    assert "layer" in inspect["table"] and all(concept in inspect["table"] for concept in ("dog", "duck", "cat"))
    assert (SCREENSHOTS / "inspect-weights.png").is_file()
    # The table is shown, not saved: the node saves and sends what it did before the run.
    stored = next(node for node in shipped_workflow(QUEUED)["nodes"] if node["id"] == inspect["id"])
    assert len(inspect["saved"]) == len(stored["widgets_values"])
    assert "weights_table" not in inspect["prompt"]
