"""Issue 34: CIDM's evaluation metrics against hand-computed cases, and the forgetting history's keying."""

import math

import pytest
import torch

from cidm.errors import CIDMInputError
from cidm.evaluation import (DEFAULT_PROMPTS, Evaluation, EvaluationKey, fill, forgetting_table, history_from_json,
                             history_json, image_alignment, parse_prompts, prompt_pairs, text_alignment,
                             with_evaluation)


def test_image_alignment_is_the_mean_over_all_pairs_of_unit_vectors():
    samples = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # lengths do not count
    references = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    s = 1 / math.sqrt(2)
    pairs = [1.0, s, 0.0,   # sample 0 against each reference
             0.0, s, -1.0]  # sample 1
    assert image_alignment(samples, references) == pytest.approx(sum(pairs) / 6)
    # not the mean of matched pairs, nor the cosine of the means
    assert image_alignment(samples, references) != pytest.approx((1.0 + s) / 2)


def test_text_alignment_scales_by_2_5_and_clips_each_sample_at_0():
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[2.0, 0.0],   # cos 1
                          [-1.0, 0.0],  # cos -1, clipped to 0
                          [1.0, 1.0]])  # cos 1/sqrt 2
    assert text_alignment(images, texts) == pytest.approx(2.5 * (1 + 0 + 1 / math.sqrt(2)) / 3)
    # each image against its own prompt only
    assert text_alignment(images[:1], texts[1:2]) == 0.0


def test_prompts_name_the_concept_as_TOK_and_the_class_word_takes_its_place():
    assert parse_prompts("  \n") == list(DEFAULT_PROMPTS)
    assert parse_prompts("A <TOK>, in the forest\n\nA watercolor painting of a <TOK>\n") == [
        "A <TOK>, in the forest", "A watercolor painting of a <TOK>"]
    with pytest.raises(CIDMInputError, match=r"prompts: .*'a dog on a beach' has none"):
        parse_prompts("a <TOK> in snow\na dog on a beach")
    template = "A <TOK>, in the forest"
    assert fill(template, "<dog>") == "A <dog>, in the forest"
    assert fill(template, "dog") == "A dog, in the forest"
    # each sample is sampled from the concept's prompt and scored against the same prompt with the class word
    assert prompt_pairs(["a <TOK>", "a <TOK> at night"], "my dog", "dog", 2) == [
        ("a <my dog>", "a dog"), ("a <my dog>", "a dog"), ("a <my dog> at night", "a dog at night"),
        ("a <my dog> at night", "a dog at night")]


def entry(revision: int, tasks: int, scores: dict, backbone="clip-vit-l", seed=0, steps=20, references="r",
          skipped=None) -> Evaluation:
    key = EvaluationKey(revision=revision, backbone=backbone, sampler={"steps": steps, "cfg": 7.5}, seed=seed)
    return Evaluation(key=key, tasks=tasks, scores={c: {"IA": v, "TA": None, "DINO": None, "references_id": references}
                                                    for c, v in scores.items()},
                      skipped=skipped or {}, created="2026-12-08T00:00:00+00:00")


def test_history_keys_by_revision_backbone_sampler_and_seed_and_a_rerun_replaces_its_entry():
    history = []
    for item in (entry(2, 1, {"dog": 0.80}), entry(3, 2, {"dog": 0.75, "duck": 0.60}),
                 entry(3, 2, {"dog": 0.70, "duck": 0.50}, backbone="dinov2-l"),  # another series
                 entry(3, 2, {"dog": 0.70, "duck": 0.50}, seed=1),
                 entry(3, 2, {"dog": 0.70, "duck": 0.50}, steps=30),
                 entry(4, 3, {"dog": 0.78, "duck": 0.55, "cat": 0.9})):
        history = with_evaluation(history, item)
    assert len(history) == 6
    rerun = entry(3, 2, {"dog": 0.76, "duck": 0.61})
    history = with_evaluation(history, rerun)
    assert len(history) == 6 and history[-1] == rerun
    # a run on some concepts at the same key keeps the others' scores; a concept skipped now loses its old score
    history = with_evaluation(history, entry(3, 2, {"duck": 0.61}))
    assert history[-1].scores == rerun.scores
    merged = with_evaluation(history, entry(3, 2, {}, skipped={"duck": "no references"}))
    assert set(merged[-1].scores) == {"dog"} and merged[-1].skipped == {"duck": "no references"}
    table = forgetting_table(history, rerun.key.series(), "IA")
    assert table.concepts == ["dog", "duck", "cat"] and table.tasks == [1, 2, 3]
    expected = torch.tensor([[0.80, 0.76, 0.78], [math.nan, 0.61, 0.55], [math.nan, math.nan, 0.9]],
                            dtype=torch.float64)
    torch.testing.assert_close(table.scores, expected, equal_nan=True)
    forgetting = table.forgetting()
    assert forgetting == pytest.approx({"dog": 0.80 - 0.78, "duck": 0.61 - 0.55, "cat": 0.0})
    assert "| duck | – | 0.610 | 0.550 | 0.060 |" in table.markdown()
    other = forgetting_table(history, history[2].key.series(), "IA")
    assert other.tasks == [2] and other.forgetting() == {"dog": 0.0, "duck": 0.0}
    with pytest.raises(ValueError, match="metric 'CLIP-T'"):
        forgetting_table(history, rerun.key.series(), "CLIP-T")


def test_the_history_round_trips_refuses_nan_and_names_an_unreadable_file(tmp_path):
    history = [entry(2, 1, {"dog": 0.8}), entry(3, 2, {"dog": 0.7, "duck": 0.6})]
    assert history_from_json(history_json(history).decode(), "here") == history
    with pytest.raises(ValueError):
        history_json([entry(2, 1, {"dog": math.nan})])
    for text in ("{", '{"format": "cidm-evaluation-history", "version": 9, "evaluations": []}', "[]"):
        with pytest.raises(CIDMInputError, match="library: the evaluation history at/here cannot be read"):
            history_from_json(text, "at/here")


def test_forgetting_is_peak_minus_the_latest_evaluation_against_the_same_references():
    history = [entry(2, 1, {"dog": 0.9}), entry(3, 2, {"dog": 0.7, "duck": 0.6}),
               entry(4, 3, {"duck": 0.5, "cat": 0.8})]  # the latest run did not score dog
    table = forgetting_table(history, history[0].key.series(), "IA")
    assert table.forgetting() == pytest.approx({"duck": 0.1, "cat": 0.0}), "dog has no latest score to compare"
    assert "| dog | 0.900 | 0.700 | – | – |" in table.markdown()
    # new (held-out) references for duck: its scores against the old ones drop out of its row
    history.append(entry(5, 4, {"duck": 0.4}, references="held-out"))
    table = forgetting_table(history, history[0].key.series(), "IA")
    assert table.scores[table.concepts.index("duck")].isnan().tolist() == [True, True, True, False]
    assert table.forgetting()["duck"] == 0.0
