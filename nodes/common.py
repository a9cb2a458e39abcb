"""Shared translation helpers for the node families: where libraries live, and the CIDM_LIBRARY value."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import folder_paths

from ..cidm.errors import CIDMInputError
from ..cidm.library import ConceptLibrary, library_folder

LIBRARY_FOLDER = "cidm"
EVAL_FOLDER = "cidm_eval"


def register_library_folder() -> None:
    """models/cidm/<library>/ holds the concept libraries, models/cidm_eval/ the paper's evaluation backbones
    (registered like any model folder)."""
    if LIBRARY_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(LIBRARY_FOLDER, os.path.join(folder_paths.models_dir, LIBRARY_FOLDER))
    if EVAL_FOLDER not in folder_paths.folder_names_and_paths:  # safetensors only: nothing is unpickled
        folder_paths.folder_names_and_paths[EVAL_FOLDER] = ([os.path.join(folder_paths.models_dir, EVAL_FOLDER)],
                                                            {".safetensors"})


def libraries_root() -> Path:
    register_library_folder()
    return Path(folder_paths.get_folder_paths(LIBRARY_FOLDER)[0])


def existing_library_names() -> list[str]:
    root = libraries_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "manifest.json").is_file())


@dataclass(frozen=True)
class LibraryRef:
    """The CIDM_LIBRARY value passed between nodes: a library folder (which may not exist yet) and the sha256 of
    the manifest it had when the ref was made (None: no library yet)."""
    name: str
    root: str
    content: str | None

    def open(self) -> ConceptLibrary:
        """The library as this ref saw it. Raises CIDMInputError("library") when it does not exist, or when it
        changed on disk after the ref was made (a node must not read other contents than its cache key names)."""
        if ConceptLibrary.content_id(Path(self.root)) is None:
            raise CIDMInputError("library", f"library '{self.name}' has no concepts yet; train one first "
                                            f"(existing: {', '.join(existing_library_names()) or 'none'})")
        library = ConceptLibrary.open(Path(self.root))
        if library.content_sha256 != self.content:
            raise CIDMInputError("library", f"library '{self.name}' changed on disk after Load Concept Library read "
                                            "it (a Train Concept Increment in this prompt or another process wrote "
                                            "it); take the library from the last Train Concept Increment's output, "
                                            "or queue the prompt again")
        return library


def library_ref(name: str) -> LibraryRef:
    """The library named `name` (any case: `cidm.library.library_folder`), under its folder's own spelling."""
    root = library_folder(libraries_root(), name.strip())
    content = ConceptLibrary.open(root).content_sha256 if ConceptLibrary.content_id(root) else None
    return LibraryRef(name=root.name, root=str(root), content=content)


def library_fingerprint(name: str) -> str | float:
    """ComfyUI's cache key for a library: its manifest's sha256, which lists every task file's sha256. While the
    library does not exist it is NaN, which equals nothing, so the nodes that would create it always run (a
    deleted library is trained again instead of being served from the cache)."""
    content = ConceptLibrary.content_id(library_folder(libraries_root(), name.strip()))
    return float("nan") if content is None else content


def input_root() -> Path:
    """ComfyUI's input directory, resolved: every file a node reads from a folder must resolve inside it."""
    return Path(folder_paths.get_input_directory()).resolve()


def input_subfolder(folder: str, input_name: str = "folder") -> Path | None:
    """A folder named relative to ComfyUI's input directory; refuses paths that escape it, naming `input_name`."""
    folder = folder.strip()
    if not folder:
        return None
    base = input_root()
    path = (base / folder).resolve()
    if base != path and base not in path.parents:
        raise CIDMInputError(input_name, f"'{folder}' is outside ComfyUI's input directory")
    return path


def one_value(name: str, values: list):
    """The single value of an input of a list-input node; a list of several values (e.g. several concept names
    from a dataset node) is refused, naming the input, before anything runs."""
    if len(values) != 1:
        raise CIDMInputError(name, f"expects one value per run, got a list of {len(values)}; only `images` "
                                   "takes a list (all of it becomes one task)")
    return values[0]
