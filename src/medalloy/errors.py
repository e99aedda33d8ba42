"""One exception type for every problem a user can fix.

The CLI prints ``str(error)`` as a single line and exits with code 1, so the message must name the
file (or setting) at fault and what to do about it.
"""

from __future__ import annotations

from pathlib import Path


class MedalloyError(Exception):
    """A problem with the user's input, reported as one line: what is wrong, where, and the fix."""

    def __init__(self, message: str, path: str | Path | None = None, fix: str | None = None):
        parts = []
        if path is not None:
            parts.append(f"{path}:")
        parts.append(message.rstrip("."))
        text = " ".join(parts)
        if fix:
            text += f"; {fix.rstrip('.')}"
        super().__init__(text.replace("\n", " "))
        self.path = path
        self.fix = fix
