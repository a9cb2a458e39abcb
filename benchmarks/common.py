"""What both benchmarks share: a real ComfyUI server in a scratch workspace, and per-step times of a measured node.

ComfyUI is never imported here; prompts go over HTTP and times come from the server's own /history timestamps.
A prompt's execution time is fixed overhead (uncached upstream nodes, model loading and patching, VAE work,
file writes) plus steps × per-step time, so (time with 2N steps − time with N steps) / N is the per-step time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests"), str(REPO)]

from comfy_host import ComfyServer, Graph, ensure_checkpoint  # noqa: E402

LAYOUTS = ("mini", "sd15-blocks", "full")
_unique = itertools.count(1)


def unique() -> int:
    """A fresh number per run: a prompt whose inputs all match the previous one is answered from ComfyUI's cache
    without executing, so every measured run changes a seed or a name."""
    return next(_unique)


def common_arguments(parser: argparse.ArgumentParser, resolution: int, steps: int, repeats: int) -> None:
    parser.add_argument("--layout", default="sd15-blocks", choices=LAYOUTS,
                        help="generated checkpoint: mini (4 attn2 layers), sd15-blocks (16), full (real SD1.5 size)")
    parser.add_argument("--resolution", type=int, default=resolution, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=steps, help="N: every configuration runs with N and 2N steps")
    parser.add_argument("--repeats", type=int, default=repeats, help="N/2N pairs per configuration (median)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")


class BenchServer:
    """`with BenchServer(layout) as server:` a ComfyUI server on a fresh temporary workspace with one checkpoint,
    available to prompts as `server.ckpt` and on disk as `server.ckpt_path`."""

    def __init__(self, layout: str):
        self.ckpt = f"cidm_{layout.replace('-', '_')}.safetensors"
        self._scratch = tempfile.TemporaryDirectory(prefix="cidm-bench-")
        self.workspace = Path(self._scratch.name)
        self.server = ComfyServer(self.workspace, {self.ckpt: ensure_checkpoint(layout)})
        self.ckpt_path = self.workspace / "models" / "checkpoints" / self.ckpt

    def __enter__(self) -> "BenchServer":
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()
        self._scratch.cleanup()

    def seconds(self, graph: Graph) -> float:
        """Server-side time from execution_start to execution_success of one prompt."""
        entry = self.server.run(graph.prompt(), timeout=3600)
        stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
        return (stamps["execution_success"] - stamps["execution_start"]) / 1000.0

    def checkpoint_graph(self) -> tuple[Graph, object]:
        graph = Graph()
        return graph, graph.add("CheckpointLoaderSimple", ckpt_name=self.ckpt)


def seconds_per_step(configurations: dict[str, Callable[[int], float]], steps: int,
                     repeats: int) -> dict[str, list[float]]:
    """Per-step samples for each configuration: `run(steps)` executes one prompt and returns its seconds.

    Each pair is preceded by a 1-step run of the same configuration, which re-executes whatever upstream nodes
    the previous configuration's prompt evicted from ComfyUI's cache, so the N and 2N runs carry the same overhead.
    Configurations alternate within each repeat, so drifting CPU load (other jobs on the machine) hits all alike.
    """
    samples = {name: [] for name in configurations}
    for repeat in range(repeats):
        for name, run in configurations.items():
            run(1)
            single, double = run(steps), run(2 * steps)
            samples[name].append((double - single) / steps)
            print(f"  repeat {repeat + 1}/{repeats} {name}: {samples[name][-1]:.3f} s/step", file=sys.stderr)
    return samples


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=1) + "\n")
