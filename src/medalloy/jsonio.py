"""JSON (and other small text) files: read with one-line errors, write atomically."""

from __future__ import annotations

import json
import os
import tempfile
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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` via a temporary file and a rename: a kill at any moment leaves the old file
    or the new one, never half of either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON via a temporary file and a rename, so a crash never leaves half a file."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
