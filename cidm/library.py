"""The concept library: a folder holding one safetensors file per learned task plus a versioned manifest.

Every write is atomic (temp file, fsync, os.replace, fsync of the folder) and the manifest is written last,
so a crash at any moment leaves the previous manifest and every file it references readable. What a killed writer
leaves behind (temp files, a task file the manifest never listed, the resume state of a concept it had already
appended) is swept under the writer lock by the next write or open.

The library's rules for a new task live here and are checked again under the writer lock: concept names and
tokens are unique by `cidm.names.name_key` (ignoring case), and no token spells another concept's `<name>`. What a
name or a token may hold is `cidm.names`'s rule. Every number read from
disk is checked: manifests hold no NaN or infinity, task tensors are finite floating point of the recorded shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .errors import CIDMInputError
from .evaluation import Evaluation, history_from_json, history_json, with_evaluation
from .family import SD15, ModelFamily, family_named
from .files import TEMP_PATTERN, check_room, fsync_folder, write_atomic, write_error
from .names import automatic_tokens, name_key, validate_name, validate_tokens, were_automatic
from .tokens import check_token_slots

if os.name == "nt":
    import msvcrt

    def _try_lock(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)

    def _unlock(handle) -> None:
        handle.seek(0)
        msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)

else:
    import fcntl

    def _try_lock(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(handle) -> None:
        fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


MANIFEST_FORMAT = "cidm-concept-library"
# Version 2 (issue #30) records the token slots in `base_model["token_slots"]`; version 1 manifests have none and
# are read as one slot per layer (as they were written), so they sample bit for bit as before.
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
RESUME_FOLDER = ".resume"
EVALUATIONS_NAME = "evaluations.json"  # the forgetting history (cidm.evaluation); never part of the manifest
TASK_FILE_FORMAT = "cidm-task"
RESUME_FILE_FORMAT = "cidm-resume-state"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
# Room for a task file's JSON header and the manifest's new entry, both far smaller in practice.
RECORD_ALLOWANCE = 256 * 1024

_TASK_FILE_PATTERN = re.compile(r"task_\d{3,}_.+\.safetensors")
_LORA_KEY_PATTERN = re.compile(r"lora\.(\d{2,})\.(to_q|to_k|to_v|to_out\.0)\.(down|up)")
_BASE_MODEL_REQUIRED = {"fingerprint": str, "num_layers": int, "context_dim": int}


def library_folder(parent: Path, name: str) -> Path:
    """The folder of library `name` under `parent`. Library names compare by `name_key`, as folder names do on
    Windows and macOS: an existing folder whose name differs only in case or Unicode form (`LIBA` for `libA`) is
    that library. Where a case-sensitive file system holds several such folders, the exact name wins.

    Raises:
        CIDMInputError: ("library") when the name is not valid (`validate_name`), or when it matches several
            folders that differ only in case and none exactly.
    """
    name, parent = validate_name(name, "library"), Path(parent)
    if (parent / name).exists() or not parent.is_dir():
        return parent / name
    matches = sorted(path for path in parent.iterdir() if path.is_dir() and name_key(path.name) == name_key(name))
    if len(matches) > 1:
        raise CIDMInputError("library", f"'{name}' matches the folders {', '.join(p.name for p in matches)} in "
                                        f"{parent}, which differ only in case; name one exactly")
    return matches[0] if matches else parent / name


@dataclasses.dataclass
class TaskRecord:
    """One learned concept as listed in the manifest."""

    index: int
    concept: str
    tokens: list[str]
    method: str
    rank: int
    multiplier: float  # h = Wx + multiplier·BAx, in training, aggregation and export
    steps: int
    seed: int
    hyperparameters: dict
    file: str
    sha256: str
    created: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TaskData:
    """The tensors of one task. `lora` maps (layer_index, projection) to (down [r, in], up [out, r])."""

    lora: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    embeddings: torch.Tensor
    features: torch.Tensor | None = None


@contextlib.contextmanager
def _writer_lock(root: Path):
    try:
        handle = open(root / LOCK_NAME, "a+b")
    except OSError as error:
        raise write_error(root / LOCK_NAME, error, "library") from None
    with handle:
        try:
            _try_lock(handle)
        except OSError:
            raise CIDMInputError(
                "library", f"library at {root} is being written by another process; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            _unlock(handle)


def _read_safetensors(path: Path, expected_format: str, what: str, input_name: str = "library",
                      advice: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except Exception as error:
        raise CIDMInputError(input_name, f"{what} {path} is corrupt or not a safetensors file ({error}){advice}") \
            from None
    if metadata.get("cidm.format") != expected_format:
        raise CIDMInputError(input_name, f"{what} {path} is not a {expected_format} file (cidm.format is "
                                         f"{metadata.get('cidm.format')!r}){advice}")
    return tensors, metadata


def token_slots_of(base_model: dict) -> list[int]:
    """The token slot of each layer (cidm.tokens) a library records; one per layer where none is recorded."""
    return base_model.get("token_slots", list(range(base_model["num_layers"])))


def _task_data_problem(data: TaskData, n_tokens: int, rank: int, base_model: dict) -> str | None:
    """Describe why `data` does not fit its task record and library, or None when it fits."""
    num_layers, context_dim = base_model["num_layers"], base_model["context_dim"]
    expected = (n_tokens, max(token_slots_of(base_model)) + 1, context_dim)
    if tuple(data.embeddings.shape) != expected:
        return f"embeddings have shape {tuple(data.embeddings.shape)}, expected {expected}"
    if data.features is not None and tuple(data.features.shape) != (n_tokens, num_layers, context_dim):
        return f"features have shape {tuple(data.features.shape)}, expected {(n_tokens, num_layers, context_dim)}"
    for (layer, projection), (down, up) in data.lora.items():
        if projection not in PROJECTIONS or not 0 <= layer < num_layers:
            return f"LoRA key ({layer}, {projection!r}) is not one of {num_layers} layers x {PROJECTIONS}"
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != rank or up.shape[1] != rank:
            return (
                f"LoRA ({layer}, {projection}) has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                f"expected [{rank}, in] and [out, {rank}]"
            )
        if projection in ("to_k", "to_v") and down.shape[1] != context_dim:
            return f"LoRA ({layer}, {projection}) reads {down.shape[1]} features, the text context has {context_dim}"
    return None


def _tensor_problem(key: str, tensor: torch.Tensor, floating: bool) -> str | None:
    """Why a tensor read from disk cannot be used (`floating`: it must be floating point), or None."""
    if floating and not tensor.is_floating_point():
        return f"tensor {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected floating point"
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        return f"tensor {key!r} holds NaN or infinite values"
    return None


def bytes_for_task(layer_shapes: list[dict[str, tuple[int, int]]], rank: int, n_tokens: int, context_dim: int,
                   resume_states: bool, dtype: torch.dtype = torch.float16) -> int:
    """An upper bound on the disk space that training and appending one task takes in its library folder.

    `layer_shapes` holds each cross-attention layer's (out_features, in_features) per projection. The task file
    holds every projection's factors (rank·(out + in) values) and the token embeddings and features
    (n_tokens·layers·context_dim values each at most, fewer embeddings with shared token slots) as `dtype`, plus a
    header within RECORD_ALLOWANCE. With
    `resume_states`, a save writes the new state before the old one goes: two states, each the factors and the
    embeddings in float32 with AdamW's two moments of each.
    """
    factors = sum(rank * (out + inp) for shapes in layer_shapes for out, inp in shapes.values())
    tokens = n_tokens * len(layer_shapes) * context_dim
    task = (factors + 2 * tokens) * torch.finfo(dtype).bits // 8
    resume = 2 * 3 * (factors + tokens) * 4 if resume_states else 0
    return task + resume + RECORD_ALLOWANCE


def _task_tensors(data: TaskData, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    def stored(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(device="cpu", dtype=dtype).contiguous()

    tensors = {"tokens.embeddings": stored(data.embeddings)}
    if data.features is not None:
        tensors["tokens.features"] = stored(data.features)
    for (layer, projection), (down, up) in sorted(data.lora.items()):
        tensors[f"lora.{layer:02d}.{projection}.down"] = stored(down)
        tensors[f"lora.{layer:02d}.{projection}.up"] = stored(up)
    return tensors


def _task_data_from_tensors(tensors: dict[str, torch.Tensor]) -> TaskData | str:
    """Rebuild TaskData (float32) from a task file's tensors, or return what is wrong with them."""
    if "tokens.embeddings" not in tensors:
        return "tensor tokens.embeddings is missing"
    for key, tensor in tensors.items():
        problem = _tensor_problem(key, tensor, floating=True)
        if problem is not None:
            return problem
    factors: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if key in ("tokens.embeddings", "tokens.features"):
            continue
        match = _LORA_KEY_PATTERN.fullmatch(key)
        if match is None:
            return f"unexpected tensor {key!r}"
        factors.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor.float()
    lora = {}
    for key, pair in factors.items():
        if set(pair) != {"down", "up"}:
            return f"LoRA ({key[0]}, {key[1]}) lacks its {'up' if 'down' in pair else 'down'} factor"
        lora[key] = (pair["down"], pair["up"])
    features = tensors.get("tokens.features")
    return TaskData(
        lora=lora,
        embeddings=tensors["tokens.embeddings"].float(),
        features=None if features is None else features.float(),
    )


_RECORD_TYPES = {"index": int, "concept": str, "tokens": list, "method": str, "rank": int,
                 "multiplier": (int, float), "steps": int, "seed": int, "hyperparameters": dict, "file": str,
                 "sha256": str, "created": str}


def _record_from_json(entry: object) -> TaskRecord:
    """Build a TaskRecord from manifest JSON; raises ValueError saying what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError("a task entry is not an object")
    if "alpha" in entry and "multiplier" not in entry:  # manifests written before the multiplier had one name
        entry = {("multiplier" if key == "alpha" else key): value for key, value in entry.items()}
    fields = {field.name for field in dataclasses.fields(TaskRecord)}
    if set(entry) != fields:
        raise ValueError(f"task entry has fields {sorted(entry)}, expected {sorted(fields)}")
    for key, kind in _RECORD_TYPES.items():
        if not isinstance(entry[key], kind) or isinstance(entry[key], bool):
            raise ValueError(f"task entry field {key!r} is {entry[key]!r}, of the wrong type")
    record = TaskRecord(**entry)
    file_name = record.file
    if Path(file_name).name != file_name or file_name.startswith("."):
        raise ValueError(f"task {record.index} names file {file_name!r}, which is not a plain file name")
    if not all(isinstance(token, str) for token in record.tokens):
        raise ValueError(f"task {record.index} has tokens {record.tokens!r}, expected strings")
    return record


def _check_base_model_dict(base_model: dict) -> None:
    if not isinstance(base_model, dict):
        raise ValueError("base_model must be a dict")
    for key, kind in _BASE_MODEL_REQUIRED.items():
        if not isinstance(base_model.get(key), kind) or isinstance(base_model.get(key), bool):
            raise ValueError(f"base_model[{key!r}] must be a {kind.__name__}")
    if base_model["num_layers"] < 1:
        raise ValueError("base_model['num_layers'] must be at least 1")
    try:
        check_token_slots(token_slots_of(base_model), base_model["num_layers"], "base_model['token_slots']")
    except (CIDMInputError, TypeError) as error:  # TypeError: a map that is not a sequence
        raise ValueError(str(error)) from None


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"it holds {text}, which is not a finite number")
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"it holds {name}, which is not a finite number")


def loads_finite_json(text: str):
    """`json.loads` that refuses NaN, Infinity and numbers too large for a float (ValueError naming the value)."""
    return json.loads(text, parse_float=_finite_float, parse_constant=_refuse_constant)


def _comparable(value):
    """A value as it reads back from the manifest (tuples become lists, keys strings)."""
    return json.loads(json.dumps(value, allow_nan=False))


def _differences(recorded: dict, inputs: dict) -> list[tuple[str, object, object]]:
    """(key, recorded value, new value) for every input that differs from what was recorded, dict values key by key
    ("consolidation.clora"); keys that were not recorded are not compared."""
    found = []
    for key, value in inputs.items():
        if key not in recorded or recorded[key] == value:
            continue
        old = recorded[key]
        if isinstance(old, dict) and isinstance(value, dict):
            found += [(f"{key}.{sub}", old.get(sub), value.get(sub)) for sub in sorted(set(old) | set(value))
                      if old.get(sub) != value.get(sub)]
        else:
            found.append((key, old, value))
    return found


def _shown(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


class ConceptLibrary:
    """A concept library folder. Reads need no lock; every write takes the folder's writer lock.

    `content_sha256` is the sha256 of the manifest as read: with the task files' hashes listed inside it, it
    identifies everything the library holds (ComfyUI's cache keys use it)."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.name: str = manifest["name"]
        self.revision: int = manifest["revision"]
        self.base_model: dict = manifest["base_model"]
        self.tasks: list[TaskRecord] = manifest["tasks"]
        self.content_sha256: str = manifest["sha256"]

    @property
    def num_layers(self) -> int:
        return self.base_model["num_layers"]

    @property
    def token_slots(self) -> list[int]:
        """[L]: the token slot each cross-attention layer reads (cidm.tokens); a task's embeddings are [n, S, D]."""
        return token_slots_of(self.base_model)

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @classmethod
    def create(cls, root: Path, base_model: dict) -> ConceptLibrary:
        """A new, empty library at `root` (its folder name is the library name) bound to `base_model`.

        Raises:
            CIDMInputError: ("library") when the name is not valid or a library already exists at `root`, or naming
                the path and what to do when the OS refuses a write (`write_error`).
            ValueError: when `base_model` lacks a field or has one of the wrong type.
        """
        root = Path(root)
        name = validate_name(root.name, "library")
        _check_base_model_dict(base_model)
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise write_error(root, error, "library") from None
        with _writer_lock(root):
            if (root / MANIFEST_NAME).exists():
                raise CIDMInputError("library", f"a concept library already exists at {root}")
            library = cls(root, {"name": name, "revision": 0, "base_model": dict(base_model), "tasks": [],
                                 "sha256": ""})
            library._write_manifest(library.tasks)
        return library

    @classmethod
    def open(cls, root: Path) -> ConceptLibrary:
        """Read the library at `root`; when no other process is writing it, first sweep what killed writers left.

        Raises CIDMInputError("library") when the manifest is missing, corrupt or of a newer version."""
        root = Path(root)
        library = cls(root, cls._read_manifest(root / MANIFEST_NAME))
        with contextlib.suppress(CIDMInputError, OSError):
            with _writer_lock(root):
                library._sweep()
        return library

    @staticmethod
    def content_id(root: Path) -> str | None:
        """sha256 of the manifest at `root` (what `content_sha256` will be), or None when there is no library."""
        try:
            return hashlib.sha256((Path(root) / MANIFEST_NAME).read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    @classmethod
    def open_or_create(cls, root: Path, base_model: dict) -> ConceptLibrary:
        """Open the library at `root`, creating it when absent. The caller still checks the base model."""
        root = Path(root)
        if (root / MANIFEST_NAME).exists():
            return cls.open(root)
        try:
            return cls.create(root, base_model)
        except CIDMInputError:
            # Another process may have created it between the check and our lock.
            if (root / MANIFEST_NAME).exists():
                return cls.open(root)
            raise

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        def corrupt(problem: str) -> CIDMInputError:
            return CIDMInputError("library", f"manifest {path} is corrupt: {problem}")

        try:
            content = path.read_bytes()
            text = content.decode("utf-8")
        except FileNotFoundError:
            missing = f"no concept library at {path.parent} ({MANIFEST_NAME} is missing)"
            raise CIDMInputError("library", missing) from None
        except (OSError, UnicodeDecodeError) as error:
            raise corrupt(f"cannot be read ({error})") from None
        try:
            manifest = loads_finite_json(text)
        except json.JSONDecodeError as error:
            raise corrupt(f"not valid JSON ({error})") from None
        except ValueError as error:
            raise corrupt(str(error)) from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise CIDMInputError("library", f"{path} is not a CIDM concept library manifest (format is {found!r})")
        if manifest.get("version") not in READABLE_VERSIONS:
            raise CIDMInputError(
                "library",
                f"manifest {path} has version {manifest.get('version')!r}; this node pack reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} (a newer node pack may be needed)",
            )
        if not isinstance(manifest.get("name"), str) or not isinstance(manifest.get("revision"), int):
            raise corrupt("'name' must be a string and 'revision' an integer")
        try:
            _check_base_model_dict(manifest.get("base_model"))
        except ValueError as error:
            raise corrupt(str(error)) from None
        if not isinstance(manifest.get("tasks"), list):
            raise corrupt("'tasks' must be a list")
        try:
            tasks = [_record_from_json(entry) for entry in manifest["tasks"]]
        except (ValueError, TypeError) as error:
            raise corrupt(str(error)) from None
        if len({task.index for task in tasks}) != len(tasks):
            raise corrupt("two tasks share an index")
        return {**manifest, "tasks": tasks, "sha256": hashlib.sha256(content).hexdigest()}

    def _reload(self) -> None:
        manifest = self._read_manifest(self.manifest_path)
        self.revision = manifest["revision"]
        self.base_model = manifest["base_model"]
        self.tasks = manifest["tasks"]
        self.content_sha256 = manifest["sha256"]

    def _write_manifest(self, tasks: list[TaskRecord]) -> None:
        """Write the manifest with `tasks` as the next revision; the caller holds the writer lock.

        Raises ValueError when a task holds a non-finite number (nothing is written then)."""
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "name": self.name,
            "revision": self.revision + 1,
            "base_model": self.base_model,
            "tasks": [task.to_json() for task in tasks],
        }
        content = (json.dumps(manifest, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        write_atomic(self.manifest_path, content)
        self.revision += 1
        self.tasks = list(tasks)
        self.content_sha256 = hashlib.sha256(content).hexdigest()

    def _sweep(self) -> None:
        """Delete what killed writers left: temp files, task files the manifest does not list, and resume states
        of concepts already appended. The caller holds the writer lock, so no write is in progress."""
        self._reload()
        listed = {task.file for task in self.tasks}
        appended = {task.concept for task in self.tasks}
        resume = self.root / RESUME_FOLDER
        leftovers = [path for path in self.root.iterdir() if TEMP_PATTERN.fullmatch(path.name)
                     or (_TASK_FILE_PATTERN.fullmatch(path.name) and path.name not in listed)]
        if resume.is_dir():
            leftovers += [path for path in resume.iterdir() if TEMP_PATTERN.fullmatch(path.name)
                          or (path.suffix == ".safetensors" and path.stem in appended)]
        for path in leftovers:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if leftovers:
            logging.info("CIDM: library %s: removed %d files left by an interrupted write: %s", self.name,
                         len(leftovers), ", ".join(sorted(path.name for path in leftovers)))
            fsync_folder(self.root)

    @staticmethod
    def check_room(root: Path, needed: int) -> None:
        """Refuse, before training, a library folder that cannot take `needed` more bytes (`bytes_for_task`) plus a
        new manifest beside the current one. Nothing is created: while the library does not exist, the nearest
        existing folder above it is checked.

        Raises:
            CIDMInputError: ("library") naming the folder, the space needed and free, and what to do.
        """
        manifest = Path(root) / MANIFEST_NAME
        check_room(Path(root), needed + (manifest.stat().st_size if manifest.exists() else 0), "library")

    @staticmethod
    @contextlib.contextmanager
    def creating(root: Path):
        """Wraps writes that may create the library at `root`: when one fails while no library existed before, the
        folder goes again unless it holds a task or a resume state by then, so a failed first training leaves no
        empty library behind. Re-raises what the writes raise."""
        root = Path(root)
        existed = root.is_dir()
        try:
            yield
        except BaseException:
            if not existed:
                with contextlib.suppress(CIDMInputError, OSError):
                    ConceptLibrary._remove_if_empty(root)
            raise

    @staticmethod
    def _remove_if_empty(root: Path) -> None:
        resume = root / RESUME_FOLDER
        with _writer_lock(root):
            manifest = root / MANIFEST_NAME
            if (manifest.exists() and ConceptLibrary._read_manifest(manifest)["tasks"]) \
                    or (resume.is_dir() and any(resume.iterdir())):
                return
            manifest.unlink(missing_ok=True)
        (root / LOCK_NAME).unlink()
        for folder in (resume, root):
            with contextlib.suppress(FileNotFoundError):
                folder.rmdir()

    @property
    def family(self) -> ModelFamily:
        """The model family of the base model (cidm.family); SD1.5 for libraries written before it was recorded."""
        return family_named(self.base_model.get("family", SD15.name))

    def check_base_model(self, fingerprint: str, num_layers: int, family: str = SD15.name) -> None:
        """Refuses a model other than the one the library was trained on.

        Raises:
            CIDMInputError: ("model") naming both families, or both fingerprints and layer counts.
        """
        if family != self.family.name:
            raise CIDMInputError("model", f"library {self.name} was trained on an {self.family.name}-family model, "
                                          f"this is an {family}-family model; connect the checkpoint the library was "
                                          "trained on")
        if fingerprint != self.base_model["fingerprint"] or num_layers != self.num_layers:
            raise CIDMInputError(
                "model",
                f"library {self.name} was trained on base model {self.base_model['fingerprint']} "
                f"({self.num_layers} layers), this model is {fingerprint} ({num_layers} layers)",
            )

    def token_owner(self) -> dict[str, int]:
        return {token: task.index for task in self.tasks for token in task.tokens}

    def check_new_task(self, concept: str, tokens: list[str]) -> None:
        """Refuse a new concept whose name or tokens another task already uses, ignoring case, where a concept
        `dog` owns the prompt word `<dog>`: no token may spell another concept's `<name>` and no concept may be
        named after another task's token. A token that spells the concept's own `<name>` is refused too, since
        `<name>` in a prompt stands for all of the concept's tokens.

        Raises:
            CIDMInputError: ("concept") or ("tokens") naming the task that holds the word, or when the name or a
                token is not valid (`validate_name`, `validate_tokens`).
        """
        concept = validate_name(concept, "concept")
        tokens = validate_tokens(tokens, concept)
        owners: dict[str, tuple[str, TaskRecord]] = {}
        for task in self.tasks:
            owners[name_key(f"<{task.concept}>")] = ("the concept name", task)
            owners.update({name_key(token): ("a token", task) for token in task.tokens})
        word = f"<{concept}>"
        if name_key(word) in owners:
            kind, task = owners[name_key(word)]
            held = (f"already has a concept named '{task.concept}'" if kind == "the concept name"
                    else f"already uses {word} as a token of task {task.index} ({task.concept})")
            raise CIDMInputError("concept", f"library '{self.name}' {held} (task {task.index}; names are "
                                            f"compared ignoring case); choose another name (e.g. '{concept}_b')")
        for token in tokens:
            if name_key(token) in owners:
                kind, task = owners[name_key(token)]
                raise CIDMInputError("tokens", f"{token} is already used by task {task.index} ({task.concept}) of "
                                               f"library {self.name} as {kind} (ignoring case); choose another token")

    def concept_task(self, concept: str) -> TaskRecord | None:
        """The task of `concept`, its name compared by `name_key` (ignoring case) where no task has it exactly;
        None when the library has no such concept."""
        exact = next((task for task in self.tasks if task.concept == concept), None)
        return exact or next((task for task in self.tasks if name_key(task.concept) == name_key(concept)), None)

    def automatic_tokens(self, concept: str) -> list[str]:
        """The tokens `concept` gets when none are given: the ones its task stored when that task was trained with
        automatic tokens (`<dog1> <dog2>` from before the '#' included), so that a re-run reuses it; else
        `cidm.names.automatic_tokens`."""
        task = self.concept_task(concept)
        return task.tokens if task is not None and were_automatic(task.tokens, task.concept) \
            else automatic_tokens(concept)

    def trained_task(self, concept: str, inputs: dict, input_names: dict[str, str] | None = None) -> TaskRecord | None:
        """The task that already holds `concept` when it was trained with the same `inputs`, so a re-run can reuse
        it; None when the library has no such concept.

        `inputs` maps record fields (tokens, method, rank, multiplier, steps, seed) and hyperparameter keys to the
        values a new run would store; keys an older task did not record are not compared. A dict value is compared
        key by key, as "key.subkey". `input_names` maps those keys to what the caller calls them (a node's input
        names), for the error.

        Raises:
            CIDMInputError: ("concept") naming every input that differs and how to proceed.
        """
        task = self.concept_task(concept)
        if task is None:
            return None
        recorded = {**task.hyperparameters, **{key: value for key, value in task.to_json().items()
                                               if key not in ("hyperparameters", "index", "file", "sha256",
                                                              "created", "concept")}}
        names = input_names or {}
        changed = [f"{names.get(key, key)} {_shown(old)} -> {_shown(new)}"
                   for key, old, new in _differences(recorded, _comparable(inputs))]
        if changed:
            raise CIDMInputError(
                "concept",
                f"library '{self.name}' already holds '{concept}' as task {task.index}, trained with other inputs "
                f"({'; '.join(changed)}). To reuse task {task.index}, set those inputs back; to train again, give "
                f"the concept a new name (e.g. '{concept}_b') or use a new library",
            )
        return task

    def task(self, index: int) -> TaskRecord:
        """The record of task `index` (1-based, in training order).

        Raises:
            CIDMInputError: ("library") when the library has no such task.
        """
        for task in self.tasks:
            if task.index == index:
                return task
        raise CIDMInputError("library", f"library {self.name} has no task {index}")

    def load_task(self, index: int) -> TaskData:
        """Load one task's tensors as float32 after checking the file against the manifest's sha256.

        Raises:
            CIDMInputError: ("library") naming the file (and the tensor) when the file is missing, altered, not a
                cidm-task safetensors file, or holds tensors that are not finite floating point of the recorded
                shapes; or when the library has no task `index`.
        """
        record = self.task(index)
        path = self.root / record.file
        try:
            content = path.read_bytes()
        except OSError as error:
            raise CIDMInputError("library", f"task file {path} is corrupt or missing ({error})") from None
        if hashlib.sha256(content).hexdigest() != record.sha256:
            raise CIDMInputError(
                "library",
                f"task file {path} is corrupt (its sha256 does not match the manifest); restore it from a backup",
            )
        tensors, _ = _read_safetensors(path, TASK_FILE_FORMAT, "task file")
        data = _task_data_from_tensors(tensors)
        if isinstance(data, str):
            raise CIDMInputError("library", f"task file {path} is corrupt: {data}")
        problem = _task_data_problem(data, len(record.tokens), record.rank, self.base_model)
        if problem is not None:
            raise CIDMInputError("library", f"task file {path} is corrupt: {problem}")
        return data

    def load_all(self) -> list[TaskData]:
        return [self.load_task(task.index) for task in self.tasks]

    def append_task(
        self,
        *,
        concept: str,
        tokens: list[str],
        method: str,
        rank: int,
        multiplier: float,
        steps: int,
        seed: int,
        hyperparameters: dict,
        data: TaskData,
        dtype: torch.dtype = torch.float16,
    ) -> TaskRecord:
        """Store a new task after the existing ones; older task files are never touched.

        Under the writer lock, re-reads the manifest and applies `check_new_task`.

        Raises:
            CIDMInputError: from `check_new_task` (the name or a token is taken or not valid); ("library") naming
                the file and what to do when the OS refuses a write (a full disk, a read-only folder).
            ValueError: when `data` does not fit the library or holds non-finite values, or a number is not finite.
        """
        concept = validate_name(concept, "concept")
        tokens = validate_tokens(tokens, concept)
        problem = _task_data_problem(data, len(tokens), rank, self.base_model)
        tensors = _task_tensors(data, dtype)
        problem = problem or next(filter(None, (_tensor_problem(key, tensor, floating=True)
                                                for key, tensor in tensors.items())), None)
        if problem is not None:
            raise ValueError(f"task data does not fit library {self.name}: {problem}")
        with _writer_lock(self.root):
            # Another process may have appended since this library was opened.
            self._reload()
            self.check_new_task(concept, tokens)
            index = max((task.index for task in self.tasks), default=0) + 1
            record = TaskRecord(
                index=index,
                concept=concept,
                tokens=tokens,
                method=method,
                rank=rank,
                multiplier=multiplier,
                steps=steps,
                seed=seed,
                hyperparameters=hyperparameters,
                file=f"task_{index:03d}_{concept.replace(' ', '_')}.safetensors",
                sha256="",
                created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            )
            # The header cannot hold the hash of the bytes it is part of, so it stores the record without it.
            header_record = {key: value for key, value in record.to_json().items() if key != "sha256"}
            content = safetensors_bytes(
                tensors,
                metadata={"cidm.format": TASK_FILE_FORMAT, "cidm.task": json.dumps(header_record, allow_nan=False)},
            )
            record.sha256 = hashlib.sha256(content).hexdigest()
            write_atomic(self.root / record.file, content)
            self._write_manifest([*self.tasks, record])
            self._sweep()
        return record

    def _resume_path(self, key: str) -> Path:
        return self.root / RESUME_FOLDER / f"{validate_name(key, 'resume_key')}.safetensors"

    def save_resume_state(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Store training state under `key` (tensors keep their dtype) so an interrupted training can resume.

        Raises:
            CIDMInputError: ("library") naming the file and what to do when the OS refuses the write.
        """
        path = self._resume_path(key)
        content = safetensors_bytes(
            {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
            metadata={"cidm.format": RESUME_FILE_FORMAT, "cidm.resume": json.dumps(meta, allow_nan=False)},
        )
        with _writer_lock(self.root):
            path.parent.mkdir(exist_ok=True)
            write_atomic(path, content)

    def load_resume_state(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """The state saved under `key`, or None.

        Raises:
            CIDMInputError: ("resume") naming the file (and the tensor) when it is not a cidm resume file or holds
                NaN or infinite values; the message says to untick resume.
        """
        path = self._resume_path(key)
        if not path.exists():
            return None
        restart = "untick resume to train this concept from the start (its next save replaces the file)"
        tensors, metadata = _read_safetensors(path, RESUME_FILE_FORMAT, "resume state", "resume", f"; {restart}")
        try:
            meta = loads_finite_json(metadata["cidm.resume"])
        except (KeyError, ValueError) as error:
            raise CIDMInputError("resume", f"resume state {path} is corrupt: its metadata is unreadable ({error}); "
                                           f"{restart}") from None
        problem = next(filter(None, (_tensor_problem(name, tensor, floating=False)
                                     for name, tensor in tensors.items())), None)
        if not isinstance(meta, dict):
            problem = problem or "its metadata is not an object"
        if problem is not None:
            raise CIDMInputError("resume", f"resume state {path} is corrupt: {problem}; {restart}")
        return tensors, meta

    def evaluation_history(self) -> list[Evaluation]:
        """The evaluations recorded for this library (cidm.evaluation), oldest first; [] before the first.

        Raises CIDMInputError("library") naming the file when it is unreadable."""
        path = self.root / EVALUATIONS_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        return history_from_json(text, str(path))

    def record_evaluation(self, evaluation: Evaluation) -> list[Evaluation]:
        """Adds `evaluation` to the history (replacing one under the same key) in one atomic write under the writer
        lock, and returns the new history. The manifest, the tasks and `content_sha256` stay as they are.

        Raises:
            CIDMInputError: ("library") when another process writes the library, the history is unreadable, or
                the OS refuses the write (the old history is kept then).
            ValueError: for a non-finite score (nothing is written).
        """
        with _writer_lock(self.root):
            history = with_evaluation(self.evaluation_history(), evaluation)
            write_atomic(self.root / EVALUATIONS_NAME, history_json(history))
        return history
