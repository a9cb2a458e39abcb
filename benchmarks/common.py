"""What both benchmarks share: a real ComfyUI server in a scratch workspace, and the per-step times of one node.

ComfyUI is never imported here; prompts go over HTTP. A step's time is the interval between two of the server's
websocket "progress" messages for the measured node (KSampler, TrainLoraNode and Train Concept Increment each send
one per step), so model loading, VAE encoding, text encoding and saving, which happen before the first step or
after the last, never enter it. The first step is left out too: it carries one-time work such as lazy allocation.
Each interval is measured twice: in wall seconds, and in the CPU seconds the server process spent (Linux /proc).
With the server on one torch thread (the default) the CPU time is the work alone, little disturbed by other jobs on
the machine, so the verdicts use it. With `--device gpu` the server runs on CUDA, where its CPU seconds are mostly
kernel launches and waiting, so the verdicts use wall seconds; the progress messages are sent from the host side
after each step's kernels are queued, so single intervals jitter with the launch queue (medians of many steps).

Timing whole prompts with N and 2N steps would cancel the overhead too, but that overhead is large and jittery
(±4 s in a 20 s Train Concept Increment prompt on a busy 2-core machine), so its noise swamped the difference.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests"), str(REPO)]

from comfy_host import ComfyServer, Graph, ensure_checkpoint  # noqa: E402

LAYOUTS = ("mini", "sd15-blocks", "full", "sdxl-blocks", "sdxl-full")
# The SDXL layouts' checkpoints hold 3-layer CLIP towers, which CheckpointLoaderSimple would build at full depth and
# leave mostly uninitialised; the test-only loader (tests/host_nodes, linked by ComfyServer) sets their depth.
SDXL_LAYOUTS = ("sdxl-blocks", "sdxl-full")
DEVICES = ("cpu", "gpu")
_unique = itertools.count(1)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Timing(NamedTuple):
    wall: float
    cpu: float


class Memory(NamedTuple):
    """The server's resident set when a prompt was submitted and its peak while the prompt ran, in bytes (host
    memory: /proc VmRSS, and VmHWM reset through clear_refs just before the prompt)."""
    start: int
    peak: int


def unique() -> int:
    """A fresh number per run: a prompt whose inputs all match an earlier one is answered from ComfyUI's cache
    without executing, so every measured run changes a seed or a name."""
    return next(_unique)


def common_arguments(parser: argparse.ArgumentParser, resolution: int, steps: int, repeats: int) -> None:
    parser.add_argument("--layout", default="sd15-blocks", choices=LAYOUTS,
                        help="generated checkpoint: mini (4 attn2 layers), sd15-blocks (16), full (real SD1.5 size), "
                             "sdxl-blocks (SDXL's 70 attn2 layers, 283 M UNet), sdxl-full (real SDXL UNet size, "
                             "2.6 B); the SDXL ones have 3-layer text towers")
    parser.add_argument("--resolution", type=int, default=resolution, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=steps, help="steps per run (the first is not timed)")
    parser.add_argument("--repeats", type=int, default=repeats, help="runs per configuration")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads in the server; with more than one, other jobs on the machine inflate "
                             "CPU time too (threads spin while waiting for each other)")
    parser.add_argument("--device", default="cpu", choices=DEVICES,
                        help="where the server samples: cpu (`--cpu`, verdicts on CPU seconds) or gpu (CUDA, "
                             "verdicts on wall seconds)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")


def basis(args: argparse.Namespace) -> str:
    """The Timing field the verdicts use: CPU seconds on the CPU, wall seconds on a GPU."""
    return "wall" if args.device == "gpu" else "cpu"


class BenchServer:
    """`with BenchServer(args) as bench:` a ComfyUI server on a fresh temporary workspace with the checkpoint of
    `args.layout`, named `bench.ckpt` in prompts and found at `bench.ckpt_path`, loaded by `bench.loader`.
    `bench.last_memory` is the Memory of the latest prompt that `step_times` ran."""

    def __init__(self, args: argparse.Namespace):
        self.ckpt = f"cidm_{args.layout.replace('-', '_')}.safetensors"
        self.loader = "CIDMTest_SmallTowerCheckpointLoader" if args.layout in SDXL_LAYOUTS else "CheckpointLoaderSimple"
        self.threads = args.threads
        self._scratch = tempfile.TemporaryDirectory(prefix="cidm-bench-")
        self.workspace = Path(self._scratch.name)
        self.server = ComfyServer(self.workspace, {self.ckpt: ensure_checkpoint(args.layout)}, device=args.device)
        self.ckpt_path = self.workspace / "models" / "checkpoints" / self.ckpt
        self.last_memory: Memory | None = None

    def __enter__(self) -> "BenchServer":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so a killed benchmark still stops its server
        os.environ["OMP_NUM_THREADS"] = str(self.threads)  # the server inherits this environment
        self.server.start()
        self.events = self.server.listen(stamp=self._clock).__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.events.__exit__(*exc)
        self.server.stop()
        self._scratch.cleanup()

    def _clock(self) -> Timing:
        fields = Path(f"/proc/{self.server.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime + stime: fields 14, 15 of proc(5)
        return Timing(time.monotonic(), cpu)

    def _resident(self, field: str) -> int:
        """VmRSS or VmHWM of the server in bytes (proc(5): /proc/pid/status, in kB)."""
        for line in Path(f"/proc/{self.server.process.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"no {field} in /proc/{self.server.process.pid}/status")

    def checkpoint_graph(self) -> tuple[Graph, object]:
        graph = Graph()
        return graph, graph.add(self.loader, ckpt_name=self.ckpt)

    def step_times(self, graph: Graph, node, steps: int) -> list[Timing]:
        """Runs the prompt; returns the wall and CPU seconds of `node`'s steps 2..steps. Sets `last_memory`."""
        Path(f"/proc/{self.server.process.pid}/clear_refs").write_text("5")  # VmHWM restarts from VmRSS
        start = self._resident("VmRSS")
        prompt_id = self.server.submit(graph.prompt(), self.events.client_id)
        self.server.wait(prompt_id, timeout=3600)
        self.events.wait_finished(prompt_id)
        self.last_memory = Memory(start, self._resident("VmHWM"))
        arrivals = {}
        for kind, data, clock in list(self.events.messages):
            if kind == "progress" and data["prompt_id"] == prompt_id and data["node"] == node.id and data["value"] >= 1:
                arrivals.setdefault(data["value"], clock)
        if len(arrivals) != steps:
            raise RuntimeError(f"node {node.id} reported steps {sorted(arrivals)}, expected 1..{steps}")
        return [Timing(*(after - before for after, before in zip(arrivals[value + 1], arrivals[value])))
                for value in range(1, steps)]


def seconds_per_step(configurations: dict[str, Callable[[], list[Timing]]],
                     repeats: int) -> tuple[dict[str, Timing], dict[str, list[Timing]]]:
    """The median per-step wall and CPU seconds of each configuration, and every step timing behind them.
    Configurations take turns, run by run, so drifting load from other jobs hits all of them alike."""
    steps = {name: [] for name in configurations}
    for repeat in range(repeats):
        for name, run in configurations.items():
            steps[name] += run()
            print(f"  run {repeat + 1}/{repeats} {name}: " + " ".join(f"{t.wall:.2f}" for t in steps[name][-3:])
                  + " s/step (last 3)", file=sys.stderr, flush=True)
    medians = {name: Timing(*(statistics.median(getattr(t, kind) for t in timings) for kind in Timing._fields))
               for name, timings in steps.items()}
    return medians, steps


def print_table(per_step: dict[str, Timing], labels: dict[str, str], reference: str,
                verdict_basis: str = "cpu") -> dict[str, Timing]:
    """Prints per-step CPU and wall seconds with their ratios to the `reference` row; returns the ratios. With
    `verdict_basis="wall"` the wall columns are marked * and a note under the table says the verdicts use them (CPU
    seconds, the default basis, go unmarked as before)."""
    ratios = {name: Timing(*(value / base for value, base in zip(timing, per_step[reference])))
              for name, timing in per_step.items()}
    width = max(map(len, labels.values())) + 2
    wall = "*" if verdict_basis == "wall" else ""
    column = 12 + len(wall)
    print(f"{'':<{width}}{'CPU s/step':>12}{wall + 'wall s/step':>{column}}{'CPU ratio':>11}{wall + 'wall ratio':>12}")
    for name, label in labels.items():
        print(f"{label:<{width}}{per_step[name].cpu:12.3f}{per_step[name].wall:{column}.3f}{ratios[name].cpu:11.3f}"
              f"{ratios[name].wall:12.3f}")
    if wall:
        print("* the verdicts use wall seconds (on a GPU the server's CPU seconds are launches and waiting)")
    return ratios


def verdict(value: float, goal: float, unit: str = "") -> str:
    return f"goal ≤ {goal:g}{unit}  {'ok' if value <= goal else 'MISSED'}"


def write_json(path: Path | None, result: dict) -> None:
    def plain(value):
        if isinstance(value, (Timing, Memory)):
            return value._asdict()
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        return [plain(item) for item in value] if isinstance(value, list) else value
    if path is not None:
        path.write_text(json.dumps(plain(result), indent=1) + "\n")
