"""The package's imports point one way: cli -> recipes -> models / losses / engine -> data, as
docs/design.md draws them; no benchmark imports another (shared scoring lives in benchmarks/common.py)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "medalloy"

# what each layer may import from the package (base modules: errors, jsonio, seeding)
BASE = {"errors", "jsonio", "seeding"}
ALLOWED = {
    "data": {"data", "planning"},  # preprocessing reads the plan's fields
    "planning": {"planning", "data"},
    "models": {"models"},  # networks take numbers and a U-Net layout (models/unet.UNetLayout), never a plan
    "losses": {"losses"},
    "engine": {"engine", "data", "planning", "models", "losses"},
    "interop": {"interop", "planning", "runtime"},  # the ONNX sidecar is the runtime's
    # deployment without torch: only the torch-free modules of data and planning (tests/runtime imports it with torch blocked)
    "runtime": {"runtime", "data", "planning"},
    "recipes": {"recipes", "engine", "data", "planning", "models", "losses", "runs", "interop"},  # interop: foreign experts (nnU-Net)
    # the pipeline composes recipes and the applications over them (prediction, export, evaluation)
    "pipeline": {"pipeline", "recipes", "engine", "data", "planning", "models", "losses", "interop", "runs", "predict", "export", "evaluation"},
}


def _imports(path: Path) -> set[str]:
    """Top-level medalloy subpackages/modules imported by ``path`` (anywhere in the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "medalloy" and len(parts) > 1:
                found.add(parts[1])
    return found


# the modules at the package's top, with what each may import: the base modules (errors first) and
# the run-folder helpers; then the applications of the layers (evaluation, prediction, export, the
# radiograph commands), the demo, and the CLI above all
LIBRARY = set(ALLOWED) | BASE  # the pipeline included
TOP_LEVEL = {
    "errors": set(),
    "seeding": set(),
    "jsonio": {"errors"},
    "runs": {"errors"},
    "__init__": {"errors"},
    "evaluation": BASE | {"data", "engine", "planning"},
    "predict": BASE | {"data", "engine", "planning", "interop", "recipes", "runs"},
    "export": BASE | {"data", "engine", "planning", "interop", "recipes", "runs", "predict"},
    "radiograph_tasks": BASE | {"data", "engine", "models", "recipes"},
    "demo": LIBRARY | {"runs", "predict", "export", "evaluation", "radiograph_tasks"},
    "cli": LIBRARY | {"runs", "predict", "export", "evaluation", "radiograph_tasks", "demo"},
    "__main__": {"cli"},
}


def test_layers_import_only_downwards():
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PKG / layer).rglob("*.py")):
            bad = _imports(path) - allowed - BASE
            if bad:
                wrong.append(f"{path.relative_to(PKG)} imports {sorted(bad)}")
    assert not wrong, wrong


def test_every_module_has_a_place_and_keeps_to_it():
    placed = {p for layer in ALLOWED for p in (PKG / layer).rglob("*.py")}
    wrong = []
    for path in sorted(PKG.rglob("*.py")):
        if path in placed:
            continue
        if path.parent != PKG or path.stem not in TOP_LEVEL:
            wrong.append(f"{path.relative_to(PKG)} belongs to no layer: add it to tests/test_layers.py and docs/design.md")
            continue
        bad = _imports(path) - TOP_LEVEL[path.stem] - {path.stem}
        if bad:
            wrong.append(f"{path.relative_to(PKG)} imports {sorted(bad)}")
    assert not wrong, wrong


def test_benchmarks_import_only_their_shared_modules_and_never_touch_sys_path():
    """A study reads the shared datasets, splits and scoring (common) and the nnU-Net peer's driver,
    never another study; the folder is a package run with ``python -m benchmarks.<study>``."""
    bench = ROOT / "benchmarks"
    scripts = {p.stem for p in bench.glob("*.py")} - {"__init__"}
    shared = {"common", "nnunet_peer", "manifest"}  # run.py dispatches to studies as processes, never imports them
    edges = set()
    for p in bench.glob("*.py"):
        text = p.read_text(encoding="utf-8")
        assert "sys.path" not in text, f"{p.name} edits sys.path"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [f"{node.module}.{a.name}" for a in node.names] if node.module == "benchmarks" else [node.module or ""]
            else:
                continue
            for m in mods:
                assert m.split(".")[0] not in scripts, f"{p.name}: import {m} as benchmarks.{m} (the folder is a package)"
                name = m.removeprefix("benchmarks.").split(".")[0]
                if name in scripts and name != p.stem:
                    edges.add((p.stem, name))
    assert (bench / "__init__.py").is_file()
    assert {(a, b) for a, b in edges if b not in shared} == set(), edges
    assert {b for a, b in edges if a == "nnunet_peer"} <= {"common"}, edges


def test_benchmarks_keep_no_prose_in_python():
    """Findings are written by people in benchmarks/results/<study>/NOTES.md; a module-level constant
    of more than 40 words of text is prose that belongs there."""
    found = []
    for p in sorted((ROOT / "benchmarks").rglob("*.py")):
        for node in ast.parse(p.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                words = sum(len(n.value.split()) for n in ast.walk(node.value) if isinstance(n, ast.Constant) and isinstance(n.value, str))
                if words > 40:
                    found.append(f"{p.relative_to(ROOT)}:{node.lineno} ({words} words)")
    assert not found, found
