"""One rule for concept names, library names, tokens and prompt markers (cidm.names; issue 29, kinds 3 and 5)."""

import unicodedata

import pytest
import torch

from cidm.errors import CIDMInputError
from cidm.library import ConceptLibrary, library_folder
from cidm.names import automatic_tokens, validate_name, validate_tokens
from cidm.tokens import vocabulary_from_tasks
from test_library import BASE_MODEL, NUM_LAYERS, append


@pytest.mark.parametrize("name", ["café", "日本", "日本の犬", "Ёлка", "हिन्दी", "my dog", "dogs_v2.1-final"])
def test_names_of_any_script_are_accepted_as_concepts_and_libraries(tmp_path, name):
    assert validate_name(name, "concept") == name
    library = ConceptLibrary.create(tmp_path / name, BASE_MODEL)
    record = append(library, name, automatic_tokens(name), seed=1)
    reopened = ConceptLibrary.open(tmp_path / name)
    assert reopened.name == name and reopened.tasks[0].concept == name == record.concept


def test_names_and_tokens_are_nfc_normalised():
    decomposed = unicodedata.normalize("NFD", "café")
    assert decomposed != "café"
    assert validate_name(decomposed, "library") == "café"
    assert validate_tokens([f"<{decomposed}1>"]) == ["<café1>"]


@pytest.mark.parametrize("name", ["CON", "nul", "Aux.txt", "com1", "LPT9.tar.gz", "dog.", "dog ", " dog", "a:b",
                                  "a|b", "a?", "tab\there", "emoji🐶", "a/b", "a\\b", "x..y", ".hidden"])
def test_names_unsafe_on_windows_or_macos_are_refused(name):
    with pytest.raises(CIDMInputError) as error:
        validate_name(name, "library")
    assert error.value.input_name == "library"


def test_tokens_follow_the_name_rule_plus_hash():
    assert validate_tokens(["<café#1>", "<日本2>", "<my_dog-3.b>"]) == ["<café#1>", "<日本2>", "<my_dog-3.b>"]
    with pytest.raises(CIDMInputError, match="may hold letters and digits"):
        validate_tokens(["<v*>"])


def test_automatic_tokens_leave_the_natural_names_free(library):
    """A second dog is `dog2` (or `dog 2`, `dog-2`): the automatic tokens of `dog` take none of these names."""
    append(library, "dog", automatic_tokens("dog"), seed=1)
    assert library.tasks[0].tokens == ["<dog#1>", "<dog#2>"]
    for number, name in enumerate(["dog2", "dog 2", "dog-2", "my dog"], start=2):
        append(library, name, automatic_tokens(name), seed=number)
    assert [task.tokens for task in library.tasks][-1] == ["<my_dog#1>", "<my_dog#2>"]


def test_a_library_keeps_the_automatic_tokens_its_tasks_stored(library):
    """A library written before the '#' keeps `<dog1> <dog2>`, so a re-run of its workflow still reuses the task."""
    append(library, "dog", ["<dog1>", "<dog2>"], seed=1)
    assert library.automatic_tokens("dog") == library.automatic_tokens("DOG") == ["<dog1>", "<dog2>"]
    assert library.automatic_tokens("bird") == ["<bird#1>", "<bird#2>"]


def test_explicit_tokens_are_not_taken_for_automatic_ones(library):
    append(library, "dog", ["<pup1>", "<pup2>"], seed=1)
    assert library.automatic_tokens("dog") == ["<dog#1>", "<dog#2>"]


def test_concept_names_ignore_case_wherever_a_task_is_looked_up(library):
    append(library, "my dog", ["<dog1>", "<dog2>"], seed=1)
    assert library.concept_task("My Dog").index == 1
    assert library.trained_task("MY DOG", {"tokens": ["<dog1>", "<dog2>"], "seed": 1}).index == 1


def vocabulary(concepts: dict[str, list[str]]):
    return vocabulary_from_tasks(list(concepts), list(concepts.values()),
                                 [torch.zeros(len(tokens), NUM_LAYERS, 4) for tokens in concepts.values()])


def test_markers_name_concepts_in_any_case_with_spaces():
    words = vocabulary({"my dog": ["<my_dog1>", "<my_dog2>"], "cat": ["<cat#1>"], "café": ["<café#1>"]})
    assert words.expand("a photo of <my dog>") == "a photo of <my_dog1> <my_dog2>"
    assert words.expand("<My  Dog> and <CAT> at the <CAFÉ>") == "<my_dog1> <my_dog2> and <cat#1> at the <café#1>"
    assert words.expand("<MY_DOG2> and <Cat#1>") == "<my_dog2> and <cat#1>"
    assert words.tokens_in(words.expand("<CAT>")) == ["<cat#1>"]


def test_the_unknown_concept_error_lists_only_markers_that_work():
    words = vocabulary({"my dog": ["<my_dog1>"], "cat": ["<cat1>"]})
    with pytest.raises(CIDMInputError, match="unknown concept <bird>") as error:
        words.expand("a <bird>", "text")
    assert error.value.input_name == "text"
    listed = str(error.value).split("known concepts (any case): ")[1].split(", ")
    assert listed == ["<my dog>", "<cat>"]
    assert all(words.expand(marker) != marker for marker in listed)


def test_a_library_name_in_another_case_is_the_same_library(tmp_path):
    ConceptLibrary.create(tmp_path / "libA", BASE_MODEL)
    assert library_folder(tmp_path, "LIBA") == tmp_path / "libA"
    assert library_folder(tmp_path, unicodedata.normalize("NFD", "Café")) == tmp_path / "Café"
    assert library_folder(tmp_path, "libA") == tmp_path / "libA"
    (tmp_path / "LibA").mkdir()  # two spellings only a case-sensitive file system can hold: the exact one wins
    assert library_folder(tmp_path, "LibA") == tmp_path / "LibA"
    with pytest.raises(CIDMInputError, match="differ only in case") as error:
        library_folder(tmp_path, "LIBA")
    assert error.value.input_name == "library"


@pytest.fixture
def library(tmp_path):
    return ConceptLibrary.create(tmp_path / "pets", BASE_MODEL)
