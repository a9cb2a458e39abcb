import fcntl
import hashlib
import json
import math
import os
import pickle
from pathlib import Path

import pytest
import torch

from cidm import library as library_module
from cidm.errors import CIDMInputError
from cidm.evaluation import Evaluation, EvaluationKey
from cidm.library import EVALUATIONS_NAME, ConceptLibrary, TaskData, validate_name, validate_tokens

NUM_LAYERS = 2
DIM = 8
BASE_MODEL = {"fingerprint": "sd15-abc123", "num_layers": NUM_LAYERS, "context_dim": DIM, "label": "tiny"}


def make_task_data(seed: int, n_tokens: int = 2, rank: int = 2, with_features: bool = True) -> TaskData:
    generator = torch.Generator().manual_seed(seed)
    lora = {
        (layer, projection): (torch.randn(rank, DIM, generator=generator), torch.randn(DIM, rank, generator=generator))
        for layer in range(NUM_LAYERS)
        for projection in ("to_q", "to_k", "to_v", "to_out.0")
    }
    embeddings = torch.randn(n_tokens, NUM_LAYERS, DIM, generator=generator)
    features = torch.randn(n_tokens, NUM_LAYERS, DIM, generator=generator) if with_features else None
    return TaskData(lora=lora, embeddings=embeddings, features=features)


def append(library: ConceptLibrary, concept: str, tokens: list[str], seed: int, **overrides):
    fields = dict(
        concept=concept,
        tokens=tokens,
        method="cidm",
        rank=2,
        multiplier=2.0,
        steps=10,
        seed=seed,
        hyperparameters={"lr": 1e-4},
        data=make_task_data(seed, n_tokens=len(tokens)),
    )
    fields.update(overrides)
    return library.append_task(**fields)


def assert_task_data_close(loaded: TaskData, original: TaskData) -> None:
    assert loaded.lora.keys() == original.lora.keys()
    for key, (down, up) in original.lora.items():
        assert loaded.lora[key][0].dtype == torch.float32
        torch.testing.assert_close(loaded.lora[key][0], down, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(loaded.lora[key][1], up, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(loaded.embeddings, original.embeddings, atol=1e-2, rtol=1e-2)
    if original.features is None:
        assert loaded.features is None
    else:
        torch.testing.assert_close(loaded.features, original.features, atol=1e-2, rtol=1e-2)


@pytest.fixture
def library(tmp_path):
    return ConceptLibrary.create(tmp_path / "pets", BASE_MODEL)


@pytest.fixture
def library_with_one_task(library):
    append(library, "dog", ["<dog1>", "<dog2>"], seed=1)
    return library


def test_round_trip_two_tasks(library):
    first = append(library, "dog", ["<dog1>", "<dog2>"], seed=1)
    second = append(library, "red cat", ["<cat1>"], seed=2, data=make_task_data(2, n_tokens=1, with_features=False))

    reopened = ConceptLibrary.open(library.root)
    assert reopened.name == "pets"
    assert reopened.base_model == BASE_MODEL
    assert reopened.revision == 3
    assert reopened.tasks == [first, second]
    assert [task.index for task in reopened.tasks] == [1, 2]
    assert second.file == "task_002_red_cat.safetensors"
    assert reopened.token_owner() == {"<dog1>": 1, "<dog2>": 1, "<cat1>": 2}
    loaded = reopened.load_all()
    assert_task_data_close(loaded[0], make_task_data(1))
    assert_task_data_close(loaded[1], make_task_data(2, n_tokens=1, with_features=False))


def test_task_file_is_fp16_and_header_holds_record(library_with_one_task):
    record = library_with_one_task.tasks[0]
    path = library_with_one_task.root / record.file
    with library_module.safe_open(str(path), framework="pt") as reader:
        assert reader.get_tensor("lora.01.to_out.0.down").dtype == torch.float16
        assert reader.get_tensor("tokens.embeddings").dtype == torch.float16
        header = json.loads(reader.metadata()["cidm.task"])
    assert header == {key: value for key, value in record.to_json().items() if key != "sha256"}
    assert hashlib.sha256(path.read_bytes()).hexdigest() == record.sha256


def test_append_leaves_older_task_file_untouched(library_with_one_task):
    first_path = library_with_one_task.root / library_with_one_task.tasks[0].file
    before = first_path.read_bytes()
    append(library_with_one_task, "cat", ["<cat1>"], seed=2)
    assert first_path.read_bytes() == before


def test_append_sees_tasks_written_by_another_handle(library_with_one_task):
    stale = ConceptLibrary.open(library_with_one_task.root)
    append(library_with_one_task, "cat", ["<cat1>"], seed=2)
    with pytest.raises(CIDMInputError, match="task 2"):
        append(stale, "kitten", ["<cat1>"], seed=3)
    assert append(stale, "bird", ["<bird1>"], seed=3).index == 3


@pytest.mark.parametrize("crashing_file", ["manifest.json", "task_002_cat.safetensors"])
def test_crash_during_write_keeps_previous_revision(library_with_one_task, monkeypatch, crashing_file):
    root = library_with_one_task.root
    real_replace = os.replace

    def crashing_replace(source, destination):
        if os.path.basename(destination) == crashing_file:
            raise OSError("simulated crash")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(CIDMInputError, match=f"cannot write {root / crashing_file}: simulated crash"):
        append(library_with_one_task, "cat", ["<cat1>"], seed=2)
    monkeypatch.setattr(os, "replace", real_replace)

    reopened = ConceptLibrary.open(root)
    assert reopened.revision == 2
    assert [task.concept for task in reopened.tasks] == ["dog"]
    assert_task_data_close(reopened.load_task(1), make_task_data(1))
    assert not list(root.glob("*.tmp"))

    record = append(reopened, "cat", ["<cat1>"], seed=2)
    assert record.index == 2
    assert_task_data_close(ConceptLibrary.open(root).load_task(2), make_task_data(2, n_tokens=1))


def test_temp_files_left_by_a_killed_writer_do_not_block_writes(library_with_one_task):
    root = library_with_one_task.root
    (root / ".manifest.json.dead.tmp").write_bytes(b"{half a manifest")
    (root / ".task_002_cat.safetensors.dead.tmp").write_bytes(b"\x00" * 10)
    append(library_with_one_task, "cat", ["<cat1>"], seed=2)
    assert [task.concept for task in ConceptLibrary.open(root).tasks] == ["dog", "cat"]


def test_orphan_task_file_is_ignored_and_overwritten(library_with_one_task):
    root = library_with_one_task.root
    (root / "task_002_cat.safetensors").write_bytes(b"orphan from a crashed append")
    assert len(ConceptLibrary.open(root).tasks) == 1
    append(library_with_one_task, "cat", ["<cat1>"], seed=2)
    assert_task_data_close(ConceptLibrary.open(root).load_task(2), make_task_data(2, n_tokens=1))


@pytest.mark.parametrize(
    "manifest_text, message",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"format": "something-else", "version": 1}), "not a CIDM concept library"),
        (json.dumps({"format": "cidm-concept-library", "version": 99}), "version 99"),
        (
            json.dumps({"format": "cidm-concept-library", "version": 1, "name": "pets", "revision": 1,
                        "base_model": BASE_MODEL, "tasks": [{"index": 1, "file": "../x.safetensors"}]}),
            "corrupt",
        ),
    ],
)
def test_corrupt_manifest_is_refused(library, manifest_text, message):
    (library.root / "manifest.json").write_text(manifest_text)
    with pytest.raises(CIDMInputError, match=message) as error:
        ConceptLibrary.open(library.root)
    assert error.value.input_name == "library"
    assert str(library.root) in str(error.value)


def test_missing_manifest_is_refused(tmp_path):
    with pytest.raises(CIDMInputError, match="manifest.json is missing") as error:
        ConceptLibrary.open(tmp_path / "nothing")
    assert error.value.input_name == "library"


def test_create_refuses_existing_library(library):
    with pytest.raises(CIDMInputError, match="already exists"):
        ConceptLibrary.create(library.root, BASE_MODEL)
    assert ConceptLibrary.open_or_create(library.root, BASE_MODEL).revision == library.revision


def test_open_or_create_creates_missing_library(tmp_path):
    created = ConceptLibrary.open_or_create(tmp_path / "new one", BASE_MODEL)
    assert created.tasks == [] and created.revision == 1 and created.num_layers == NUM_LAYERS


def flip_byte(path, offset):
    content = bytearray(path.read_bytes())
    content[offset] ^= 0xFF
    path.write_bytes(bytes(content))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "deleted"])
def test_corrupt_task_file_is_refused(library_with_one_task, damage):
    path = library_with_one_task.root / library_with_one_task.tasks[0].file
    if damage == "flipped byte":
        flip_byte(path, len(path.read_bytes()) - 3)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        path.unlink()
    with pytest.raises(CIDMInputError, match="is corrupt") as error:
        library_with_one_task.load_task(1)
    assert error.value.input_name == "library"
    assert str(path) in str(error.value)


def test_pickle_with_matching_hash_is_refused(library_with_one_task):
    root = library_with_one_task.root
    pickled = pickle.dumps({"tokens.embeddings": [1.0, 2.0]})
    (root / "evil.pt").write_bytes(pickled)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tasks"][0].update(file="evil.pt", sha256=hashlib.sha256(pickled).hexdigest())
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CIDMInputError, match="not a safetensors file") as error:
        ConceptLibrary.open(root).load_task(1)
    assert error.value.input_name == "library"


def test_pickled_resume_state_is_refused(library):
    (library.root / ".resume").mkdir()
    (library.root / ".resume" / "task_001.safetensors").write_bytes(pickle.dumps({"step": 3}))
    with pytest.raises(CIDMInputError, match="not a safetensors file"):
        library.load_resume_state("task_001")


@pytest.mark.parametrize("bad_name", ["", "..", "a/b", "a\\b", "x..y", ".hidden", "nul\0", "a" * 65, "star*"])
def test_validate_name_rejects_unsafe_names(bad_name):
    with pytest.raises(CIDMInputError) as error:
        validate_name(bad_name, "library_name")
    assert error.value.input_name == "library_name"


def test_validate_name_accepts_plain_names():
    assert validate_name("my dogs_v2.1-final", "concept") == "my dogs_v2.1-final"


def test_append_rejects_unsafe_concept_name(library):
    with pytest.raises(CIDMInputError) as error:
        append(library, "../dog", ["<dog1>"], seed=1)
    assert error.value.input_name == "concept"
    assert not list(library.root.glob("task_*"))


@pytest.mark.parametrize("bad_tokens", [[], ["dog1"], ["<dog 1>"], ["<dog1>", "<dog1>"], ["<>"]])
def test_validate_tokens_rejects_malformed(bad_tokens):
    with pytest.raises(CIDMInputError) as error:
        validate_tokens(bad_tokens)
    assert error.value.input_name == "tokens"


def test_token_collision_names_owning_task(library_with_one_task):
    with pytest.raises(CIDMInputError, match=r"<dog2> is already used by task 1 \(dog\)") as error:
        library_with_one_task.check_new_task("puppy", ["<new1>", "<dog2>"])
    assert error.value.input_name == "tokens"
    with pytest.raises(CIDMInputError, match="task 1"):
        append(library_with_one_task, "puppy", ["<dog1>"], seed=2)
    assert len(ConceptLibrary.open(library_with_one_task.root).tasks) == 1


def test_base_model_mismatch_names_model(library):
    library.check_base_model("sd15-abc123", NUM_LAYERS)
    with pytest.raises(CIDMInputError, match="sd15-abc123.*other-fp") as error:
        library.check_base_model("other-fp", NUM_LAYERS)
    assert error.value.input_name == "model"


def test_append_rejects_data_that_does_not_fit(library):
    with pytest.raises(ValueError, match="embeddings have shape"):
        append(library, "dog", ["<dog1>"], seed=1, data=make_task_data(1, n_tokens=2))
    with pytest.raises(ValueError, match="expected \\[3, in\\]"):
        append(library, "dog", ["<dog1>", "<dog2>"], seed=1, rank=3)


def test_second_writer_is_refused_while_lock_is_held(library):
    with open(library.root / ".lock", "a+b") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(CIDMInputError, match="being written by another process") as error:
            append(library, "dog", ["<dog1>", "<dog2>"], seed=1)
        assert error.value.input_name == "library"
        with pytest.raises(CIDMInputError, match="being written by another process"):
            library.save_resume_state("task_001", {"x": torch.zeros(1)}, {})
        fcntl.flock(holder.fileno(), fcntl.LOCK_UN)
    assert append(library, "dog", ["<dog1>", "<dog2>"], seed=1).index == 1


def test_writer_holds_lock_during_write(library, monkeypatch):
    other_handle = ConceptLibrary.open(library.root)
    real_replace = os.replace
    refusals = []

    def replace_while_trying_second_writer(source, destination):
        with pytest.raises(CIDMInputError, match="being written by another process"):
            append(other_handle, "cat", ["<cat1>"], seed=2)
        refusals.append(destination)
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_while_trying_second_writer)
    append(library, "dog", ["<dog1>", "<dog2>"], seed=1)
    assert len(refusals) == 2


def test_resume_state_round_trip(library):
    assert library.load_resume_state("task_001") is None
    tensors = {"lora.down": torch.randn(2, 3), "step": torch.tensor([7], dtype=torch.int64)}
    meta = {"step": 7, "concept": "dog", "lr": 1e-4}
    library.save_resume_state("task_001", tensors, meta)

    loaded_tensors, loaded_meta = ConceptLibrary.open(library.root).load_resume_state("task_001")
    assert loaded_meta == meta
    assert loaded_tensors.keys() == tensors.keys()
    torch.testing.assert_close(loaded_tensors["lora.down"], tensors["lora.down"], rtol=0, atol=0)
    assert loaded_tensors["step"].dtype == torch.int64
    assert json.loads((library.root / "manifest.json").read_text())["revision"] == library.revision


def test_resume_key_is_validated(library):
    with pytest.raises(CIDMInputError) as error:
        library.save_resume_state("../escape", {"x": torch.zeros(1)}, {})
    assert error.value.input_name == "resume_key"


def test_plain_safetensors_without_cidm_header_is_refused(library_with_one_task):
    root = library_with_one_task.root
    foreign = library_module.safetensors_bytes({"tokens.embeddings": torch.zeros(2, NUM_LAYERS, DIM)})
    (root / "foreign.safetensors").write_bytes(foreign)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tasks"][0].update(file="foreign.safetensors", sha256=hashlib.sha256(foreign).hexdigest())
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CIDMInputError, match="is not a cidm-task file"):
        ConceptLibrary.open(root).load_task(1)


def test_append_syncs_task_file_before_manifest(library, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def recording_fsync(fd):
        events.append("fsync folder" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync file")
        real_fsync(fd)

    def recording_replace(source, destination):
        events.append(f"replace {os.path.basename(destination)}")
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    append(library, "dog", ["<dog1>", "<dog2>"], seed=1)
    assert events == [
        "fsync file", "replace task_001_dog.safetensors", "fsync folder",
        "fsync file", "replace manifest.json", "fsync folder",
    ]


# Names are unambiguous (issue 16, kind 6) -------------------------------------------------------------------------
@pytest.mark.parametrize("concept, tokens, input_name, message", [
    ("cat", ["<dog>"], "tokens", r"<dog> is already used by task 1 \(dog\)"),  # a token spelling a concept
    ("dog1", ["<pup1>"], "concept", r"already uses <dog1> as a token of task 1"),  # a concept spelling a token
    ("Dog", ["<pup1>"], "concept", "already has a concept named 'dog'"),
    ("puppy", ["<DOG2>"], "tokens", r"<DOG2> is already used by task 1 \(dog\)"),
    ("cat", ["<Dog>"], "tokens", r"<Dog> is already used by task 1 \(dog\)"),
    ("cat", ["<cat>", "<cat2>"], "tokens", "the concept's own name"),
])
def test_name_collisions_are_refused_ignoring_case(library_with_one_task, concept, tokens, input_name, message):
    with pytest.raises(CIDMInputError, match=message) as error:
        library_with_one_task.check_new_task(concept, tokens)
    assert error.value.input_name == input_name
    with pytest.raises(CIDMInputError, match=message):  # append applies the same rules under its lock
        append(library_with_one_task, concept, tokens, seed=2)
    assert [t.concept for t in ConceptLibrary.open(library_with_one_task.root).tasks] == ["dog"]


def test_tokens_differing_only_in_case_are_refused():
    with pytest.raises(CIDMInputError, match="listed twice"):
        validate_tokens(["<a1>", "<A1>"])


def test_a_token_spelling_its_own_concept_is_refused_before_any_library_exists():
    with pytest.raises(CIDMInputError, match="<Cat> is the concept's own name") as error:
        validate_tokens(["<cat1>", "<Cat>"], "cat")
    assert error.value.input_name == "tokens"


def test_append_rechecks_names_under_the_lock(library_with_one_task):
    stale = ConceptLibrary.open(library_with_one_task.root)
    append(library_with_one_task, "cat", ["<cat1>"], seed=2)
    with pytest.raises(CIDMInputError, match="already has a concept named 'cat'"):
        append(stale, "CAT", ["<kitty1>"], seed=3)


# Training that can be run again (issue 15, item 2) ----------------------------------------------------------------
SETTINGS = {"tokens": ["<dog1>", "<dog2>"], "method": "cidm", "rank": 2, "multiplier": 2.0, "steps": 10, "seed": 1,
            "lr": 1e-4}


def test_trained_task_is_found_for_the_same_inputs(library_with_one_task):
    assert library_with_one_task.trained_task("dog", SETTINGS) == library_with_one_task.tasks[0]
    assert library_with_one_task.trained_task("cat", SETTINGS) is None
    # An input an older task did not record is not compared.
    assert library_with_one_task.trained_task("dog", {**SETTINGS, "training_data": "abc"}).index == 1


def test_changed_input_of_an_existing_concept_names_what_changed(library_with_one_task):
    with pytest.raises(CIDMInputError, match=r"steps 10 -> 20; lr 0.0001 -> 0.001.*new name \(e.g. 'dog_b'\)") \
            as error:
        library_with_one_task.trained_task("dog", {**SETTINGS, "steps": 20, "lr": 1e-3})
    assert error.value.input_name == "concept"
    with pytest.raises(CIDMInputError, match=r"tokens \['<dog1>', '<dog2>'\] -> \['<dog1>'\]"):
        library_with_one_task.trained_task("dog", {**SETTINGS, "tokens": ("<dog1>",)})


def test_changed_inputs_are_named_as_the_caller_names_them_and_dicts_key_by_key(tmp_path):
    library = ConceptLibrary.create(tmp_path / "pets", BASE_MODEL)
    recorded = {"seed": 1, "consolidation": {"orthogonal": 0.1, "clora": 1.0}}
    append(library, "dog", ["<dog1>"], seed=1, hyperparameters=recorded)
    names = {"seed": "training_seed", "consolidation.clora": "clora_lambda"}
    with pytest.raises(CIDMInputError) as error:
        library.trained_task("dog", {"seed": 2, "consolidation": {"orthogonal": 0.1, "clora": 10.0}}, names)
    assert "training_seed 1 -> 2; clora_lambda 1.0 -> 10.0" in str(error.value)
    assert "orthogonal" not in str(error.value), "an unchanged setting of a group is not listed"


# What is on disk decides (issue 16, kind 1) -----------------------------------------------------------------------
def test_content_id_identifies_what_the_library_holds(tmp_path):
    first = ConceptLibrary.create(tmp_path / "a" / "pets", BASE_MODEL)
    second = ConceptLibrary.create(tmp_path / "b" / "pets", BASE_MODEL)
    append(first, "dog", ["<dog1>"], seed=1)
    append(second, "cat", ["<cat1>"], seed=2)
    assert first.revision == second.revision
    assert first.content_sha256 != second.content_sha256
    assert ConceptLibrary.content_id(first.root) == first.content_sha256 == ConceptLibrary.open(first.root).content_sha256
    assert ConceptLibrary.content_id(tmp_path / "none") is None


# Crashes leave nothing behind (issue 16, kind 3) ------------------------------------------------------------------
LEFTOVERS = {
    ".task_002_cat.safetensors.0123abcd.tmp": b"\x00" * 10,
    ".manifest.json.89abcdef.tmp": b"{half a manifest",
    "task_002_cat.safetensors": b"orphan from a crashed append",
    ".resume/.cat.safetensors.00ff00ff.tmp": b"\x00",
    ".resume/dog.safetensors": b"stale: dog is already task 1",
}


def plant_leftovers(root):
    (root / ".resume").mkdir(exist_ok=True)
    for name, content in LEFTOVERS.items():
        (root / name).write_bytes(content)


def test_open_sweeps_what_a_killed_writer_left(library_with_one_task):
    root = library_with_one_task.root
    plant_leftovers(root)
    library_with_one_task.save_resume_state("cat", {"x": torch.zeros(1)}, {"step": 1})
    kept = {p.relative_to(root) for p in root.rglob("*")} - {Path(name) for name in LEFTOVERS}
    reopened = ConceptLibrary.open(root)
    assert {p.relative_to(root) for p in root.rglob("*")} == kept
    assert reopened.load_resume_state("cat") is not None  # a concept not yet appended keeps its state
    assert [t.concept for t in reopened.tasks] == ["dog"]


def test_sweep_waits_for_the_writer_lock(library_with_one_task):
    root = library_with_one_task.root
    plant_leftovers(root)
    with open(root / ".lock", "a+b") as holder:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        ConceptLibrary.open(root)
        assert all((root / name).exists() for name in LEFTOVERS)  # a writer may still be using them
        fcntl.flock(holder.fileno(), fcntl.LOCK_UN)
    append(ConceptLibrary.open(root), "cat", ["<cat1>"], seed=2)
    assert not list(root.rglob("*.tmp")) and not (root / ".resume" / "dog.safetensors").exists()


def test_append_removes_the_appended_concepts_resume_state(library_with_one_task):
    library_with_one_task.save_resume_state("cat", {"x": torch.zeros(1)}, {"step": 1})
    append(library_with_one_task, "cat", ["<cat1>"], seed=2)
    assert library_with_one_task.load_resume_state("cat") is None


# Every file read is checked (issue 16, kinds 2 and 4) -------------------------------------------------------------
def rewrite_task_file(library, change):
    """Rewrites task 1's tensors with `change` applied and fixes the manifest's sha256 to match."""
    root = library.root
    record = library.tasks[0]
    path = root / record.file
    with library_module.safe_open(str(path), framework="pt") as reader:
        metadata = reader.metadata()
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    change(tensors)
    content = library_module.safetensors_bytes(tensors, metadata=metadata)
    path.write_bytes(content)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tasks"][0]["sha256"] = hashlib.sha256(content).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    return path


def to_int8(tensors):
    for key in tensors:
        tensors[key] = (tensors[key] * 100).to(torch.int8)


def poison(tensors):
    tensors["lora.01.to_v.up"][0, 0] = float("nan")


def widen(tensors):
    tensors["tokens.embeddings"] = torch.zeros(2, NUM_LAYERS, DIM + 1, dtype=torch.float16)
    tensors["tokens.features"] = torch.zeros(2, NUM_LAYERS, DIM + 1, dtype=torch.float16)


@pytest.mark.parametrize("change, message", [
    (to_int8, "tensor '.*' has dtype int8, expected floating point"),
    (poison, "tensor 'lora.01.to_v.up' holds NaN or infinite values"),
    (widen, r"embeddings have shape \(2, 2, 9\), expected \(2, 2, 8\)"),
])
def test_task_file_with_matching_hash_but_unusable_tensors_is_refused(library_with_one_task, change, message):
    path = rewrite_task_file(library_with_one_task, change)
    with pytest.raises(CIDMInputError, match=message) as error:
        ConceptLibrary.open(library_with_one_task.root).load_task(1)
    assert error.value.input_name == "library" and str(path) in str(error.value)


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_manifest_with_a_non_finite_number_is_refused(library_with_one_task, number):
    path = library_with_one_task.root / "manifest.json"
    path.write_text(path.read_text().replace('"multiplier": 2.0', f'"multiplier": {number}'))
    with pytest.raises(CIDMInputError, match="corrupt: it holds .*, which is not a finite number") as error:
        ConceptLibrary.open(library_with_one_task.root)
    assert error.value.input_name == "library"


def test_manifest_field_of_the_wrong_type_is_refused(library_with_one_task):
    path = library_with_one_task.root / "manifest.json"
    path.write_text(path.read_text().replace('"rank": 2', '"rank": "2"'))
    with pytest.raises(CIDMInputError, match="'rank' is '2', of the wrong type"):
        ConceptLibrary.open(library_with_one_task.root)


def test_non_finite_task_data_is_never_written(library):
    data = make_task_data(1)
    data.embeddings[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="tokens.embeddings' holds NaN or infinite"):
        append(library, "dog", ["<dog1>", "<dog2>"], seed=1, data=data)
    with pytest.raises(ValueError):
        append(library, "dog", ["<dog1>", "<dog2>"], seed=1, multiplier=float("nan"))
    assert ConceptLibrary.open(library.root).tasks == [] and not list(library.root.glob("task_*"))


@pytest.mark.parametrize("damage, message", [
    ("pickle", "not a safetensors file"),
    ("nan tensor", "tensor 'lora.down' holds NaN"),
    ("nan meta", "metadata is unreadable"),
])
def test_corrupt_resume_state_says_to_untick_resume(library, damage, message):
    path = library.root / ".resume" / "dog.safetensors"
    library.save_resume_state("dog", {"lora.down": torch.ones(2)}, {"step": 1, "losses": [0.5]})
    if damage == "pickle":
        path.write_bytes(pickle.dumps({"step": 3}))
    elif damage == "nan tensor":
        library.save_resume_state("dog", {"lora.down": torch.tensor([1.0, float("nan")])}, {"step": 1})
    else:
        content = library_module.safetensors_bytes({"x": torch.ones(1)}, metadata={
            "cidm.format": library_module.RESUME_FILE_FORMAT, "cidm.resume": '{"losses": [NaN]}'})
        path.write_bytes(content)
    with pytest.raises(CIDMInputError, match=message) as error:
        library.load_resume_state("dog")
    assert error.value.input_name == "resume"
    assert "untick resume" in str(error.value) and str(path) in str(error.value)


def test_a_manifest_written_with_the_old_alpha_field_reads_as_the_multiplier(tmp_path):
    library = ConceptLibrary.create(tmp_path / "old", BASE_MODEL)
    append(library, "dog", ["<dog1>"], seed=0, multiplier=1.5)
    manifest = json.loads(library.manifest_path.read_text())
    for task in manifest["tasks"]:
        task["alpha"] = task.pop("multiplier")
    library.manifest_path.write_text(json.dumps(manifest))
    assert ConceptLibrary.open(tmp_path / "old").tasks[0].multiplier == 1.5


def test_shared_token_slots_store_one_embedding_per_slot_and_features_per_layer(tmp_path):
    """A library recording a token-slot map (manifest v2) holds [n, S, D] embeddings and [n, L, D] features; a
    task shaped for another map is refused, and a map that is not numbered by first use cannot be recorded."""
    base = {**BASE_MODEL, "token_slots": [0, 0]}
    library = ConceptLibrary.create(tmp_path / "shared", base)
    assert library.token_slots == [0, 0]
    data = make_task_data(0)
    shared = TaskData(lora=data.lora, embeddings=data.embeddings[:, :1], features=data.features)
    append(library, "dog", ["<dog1>", "<dog2>"], 0, data=shared)
    reopened = ConceptLibrary.open(tmp_path / "shared")
    assert json.loads(reopened.manifest_path.read_text())["version"] == 2
    assert tuple(reopened.load_task(1).embeddings.shape) == (2, 1, DIM)
    assert tuple(reopened.load_task(1).features.shape) == (2, NUM_LAYERS, DIM)
    with pytest.raises(ValueError, match=r"embeddings have shape \(2, 2, 8\), expected \(2, 1, 8\)"):
        append(reopened, "cat", ["<cat1>", "<cat2>"], 1)
    for slots in ([1, 0], [0, 2], [0], [0, True]):
        with pytest.raises(ValueError, match="token_slots"):
            ConceptLibrary.create(tmp_path / f"bad{len(slots)}{slots[-1]}", {**BASE_MODEL, "token_slots": slots})


def test_version_1_manifest_reads_as_one_slot_per_layer(tmp_path):
    """A library written before the token-slot map (manifest version 1, no map) opens with one slot per layer, and
    an append keeps its tasks and writes version 2."""
    library = ConceptLibrary.create(tmp_path / "old", BASE_MODEL)
    append(library, "dog", ["<dog1>", "<dog2>"], 0)
    manifest = json.loads(library.manifest_path.read_text())
    library.manifest_path.write_text(json.dumps({**manifest, "version": 1}))
    old = ConceptLibrary.open(tmp_path / "old")
    assert old.token_slots == list(range(NUM_LAYERS))
    assert_task_data_close(old.load_task(1), make_task_data(0))
    append(old, "cat", ["<cat1>", "<cat2>"], 1)
    assert json.loads(old.manifest_path.read_text())["version"] == 2
    assert [t.concept for t in ConceptLibrary.open(tmp_path / "old").tasks] == ["dog", "cat"]


def evaluation_entry(revision: int, tasks: int, scores: dict) -> Evaluation:
    return Evaluation(key=EvaluationKey(revision=revision, backbone="clip-vit-l", sampler={"steps": 20}, seed=0),
                      tasks=tasks, scores={c: {"IA": v, "TA": None, "DINO": None} for c, v in scores.items()},
                      skipped={}, created="2026-12-08T00:00:00+00:00")


def test_recording_an_evaluation_changes_neither_the_manifest_nor_the_tasks(library_with_one_task):
    """Issue 34: the forgetting history is written beside the manifest, atomically, and never rewrites a task."""
    library = library_with_one_task
    manifest = library.manifest_path.read_bytes()
    assert library.evaluation_history() == []
    first = evaluation_entry(library.revision, 1, {"dog": 0.5})
    assert library.record_evaluation(first) == [first]
    again = ConceptLibrary.open(library.root)
    assert again.content_sha256 == library.content_sha256 and library.manifest_path.read_bytes() == manifest
    assert again.evaluation_history() == [first]
    with pytest.raises(ValueError):
        again.record_evaluation(evaluation_entry(library.revision, 1, {"dog": math.inf}))
    assert again.evaluation_history() == [first]
    assert not [p.name for p in library.root.iterdir() if p.name.startswith(".evaluations")]
    (library.root / EVALUATIONS_NAME).write_text("not json")
    with pytest.raises(CIDMInputError, match="evaluations.json cannot be read"):
        again.evaluation_history()
    assert ConceptLibrary.open(library.root).load_all()  # the tasks are still readable
