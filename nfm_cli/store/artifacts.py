"""The artifact contract: one safetensors file per step, validated on read, written atomically.

Metadata (safetensors' string -> string map):

- ``nfm.format``: integer version of this contract (``FORMAT``),
- ``nfm.kind``: ``checkpoint`` | ``hessian-diag`` | ``measures``,
- every other ``nfm.<key>``: a JSON value (config, progress, metrics, parents, result, ...);
  ``nfm.progress.complete`` (``COMPLETE``) says a file is finished, for every kind (hessian-diag
  files written before it say ``done``: ``is_complete`` reads both).

The content hash of an artifact is the SHA-256 of its bytes; derived artifacts record their
parents' hashes under ``nfm.parents`` so a step can refuse mismatched inputs.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nfm_cli.errors import NfmError

# torch and safetensors are imported where tensors are read or written, so the header-only readers
# (report over many files) stay light
if TYPE_CHECKING:
    import torch

FORMAT = 1
KINDS = ("checkpoint", "hessian-diag", "measures")
_PREFIX = "nfm."
# Well-known metadata entries and the JSON type every reader assumes: a file where one has another
# type (null, a number, a list, ...) is corrupt and refused on read, so no reader meets it.
_META_TYPES = {"config": dict, "model": dict, "progress": dict, "metrics": dict, "parents": dict,
               "result": dict, "optimizer": dict, "data": dict, "source": dict, "history": list,
               "wall_time": (int, float), "version": str, "checkpoint_path": str}
_TYPE_NAMES = {dict: "a JSON object", list: "a JSON list", str: "a string"}
COMPLETE = "complete"          # the nfm.progress flag of a finished artifact
_OLD_COMPLETE = "done"         # the same flag in hessian-diag files of earlier versions


def has_completion_flag(progress: Any) -> bool:
    """Whether ``progress`` (an artifact's ``nfm.progress``) says finished or not, under either name."""
    return isinstance(progress, dict) and (COMPLETE in progress or _OLD_COMPLETE in progress)


def is_complete(progress: Any) -> bool:
    """Whether ``progress`` says the artifact is finished: ``complete``, or ``done`` in older files."""
    if not isinstance(progress, dict):
        return False
    return bool(progress[COMPLETE] if COMPLETE in progress else progress.get(_OLD_COMPLETE))


@dataclass
class Artifact:
    """A validated artifact: its kind, decoded metadata, tensors (CPU) and content hash."""

    path: Path
    kind: str
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    sha256: str = ""
    extra: dict[str, str] = field(default_factory=dict)  # metadata keys outside the nfm. namespace

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor ``name``, or an error naming the file when it is missing."""
        try:
            return self.tensors[name]
        except KeyError:
            raise NfmError(f"{self.kind} file has no tensor {name!r} (truncated or edited?)", self.path) from None

    def require(self, key: str, kinds: type | tuple[type, ...] = object) -> Any:
        """The metadata value ``key`` (without the ``nfm.`` prefix), checked to be of ``kinds``."""
        if key not in self.meta:
            raise NfmError(f"{self.kind} file has no metadata entry nfm.{key}", self.path)
        value = self.meta[key]
        if not isinstance(value, kinds) or isinstance(value, bool) and kinds in (int, float, (int, float)):
            raise NfmError(f"{self.kind} file has a malformed nfm.{key} entry", self.path)
        return value


def content_hash(data: bytes) -> str:
    """SHA-256 hex digest of a file's bytes: an artifact's identity, recorded by its children as a parent."""
    return hashlib.sha256(data).hexdigest()


def read_artifact(path: str | os.PathLike, kind: str | Iterable[str] | None = None) -> Artifact:
    """Read and validate ``path``; ``kind`` restricts the accepted kinds. Raises ``NfmError``."""
    path = Path(path)
    wanted = (kind,) if isinstance(kind, str) else (tuple(kind) if kind is not None else KINDS)
    label = " or ".join(wanted)
    if not path.exists():
        hint = " (a broken symlink)" if path.is_symlink() else ""
        raise NfmError(f"no such file{hint}; expected a {label} file", path)
    if path.is_dir():
        raise NfmError(f"is a directory, not a {label} file", path)
    if not path.is_file():          # reading a FIFO would wait for a writer forever
        raise NfmError(f"is not a regular file (a FIFO, socket or device), not a {label} file", path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NfmError(f"cannot read: {exc.strerror or exc}", path) from None
    if not data:
        raise NfmError(f"is empty, not a {label} file", path)
    from safetensors.torch import load as load_safetensors
    try:
        header_len = int.from_bytes(data[:8], "little")
        if len(data) < 8 or header_len > len(data) - 8:
            raise ValueError("header runs past the end of the file")
        raw_meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
        tensors = load_safetensors(data)
    except Exception as exc:  # safetensors raises its own error types; any failure means "not valid"
        if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":  # torch.save's zip container, or a bare pickle
            raise NfmError(f"not a safetensors file (PyTorch pickle? nfm reads only its own safetensors "
                           f"files); expected a {label} file", path) from None
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise NfmError(f"not a valid safetensors file (truncated or corrupt: {reason})", path) from None
    found, meta, extra = _decode_metadata(raw_meta, path, wanted)
    return Artifact(path, found, meta, tensors, content_hash(data), extra)


def _decode_metadata(raw_meta: Any, path: Path, wanted: tuple[str, ...]) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(kind, decoded ``nfm.*`` entries, other entries) of a safetensors header's metadata, validated."""
    label = " or ".join(wanted)
    if not isinstance(raw_meta, dict) or _PREFIX + "kind" not in raw_meta:
        raise NfmError(f"is a safetensors file but not an nfm artifact (no nfm.kind); expected a {label} file", path)
    found = raw_meta.get(_PREFIX + "kind")
    fmt = raw_meta.get(_PREFIX + "format")
    if fmt != str(FORMAT):
        raise NfmError(f"has nfm.format {fmt!r}, this nfm reads format {FORMAT}", path)
    if found not in wanted:
        raise NfmError(f"is a {found!r} file, expected a {label} file", path)
    meta: dict[str, Any] = {}
    extra: dict[str, str] = {}
    for key, value in raw_meta.items():
        if not key.startswith(_PREFIX):
            extra[key] = value
        elif key not in (_PREFIX + "kind", _PREFIX + "format"):
            try:
                meta[key[len(_PREFIX):]] = json.loads(value, parse_constant=_reject_constant)
            except (TypeError, ValueError):  # nfm never writes NaN/Infinity: such an entry is corrupt
                raise NfmError(f"metadata entry {key} is not valid JSON or holds NaN/inf (corrupt file)",
                               path) from None
            name = key[len(_PREFIX):]
            if name in _META_TYPES and (not isinstance(meta[name], _META_TYPES[name])
                                        or isinstance(meta[name], bool)):
                what = _TYPE_NAMES.get(_META_TYPES[name], "a number")
                raise NfmError(f"metadata entry {key} is not {what} (corrupt file)", path)
    return found, meta, extra


def read_metadata(path: str | os.PathLike, kind: str | Iterable[str] | None = None) -> Artifact:
    """Like ``read_artifact`` but reads only the safetensors header: kind and metadata, validated the
    same way, no tensors and no content hash (``tensors`` is empty, ``sha256`` ""). The header's
    tensor offsets must end exactly at the end of the file, so a truncated file is still refused.
    For readers of many files that need only the metadata (``nfm report``)."""
    path = Path(path)
    wanted = (kind,) if isinstance(kind, str) else (tuple(kind) if kind is not None else KINDS)
    label = " or ".join(wanted)
    if not path.is_file():
        return read_artifact(path, wanted)  # its one-line error: missing, a folder, a FIFO, ...
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            size = os.fstat(fh.fileno()).st_size
            header_len = int.from_bytes(head, "little")
            if len(head) < 8 or header_len > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(fh.read(header_len))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        if max(ends, default=0) != size - 8 - header_len:
            raise ValueError("the tensor data does not fill the file")
        raw_meta = header.get("__metadata__") or {}
    except OSError as exc:
        raise NfmError(f"cannot read: {exc.strerror or exc}", path) from None
    except Exception as exc:  # any malformed header means "not valid"
        if not path.stat().st_size:
            raise NfmError(f"is empty, not a {label} file", path) from None
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise NfmError(f"not a valid safetensors file (truncated or corrupt: {reason})", path) from None
    found, meta, extra = _decode_metadata(raw_meta, path, wanted)
    return Artifact(path, found, meta, {}, "", extra)


def _reject_constant(name: str):
    raise ValueError(f"{name} in metadata")


def peek_kind(path: str | os.PathLike) -> str | None:
    """The ``nfm.kind`` of an existing file, or None if it is not a readable nfm artifact."""
    try:
        return read_artifact(path).kind
    except NfmError:
        return None


def serialize(tensors: dict[str, torch.Tensor], kind: str, meta: dict[str, Any]) -> bytes:
    """The exact bytes ``write_artifact`` puts on disk (used for hashing before writing)."""
    from safetensors.torch import save as save_safetensors
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}")
    metadata = {_PREFIX + "format": str(FORMAT), _PREFIX + "kind": kind}
    for key, value in meta.items():
        metadata[_PREFIX + key] = json.dumps(value, sort_keys=True, allow_nan=False)
    flat = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    # safetensors refuses tensors that share storage; give each its own
    flat = {name: (t.clone() if t.untyped_storage().nbytes() != t.numel() * t.element_size() else t)
            for name, t in flat.items()}
    return save_safetensors(flat, metadata=metadata)


def write_artifact(path: str | os.PathLike, tensors: dict[str, torch.Tensor], kind: str,
                   meta: dict[str, Any]) -> str:
    """Write atomically: temp file in the same folder, fsync, rename, fsync the folder.

    An existing file at ``path`` is replaced only once the new one is complete; on any failure
    (disk full, read-only folder, ...) it is left untouched and the temp file removed.
    Returns the content hash of what was written.
    """
    path = Path(path)
    try:
        data = serialize(tensors, kind, meta)
    except ValueError:  # json refuses NaN/inf: the caller computed a broken number
        bad = [key for key, value in meta.items() if _has_nonfinite(value)]
        if not bad:
            raise
        raise NfmError(f"cannot write: metadata entry nfm.{bad[0]} holds NaN or inf (numerically broken "
                       "inputs?); nothing was written", path) from None
    atomic_write(path, lambda handle: handle.write(data))
    return content_hash(data)


def atomic_write(path: str | os.PathLike, write: Callable[[Any], Any]) -> Path:
    """Call ``write(handle)`` on a temp file in the destination folder, fsync, rename onto ``path``,
    fsync the folder. A previous file at ``path`` is replaced only once the new one is complete; on
    any failure (disk full, read-only folder, ...) it is left untouched and the temp file removed.
    Used for every file nfm writes (artifacts, CSV, PNG)."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise NfmError(f"output folder {str(folder)!r} does not exist; create it first", path)
    tmp_name = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{_writer_tag()}.", suffix=".tmp", dir=folder)
        os.chmod(tmp_name, _UMASK_MODE)  # mkstemp makes 0600; artifacts get the usual 0666 & ~umask
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_dir(folder)
        remove_stale_temp_files(path)
    except OSError as exc:
        raise NfmError(_describe_write_error(exc) + "; any previous file there is untouched", path) from None
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
    return path


def _has_nonfinite(value: Any) -> bool:
    if isinstance(value, float):
        return value != value or value in (float("inf"), float("-inf"))
    if isinstance(value, dict):
        return any(_has_nonfinite(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_nonfinite(v) for v in value)
    return False


def _writer_tag() -> str:
    """``<host>-<pid>`` in temp file names, so a later writer can tell a killed writer's leftovers."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-_") or "host"
    return f"{host}-{os.getpid()}"


def remove_stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files that writers of ``path`` on this host left when they were killed
    (SIGKILL, OOM, power loss) before renaming them; a live writer's temp file is kept."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    host = _writer_tag().rsplit("-", 1)[0]
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    prefix = f".{path.name}.{host}-"
    for name in names:
        if not (name.startswith(prefix) and name.endswith(".tmp")):
            continue
        pid_text = name[len(prefix):].split(".", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _pid_alive(int(pid_text)):
            continue
        try:
            os.unlink(folder / name)
            removed.append(folder / name)
        except OSError:
            pass
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _file_mode() -> int:
    current = os.umask(0)
    os.umask(current)
    return 0o666 & ~current


_UMASK_MODE = _file_mode()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _describe_write_error(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "cannot write: no space left on the device"
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write: the output folder is read-only or not writable ({exc.strerror})"
    if exc.errno == errno.EISDIR:
        return "cannot write: the output path is a directory"
    return f"cannot write: {exc.strerror or exc}"


def describe_artifact(path: str | os.PathLike) -> dict[str, Any]:
    """A summary of any nfm artifact for ``nfm inspect``: kind, hash, metadata, tensor list,
    and the names of floating tensors holding NaN/inf (a diverged run shows up here)."""
    import torch
    art = read_artifact(path)
    tensors = {name: {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
               for name, t in art.tensors.items()}
    nonfinite = [name for name, t in art.tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    return {"path": str(art.path), "kind": art.kind, "format": FORMAT, "sha256": art.sha256,
            "meta": art.meta, "tensors": tensors, "nonfinite_tensors": nonfinite}
