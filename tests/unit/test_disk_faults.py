"""A library folder that cannot take a task is refused before training, naming the folder, the space and what to
do; a write the OS refuses later names its file, and a failed first training leaves no library (issue 29, kind 4).
Files the pack writes get the folder's normal permissions."""

import errno
import os
import shutil
from collections import namedtuple

import pytest
from test_library import BASE_MODEL, DIM, NUM_LAYERS, append, make_task_data

from cidm import files
from cidm.errors import CIDMInputError
from cidm.library import LOCK_NAME, ConceptLibrary, bytes_for_task
from fs_faults import nearly_full, read_only

SHAPES = [{proj: (DIM, DIM) for proj in ("to_q", "to_k", "to_v", "to_out.0")}] * NUM_LAYERS
Usage = namedtuple("Usage", "total used free")


def task_bytes(resume_states=False):
    return bytes_for_task(SHAPES, rank=2, n_tokens=2, context_dim=DIM, resume_states=resume_states)


def test_task_size_known_in_advance_bounds_the_task_file(tmp_path):
    library = ConceptLibrary.create(tmp_path / "pets", BASE_MODEL)
    record = append(library, "dog", ["<dog1>", "<dog2>"], seed=1)
    stored = (library.root / record.file).stat().st_size
    tensors = (2 * 4 * NUM_LAYERS * 2 * DIM + 2 * 2 * NUM_LAYERS * DIM) * 2  # fp16 factors, embeddings, features
    assert tensors < stored <= task_bytes() < task_bytes(resume_states=True)


def test_full_drive_is_refused_naming_the_folder_and_the_space(tmp_path, monkeypatch):
    root = tmp_path / "models" / "cidm" / "pets"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10 << 30, 10 << 30, 1000))
    with pytest.raises(CIDMInputError, match="^library: ") as caught:
        ConceptLibrary.check_room(root, task_bytes())
    message = str(caught.value)
    assert str(root) in message and files.mib(task_bytes()) in message and "0.0 MiB" in message, message
    assert "free space" in message
    assert not (tmp_path / "models").exists()  # nothing created


def test_enough_space_passes_and_creates_nothing(tmp_path):
    ConceptLibrary.check_room(tmp_path / "cidm" / "pets", task_bytes())
    assert list(tmp_path.iterdir()) == []


def test_read_only_folder_is_refused_before_training(tmp_path):
    library = ConceptLibrary.create(tmp_path / "pets", BASE_MODEL)
    with read_only(library.root):
        with pytest.raises(CIDMInputError, match="^library: cannot create files in .*pets.*writable"):
            ConceptLibrary.check_room(library.root, task_bytes())


def test_nearly_full_drive_is_refused_and_a_failed_first_write_leaves_nothing(tmp_path):
    with nearly_full(tmp_path / "drive", free=64 << 10) as drive:
        root = drive / "pets"
        with pytest.raises(CIDMInputError, match="needs .* free, its drive has"):
            ConceptLibrary.check_room(root, task_bytes())
        data = make_task_data(1)
        # to_q reads the UNet's features, whose width the library does not fix: ~128 KiB of fp16 factors.
        data.lora = {(layer, proj): (down.repeat(1, 2000), up) if proj == "to_q" else (down, up)
                     for (layer, proj), (down, up) in data.lora.items()}
        with pytest.raises(CIDMInputError, match=f"^library: cannot write {root}/task_001_dog.*No space left"):
            with ConceptLibrary.creating(root):
                ConceptLibrary.open_or_create(root, BASE_MODEL).append_task(
                    concept="dog", tokens=["<dog1>", "<dog2>"], method="cidm", rank=2, multiplier=1.0, steps=1,
                    seed=0, hyperparameters={}, data=data)
        assert sorted(path.name for path in drive.iterdir()) == ["filler"]


def test_late_write_error_names_the_file_and_the_first_training_leaves_no_library(tmp_path, monkeypatch):
    root = tmp_path / "pets"
    real_fsync = os.fsync

    def fsync(fd):  # the drive fills up while the task file is written, after the new library's manifest
        if "task_001_dog" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(CIDMInputError, match=f"^library: cannot write {root}/task_001_dog.safetensors: No space"):
        with ConceptLibrary.creating(root):
            append(ConceptLibrary.open_or_create(root, BASE_MODEL), "dog", ["<dog1>", "<dog2>"], seed=1)
    assert not root.exists()


def test_a_library_holding_a_task_survives_a_failed_write(tmp_path, monkeypatch):
    library = ConceptLibrary.create(tmp_path / "pets", BASE_MODEL)
    append(library, "dog", ["<dog1>", "<dog2>"], seed=1)
    monkeypatch.setattr(files.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EROFS, "read-only")))
    with pytest.raises(CIDMInputError, match="cannot write .*task_002_cat.*make .* writable"):
        with ConceptLibrary.creating(library.root):
            append(library, "cat", ["<cat1>", "<cat2>"], seed=2)
    assert [task.concept for task in ConceptLibrary.open(library.root).tasks] == ["dog"]


def test_read_only_lock_file_names_the_file(tmp_path):
    library = ConceptLibrary.create(tmp_path / "pets", BASE_MODEL)
    with read_only(library.root / LOCK_NAME):
        with pytest.raises(CIDMInputError, match=f"^library: cannot write {library.root / LOCK_NAME}"):
            append(library, "dog", ["<dog1>", "<dog2>"], seed=1)


def test_written_files_get_the_folders_normal_permissions(tmp_path):
    previous = os.umask(0o027)
    try:
        library = ConceptLibrary.create(tmp_path / "pets", BASE_MODEL)
        record = append(library, "dog", ["<dog1>", "<dog2>"], seed=1)
        files.write_atomic(tmp_path / "plain.bin", b"data")
    finally:
        os.umask(previous)
    for path in (library.manifest_path, library.root / record.file, tmp_path / "plain.bin"):
        assert path.stat().st_mode & 0o777 == 0o640, path
    assert (tmp_path / "plain.bin").read_bytes() == b"data"
