"""Per-module mutation score and the surviving mutants of the last `make mutation` run (docs/testing.md).

Run from the repository root after `mutmut run`; reads mutmut's result files under ./mutants (its
[tool.mutmut] section in pyproject.toml says which files were mutated). Prints Markdown:

    score = detected / (detected + survived + no tests)      detected = killed + timeout + crashed

A timeout or a crash (a mutant that loops or blows up memory) counts as detected: the tests did not
pass with it. "suspicious" and "not checked" mutants are counted apart and left out of the score; a
"not checked" count above zero means the run stopped early (`.venv/bin/mutmut run` resumes it).

    python tools/mutation_report.py               # score table, then every survivor with its diff
    python tools/mutation_report.py --no-diff     # survivor names only
    python tools/mutation_report.py --table-only  # the score table alone
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

# mutmut is pinned (pyproject's `mutation` extra): these internals are its result-file format.
from mutmut.mutation.data import SourceFileMutationData
from mutmut.mutation.diff_apply import get_diff_for_mutant
from mutmut.stats import status_by_exit_code
from mutmut.utils.file_utils import walk_mutatable_files

DETECTED = {"killed", "timeout", "segfault"}
COLUMNS = ["mutants", "killed", "timeout", "crashed", "survived", "no tests", "suspicious", "not checked"]


def _module(path: Path) -> str:
    return ".".join(path.with_suffix("").parts[1:])  # src/medalloy/losses/cwd.py -> medalloy.losses.cwd


def _counts(statuses: list[str]) -> dict[str, int]:
    c = Counter(statuses)
    return {
        "mutants": len(statuses),
        "killed": c["killed"],
        "timeout": c["timeout"],
        "crashed": c["segfault"],
        "survived": c["survived"],
        "no tests": c["no tests"],
        "suspicious": c["suspicious"],
        "not checked": c["not checked"] + c["check was interrupted by user"],
    }


def _score(row: dict[str, int]) -> str:
    detected = row["killed"] + row["timeout"] + row["crashed"]
    judged = detected + row["survived"] + row["no tests"]
    return f"{100 * detected / judged:.1f}%" if judged else "n/a"


def _short_diff(mutant: str, path: Path) -> list[str]:
    lines = get_diff_for_mutant(mutant, path=path).splitlines()
    return [line for line in lines if line[:1] in "+-" and not line.startswith(("+++", "---"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-diff", action="store_true", help="list survivors by name only")
    ap.add_argument("--table-only", action="store_true", help="print the score table alone")
    args = ap.parse_args(argv)
    if not Path("mutants").is_dir():
        print("no ./mutants here: run `make mutation` (or `.venv/bin/mutmut run`) from the repository root first", file=sys.stderr)
        return 2

    rows: dict[str, dict[str, int]] = {}
    survivors: dict[str, list[tuple[str, str, Path]]] = {}
    for path in sorted(walk_mutatable_files()):
        data = SourceFileMutationData(path=path)
        data.load()
        if not data.exit_code_by_key:
            continue
        statuses = {name: status_by_exit_code[code] for name, code in data.exit_code_by_key.items()}
        rows[_module(path)] = _counts(list(statuses.values()))
        survivors[_module(path)] = [(name, s, path) for name, s in sorted(statuses.items()) if s in ("survived", "no tests", "suspicious")]
    if not rows:
        print("no mutation results under ./mutants", file=sys.stderr)
        return 2

    total = {k: sum(r[k] for r in rows.values()) for k in COLUMNS}
    print("| module | score | " + " | ".join(COLUMNS) + " |")
    print("|---|---:|" + "---:|" * len(COLUMNS))
    for module, row in list(rows.items()) + [("**all**", total)]:
        print(f"| {module} | {_score(row)} | " + " | ".join(str(row[k]) for k in COLUMNS) + " |")
    if args.table_only:
        return 0

    print(f"\n## Survivors ({total['survived']} survived, {total['no tests']} no tests, {total['suspicious']} suspicious)")
    print("Judge each: keep in docs/testing.md only those that change a value the method computes.")
    for module, items in survivors.items():
        if not items:
            continue
        print(f"\n### {module}\n")
        for name, status, path in items:
            tag = "" if status == "survived" else f" ({status})"
            if args.no_diff:
                print(f"- `{name}`{tag}")
                continue
            print(f"- `{name}`{tag}")
            for line in _short_diff(name, path):
                print(f"      {line.strip()[:1]} {line[1:].strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
