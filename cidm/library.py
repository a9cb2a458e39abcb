"""The concept library: a folder holding one safetensors file per learned task plus a versioned manifest.

Every write is atomic (temp file, fsync, os.replace, fsync of the folder) and the manifest is written last,
so a crash at any moment leaves the previous manifest and every file it references readable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .errors import CIDMInputError

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
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".lock"
RESUME_FOLDER = ".resume"
TASK_FILE_FORMAT = "cidm-task"
RESUME_FILE_FORMAT = "cidm-resume-state"
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
MAX_NAME_LENGTH = 64

_NAME_PATTERN = re.compile(r"[A-Za-z0-9_\-. ]+")
_LORA_KEY_PATTERN = re.compile(r"lora\.(\d{2,})\.(to_q|to_k|to_v|to_out\.0)\.(down|up)")
_BASE_MODEL_REQUIRED = {"fingerprint": str, "num_layers": int, "context_dim": int}


def validate_name(name: str, input_name: str) -> str:
    """Check a library or concept name that becomes part of a path; returns it unchanged."""
    if not isinstance(name, str) or not name:
        raise CIDMInputError(input_name, "must not be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise CIDMInputError(input_name, f"{name!r} is longer than {MAX_NAME_LENGTH} characters")
    if ".." in name or "/" in name or "\\" in name or "\0" in name:
        raise CIDMInputError(input_name, f"{name!r} must not contain '..', '/', '\\' or NUL")
    if name.startswith("."):
        raise CIDMInputError(input_name, f"{name!r} must not start with '.'")
    if name != name.strip():
        raise CIDMInputError(input_name, f"{name!r} must not start or end with a space")
    if not _NAME_PATTERN.fullmatch(name):
        raise CIDMInputError(input_name, f"{name!r} may only contain letters, digits, '_', '-', '.' and spaces")
    return name


def validate_tokens(tokens: list[str], input_name: str = "tokens") -> list[str]:
    """Check concept tokens such as "<dog1>": bracketed, no whitespace, unique; returns them as a list."""
    tokens = list(tokens)
    if not tokens:
        raise CIDMInputError(input_name, "at least one token is required")
    seen = set()
    for token in tokens:
        if not isinstance(token, str) or len(token) < 3 or not (token.startswith("<") and token.endswith(">")):
            raise CIDMInputError(input_name, f"{token!r} must look like <name1>: '<', at least one character, '>'")
        if any(char.isspace() for char in token):
            raise CIDMInputError(input_name, f"{token!r} must not contain spaces")
        if token in seen:
            raise CIDMInputError(input_name, f"{token!r} is listed twice")
        seen.add(token)
    return tokens


@dataclasses.dataclass
class TaskRecord:
    """One learned concept as listed in the manifest."""

    index: int
    concept: str
    tokens: list[str]
    method: str
    rank: int
    alpha: float
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


def _fsync_folder(folder: Path) -> None:
    # Windows cannot open a folder for fsync; its os.replace is already durable enough there.
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that readers see either the old or the new file, never a partial one."""
    # A random temp name means a temp file left by a killed process never blocks a later write.
    temp_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(temp_path, "xb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        raise
    _fsync_folder(path.parent)


@contextlib.contextmanager
def _writer_lock(root: Path):
    with open(root / LOCK_NAME, "a+b") as handle:
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


def _read_safetensors(path: Path, expected_format: str, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as reader:
            metadata = reader.metadata() or {}
            tensors = {key: reader.get_tensor(key) for key in reader.keys()}
    except Exception as error:
        raise CIDMInputError("library", f"{what} {path} is corrupt or not a safetensors file ({error})") from None
    if metadata.get("cidm.format") != expected_format:
        raise CIDMInputError(
            "library", f"{what} {path} is not a {expected_format} file (cidm.format is {metadata.get('cidm.format')!r})"
        )
    return tensors, metadata


def _task_data_problem(data: TaskData, n_tokens: int, rank: int, num_layers: int) -> str | None:
    """Describe why `data` does not fit its task record and library, or None when it fits."""
    expected = (n_tokens, num_layers)
    if data.embeddings.dim() != 3 or tuple(data.embeddings.shape[:2]) != expected:
        return f"embeddings have shape {tuple(data.embeddings.shape)}, expected ({n_tokens}, {num_layers}, dim)"
    if data.features is not None and data.features.shape != data.embeddings.shape:
        return f"features have shape {tuple(data.features.shape)}, expected {tuple(data.embeddings.shape)}"
    for (layer, projection), (down, up) in data.lora.items():
        if projection not in PROJECTIONS or not 0 <= layer < num_layers:
            return f"LoRA key ({layer}, {projection!r}) is not one of {num_layers} layers x {PROJECTIONS}"
        if down.dim() != 2 or up.dim() != 2 or down.shape[0] != rank or up.shape[1] != rank:
            return (
                f"LoRA ({layer}, {projection}) has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                f"expected [{rank}, in] and [out, {rank}]"
            )
    return None


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


def _record_from_json(entry: object) -> TaskRecord:
    """Build a TaskRecord from manifest JSON; raises ValueError saying what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError("a task entry is not an object")
    fields = {field.name for field in dataclasses.fields(TaskRecord)}
    if set(entry) != fields:
        raise ValueError(f"task entry has fields {sorted(entry)}, expected {sorted(fields)}")
    record = TaskRecord(**entry)
    file_name = record.file
    if not isinstance(file_name, str) or Path(file_name).name != file_name or file_name.startswith("."):
        raise ValueError(f"task {record.index} names file {file_name!r}, which is not a plain file name")
    if not isinstance(record.index, int) or not isinstance(record.tokens, list) or not isinstance(record.sha256, str):
        raise ValueError(f"task entry {entry!r} has fields of the wrong type")
    return record


def _check_base_model_dict(base_model: dict) -> None:
    if not isinstance(base_model, dict):
        raise ValueError("base_model must be a dict")
    for key, kind in _BASE_MODEL_REQUIRED.items():
        if not isinstance(base_model.get(key), kind):
            raise ValueError(f"base_model[{key!r}] must be a {kind.__name__}")


class ConceptLibrary:
    """A concept library folder. Reads need no lock; every write takes the folder's writer lock."""

    def __init__(self, root: Path, manifest: dict):
        self.root = Path(root)
        self.name: str = manifest["name"]
        self.revision: int = manifest["revision"]
        self.base_model: dict = manifest["base_model"]
        self.tasks: list[TaskRecord] = manifest["tasks"]

    @property
    def num_layers(self) -> int:
        return self.base_model["num_layers"]

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST_NAME

    @classmethod
    def create(cls, root: Path, base_model: dict) -> ConceptLibrary:
        root = Path(root)
        name = validate_name(root.name, "library")
        _check_base_model_dict(base_model)
        root.mkdir(parents=True, exist_ok=True)
        with _writer_lock(root):
            if (root / MANIFEST_NAME).exists():
                raise CIDMInputError("library", f"a concept library already exists at {root}")
            library = cls(root, {"name": name, "revision": 0, "base_model": dict(base_model), "tasks": []})
            library._write_manifest(library.tasks)
        return library

    @classmethod
    def open(cls, root: Path) -> ConceptLibrary:
        root = Path(root)
        return cls(root, cls._read_manifest(root / MANIFEST_NAME))

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
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            missing = f"no concept library at {path.parent} ({MANIFEST_NAME} is missing)"
            raise CIDMInputError("library", missing) from None
        except (OSError, UnicodeDecodeError) as error:
            raise corrupt(f"cannot be read ({error})") from None
        try:
            manifest = json.loads(text)
        except json.JSONDecodeError as error:
            raise corrupt(f"not valid JSON ({error})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
            found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
            raise CIDMInputError("library", f"{path} is not a CIDM concept library manifest (format is {found!r})")
        if manifest.get("version") != MANIFEST_VERSION:
            raise CIDMInputError(
                "library",
                f"manifest {path} has version {manifest.get('version')!r}; this node pack reads version "
                f"{MANIFEST_VERSION} (a newer node pack may be needed)",
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
        return {**manifest, "tasks": tasks}

    def _reload(self) -> None:
        manifest = self._read_manifest(self.manifest_path)
        self.revision = manifest["revision"]
        self.base_model = manifest["base_model"]
        self.tasks = manifest["tasks"]

    def _write_manifest(self, tasks: list[TaskRecord]) -> None:
        """Write the manifest with `tasks` as the next revision; the caller holds the writer lock."""
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "name": self.name,
            "revision": self.revision + 1,
            "base_model": self.base_model,
            "tasks": [task.to_json() for task in tasks],
        }
        text = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        _write_atomic(self.manifest_path, text.encode("utf-8"))
        self.revision += 1
        self.tasks = list(tasks)

    def check_base_model(self, fingerprint: str, num_layers: int) -> None:
        if fingerprint != self.base_model["fingerprint"] or num_layers != self.num_layers:
            raise CIDMInputError(
                "model",
                f"library {self.name} was trained on base model {self.base_model['fingerprint']} "
                f"({self.num_layers} layers), this model is {fingerprint} ({num_layers} layers)",
            )

    def token_owner(self) -> dict[str, int]:
        return {token: task.index for task in self.tasks for token in task.tokens}

    def check_new_tokens(self, tokens: list[str]) -> None:
        owners = self.token_owner()
        for token in validate_tokens(tokens):
            if token in owners:
                owner = self.task(owners[token])
                raise CIDMInputError(
                    "tokens",
                    f"{token} is already used by task {owner.index} ({owner.concept}) of library {self.name}; "
                    "choose another token",
                )

    def task(self, index: int) -> TaskRecord:
        for task in self.tasks:
            if task.index == index:
                return task
        raise CIDMInputError("library", f"library {self.name} has no task {index}")

    def load_task(self, index: int) -> TaskData:
        """Load one task's tensors as float32 after checking the file against the manifest's sha256."""
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
        problem = _task_data_problem(data, len(record.tokens), record.rank, self.num_layers)
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
        alpha: float,
        steps: int,
        seed: int,
        hyperparameters: dict,
        data: TaskData,
        dtype: torch.dtype = torch.float16,
    ) -> TaskRecord:
        """Store a new task after the existing ones; older task files are never touched."""
        validate_name(concept, "concept")
        tokens = validate_tokens(tokens)
        problem = _task_data_problem(data, len(tokens), rank, self.num_layers)
        if problem is not None:
            raise ValueError(f"task data does not fit library {self.name}: {problem}")
        with _writer_lock(self.root):
            # Another process may have appended since this library was opened.
            self._reload()
            self.check_new_tokens(tokens)
            index = max((task.index for task in self.tasks), default=0) + 1
            record = TaskRecord(
                index=index,
                concept=concept,
                tokens=tokens,
                method=method,
                rank=rank,
                alpha=alpha,
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
                _task_tensors(data, dtype),
                metadata={"cidm.format": TASK_FILE_FORMAT, "cidm.task": json.dumps(header_record)},
            )
            record.sha256 = hashlib.sha256(content).hexdigest()
            _write_atomic(self.root / record.file, content)
            self._write_manifest([*self.tasks, record])
        return record

    def _resume_path(self, key: str) -> Path:
        return self.root / RESUME_FOLDER / f"{validate_name(key, 'resume_key')}.safetensors"

    def save_resume_state(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Store training state under `key` (tensors keep their dtype) so an interrupted training can resume."""
        path = self._resume_path(key)
        content = safetensors_bytes(
            {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()},
            metadata={"cidm.format": RESUME_FILE_FORMAT, "cidm.resume": json.dumps(meta)},
        )
        with _writer_lock(self.root):
            path.parent.mkdir(exist_ok=True)
            _write_atomic(path, content)

    def load_resume_state(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        path = self._resume_path(key)
        if not path.exists():
            return None
        tensors, metadata = _read_safetensors(path, RESUME_FILE_FORMAT, "resume state")
        try:
            meta = json.loads(metadata["cidm.resume"])
        except (KeyError, json.JSONDecodeError):
            raise CIDMInputError("library", f"resume state {path} is corrupt: its metadata is unreadable") from None
        return tensors, meta

    def clear_resume_state(self, key: str) -> None:
        path = self._resume_path(key)
        with _writer_lock(self.root):
            if path.exists():
                path.unlink()
                _fsync_folder(path.parent)
