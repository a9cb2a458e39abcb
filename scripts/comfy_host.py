"""Drives a real ComfyUI server in a subprocess for integration tests.

ComfyUI is never imported here: its top-level modules (`nodes`, `utils`, `server`) would shadow the pack's own.
Everything goes over HTTP on 127.0.0.1, plus the files the server writes into its workspace.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from PIL import Image, ImageDraw

from workflow_format import to_api, with_overrides

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CIDM_CACHE", Path.home() / ".cache" / "cidm-comfyui")).resolve()
COMFY_ROOT = CACHE / "ComfyUI"
CIFC = Path(os.environ.get("CIDM_CIFC", REPO.parent / "shared" / "datasets" / "cifc"))
HOST_PYTHON = CACHE / "venv" / "bin" / "python"
PACK_FOLDER_NAME = "comfyui-cidm"
CHECKPOINT_SCRIPT = REPO / "scripts" / "make_test_checkpoint.py"
WORKFLOWS = REPO / "workflows"
TEST_NODES = REPO / "tests" / "host_nodes"


def host_ready() -> bool:
    return HOST_PYTHON.exists() and (COMFY_ROOT / "main.py").exists()


def ensure_checkpoint(layout: str = "mini", seed: int = 0) -> Path:
    """A generated checkpoint of a make_test_checkpoint.py layout, cached outside the repo under the hash of the
    script that makes it."""
    digest = hashlib.sha256(CHECKPOINT_SCRIPT.read_bytes() + f"{layout}:{seed}".encode()).hexdigest()[:16]
    path = CACHE / "checkpoints" / f"cidm_test_{layout}_{digest}.safetensors"
    if not path.exists():
        env = dict(os.environ, PYTHONPATH=str(COMFY_ROOT))
        subprocess.run([str(HOST_PYTHON), str(CHECKPOINT_SCRIPT), "--out", str(path), "--layout", layout,
                        "--seed", str(seed)], check=True, env=env, cwd=str(CACHE))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WorkflowFailed(AssertionError):
    pass


class ComfyServer:
    """`main.py --cpu` on a temporary base directory with the pack linked into custom_nodes; `env` adds to the
    server's environment. `device="gpu"` leaves out `--cpu` (ComfyUI then picks CUDA); arguments in the
    environment variable CIDM_COMFY_ARGS are appended to the command line (such as `--front-end-root DIR` where
    the frontend package is not installed)."""

    def __init__(self, workspace: Path, checkpoints: dict[str, Path], env: dict[str, str] | None = None,
                 device: str = "cpu"):
        if device not in ("cpu", "gpu"):
            raise ValueError(f"device must be cpu or gpu, not {device!r}")
        self.workspace = workspace
        self.env = env or {}
        self.device = device
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workspace / "server.log"
        for sub in ("models/checkpoints", "models/loras", "custom_nodes", "input", "output"):
            (workspace / sub).mkdir(parents=True, exist_ok=True)
        for name, source in checkpoints.items():
            self.link_checkpoint(name, source)
        pack_link = workspace / "custom_nodes" / PACK_FOLDER_NAME
        if not pack_link.exists():
            pack_link.symlink_to(REPO, target_is_directory=True)
        for test_nodes in sorted(TEST_NODES.iterdir()):  # test-only nodes (UNet call counter, attn2 replace patch)
            link = workspace / "custom_nodes" / test_nodes.name
            if not link.exists():
                link.symlink_to(test_nodes, target_is_directory=True)
        self.process: subprocess.Popen | None = None

    def link_checkpoint(self, name: str, source: Path) -> str:
        """Links `source` into models/checkpoints as `name`; a running server lists it from its next prompt on
        (folder_paths re-reads a folder whose mtime changed). Returns `name`."""
        link = self.workspace / "models" / "checkpoints" / name
        if not link.exists():
            link.symlink_to(source)
        return name

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        command = [str(HOST_PYTHON), str(COMFY_ROOT / "main.py"), *(["--cpu"] if self.device == "cpu" else []),
                   "--base-directory", str(self.workspace), "--listen", "127.0.0.1", "--port", str(self.port),
                   "--disable-auto-launch", "--disable-api-nodes"]
        command += shlex.split(os.environ.get("CIDM_COMFY_ARGS", ""))
        log = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", **self.env)
        self.process = subprocess.Popen(command, cwd=str(self.workspace), stdout=log, stderr=subprocess.STDOUT,
                                        env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not come up in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, timeout: float = 300.0) -> None:
        """Waits until `text` appears in the server log."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if text in self.log():
                return
            time.sleep(0.2)
        raise TimeoutError(f"{text!r} did not appear in the server log")

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=30) as response:
            return json.loads(response.read())

    def post(self, route: str, payload: dict):
        request = urllib.request.Request(self.url + route, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                return json.loads(body) if body else None  # /interrupt answers with an empty body
        except urllib.error.HTTPError as error:
            raise WorkflowFailed(f"POST {route} -> {error.code}: {error.read().decode(errors='replace')}") from None

    def object_info(self, node_type: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node_type}" if node_type else ""))

    def submit(self, prompt: dict, client_id: str | None = None) -> str:
        """Queues a prompt; the server sends its progress messages to the websocket client `client_id`."""
        return self.post("/prompt", {"prompt": prompt, "client_id": client_id or uuid.uuid4().hex})["prompt_id"]

    def listen(self, stamp=time.monotonic) -> "EventListener":
        return EventListener(self.url.replace("http", "ws", 1), stamp)

    def interrupt(self) -> None:
        self.post("/interrupt", {})

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """The /history entry once the prompt has finished (raises WorkflowFailed on an execution error)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"].get("status_str") == "error":
                    raise WorkflowFailed(self.describe_error(entry))
                return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            time.sleep(0.25)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        return self.wait(self.submit(prompt), timeout)

    def run_expecting_error(self, prompt: dict, timeout: float = 600.0) -> str:
        """Runs a prompt that must fail; returns the error message the user would see."""
        try:
            self.run(prompt, timeout)
        except WorkflowFailed as failure:
            return str(failure)
        raise AssertionError("the workflow was expected to fail but succeeded")

    @staticmethod
    def describe_error(entry: dict) -> str:
        for kind, data in entry["status"].get("messages", []):
            if kind == "execution_error":
                return f"{data.get('node_type')}: {data.get('exception_type')}: {data.get('exception_message')}"
        return json.dumps(entry["status"])

    def output_files(self, entry: dict) -> list[Path]:
        files = []
        for node_output in entry.get("outputs", {}).values():
            for item in node_output.get("images", []):
                folder = self.workspace / item.get("type", "output") / item.get("subfolder", "")
                files.append(folder / item["filename"])
        return files


class EventListener:
    """`with server.listen() as events:` records what the server sends to one websocket client, from a background
    thread, each message with `stamp()` taken on arrival. Prompts must be queued with `events.client_id`."""

    TEXT_EVENT = 3  # BinaryEventTypes.TEXT: a node's progress text

    def __init__(self, ws_url: str, stamp):
        self.client_id = uuid.uuid4().hex
        self.url = f"{ws_url}/ws?clientId={self.client_id}"
        self.stamp = stamp
        self.messages: list[tuple[str, object, object]] = []  # (type, data, stamp); binary: ("binary", (kind, bytes))
        self._connected = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._socket = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._listen(),), daemon=True)

    def __enter__(self) -> "EventListener":
        self._thread.start()
        if not self._connected.wait(30):
            raise RuntimeError(f"could not open {self.url}")
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._socket.close()))
        self._thread.join(10)

    async def _listen(self) -> None:
        import aiohttp  # ComfyUI's own dependency: present in the host venv that runs tests and benchmarks
        async with aiohttp.ClientSession() as session, session.ws_connect(self.url, max_msg_size=0) as socket:
            self._socket = socket
            self._connected.set()
            async for message in socket:
                if message.type == aiohttp.WSMsgType.TEXT:
                    event = json.loads(message.data)
                    self.messages.append((event["type"], event["data"], self.stamp()))
                elif message.type == aiohttp.WSMsgType.BINARY:
                    kind = int.from_bytes(message.data[:4], "big")
                    self.messages.append(("binary", (kind, message.data[4:]), self.stamp()))

    def wait_finished(self, prompt_id: str, timeout: float = 30.0) -> None:
        """Waits for the last message of a prompt ("executing" with no node), so that every earlier message of
        it has arrived too (the history can be complete before the socket has delivered them)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id
                   for kind, data, _ in list(self.messages)):
                return
            time.sleep(0.05)
        raise TimeoutError(f"no end-of-prompt message for {prompt_id} within {timeout}s")

    def progress_texts(self, node_id: str) -> list[str]:
        """The progress texts a node showed (binary TEXT events: node id length, node id, text)."""
        texts = []
        for kind, data, _ in list(self.messages):
            if kind == "binary" and data[0] == self.TEXT_EVENT:
                length = int.from_bytes(data[1][:4], "big")
                if data[1][4:4 + length].decode() == node_id:
                    texts.append(data[1][4 + length:].decode())
        return texts


class Graph:
    """Builds an API-format prompt: `ref = graph.add("KSampler", seed=1, model=other[0])`."""

    def __init__(self):
        self.nodes: dict[str, dict] = {}
        self._ids = itertools.count(1)

    def add(self, class_type: str, **inputs) -> "NodeRef":
        node_id = str(next(self._ids))
        self.nodes[node_id] = {"class_type": class_type,
                               "inputs": {k: (v.link if isinstance(v, Output) else v) for k, v in inputs.items()}}
        return NodeRef(node_id)

    def prompt(self) -> dict:
        return json.loads(json.dumps(self.nodes))


class Output:
    def __init__(self, node_id: str, index: int):
        self.link = [node_id, index]


class NodeRef:
    def __init__(self, node_id: str):
        self.id = node_id

    def __getitem__(self, index: int) -> Output:
        return Output(self.id, index)


def sample_image(graph: Graph, model, clip, vae, positive: str = "a photo", negative: str = "",
                 seed: int = 1, steps: int = 2, size: int = 64, prefix: str = "cidm_test",
                 positive_cond=None, negative_cond=None):
    """Appends CLIPTextEncode → KSampler → VAEDecode → SaveImage; returns the SaveImage node."""
    positive_cond = positive_cond or graph.add("CLIPTextEncode", text=positive, clip=clip)[0]
    negative_cond = negative_cond or graph.add("CLIPTextEncode", text=negative, clip=clip)[0]
    latent = graph.add("EmptyLatentImage", width=size, height=size, batch_size=1)
    sampled = graph.add("KSampler", model=model, seed=seed, steps=steps, cfg=5.0, sampler_name="euler",
                        scheduler="normal", positive=positive_cond, negative=negative_cond,
                        latent_image=latent[0], denoise=1.0)
    decoded = graph.add("VAEDecode", samples=sampled[0], vae=vae)
    return graph.add("SaveImage", images=decoded[0], filename_prefix=prefix)


def with_hook_lora(graph: Graph, conditioning, lora_name: str, keyframed: bool):
    """Appends CreateHookLora (model only) → ConditioningSetProperties: `conditioning` with a ComfyUI weight hook of
    `lora_name`, on for the whole run, or (`keyframed`) off for the first half of the steps and on after; returns
    the hooked conditioning."""
    hooks = graph.add("CreateHookLora", lora_name=lora_name, strength_model=1.0, strength_clip=0.0)[0]
    if keyframed:
        off = graph.add("CreateHookKeyframe", strength_mult=0.0, start_percent=0.0)[0]
        on = graph.add("CreateHookKeyframe", strength_mult=1.0, start_percent=0.5, prev_hook_kf=off)[0]
        hooks = graph.add("SetHookKeyframes", hooks=hooks, hook_kf=on)[0]
    return graph.add("ConditioningSetProperties", cond_NEW=conditioning, strength=1.0, set_cond_area="default",
                     hooks=hooks)[0]


def stage(workspace: Path, concept: str, subfolder: str | None = None) -> str:
    """Copies a CIFC concept into the server's input folder; without the dataset, draws a stand-in concept."""
    target = workspace / "input" / "cifc" / (subfolder or concept)
    if not target.exists():
        target.mkdir(parents=True)
        if (CIFC / "images" / concept).is_dir():
            for folder in ("images", "caption"):
                for file in (CIFC / folder / concept).iterdir():
                    shutil.copy2(file, target / file.name)
        else:
            draw_concept(target, concept)
    return f"cifc/{subfolder or concept}"


def shipped_workflow(name: str) -> dict:
    """A UI-format workflow of workflows/ as stored (what the Templates dialog opens)."""
    return json.loads((WORKFLOWS / f"{name}.json").read_text())


def shipped_prompt(server: ComfyServer, name: str, overrides: dict[str, dict], scale_sizes: int = 1) -> dict:
    """A shipped workflow converted to API format with run-time overrides (never stored), after staging every
    CIFC folder its training nodes read (`cifc/<concept>`) into the server's input directory."""
    prompt = with_overrides(to_api(shipped_workflow(name), server.object_info()), overrides, scale_sizes)
    for node in prompt.values():
        folder = node["inputs"].get("folder")
        if node["class_type"] == "CIDM_TrainConceptIncrement" and isinstance(folder, str) and \
                folder.startswith("cifc/"):
            stage(server.workspace, folder.removeprefix("cifc/"))
    return prompt


def draw_concept(folder: Path, concept: str, count: int = 4) -> None:
    """A distinctive coloured shape on varied backgrounds, with captions that name the concept."""
    rng = random.Random(concept)
    colour = tuple(rng.randrange(256) for _ in range(3))
    for index in range(count):
        image = Image.new("RGB", (96, 80), tuple(rng.randrange(256) for _ in range(3)))
        left, top = rng.randrange(10, 40), rng.randrange(10, 30)
        ImageDraw.Draw(image).ellipse((left, top, left + 40, top + 40), fill=colour)
        image.save(folder / f"{index:02d}.png")
        (folder / f"{index:02d}.txt").write_text(f"a photo of a {concept} on a plain background")


def pack_tracebacks(log: str) -> list[str]:
    """Traceback blocks in a server log whose frames are in the pack's files."""
    found = []
    for block in log.split("Traceback (most recent call last):")[1:]:
        lines = block.splitlines()[1:]
        frames = []
        for line in lines:
            frames.append(line)
            if not line.startswith(" "):  # the exception line ends the traceback
                break
        text = "\n".join(frames)
        if PACK_FOLDER_NAME in text or str(REPO) in text:
            found.append(text)
    return found

if __name__ == "__main__":
    print(ensure_checkpoint(sys.argv[1] if len(sys.argv) > 1 else "mini"))
