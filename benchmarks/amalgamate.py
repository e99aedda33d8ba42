"""Knowledge amalgamation (KA2ER) against the experts it amalgamates and the foundation alone, at
equal compute, on the real 2D data of ../shared/data.

    python -m benchmarks.amalgamate [--data ../shared/data] [--budget-minutes 2] [--feature-size 12]
                                    [--only experts foundation amalgamated no_hier_attention no_prompt_decoder no_experts no_expert_priors no_router]
    python -m benchmarks.amalgamate --report      # re-render the markdown from the raw results

Tasks, held-out cases and equal-compute rule are the universal benchmark's (benchmarks/universal.py):
JSRT (lung, heart), Shenzhen (lung), Polyp-Kvasir and Polyp-CVC (one dataset per centre), ACDC per
slice (RV, MYO, LV); each expert trains B minutes, every other arm 5 x B minutes.

- ``experts``: one medalloy expert per dataset (they are also the frozen experts of the
  amalgamated arms; cross-source rows as the experts benchmark's);
- ``foundation``: SwinUNETR alone on all tasks (no experts, no amalgamation, one head per task),
  the same per-dataset batches;
- ``amalgamated``: SwinUNETR + the five frozen experts, hierarchical attention, prompt decoder,
  each task's logits starting from its own experts' log-odds (expert priors);
- ``no_hier_attention`` (concatenate + 1x1 conv), ``no_prompt_decoder`` (one head per task),
  ``no_experts`` (the amalgamation layer's self-attention and the prompt decoder, no experts),
  ``no_expert_priors`` (the experts' hidden features only, the paper's form: the decoder answers alone),
  ``no_router`` (priors, but experts that share a task averaged, not routed).
- ``universal``: the universal benchmark's 2D universal arm (results/universal/results.json), when present:
  same tasks, splits and rule.

The hardest classes (ACDC RV and MYO; polyp across centres: the model asked as one centre on the
other's held-out cases) are reported apart. Writes ``benchmarks/results/amalgamate/results.json`` (the
issue's shape), ``raw.json`` and ``results.md``; what the runs found is in ``NOTES.md`` beside them,
written by people (the script never writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import PLAN_OPTIONS, dataset_path, foreground, member_folder, predict_and_score, splits, train_benchmark_expert

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "amalgamate"
# the universal study's summary: its 2D universal arm is a column of this table
UNIVERSAL = HERE / "results" / "universal" / "results.json"
DEFAULT_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", HERE.parent.parent / "shared" / "data"))

MEMBERS = ["JSRT", "Shenzhen", "Polyp-Kvasir", "Polyp-CVC", "ACDC"]
ARMS = ["experts", "foundation", "amalgamated", "no_hier_attention", "no_prompt_decoder", "no_experts", "no_expert_priors", "no_router"]
# arm -> (uses the experts, AmalgamateConfig overrides)
SETTINGS: dict[str, tuple[bool, dict[str, Any]]] = {
    "foundation": (False, {"decoder": "plain", "stages": []}),
    "amalgamated": (True, {}),
    "no_hier_attention": (True, {"hierarchical": False}),
    "no_prompt_decoder": (True, {"decoder": "plain"}),
    "no_experts": (False, {}),
    "no_expert_priors": (True, {"expert_priors": False}),
    "no_router": (True, {"route": False}),  # priors, but the plain mean of experts sharing a task
}
HARDEST = ["ACDC/RV", "ACDC/MYO"]
CROSS = [("Polyp-Kvasir", "Polyp-CVC"), ("Polyp-CVC", "Polyp-Kvasir")]


def log(msg: str) -> None:
    print(f"[amalgamate] {msg}", flush=True)


def train_arm(arm: str, raw: dict[str, Any], data: Path, work: Path, budget: float, seed: int, feature_size: int, batch_size: int | None) -> dict[str, Any]:
    from medalloy.planning.multi_dataset import PlanOptions
    from medalloy.recipes.amalgamate import AmalgamateConfig, train_amalgamate

    with_experts, overrides = SETTINGS[arm]
    experts = [raw["experts"][n]["run"] for n in MEMBERS] if with_experts else []
    if with_experts and "experts" not in raw:
        raise SystemExit("amalgamate.py: train the experts first (--only experts)")
    folders = {n: member_folder(n, data, work) for n in MEMBERS}
    ids = {n: splits(n, dataset_path(n, data, work), seed) for n in MEMBERS}
    options = {n: PlanOptions(**PLAN_OPTIONS.get(n, {})) for n in MEMBERS}
    cfg = AmalgamateConfig(plan_options=options, feature_size=feature_size, batch_size=batch_size, **overrides)
    cfg.train.steps, cfg.train.val_every, cfg.train.seed = 1_000_000, 200, seed
    cfg.train.time_budget_minutes = budget * len(MEMBERS)
    run = work / "runs" / arm
    log(f"{arm}: {len(experts)} experts, {cfg.train.time_budget_minutes:g} min, feature size {feature_size}")
    res = train_amalgamate(
        [folders[n] for n in MEMBERS], experts, run, config=cfg, overwrite=True, progress=sys.stderr.isatty(),
        splits={n: {"train": ids[n]["train"], "val": ids[n]["val"]} for n in MEMBERS},
    )  # fmt: skip
    scores, secs = {}, []
    for n in MEMBERS:
        scores[n], sec = predict_and_score(run, folders[n], ids[n]["test"], foreground(folders[n]), f"ka-{arm}-{n}", work)
        secs.append(sec)
    out = {
        "run": str(run), "scores": scores, "seconds_per_case": round(float(np.mean(secs)), 3), "params": int(res["params"]),
        "trainable_params": int(res["trainable_params"]), "minutes": round(res["seconds"] / 60, 2), "steps": int(res["steps"]),
        "foundation_init": res["foundation_init"],
    }  # fmt: skip
    out["cross"] = cross_rows(run, None, data, work, seed, arm)
    return out


def cross_rows(run: Path | None, expert_runs: dict[str, Any] | None, data: Path, work: Path, seed: int, arm: str) -> dict[str, Any]:
    """``train->test/polyp``: a model asked as one centre on the other centre's held-out cases."""
    rows = {}
    for train, test in CROSS:
        test_path = member_folder(test, data, work)
        ids = splits(test, dataset_path(test, data, work), seed)["test"]
        model = Path(expert_runs[train]["run"]) if expert_runs is not None else run
        scores, _ = predict_and_score(model, test_path, ids, {"polyp": 1}, f"ka-cross-{arm}-{train}-{test}", work, as_dataset=None if expert_runs else train)
        rows[f"{train}->{test}/polyp"] = scores["polyp"]
    return rows


def run_arm(arm: str, raw: dict[str, Any], data: Path, work: Path, budget: float, seed: int, feature_size: int, batch_size: int | None) -> dict[str, Any]:
    if arm == "experts":
        out = {n: train_benchmark_expert(n, data, work, work / "runs" / "experts" / n, budget, seed, dict(PLAN_OPTIONS.get(n, {})), "expert") for n in MEMBERS}
        out["cross"] = cross_rows(None, out, data, work, seed, arm)
        return out
    return train_arm(arm, raw, data, work, budget, seed, feature_size, batch_size)


# -- results ------------------------------------------------------------------------------------


def universal_rows() -> dict[str, float]:
    """The universal benchmark's 2D universal arm per task, when it has run (same tasks, splits, rule)."""
    if not UNIVERSAL.exists():
        return {}
    tasks = json.loads(UNIVERSAL.read_text(encoding="utf-8")).get("tasks", {})
    return {k: v["universal"] for k, v in tasks.items() if "universal" in v}


def summary(raw: dict[str, Any]) -> dict[str, Any]:
    """The issue's results shape, from the raw per-arm entries."""
    tasks: dict[str, dict[str, Any]] = {}
    uni = universal_rows()
    for arm in ARMS:
        entry = raw.get(arm)
        if not entry:
            continue
        for n in MEMBERS:
            scores = entry[n]["scores"] if arm == "experts" else entry["scores"].get(n, {})
            for label, s in scores.items():
                tasks.setdefault(f"{n}/{label}", {})[arm] = s["dice"]
    for key, row in tasks.items():
        row["universal"] = uni.get(key)
    hardest = {k: tasks[k] for k in HARDEST if k in tasks}
    for train, test in CROSS:
        key = f"{train}->{test}/polyp"
        hardest[key] = {arm: raw[arm]["cross"][key]["dice"] for arm in ARMS if arm in raw and key in raw[arm].get("cross", {})}
    params, minutes, steps = {}, {}, {}
    for arm, entry in raw.items():
        if arm not in ARMS:
            continue
        if arm == "experts":
            params["experts_total"] = int(sum(entry[n]["params"] for n in MEMBERS))
            minutes["experts"] = round(sum(entry[n]["minutes"] for n in MEMBERS), 2)
            steps["experts"] = int(sum(entry[n]["steps"] for n in MEMBERS))
        else:
            params[arm], minutes[arm], steps[arm] = entry["params"], entry["minutes"], entry["steps"]
            params[f"{arm}_trainable"] = entry["trainable_params"]
    return {"tasks": tasks, "hardest": hardest, "params": params, "train_minutes": minutes, "steps": steps, "setting": raw.get("setting", {})}


def _mean(rows: dict[str, dict[str, Any]], key: str) -> float | None:
    vals = [r.get(key) for r in rows.values()]
    return round(float(np.mean(vals)), 4) if vals and all(v is not None for v in vals) else None


def targets(res: dict[str, Any]) -> list[str]:
    rows, lines = res["tasks"], []
    a, e, f = _mean(rows, "amalgamated"), _mean(rows, "experts"), _mean(rows, "foundation")
    if a is not None and e is not None:
        lines.append(f"- {'met' if a >= e else 'missed'}: amalgamated mean Dice {a:.3f} vs experts {e:.3f} ({a - e:+.3f})")
    if a is not None and f is not None:
        lines.append(f"- {'met' if a > f else 'missed'}: amalgamated {a:.3f} vs the foundation alone {f:.3f} ({a - f:+.3f})")
    hard = {k: v for k, v in res["hardest"].items() if "amalgamated" in v and "experts" in v}
    if hard:
        below = [f"{k} {v['amalgamated']:.3f} < {v['experts']:.3f}" for k, v in hard.items() if v["amalgamated"] <= v["experts"]]
        lines.append(
            f"- {'met' if not below else 'missed'}: amalgamated above the experts on the hardest classes" + (f" ({'; '.join(below)})" if below else "")
        )
    return lines


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def markdown(res: dict[str, Any], raw: dict[str, Any]) -> str:
    s = res["setting"]
    cols = [c for c in ["experts", "foundation", "universal", *ARMS[2:]] if any(c in r and r[c] is not None for r in res["tasks"].values())]
    out = [
        "# Knowledge amalgamation (KA2ER) on real data",
        "",
        f"Made by `python -m benchmarks.amalgamate --budget-minutes {s.get('budget_per_expert_minutes', 2):g} --feature-size {s.get('feature_size', 12)}` "
        f"(seed {s.get('seed', 0)}): each expert {s.get('budget_per_expert_minutes', 2):g} min, every other arm 5x that, on 2 CPU cores; "
        "held-out cases as the experts and universal benchmarks (never seen in training or model selection). Dice per task; "
        "`universal` is the universal benchmark's 2D arm (its own run, same rule).",
        "",
        "| task | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for key, row in res["tasks"].items():
        out.append(f"| {key} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    out.append("| **mean** | " + " | ".join(_fmt(_mean(res["tasks"], c)) for c in cols) + " |")
    out += ["", "## Hardest classes", "", "| class | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for key, row in res["hardest"].items():
        out.append(f"| {key} | " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    out += ["", "## Cost", "", "| arm | train min | steps | parameters (trainable) |", "|---|---|---|---|"]
    for arm in ARMS:
        if arm not in raw:
            continue
        if arm == "experts":
            out.append(f"| experts (5) | {res['train_minutes']['experts']} | {res['steps']['experts']} | {res['params']['experts_total']} |")
        else:
            out.append(f"| {arm} | {res['train_minutes'][arm]} | {res['steps'][arm]} | {res['params'][arm]} ({res['params'][arm + '_trainable']}) |")
    out += ["", "## Targets", ""] + (targets(res) or ["- nothing to compare yet"])
    out += ["", "Notes (written by people, not generated): [NOTES.md](NOTES.md)."]
    return "\n".join(out) + "\n"


def save(raw: dict[str, Any], results: Path) -> dict[str, Any]:
    from medalloy.jsonio import write_text_atomic

    res = summary(raw)
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / "raw.json", json.dumps(raw, indent=2) + "\n")
    write_text_atomic(results / "results.json", json.dumps(res, indent=2) + "\n")
    write_text_atomic(results / "results.md", markdown(res, raw))
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-amalgamate")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--budget-minutes", type=float, default=2.0, help="per expert; every other arm gets 5 x this")
    p.add_argument("--feature-size", type=int, default=12, help="SwinUNETR width (12 fits 2 CPU cores; 48 on a GPU)")
    p.add_argument("--batch-size", type=int, default=None, help="amalgamation arms (default: each dataset's plan)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", choices=ARMS, default=None)
    p.add_argument("--report", action="store_true", help="re-render the results from raw.json")
    a = p.parse_args(argv)
    raw_path = a.results / "raw.json"
    raw = json.loads(raw_path.read_text(encoding="utf-8")) if raw_path.exists() else {}
    if a.report:
        save(raw, a.results)
        return 0
    if not a.data.is_dir():
        print(f"amalgamate.py: no data at {a.data}; pass --data", file=sys.stderr)
        return 1
    setting = {"budget_per_expert_minutes": a.budget_minutes, "seed": a.seed, "feature_size": a.feature_size, "batch_size": a.batch_size}
    if raw.get("setting") not in (None, setting):
        if a.only is None:
            raw = {}
        else:
            print(f"amalgamate.py: {raw_path} was made with {raw.get('setting')}; rerun every arm, or pass its settings", file=sys.stderr)
            return 1
    raw["setting"] = setting
    for arm in a.only or ARMS:
        raw[arm] = run_arm(arm, raw, a.data, a.work, a.budget_minutes, a.seed, a.feature_size, a.batch_size)
        save(raw, a.results)
    res = save(raw, a.results)
    print("\n".join(targets(res)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
