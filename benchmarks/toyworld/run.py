"""Runs the toy-world continual concept benchmark.

    python -m benchmarks.toyworld.run --world-seed 0   # full: base model (committed or cached), oracle, 5 runs
    python -m benchmarks.toyworld.run --smoke          # minutes at most: tiny everything; checks the harness

The base model (one for every world seed: `python -m benchmarks.toyworld.models` builds it) and the oracle (one per
world seed) are cached under $CIDM_CACHE/toyworld (default ~/.cache/cidm-comfyui/toyworld), named by a hash of their
configuration and code, and rebuilt deterministically when missing.
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

from benchmarks.toyworld import concepts, models, oracle, protocol, report, world  # noqa: E402

FULL = (models.BaseConfig(), oracle.OracleConfig(), protocol.ProtocolConfig())
SMOKE = (models.BaseConfig(channels=(16, 32, 32), norm_groups=8, text_width=32, steps=4, batch_size=4, images=64,
                           scenes=16),
         oracle.OracleConfig(generic=240, per_concept=12, garbage=60, epochs=1, batch_size=64, width=8),
         protocol.ProtocolConfig(tasks=2, training=TrainingConfig(steps=2, rank=2, lora_lr=3e-4, embedding_lr=3e-3,
                                                                  batch_size=2),
                                 backgrounds=("white", "olive"), samples_per_prompt=1, upper_bound_samples_per_prompt=2,
                                 generic_prompts=2, sampling_steps=2))
RESULTS = REPO / "benchmarks" / "results" / "toyworld"
ORACLE_CHECK_SEED = 12345  # held-out renders: a world seed the oracle never trained on


def protocol_key(base_config, oracle_config, protocol_config) -> str:
    """Names the folder of finished methods: every configuration (the oracle's includes the world seed), and the
    code that decides the scores (the method, the world and its concepts, the models, the oracle and the protocol;
    not the report or this command line)."""
    digest = hashlib.sha256(f"{base_config.key()} {oracle_config.key()}".encode())
    # not which methods run: a method's scores do not depend on the others, so runs split by --only share a folder
    settings = {k: v for k, v in dataclasses.asdict(protocol_config).items() if k != "methods"}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    harness = [protocol.__file__, world.__file__, concepts.__file__, models.__file__, oracle.__file__]
    for source in sorted((REPO / "cidm").rglob("*.py")) + sorted(Path(p) for p in harness):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Variant:
    """What an ablation changes in the protocol: the concept-token slot rule (protocol.TOKEN_SLOT_RULES) and the
    cidm consolidation terms trained with (protocol.CONSOLIDATION_TERMS). Both change where finished runs are kept."""
    token_slots: str = "layer"
    consolidation: str = "both"

    def apply(self, config: protocol.ProtocolConfig) -> protocol.ProtocolConfig:
        weights = protocol.consolidation_weights(self.consolidation, config.training.consolidation)
        return dataclasses.replace(config, token_slots=self.token_slots,
                                   training=dataclasses.replace(config.training, consolidation=weights))


def configurations(smoke: bool, world_seed: int, methods: tuple[str, ...] | None = None,
                   variant: Variant = Variant()) -> tuple:
    """(base, oracle, protocol): the oracle knows the world seed's concepts; the base model is the same for all.
    `methods` (default: all) does not change where finished runs are kept; `variant` does."""
    base_config, oracle_config, protocol_config = SMOKE if smoke else FULL
    protocol_config = variant.apply(protocol_config)
    if methods:
        protocol_config = dataclasses.replace(protocol_config, methods=tuple(methods))
    return base_config, dataclasses.replace(oracle_config, world_seed=world_seed), protocol_config


def setup(smoke: bool, cache: Path, threads: int | None, log, world_seed: int = 0,
          methods: tuple[str, ...] | None = None, variant: Variant = Variant()) -> tuple[protocol.Setup, tuple, Path]:
    """The base model and oracle, the three configurations (base, oracle, protocol) and the folder where finished
    methods are kept."""
    configs = base_config, oracle_config, protocol_config = configurations(smoke, world_seed, methods, variant)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(protocol_config.seed)
    base = models.load_or_train_base(base_config, cache, log)
    judge = oracle.load_or_train_oracle(oracle_config, cache, log)
    finished = cache / f"protocol-{protocol_key(base_config, oracle_config, protocol_config)}"
    return protocol.Setup(base, judge, concepts.make_world(world_seed)), configs, finished


def run_only(names: list[str], smoke: bool, cache: Path = models.CACHE, threads: int | None = None,
             log=print, world_seed: int = 0, variant: Variant = Variant()) -> Path:
    """Some of the runs, kept in the cache for the full command to pick up: lets several processes share the work."""
    context, (_, _, protocol_config), finished = setup(smoke, cache, threads, log, world_seed, variant=variant)
    protocol.run_methods(context, protocol_config, names, log, finished)
    return finished


def run(smoke: bool, out: Path, cache: Path = models.CACHE, threads: int | None = None,
        log=print, world_seed: int = 0, methods: tuple[str, ...] | None = None,
        variant: Variant = Variant()) -> tuple[dict, dict[str, protocol.MethodRun]]:
    started = time.monotonic()
    context, (base_config, _, protocol_config), finished = setup(smoke, cache, threads, log, world_seed, methods,
                                                                 variant)
    results, runs = protocol.run_protocol(context, protocol_config, log, finished)
    results["oracle"] = oracle.held_out_accuracy(context.oracle, context.world, 60 if smoke else 600,
                                                 ORACLE_CHECK_SEED)
    results["base_model"] = {"key": base_config.key(), "steps": base_config.steps, "seed": base_config.seed}
    results["smoke"] = smoke
    results["seconds"] = time.monotonic() - started
    report.write(results, runs, out)
    return results, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny configuration: checks the harness end to end")
    parser.add_argument("--world-seed", type=int, default=0, help="which concepts (names, looks, controls) the world "
                        "has; 0 keeps the first world's names. The base model is the same for every seed")
    parser.add_argument("--out", type=Path, help=f"results folder (default {RESULTS}/world-<seed>, or a cache folder "
                        "with --smoke)")
    parser.add_argument("--cache", type=Path, default=models.CACHE, help="where the base model and oracle are kept")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --smoke, else torch's own). "
                        "On a shared machine use fewer threads than free cores: the tiny ops here slow down many "
                        "times over when a thread waits for a busy core")
    parser.add_argument("--only", nargs="+", metavar="RUN", choices=[*protocol.RUN_METHODS, "upper-bound"],
                        help="run only these (methods, or upper-bound) and keep them in the cache without writing "
                        "results; on a machine with free cores, split the runs over processes this way, then run "
                        "the plain command to collect them")
    parser.add_argument("--methods", nargs="+", choices=protocol.RUN_METHODS,
                        help="report only these methods (default: all), beside the upper bound")
    parser.add_argument("--token-slots", choices=sorted(protocol.TOKEN_SLOT_RULES), default="layer",
                        help="concept-token slots: one per attn2 layer (default), one per resolution stage, or one "
                             "for every layer")
    parser.add_argument("--consolidation", choices=sorted(protocol.CONSOLIDATION_TERMS), default="both",
                        help="the cidm consolidation terms trained with: both (default), the orthogonality term "
                             "alone, the task-shared term alone, or none (an ablation; the other methods keep theirs)")
    args = parser.parse_args()
    threads = args.threads or (1 if args.smoke else None)
    variant = Variant(args.token_slots, args.consolidation)
    if args.only:
        names = [protocol.UPPER_BOUND if name == "upper-bound" else name for name in args.only]
        kept = run_only(names, args.smoke, args.cache, threads, world_seed=args.world_seed,
                        variant=variant)
        print(f"kept in {kept}")
        return
    out = args.out or (args.cache / "smoke-results" if args.smoke else RESULTS / f"world-{args.world_seed}")
    results, _ = run(args.smoke, out, args.cache, threads, world_seed=args.world_seed, methods=args.methods,
                     variant=variant)
    print(f"results in {out} (results.md, results.json, PNGs) after {results['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
