"""Run folders: create them without ever clobbering earlier results, and read them back."""

from __future__ import annotations

import shutil
from pathlib import Path

from medalloy.errors import MedalloyError

RUN_FILE = "run.json"


def prepare_output(out: str | Path, overwrite: bool = False, resume: bool = False, marker: str = RUN_FILE) -> Path:
    """Make ``out`` ready for a new run (or a resumed one).

    A non-empty folder is refused unless ``resume`` (keep it) or ``overwrite``; ``overwrite`` only
    deletes folders medalloy wrote itself (they hold ``marker``), so a wrong path cannot wipe user data.
    """
    out = Path(out)
    if resume:
        if not out.is_dir():
            raise MedalloyError("nothing to resume: folder does not exist", out, "start without --resume")
        return out
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MedalloyError(
                "output folder exists and is not empty", out, "pass --overwrite to replace it, --resume to continue it, or choose another --out"
            )
        if not (out / marker).exists():
            raise MedalloyError(f"refusing to delete a folder that has no {marker}", out, "choose an empty or new --out folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def resolve_checkpoint(run: str | Path, which: str = "best") -> Path:
    """A run folder (``checkpoints/<which>.safetensors``) or a checkpoint file itself."""
    run = Path(run)
    if run.is_file():
        return run
    path = run / "checkpoints" / f"{which}.safetensors"
    if not path.exists():
        fallback = run / "checkpoints" / "last.safetensors"
        if which == "best" and fallback.exists():
            return fallback
        raise MedalloyError(f"no {which} checkpoint", run, "train first (`medalloy train ...`) or give the path of a .safetensors checkpoint")
    return path
