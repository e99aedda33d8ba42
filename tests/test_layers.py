"""The package's imports point one way: cli -> recipes -> models / losses / engine -> data, as
docs/design.md draws them; no two benchmarks import each other (shared scoring lives in benchmarks/common.py)."""

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
    "interop": {"interop", "planning"},
    "recipes": {"recipes", "engine", "data", "planning", "models", "losses", "runs", "interop"},  # interop: foreign experts (nnU-Net)
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


def test_layers_import_only_downwards():
    wrong = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PKG / layer).rglob("*.py")):
            bad = _imports(path) - allowed - BASE
            if bad:
                wrong.append(f"{path.relative_to(PKG)} imports {sorted(bad)}")
    assert not wrong, wrong


def test_benchmarks_do_not_import_each_other_both_ways():
    bench = ROOT / "benchmarks"
    scripts = {p.stem for p in bench.glob("*.py")}
    edges = set()
    for p in bench.glob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            edges |= {(p.stem, m) for m in mods if m in scripts and m != p.stem}
    assert not {(a, b) for a, b in edges if (b, a) in edges}, edges
    assert {b for a, b in edges if a == "nnunet_peer"} <= {"common"}, edges  # the peer uses shared scoring only
