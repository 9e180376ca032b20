"""The adapter store: a folder of adapters per model, listed, checked, added to and removed from.

A model's adapters are the entries of ``CLUSCA_ADAPTERS_DIR/<model>/`` (a PEFT folder
``<name>/`` or one file ``<name>.safetensors``) and, for the built-in model, the adapters it
ships (``clusca_shapes/adapters/``); an operator's adapter of the same name wins. Names follow
the model-name rule and are looked up among a folder's entries, never joined into a path, and an
entry whose real path (symlinks followed) leaves its folder is listed as unusable and never read.
The API and every worker see the same folder (a shared volume), so an adapter added or removed
here is seen by each worker at its next batch, without a restart.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from service.adapters.files import AdapterFileError, AdapterInfo, inspect_adapter, read_header
from service.registry import MODEL_NAME_PATTERN, ModelEntry

_NAME = re.compile(MODEL_NAME_PATTERN)
_SUFFIX = ".safetensors"


def shipped_adapters_dir() -> Path:
    """Where the built-in model's own adapters are (it may not exist: no adapters shipped)."""
    import clusca_shapes

    return Path(clusca_shapes.__file__).resolve().parent / "adapters"


class AdapterStoreError(ValueError):
    """An operation on the store that cannot be done; ``status`` is the HTTP status it answers."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class StoredAdapter:
    """One entry of a model's adapters: where it is, whose it is, and what it declares (or why it is unusable)."""

    name: str
    path: Path
    source: str  # "operator" (CLUSCA_ADAPTERS_DIR) or "shipped" (with the model)
    info: AdapterInfo | None
    problem: str | None

    @property
    def usable(self) -> bool:
        return self.problem is None


def name_of(entry: Path) -> str | None:
    """The adapter name of a folder entry (a folder, or a ``.safetensors`` file), or None when it is none."""
    if entry.name.startswith("."):
        return None  # uploads in progress and hidden files
    name = entry.name[: -len(_SUFFIX)] if entry.name.endswith(_SUFFIX) else entry.name
    if not entry.name.endswith(_SUFFIX) and not entry.is_dir():
        return None
    return name if _NAME.match(name) else None


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


class AdapterStore:
    """The adapters of every model: ``root`` (CLUSCA_ADAPTERS_DIR, or None) and the shipped ones."""

    def __init__(self, root: str | Path | None, max_bytes: int, shipped: Path | None = None):
        self.root = Path(root) if root else None
        self.max_bytes = max_bytes
        self.shipped = shipped if shipped is not None else shipped_adapters_dir()
        # Per file version (path, fingerprint): what it declares, so listing re-reads only what changed.
        self._seen: dict[tuple[str, str], AdapterInfo | str] = {}

    def folders(self, entry: ModelEntry) -> list[tuple[str, Path]]:
        """The model's adapter folders, the one whose adapters win first."""
        out = []
        if self.root is not None:
            out.append(("operator", self.root / entry.name))
        if entry.kind == "builtin":
            out.append(("shipped", self.shipped))
        return out

    def entries(self, entry: ModelEntry) -> dict[str, tuple[str, Path, Path]]:
        """``{name: (source, path, folder)}`` of the model's adapters, by name."""
        found: dict[str, tuple[str, Path, Path]] = {}
        if not entry.serves_adapters:
            return found
        for source, folder in self.folders(entry):
            try:
                children = sorted(folder.iterdir())
            except OSError:
                continue
            for child in children:
                name = name_of(child)
                if name is not None and name not in found:
                    found[name] = (source, child, folder)
        return found

    def _describe(self, name: str, source: str, path: Path, folder: Path) -> StoredAdapter:
        if not _inside(path, folder):
            return StoredAdapter(name, path, source, None, "its path leads outside the adapters folder")
        try:
            st = path.stat()
            key = (str(path), f"{st.st_size}-{st.st_mtime_ns}-{self._folder_stamp(path)}")
        except OSError as exc:
            return StoredAdapter(name, path, source, None, f"cannot be read ({exc.strerror})")
        seen = self._seen.get(key)
        if seen is None:
            try:
                seen = inspect_adapter(path, name, self.max_bytes)
            except AdapterFileError as exc:
                seen = str(exc)
            if len(self._seen) > 4096:
                self._seen.clear()
            self._seen[key] = seen
        if isinstance(seen, str):
            return StoredAdapter(name, path, source, None, seen)
        return StoredAdapter(name, path, source, seen, None)

    @staticmethod
    def _folder_stamp(path: Path) -> str:
        # A PEFT folder's files may change under an unchanged folder time: stamp by its files too.
        if not path.is_dir():
            return ""
        try:
            return ",".join(f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sorted(path.iterdir()))
        except OSError:
            return "?"

    def list(self, entry: ModelEntry) -> list[StoredAdapter]:
        """Every adapter of the model, usable or not, by name."""
        return [self._describe(name, *where) for name, where in sorted(self.entries(entry).items())]

    def get(self, entry: ModelEntry, name: str) -> StoredAdapter | None:
        """The adapter ``name`` of the model, or None when the model has none of that name."""
        if not _NAME.match(name):
            return None
        where = self.entries(entry).get(name)
        return None if where is None else self._describe(name, *where)

    # ------------------------------------------------------------------ the operator's changes
    def _own_folder(self, entry: ModelEntry) -> Path:
        if not entry.serves_adapters:
            raise AdapterStoreError(409, "adapters_disabled", f"model {entry.name!r} serves no adapters "
                                    "(its registry entry sets adapters.enabled: false)")
        if self.root is None:
            raise AdapterStoreError(409, "no_adapters_dir", "CLUSCA_ADAPTERS_DIR is not set: this service has no "
                                    "folder to keep added adapters in")
        return self.root / entry.name

    def check_name(self, name: str) -> None:
        if not _NAME.match(name):
            raise AdapterStoreError(422, "validation_error", "name: must be 1 to 64 letters, digits, '.', '_' "
                                    "or '-', starting with a letter or digit")

    def new_upload(self, entry: ModelEntry) -> Path:
        """A hidden file in the model's folder to write an upload into, then :meth:`commit` (or unlink)."""
        folder = self._own_folder(entry)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=_SUFFIX, dir=folder)
        os.close(fd)
        return Path(tmp)

    def commit(self, entry: ModelEntry, name: str, upload: Path) -> StoredAdapter:
        """Make the written ``upload`` (one LoRA ``.safetensors`` file) the model's adapter ``name``,
        replacing an operator's file of that name. Checked before it is visible: a bad file is
        refused (422, 413 over the size cap) and removed."""
        try:
            self.check_name(name)
            folder = self._own_folder(entry)
            if (folder / name).is_dir() or (folder / name).is_symlink():
                raise AdapterStoreError(409, "adapter_exists", f"adapter {name!r} of model {entry.name!r} is a "
                                        "folder; DELETE it first to replace it with a file")
            if upload.stat().st_size > self.max_bytes:
                raise AdapterStoreError(413, "adapter_too_large", f"body: {upload.stat().st_size} bytes, over the "
                                        f"limit of {self.max_bytes} (CLUSCA_ADAPTER_MAX_BYTES)")
            try:
                inspect_adapter(upload, name, self.max_bytes)
            except AdapterFileError as exc:
                raise AdapterStoreError(422, "invalid_adapter", f"body: {exc}") from None
            # Atomic: a worker sees the old file or the new one, never half of one.
            os.replace(upload, folder / f"{name}{_SUFFIX}")
        finally:
            if upload.exists():
                upload.unlink()
        stored = self.get(entry, name)
        assert stored is not None
        return stored

    def add(self, entry: ModelEntry, name: str, data: bytes) -> StoredAdapter:
        """Keep ``data`` as the model's adapter ``name`` (see :meth:`commit`)."""
        self.check_name(name)
        if len(data) > self.max_bytes:
            raise AdapterStoreError(413, "adapter_too_large", f"body: {len(data)} bytes, over the limit of "
                                    f"{self.max_bytes} (CLUSCA_ADAPTER_MAX_BYTES)")
        upload = self.new_upload(entry)
        upload.write_bytes(data)
        return self.commit(entry, name, upload)

    def remove(self, entry: ModelEntry, name: str) -> None:
        """Remove the operator's adapter ``name`` (404 when there is none, 409 for a shipped one)."""
        folder = self._own_folder(entry)
        where = self.entries(entry).get(name) if _NAME.match(name) else None
        if where is None:
            raise AdapterStoreError(404, "adapter_not_found", f"model {entry.name!r} has no adapter {name!r}")
        source, path, _ = where
        if source != "operator":
            raise AdapterStoreError(409, "adapter_shipped", f"adapter {name!r} ships with model {entry.name!r} "
                                    "and cannot be removed")
        if path.is_symlink() or path.is_file():
            path.unlink()  # a link goes, never what it points to
        elif _inside(path, folder):
            # Out of sight first (a rename is atomic), then gone.
            hidden = folder / f".removing-{name}-{os.getpid()}"
            os.replace(path, hidden)
            shutil.rmtree(hidden, ignore_errors=True)


__all__ = ["AdapterStore", "AdapterStoreError", "StoredAdapter", "read_header", "shipped_adapters_dir"]
