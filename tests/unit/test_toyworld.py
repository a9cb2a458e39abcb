"""The toy-world benchmark: a deterministic world with same-shape concept pairs, and the smoke protocol end to end
through the same cidm training, consolidation and aggregation code as the nodes (the node path and this one on one
shared case: tests/integration/test_shared_case.py)."""

import dataclasses
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.toyworld import (auto_regions, concepts, evaluation, judge_check, learnability, models, oracle, protocol,
                                 report, run, tasks,
                                 world)
from cidm.auto_regions import ProbeSettings
from cidm.evaluation import image_alignment
from cidm.backends.diffusers_backend import DiffusersDenoiser
from cidm.consolidation import CONSOLIDATORS
from cidm.train import ConceptTrainer


def test_world_is_deterministic_from_its_seed():
    first, again, other = (world.generic_samples(8, seed) for seed in (3, 3, 4))
    assert all(np.array_equal(a.image, b.image) and a.look == b.look for a, b in zip(first, again))
    assert not all(np.array_equal(a.image, b.image) for a, b in zip(first, other))
    concept = concepts.make_world(0).concepts[0]
    assert np.array_equal(concepts.concept_samples(concept, ["white"], 3)[0].image,
                          concepts.concept_samples(concept, ["white"], 3)[0].image)
    assert first[0].image.shape == (world.SIZE, world.SIZE, 3) and first[0].image.dtype == np.uint8
    assert concepts.make_world(5) == concepts.make_world(5) and concepts.make_world(5) != concepts.make_world(6)


def test_scenes_put_one_object_in_each_tile_and_say_which_is_where():
    scene = world.generic_scenes(1, 0)[0]
    assert scene.image.shape == (world.SIZE, 2 * world.SIZE, 3)
    left, right = scene.looks
    for tile, look in ((scene.image[:, :world.SIZE], left), (scene.image[:, world.SIZE:], right)):
        colour = np.array(world.COLOURS[look.colour])
        assert (np.abs(tile.astype(int) - colour).sum(axis=-1) < 30).any(), "each tile shows its own object"
    caption = world.base_caption(scene, np.random.default_rng(1), drop_pattern=0.0, empty=0.0)
    assert caption == (f"{world.object_phrase(left)} on the left and {world.object_phrase(right)} on the right on a "
                       f"{scene.background} background")
    assert set(caption.split()) <= set(world.vocabulary())


def test_the_global_names_none_layout_names_only_class_words_and_keeps_the_region_prompts():
    first, second = concepts.make_world(0).concepts[:2]
    learned = [protocol.LearnedConcept(concept, protocol.concept_tokens(concept), None, True)
               for concept in (first, second)]
    named = protocol.composition_prompts(*learned, "white")
    unnamed = protocol.composition_prompts(*learned, "white", global_names_concepts=False)
    assert f"<{first.name}>" in named[0] and f"<{second.name}>" in named[0]
    assert "<" not in unnamed[0] and first.look.shape in unnamed[0] and second.look.shape in unnamed[0]
    assert unnamed[1:] == named[1:] == (learned[0].caption("white"), learned[1].caption("white"))
    layout = protocol.LAYOUTS["global names none"]
    assert layout.boxes == protocol.LAYOUTS["left/right"].boxes and not layout.global_names_concepts


def test_generic_world_draws_two_colour_textures_but_never_the_held_out_half():
    looks = [s.look for s in world.generic_samples(2000, 0)]
    two_colour = [look for look in looks if look.second is not None]
    assert 0.4 < len(two_colour) / len(looks) < 0.6
    assert not any(world.held_out(look) for look in two_colour)
    assert {(look.colour, look.second) for look in two_colour} == set(world.colour_pairs()), "every colour pair"
    assert {(look.shape, look.pattern) for look in two_colour} == {
        (shape, pattern) for shape in world.SHAPES for pattern in world.TWO_COLOUR_PATTERNS}
    red_yellow = world.Look("circle", "checked", "red", "yellow")
    assert world.held_out(red_yellow) == world.held_out(world.Look("circle", "checked", "yellow", "red"))
    assert world.held_out(red_yellow) != world.held_out(world.Look("square", "checked", "red", "yellow"))
    assert world.object_phrase(red_yellow) == "a red and yellow checked circle"
    longest = world.scene_caption((world.object_phrase(red_yellow),) * 2, "white")
    assert len(models.build_tokenizer(models.BaseConfig().max_tokens)(longest).input_ids) <= models.BaseConfig().max_tokens


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 7, 11, 12345])
def test_every_world_has_same_shape_pairs_distinct_learnable_looks_and_generic_controls(seed):
    drawn = concepts.make_world(seed)
    looks = [c.look for c in drawn.concepts]
    assert len(drawn.concepts) == 10 and len(set(drawn.names())) == 10
    assert len(drawn.same_shape_pairs()) >= 4
    assert drawn.same_shape_pairs()[0] == tuple(drawn.names()[:2]), "the first two tasks are a same-shape pair"
    assert len(set(looks)) == 10, "no two concepts look alike"
    for a, b in drawn.same_shape_pairs():
        first, second = (drawn.concepts[drawn.names().index(n)].look for n in (a, b))
        assert not {first.colour, first.second} & {second.colour, second.second}, "a pair differs in both colours"
    generic = {s.look for s in world.generic_samples(300, 0)}
    for concept in drawn.concepts:
        look, control = concept.look, concept.control
        assert look.pattern in concepts.CONCEPT_PATTERNS and (look.colour, look.second) in world.colour_pairs()
        assert not set(concept.name) - set("abcdefghijklmnopqrstuvwxyz")
        assert world.held_out(look) and look not in generic
        assert control.second is None and control.pattern == look.pattern and control.shape == look.shape
        assert control.colour in (look.colour, look.second)
        assert set(concept.caption("white", class_word=False).split()) - set(world.vocabulary()) == {f"<{concept.name}>"}


def test_world_seed_0_keeps_the_first_worlds_names_shapes_and_colours():
    first = concepts.make_world(0)
    assert first.names() == ["zarp", "quil", "bulo", "mirt", "tesk", "lomb", "pell", "fent", "dask", "grop"]
    assert first.same_shape_pairs() == [("zarp", "quil"), ("bulo", "mirt"), ("tesk", "lomb"), ("pell", "fent")]
    v1_colours = ["yellow", "red", "red", "green", "blue", "purple", "blue", "pink", "cyan", "orange"]
    assert all(colour in (c.look.colour, c.look.second) for c, colour in zip(first.concepts, v1_colours))
    assert concepts.make_world(1).names() != first.names()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The --smoke run on a fresh cache (so the base model and oracle are trained too), on one thread: on a shared
    2-core machine a second thread waiting for a busy core makes these tiny ops many times slower."""
    threads = torch.get_num_threads()
    folder = tmp_path_factory.mktemp("toyworld")
    try:
        results, runs = run.run(smoke=True, out=folder / "out", cache=folder / "cache", threads=1, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    return folder / "out", results, runs


def test_oracle_augmentation_blurs_and_jitters_but_keeps_every_named_colours_hue():
    patches = torch.tensor([rgb for rgb in world.COLOURS.values()]).float().div(255)[:, None, None, :]
    images = patches.expand(-1, 32, 32, 3).repeat(64, 1, 1, 1)  # 64 copies of each colour's flat patch
    augmented = oracle.augment(images, torch.Generator().manual_seed(0))
    assert augmented.shape == images.shape and 0 <= augmented.min() and augmented.max() <= 1
    assert (augmented - images).abs().mean() > 0.01  # it does change the images

    def hue(rgb: torch.Tensor) -> torch.Tensor:  # degrees, from the mean pixel of each image
        r, g, b = rgb.unbind(-1)
        return torch.rad2deg(torch.atan2(3 ** 0.5 * (g - b), 2 * r - g - b))
    shift = (hue(augmented.mean(dim=(1, 2))) - hue(images.mean(dim=(1, 2))) + 180) % 360 - 180
    assert shift.abs().max() < 6  # the nearest named colours are 20-60 degrees apart


def test_smoke_protocol_writes_results_for_every_method(smoke):
    out, results, runs = smoke
    written = json.loads((out / "results.json").read_text())
    tasks = written["config"]["tasks"]
    assert written["concepts"] == concepts.make_world(0).names()[:tasks] and written["world_seed"] == 0
    assert set(written["methods"]) == set(CONSOLIDATORS)
    for method, scores in written["methods"].items():
        assert len(scores["acc"]) == tasks and all(len(row) == tasks for row in scores["acc"])
        assert all(scores["acc"][t][c] is None for t in range(tasks) for c in range(t + 1, tasks))
        assert all(0 <= scores["acc"][t][c] <= 1 for t in range(tasks) for c in range(t + 1))
        # cidm under the product's named routing (and the paper's elastic beside it); the methods that train on
        # top of the old tasks as the sum of all tasks; every method also under the other rule (issue #33)
        assert scores["composition"] == ("named" if method.startswith("cidm") else "fixed")
        assert list(scores["other_compositions"]) == (["elastic", "fixed"] if method.startswith("cidm")
                                                      else ["named"])
        for other in scores["other_compositions"].values():
            assert len(other["acc"]) == tasks and 0 <= other["final_acc"] <= 1
        if scores["composition"] == "named":
            # the zarp prompt names zarp only: weight 1 on it, 0 on its partner quil
            assert scores["weight_right"][-1] == [1.0, 1.0] and scores["weight_partner"][-1] == [0.0, 0.0]
        for layout in protocol.LAYOUTS:
            assert list(scores["regions"][layout]) == ["zarp+quil"]
            assert all(0 <= scores["regions"][layout]["zarp+quil"][key] <= 1
                       for key in ("both", "left", "right", "bleed"))
    assert len(written["upper bound"]["acc"]) == tasks
    # the upper bound's single concepts on more seeds per background than a method's, its grid cut to a method's
    ub_seeds, seeds = written["config"]["upper_bound_samples_per_prompt"], written["config"]["samples_per_prompt"]
    assert ub_seeds > seeds
    upper_samples = runs[protocol.UPPER_BOUND].samples["zarp"]
    assert len(upper_samples) == len(written["config"]["backgrounds"]) * ub_seeds
    assert torch.equal(report.first_seeds({"zarp": upper_samples}, written)["zarp"], upper_samples[::ub_seeds])
    assert f"per concept (acc / strict, {len(upper_samples)} samples each)" in (out / "results.md").read_text()
    assert list(written["upper bound"]["regions"]["left/right"]) == ["zarp+quil"], "the composition upper bound"
    assert "| composition upper bound | unequal |" in (out / "results.md").read_text()
    assert written["same_shape_pairs"], "the smoke tasks are a same-shape pair, so EWA is tested on one"
    assert (out / "acc-cidm.png").exists() and (out / "samples-cidm.png").exists() and (out / "curves.png").exists()
    assert all(f"| Q{q} " in (out / "results.md").read_text() for q in (1, 2, 4, 5))
    assert (out / "acc-cidm-elastic.png").exists() and "| cidm, elastic |" in (out / "results.md").read_text()
    assert (out / "regions-cidm.png").exists() and "Two-concept compositions" in (out / "results.md").read_text()
    assert "Compared with the previous run (world v1, seed 0" in (out / "results.md").read_text()


def test_a_concepts_training_images_spread_over_the_training_backgrounds():
    concept = concepts.make_world(0).concepts[0]
    for count, expected in ((5, [1] * 5), (12, [3, 3, 2, 2, 2]), (3, [1, 1, 1, 0, 0])):
        images = protocol.training_set(concept, protocol.ProtocolConfig(images_per_concept=count), 0)
        backgrounds = [source.split("-")[1] for source in images.sources]
        assert len(images.images) == len(images.captions) == len(set(images.sources)) == count, "unique sources"
        assert [backgrounds.count(bg) for bg in world.training_backgrounds()] == expected
    v21 = concepts.concept_samples(concept, world.training_backgrounds(5), 0)  # one per background, as v2.1 drew them
    five = protocol.training_set(concept, protocol.ProtocolConfig(images_per_concept=5), 0).images
    assert torch.equal(five, protocol.as_images(v21))


def test_retention_compares_each_old_concept_with_itself_just_after_its_task():
    acc = [[0.8, None, None], [0.4, 0.5, None], [0.6, 0.0, 0.9]]
    assert report.retention(acc) == pytest.approx((0.6 / 0.8 + 0.0 / 0.5) / 2)
    assert report.retention([[0.0, None], [0.3, 1.0]]) is None, "a concept never learned has nothing to retain"
    assert report.just_trained(acc) == pytest.approx((0.8 + 0.5 + 0.9) / 3)
    assert report.mean_curve(acc) == pytest.approx([0.8, 0.45, 0.5])


def test_ratios_carry_their_binomial_standard_error():
    ratio, error = report.ratio_with_error([0.5, 0.5], [1.0, 0.5], samples=18)
    variance_rates, variance_bounds = (0.25 + 0.25) / 18 / 4, (0.0 + 0.25) / 18 / 4
    assert ratio == pytest.approx(0.5 / 0.75)
    assert error == pytest.approx(ratio * (variance_bounds / 0.75 ** 2 + variance_rates / 0.5 ** 2) ** 0.5)
    assert report.ratio_with_error([0.5, 0.5], [1.0, 0.5], samples=72)[1] == pytest.approx(error / 2)
    assert report.ratio_with_error([0.3], [0.0], samples=18) == (None, None)
    # the upper bound on 4x the samples: only the bound's term shrinks
    _, finer = report.ratio_with_error([0.5, 0.5], [1.0, 0.5], samples=18, bound_samples=72)
    assert finer == pytest.approx(ratio * (variance_bounds / 4 / 0.75 ** 2 + variance_rates / 0.5 ** 2) ** 0.5)


def test_smoke_protocol_trains_through_cidm_concept_trainer(smoke):
    _, results, runs = smoke
    for method, consolidator in CONSOLIDATORS.items():
        trainers = runs[method].trainers
        assert all(type(t) is ConceptTrainer and isinstance(t.denoiser, DiffusersDenoiser) for t in trainers)
        assert all(type(t.consolidator) is consolidator for t in trainers)
        # Task 2 saw task 1's factors as an old task, and the learned LoRA is what the trainer produced.
        assert trainers[1].consolidator.old_tasks[0] is runs[method].learned[0].task.lora
        assert all(t.step == t.config.steps for t in trainers)
        assert results["methods"][method]["trainer"] == "cidm.train.ConceptTrainer"


def test_rerun_takes_finished_methods_from_the_cache(smoke, tmp_path):
    out, results, _ = smoke
    threads = torch.get_num_threads()
    try:
        again, runs = run.run(smoke=True, out=tmp_path / "again", cache=out.parent / "cache", threads=1,
                              log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert all(not method_run.trainers for method_run in runs.values()), "nothing is trained again"
    assert again["methods"] == json.loads(json.dumps(results["methods"]))
    assert (tmp_path / "again" / "results.md").exists()


def test_only_keeps_some_runs_for_the_full_command_to_collect(smoke, tmp_path):
    out, results, _ = smoke
    cache = tmp_path / "cache"
    shutil.copytree(out.parent / "cache", cache)
    finished = next(cache.glob("protocol-*"))
    for removed in ("finetune", "upper-bound"):
        (finished / f"{removed}.json").unlink()
    threads = torch.get_num_threads()
    try:
        assert run.run_only(["finetune", protocol.UPPER_BOUND], smoke=True, cache=cache, threads=1,
                            log=lambda _: None) == finished, "the runs chosen do not change the folder"
        again, runs = run.run(smoke=True, out=tmp_path / "out", cache=cache, threads=1, log=lambda _: None)
    finally:
        torch.set_num_threads(threads)
    assert (finished / "finetune.json").exists() and (finished / "upper-bound.json").exists()
    assert all(not method_run.trainers for method_run in runs.values()), "the full command trains nothing again"
    recomputed, first = (json.loads(json.dumps(scores["methods"]["finetune"])) for scores in (again, results))
    assert {k: v for k, v in recomputed.items() if k != "seconds"} == {k: v for k, v in first.items() if k != "seconds"}


def test_world_seed_draws_other_concepts_on_the_same_base_model(smoke, tmp_path):
    out, _, _ = smoke
    cache = tmp_path / "cache"
    shutil.copytree(out.parent / "cache", cache)
    threads = torch.get_num_threads()
    try:
        results, runs = run.run(smoke=True, out=tmp_path / "out", cache=cache, threads=1, log=lambda _: None,
                                world_seed=1)
    finally:
        torch.set_num_threads(threads)
    names = concepts.make_world(1).names()[:2]
    assert results["world_seed"] == 1 and results["concepts"] == names
    assert runs["c-lora"].trainers, "a new world seed trains its concepts again"
    assert [item.concept.name for item in runs["c-lora"].learned] == names
    assert not any(item.class_word for item in runs["c-lora"].learned), "C-LoRA prompts leave the class word out"
    second = runs["c-lora"].trainers[1]
    assert all("<" in prompt and prompt.split()[1:3] == second.concept.tokens and prompt.split()[3] == "on"
               for prompt in second._batch()[1]), "C-LoRA trains on 'a <x1> <x2> on a … background'"
    for (_, proj), (_, up) in runs["c-lora"].learned[1].task.lora.items():
        assert bool(up.any()) == (proj in ("to_k", "to_v")), "C-LoRA trains only the key and value projections"
    assert any(bool(up.any()) for (_, proj), (_, up) in runs["cidm"].learned[1].task.lora.items() if proj == "to_q")
    assert all(item.class_word for item in runs["cidm"].learned)
    assert len(list(cache.glob("base-*.safetensors"))) == 1, "one base model serves every world seed"
    assert len(list(cache.glob("oracle-*.safetensors"))) == 2, "one oracle per world seed"
    assert "--world-seed 1" in (tmp_path / "out" / "results.md").read_text()


def test_a_stopped_base_build_resumes_to_the_same_model(tmp_path, monkeypatch):
    """The build checkpoints and continues exactly, so an hour-long build can span sessions."""
    config = dataclasses.replace(run.SMOKE[0], steps=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole = models.train_base(config, log=lambda _: None)
        checkpoint, write = tmp_path / "base.checkpoint", models._checkpoint

        def write_then_stop(*args, **kwargs):
            write(*args, **kwargs)
            raise KeyboardInterrupt

        monkeypatch.setattr(models, "_checkpoint", write_then_stop)
        with pytest.raises(KeyboardInterrupt):
            models.train_base(config, log=lambda _: None, checkpoint=checkpoint, checkpoint_every=3)
        monkeypatch.setattr(models, "_checkpoint", write)
        resumed = models.train_base(config, log=lambda _: None, checkpoint=checkpoint, checkpoint_every=3)
    finally:
        torch.set_num_threads(threads)
    for module in ("unet", "text_encoder"):
        first, second = getattr(whole, module).state_dict(), getattr(resumed, module).state_dict()
        assert all(torch.equal(first[k], second[k]) for k in first)
    assert all(p.dtype == torch.float32 and torch.equal(p, p.half().float()) for p in whole.unet.parameters())


def test_learnability_probe_trains_one_concept_with_changed_settings_or_a_generic_look(smoke):
    out, _, _ = smoke
    threads = torch.get_num_threads()
    try:
        setup, (_, _, config), _ = run.setup(True, out.parent / "cache", 1, lambda _: None, 0)
        red_circle = world.Look(shape="circle", pattern="solid", colour="red", second=None, period=0.5)
        scores, verdict, item, images = learnability.probe(setup, config, "quil", {"steps": "3"}, red_circle)
    finally:
        torch.set_num_threads(threads)
    assert item.concept.name == "quil" and item.concept.look == red_circle and len(item.task.losses) == 3
    judged = len(config.backgrounds) * config.upper_bound_samples_per_prompt  # as the upper bound judges
    assert len(verdict.predictions["shape"]) == len(images) == judged
    assert 0 <= scores["acc"] <= 1


def test_the_committed_base_model_is_the_current_configurations():
    """Its cache key hashes world.py and models.py: an edit there orphans the committed weights and the next run
    rebuilds the base model (about 1 h on a CPU core, 8 min on a GPU: `python -m benchmarks.toyworld.models`)."""
    assert models.base_path(models.BaseConfig()).parent == models.COMMITTED, "rebuild and commit the base model"


def test_learnability_refuses_a_training_seed_that_the_protocol_would_ignore():
    command = [sys.executable, "-m", "benchmarks.toyworld.learnability", "--concept", "bulo", "--set", "seed=3"]
    result = subprocess.run(command, cwd=run.REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "--set seed" in result.stderr and "--protocol seed=N" in result.stderr


@pytest.mark.parametrize("seed", [0, 1])
def test_a_concepts_neighbours_are_generic_looks_one_step_from_it(seed):
    for concept in concepts.make_world(seed).concepts:
        look = concept.look
        found = judge_check.neighbours(look)
        assert found and len(set(found)) == len(found)
        for neighbour in found:
            assert not world.held_out(neighbour) and neighbour.shape == look.shape
            changed = [neighbour.pattern != look.pattern, neighbour.colour != look.colour,
                       neighbour.second != look.second]
            assert sum(changed) == 1
            first, second = neighbour.rgb_pair()
            assert np.linalg.norm(first - second) >= world.MIN_COLOUR_DISTANCE
        assert any(n.pattern != look.pattern for n in found) and any(n.pattern == look.pattern for n in found)


@pytest.mark.parametrize("sampler", sorted(protocol.SAMPLERS))
def test_every_sampler_lands_on_the_image_that_a_perfect_denoiser_predicts(sampler):
    """With the exact epsilon of one known image x0 (a point-mass data distribution), any correct sampler of the
    base model's schedule ends at x0, whatever the starting noise."""
    train = models.make_scheduler()
    target = torch.rand(1, *models.LATENT_SHAPE, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    scheduler = protocol.SAMPLERS[sampler](train, 10)
    latents = torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    assert len(scheduler.timesteps) == 10 and scheduler.timesteps[0] > scheduler.timesteps[-1]
    for timestep in scheduler.timesteps:
        alpha_bar = train.alphas_cumprod[timestep]
        epsilon = (latents - alpha_bar.sqrt() * target) / (1 - alpha_bar).sqrt()
        latents = scheduler.step(epsilon, timestep, latents).prev_sample
    assert torch.allclose(latents, target, atol=1e-3)


def test_an_unknown_sampler_is_refused_by_name_when_the_settings_are_made():
    with pytest.raises(ValueError, match="'euler'"):
        learnability.replaced(protocol.ProtocolConfig(), {"sampler": "euler"})


def test_token_slot_rules_of_the_toy_model_share_slots_by_resolution_stage_or_not_at_all():
    """The toy model's 7 attn2 layers in CIDM order: 8×8 (down block 1, up block 1's two) and 4×4 (down block 2, the
    mid block, up block 0's two)."""
    unet = models.build_unet(models.BaseConfig())
    paths = [layer.path for layer in DiffusersDenoiser(unet, models.make_scheduler()).layers]
    assert len(paths) == 7
    assert protocol.TOKEN_SLOT_RULES["stage"](paths) == [0, 1, 1, 1, 1, 0, 0]
    assert protocol.TOKEN_SLOT_RULES["layer"](paths) == list(range(7))
    assert protocol.TOKEN_SLOT_RULES["one"](paths) == [0] * 7
    with pytest.raises(ValueError, match="token_slots 'per stack'"):
        protocol.ProtocolConfig(token_slots="per stack")


def test_consolidation_ablations_zero_only_the_dropped_cidm_terms_and_name_themselves_in_the_command():
    """Issue 33: `--consolidation` keeps the named terms of cidm's loss at their weights and sets the others to 0;
    the other methods' weights are untouched, the run is kept apart, and the report's command names the ablation."""
    defaults = run.FULL[2].training.consolidation
    for terms, kept in (("both", {"orthogonal", "shared"}), ("orthogonal", {"orthogonal"}), ("shared", {"shared"}),
                        ("none", set())):
        config = run.Variant(consolidation=terms).apply(run.FULL[2])
        weights = config.training.consolidation
        for term in ("orthogonal", "shared"):
            assert getattr(weights, term) == (getattr(defaults, term) if term in kept else 0.0)
        assert (weights.official, weights.clora, weights.shared_rank) == (defaults.official, defaults.clora,
                                                                         defaults.shared_rank)
        assert protocol.consolidation_name(dataclasses.asdict(weights)) == terms
        flags = report.variant_flags(dataclasses.asdict(config))
        assert flags == ("" if terms == "both" else f" --consolidation {terms}")
    keys = {run.protocol_key(*run.configurations(False, 0, variant=run.Variant(consolidation=terms)))
            for terms in protocol.CONSOLIDATION_TERMS}
    assert len(keys) == len(protocol.CONSOLIDATION_TERMS)
    assert report.variant_flags(dataclasses.asdict(run.Variant("one", "none").apply(run.FULL[2]))) == \
        " --token-slots one --consolidation none"
    with pytest.raises(ValueError, match="consolidation 'all'"):
        protocol.consolidation_weights("all", defaults)


def test_the_evaluation_harness_scores_the_nodes_ia_on_the_protocols_stages(smoke):
    """Issue 34's toy validity check on the smoke run: the history holds each concept from its task on, its IA is
    the node's formula on the oracle's features of the stage's samples, and the harness's accuracy is the
    protocol's own."""
    out, _, runs = smoke
    context, configs, _ = run.setup(True, out.parent / "cache", 1, lambda _: None)
    config = configs[2]
    learned = runs["finetune"].learned
    embed = evaluation.oracle_features(context.oracle)
    references = {item.concept.name: embed(evaluation.held_out_references(item.concept, 0)) for item in learned}
    evaluations, stages = evaluation.method_history(context, config, learned, "finetune", embed, references,
                                                    lambda _: None)
    assert [sorted(e.scores) for e in evaluations] == [["zarp"], ["quil", "zarp"]]
    composer = protocol.Composer(context, learned, config, mode="fixed")
    _, images = protocol.judge_stage(composer, learned, config, context.oracle, context.world)
    assert evaluations[-1].scores["quil"]["IA"] == image_alignment(embed(images["quil"]), references["quil"])
    assert [s["zarp"]["acc"] for s in stages] == [row[0] for row in runs["finetune"].scores["acc"]]
    summary = evaluation.summarize(evaluations, stages, {"zarp": 0.0, "quil": 2.0})
    assert summary["above_base"] == 1 and summary["concepts"] == ["zarp", "quil"]
    assert summary["ia_forgetting_mean"] == pytest.approx(max(e.scores["zarp"]["IA"] for e in evaluations)
                                                          - evaluations[-1].scores["zarp"]["IA"])


def test_finetune_shared_trains_one_lora_on_from_task_to_task_and_samples_every_concept_through_it(smoke):
    """Issue 33's forgetting baseline: task 2 starts from task 1's factors (with a zero learning rate it ends there
    too), where a cidm task starts from its own initialisation; every concept is then sampled through the last
    LoRA with its own tokens, under named routing only."""
    out, _, _ = smoke
    context, configs, _ = run.setup(True, out.parent / "cache", 1, lambda _: None)
    config = configs[2]
    frozen = dataclasses.replace(config, training=dataclasses.replace(config.training, lora_lr=0.0))
    _, first = protocol.learn(context, 0, [], protocol.SHARED, config)
    _, second = protocol.learn(context, 1, [first], protocol.SHARED, frozen)
    _, separate = protocol.learn(context, 1, [first], "cidm", frozen)
    for key, (down, up) in first.task.lora.items():
        assert torch.equal(second.task.lora[key][0], down) and torch.equal(second.task.lora[key][1], up)
    assert any(not torch.equal(separate.task.lora[key][1], up) for key, (_, up) in first.task.lora.items())
    views = protocol.composed(protocol.SHARED, [first, second])
    assert all(view.task.lora is second.task.lora for view in views)
    assert views[0].task.embeddings is first.task.embeddings and views[0].tokens == first.tokens
    assert protocol.composed("cidm", [first, second]) == [first, second]
    scores = protocol.run_method(context, protocol.SHARED, config, lambda _: None).scores
    assert scores["composition"] == "named" and scores["other_compositions"] == {}
    assert scores["consolidator"].startswith("none") and len(scores["acc"]) == config.tasks


def test_automatic_regions_go_on_from_the_probe_and_fall_back_to_the_plain_sample(smoke, tmp_path):
    """Issue 31's toy harness: the kept tasks load back unchanged; a probe that finds no regions gives exactly the
    plain sample (the run goes on from the probe's last step); one that finds them gives disjoint masks over the
    probe grid. (The smoke tasks' LoRAs barely differ from zero, so their regions barely change the image: the real
    server's test checks that.)"""
    out, _, runs = smoke
    context, configs, _ = run.setup(True, out.parent / "cache", 1, lambda _: None)
    path = tmp_path / "tasks.safetensors"
    tasks.save_tasks(runs["cidm"].learned, path)
    loaded = tasks.load_tasks(context, path, len(runs["cidm"].learned))
    for kept, item in zip(runs["cidm"].learned, loaded):
        assert item.concept == kept.concept and item.tokens == kept.tokens
        torch.testing.assert_close(item.task.embeddings, kept.task.embeddings)
        for key, (down, up) in kept.task.lora.items():
            torch.testing.assert_close(item.task.lora[key][0], down)
            torch.testing.assert_close(item.task.lora[key][1], up)
    composer = auto_regions.AutoComposer(context, loaded, configs[2])
    prompts = [protocol.composition_prompts(loaded[0], loaded[1], "white")[0]] * 2
    channels, height, width = models.LATENT_SHAPE
    size = (height, 2 * width)
    collapsed, found = composer.sample_auto(prompts, [0, 1], ProbeSettings(min_area=1.0), size)
    assert all(item.masks is None and "collapsed" in item.problem for item in found)
    torch.testing.assert_close(collapsed, composer._sample(prompts, [], [0, 1], (channels, *size)))
    _, found = composer.sample_auto(prompts, [0, 1], ProbeSettings(threshold=0.0, min_area=0.0,
                                                                        max_overlap=1.0), size)
    for item in found:
        assert item.masks.shape == (2, height // 4, 2 * width // 4)
        assert (item.masks.sum(dim=0) == 1).all(), "at threshold 0 every cell belongs to exactly one concept"
