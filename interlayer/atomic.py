"""Atomic writes and safe reads for every file interlayer writes.

A write goes to a temporary name in the destination folder, is flushed and fsynced, and is renamed over the
final name, so a crash never leaves a half-written file under the final name and never destroys the previous
good one. Reads of user-supplied files use JSON and safetensors only (nothing is unpickled).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from interlayer.errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` for a temporary path beside ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot write {path}: a file stands where a folder is needed") from None
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def swap_in(staging: Path, out: Path) -> None:
    """Move every file and folder of ``staging`` into ``out`` (then remove ``staging``): an entry already in
    ``out`` is renamed aside first and deleted only after its replacement is in place, so a crash leaves either
    the previous result or the new one under each name, never a half-written one."""
    import shutil

    for item in sorted(staging.iterdir()):
        final, old = out / item.name, out / f".{item.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        old.unlink(missing_ok=True)
        if final.exists():
            final.rename(old)
        item.rename(final)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    shutil.rmtree(staging, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write ``data`` to ``path``."""
    _atomic_write(Path(path), lambda tmp: tmp.write_bytes(data))


def write_text(path: str | Path, text: str) -> None:
    """Atomically write UTF-8 ``text`` to ``path``."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write ``tensors`` as one safetensors file (tensors are made contiguous and moved to CPU)."""
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    _atomic_write(Path(path), lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def read_json(path: str | Path, what: str = "file") -> Any:
    """Read a JSON file, turning a missing or malformed file into a :class:`UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{what} {path} is not valid JSON: {exc}") from None


def read_json_object(path: str | Path, what: str = "file") -> dict[str, Any]:
    """:func:`read_json` of a file that must hold a JSON object (a :class:`UserError` naming it otherwise)."""
    data = read_json(path, what)
    if not isinstance(data, dict):
        raise UserError(f"{what} {path} must hold a JSON object, not {type(data).__name__}")
    return data


def read_tensors(path: str | Path, what: str = "file", device: str = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a missing or corrupt file into a :class:`UserError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return load_file(str(path), device=device)
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{what} {path} is not a readable safetensors file: {exc}") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata stored in a safetensors file's header."""
    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})
