"""Run logs: ``metrics.jsonl`` (one JSON object per training log step or validation) and a curve PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medalloy.errors import MedalloyError
from medalloy.jsonio import atomic_path, write_text_atomic


class MetricsLog:
    """Appends rows to ``metrics.jsonl``; on resume, rows past the resumed step are dropped first.

    A run killed in the middle of an append leaves a torn last line: it is dropped on resume (and
    skipped when reading), since the step it belonged to is redone anyway."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            write_text_atomic(self.path, "")
        elif self.path.exists():
            # A killed run may have logged steps whose checkpoint was never written: those are redone.
            kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")

    def rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.path) if self.path.exists() else []


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a torn last line (a killed write) is skipped, a broken line
    before it is an error."""
    path = Path(path)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise MedalloyError(f"line {i + 1} is not JSON", path, "delete the broken line (rows after it are kept), then resume") from None
    return rows


def plot_curves(rows: list[dict[str, Any]], out: Path, title: str = "") -> Path:
    """Training loss (raw and smoothed) and every validation metric against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("kind") == "train" and "loss" in r]
    val = [r for r in rows if r.get("kind") == "val"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=90)
    if train:
        steps = [r["step"] for r in train]
        loss = [r["loss"] for r in train]
        axes[0].plot(steps, loss, color="0.75", lw=0.8, label="loss")
        # Trailing mean over a tenth of the points: smooth on long runs, not lagging on short ones.
        w = max(1, len(loss) // 10)
        smooth = [sum(loss[max(0, i - w + 1) : i + 1]) / (i + 1 - max(0, i - w + 1)) for i in range(len(loss))]
        axes[0].plot(steps, smooth, color="C0", lw=1.5, label=f"loss (mean of {w})")
        # parts of the loss (e.g. ``loss/<dataset>``): a part that stops falling shows here
        parts = sorted({k for r in train for k in r if k.startswith("loss/")})
        for i, k in enumerate(parts):
            pts = [(r["step"], r[k]) for r in train if isinstance(r.get(k), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                w = max(1, len(ys) // 10)
                axes[0].plot(
                    xs, [sum(ys[max(0, j - w + 1) : j + 1]) / (j + 1 - max(0, j - w + 1)) for j in range(len(ys))], lw=0.9, color=f"C{(i + 1) % 10}", label=k
                )
        positive = min(loss) > 0 and all(r[k] > 0 for r in train for k in parts if isinstance(r.get(k), (int, float)))
        axes[0].set_yscale("log" if positive else "linear")
        axes[0].legend(fontsize=7)
    axes[0].set_xlabel("step")
    axes[0].set_title("training loss", fontsize=9)
    keys = sorted({k for r in val for k in r if k.startswith("val/")})
    for i, k in enumerate(keys):
        pts = [(r["step"], r[k]) for r in val if isinstance(r.get(k), (int, float))]
        if pts:
            axes[1].plot(*zip(*pts), marker="o", ms=3, lw=1.2, color=f"C{i % 10}", label=k[4:])
    if keys:
        axes[1].legend(fontsize=7)
    axes[1].set_xlabel("step")
    axes[1].set_title("validation", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        with atomic_path(out) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    return out
