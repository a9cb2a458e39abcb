"""Runs the toy-world continual concept benchmark.

    python -m benchmarks.toyworld.run            # full: ~1 h base model (cached), oracle, 10 tasks × 5 runs
    python -m benchmarks.toyworld.run --smoke    # minutes at most: tiny everything; checks the harness, not numbers

The base model and the oracle are cached under $CIDM_CACHE/toyworld (default ~/.cache/cidm-comfyui/toyworld), named
by a hash of their configuration and code, and rebuilt deterministically when missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from configs; nothing is downloaded

import torch  # noqa: E402

from cidm.train import TrainingConfig  # noqa: E402

from benchmarks.toyworld import models, oracle, protocol, report  # noqa: E402

FULL = (models.BaseConfig(), oracle.OracleConfig(), protocol.ProtocolConfig())
SMOKE = (models.BaseConfig(channels=(16, 32, 32), norm_groups=8, text_width=32, steps=4, batch_size=4, images=64),
         oracle.OracleConfig(generic=240, per_concept=12, garbage=60, epochs=1, batch_size=64, width=8),
         protocol.ProtocolConfig(tasks=2, training=TrainingConfig(steps=2, rank=2, lora_lr=3e-4, embedding_lr=3e-3,
                                                                  batch_size=2),
                                 backgrounds=("white", "olive"), samples_per_prompt=1, generic_prompts=2,
                                 sampling_steps=2))
RESULTS = REPO / "benchmarks" / "results" / "toyworld"
ORACLE_CHECK_SEED = 12345  # held-out renders: a world seed the oracle never trained on


def protocol_key(base_config, oracle_config, protocol_config) -> str:
    """Names the folder of finished methods: every configuration, and the code of the method and of the harness."""
    digest = hashlib.sha256(f"{base_config.key()} {oracle_config.key()}".encode())
    digest.update(json.dumps(dataclasses.asdict(protocol_config), sort_keys=True, default=str).encode())
    for source in sorted((REPO / "cidm").rglob("*.py")) + sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def run(smoke: bool, out: Path, cache: Path = models.CACHE, threads: int | None = None,
        log=print) -> tuple[dict, dict[str, protocol.MethodRun]]:
    base_config, oracle_config, protocol_config = SMOKE if smoke else FULL
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(protocol_config.seed)
    started = time.monotonic()
    base = models.load_or_train_base(base_config, cache, log)
    judge = oracle.load_or_train_oracle(oracle_config, cache, log)
    setup = protocol.Setup(base, judge, world_seed=base_config.seed)
    finished = cache / f"protocol-{protocol_key(base_config, oracle_config, protocol_config)}"
    results, runs = protocol.run_protocol(setup, protocol_config, log, finished)
    results["oracle"] = oracle.held_out_accuracy(judge, 60 if smoke else 600, ORACLE_CHECK_SEED)
    results["base_model"] = {"key": base_config.key(), "steps": base_config.steps}
    results["smoke"] = smoke
    results["seconds"] = time.monotonic() - started
    report.write(results, runs, out)
    return results, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration: checks the harness end to end")
    parser.add_argument("--out", type=Path, help=f"results folder (default {RESULTS}, or a cache folder with --smoke)")
    parser.add_argument("--cache", type=Path, default=models.CACHE, help="where the base model and oracle are kept")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --smoke, else torch's own). "
                        "On a shared machine use fewer threads than free cores: the tiny ops here slow down many "
                        "times over when a thread waits for a busy core")
    args = parser.parse_args()
    out = args.out or (args.cache / "smoke-results" if args.smoke else RESULTS)
    results, _ = run(args.smoke, out, args.cache, args.threads or (1 if args.smoke else None))
    print(f"results in {out} (results.md, results.json, PNGs) after {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
