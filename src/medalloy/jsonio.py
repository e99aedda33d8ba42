"""JSON (and other small text) files: read with one-line errors; the one place for atomic writes.

Files and folders the package writes whole go through :func:`atomic_path` or :func:`atomic_folder`:
built under a ``.tmp-`` name beside its target and renamed onto it when complete, so a kill at any
moment leaves the old target or the new one, never half of either (and ``open_run`` sweeps the
``.tmp-`` leftovers of a killed run).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from medalloy.errors import MedalloyError


def read_json(path: str | Path, what: str, fix_missing: str, fix_invalid: str = "fix the syntax") -> Any:
    """Parse ``path``; a missing file or invalid JSON raises a one-line :class:`MedalloyError`."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MedalloyError(f"{what} not found", path, fix_missing) from None
    except json.JSONDecodeError as exc:
        raise MedalloyError(f"invalid JSON in {what} (line {exc.lineno}: {exc.msg})", path, fix_invalid) from None
    except UnicodeDecodeError:
        raise MedalloyError(f"invalid JSON in {what} (not UTF-8 text)", path, fix_invalid) from None


FILE_MODE = 0o644  # mkstemp makes 0600 files and mkdtemp 0700 folders; outputs are meant to be shared
FOLDER_MODE = 0o755


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer to fill; on normal exit it becomes ``path``.

    The temporary file exists (empty) when yielded, named ``.tmp-*`` + ``suffix`` (default: the
    target's last suffix; pass e.g. ``".nii.gz"`` where a writer picks its format from the ending).
    Parent folders are created. On normal exit the file gets mode 0644 and replaces ``path`` in one
    rename; on an exception it is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix if suffix is None else suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` to build in; on normal exit it becomes ``path``.

    The folder (``.tmp-<name>-*``, mode 0755) replaces ``path``, a folder or file, only once complete;
    the old one is moved aside first and deleted after the swap. On an exception the temporary folder
    is deleted and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    try:
        os.chmod(tmp, FOLDER_MODE)
        yield tmp
        old = None
        if path.exists() or path.is_symlink():
            # os.replace cannot put a folder onto a non-empty one: move the old one aside, into a fresh folder
            old = Path(tempfile.mkdtemp(prefix=f".old-{path.name}-", dir=path.parent))
            os.replace(path, old / "x")
        try:
            os.replace(tmp, path)
        except BaseException:
            if old is not None:  # put the old one back rather than leave nothing at ``path``
                os.replace(old / "x", path)
                old.rmdir()
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) via :func:`atomic_path`: a kill at any moment leaves the old file or the new one."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON via a temporary file and a rename, so a crash never leaves half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
