"""Shared translation helpers for the node families: where libraries live, and the CIDM_LIBRARY value."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import folder_paths

from ..cidm.errors import CIDMInputError
from ..cidm.library import ConceptLibrary, validate_name

LIBRARY_FOLDER = "cidm"


def register_library_folder() -> None:
    """models/cidm/<library>/ holds the concept libraries (registered like any model folder)."""
    if LIBRARY_FOLDER not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(LIBRARY_FOLDER, os.path.join(folder_paths.models_dir, LIBRARY_FOLDER))


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
    """The CIDM_LIBRARY value passed between nodes: a library folder (which may not exist yet) and its revision,
    so a downstream node re-runs when the library changes."""
    name: str
    root: str
    revision: int

    def open(self) -> ConceptLibrary:
        if not (Path(self.root) / "manifest.json").exists():
            raise CIDMInputError("library", f"library '{self.name}' has no concepts yet; train one first "
                                            f"(existing: {', '.join(existing_library_names()) or 'none'})")
        return ConceptLibrary.open(Path(self.root))


def library_ref(name: str) -> LibraryRef:
    name = validate_name(name.strip(), "library")
    root = libraries_root() / name
    revision = ConceptLibrary.open(root).revision if (root / "manifest.json").exists() else 0
    return LibraryRef(name=name, root=str(root), revision=revision)


def input_root() -> Path:
    """ComfyUI's input directory, resolved: every file a node reads from a folder must resolve inside it."""
    return Path(folder_paths.get_input_directory()).resolve()


def input_subfolder(folder: str) -> Path | None:
    """A folder named relative to ComfyUI's input directory; refuses paths that escape it."""
    folder = folder.strip()
    if not folder:
        return None
    base = input_root()
    path = (base / folder).resolve()
    if base != path and base not in path.parents:
        raise CIDMInputError("folder", f"'{folder}' is outside ComfyUI's input directory")
    return path
