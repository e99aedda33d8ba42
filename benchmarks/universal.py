"""One universal (Hermes) model against the experts it replaces, at equal compute, on the real data
of ../shared/data.

    python -m benchmarks.universal [--data ../shared/data] [--budget-minutes 6] [--mix 2d 3d]
                                   [--only experts universal no_priors task_priors_only transfer]

Held-out cases are the experts benchmark's (benchmarks/experts.py: fold 0 of 5 by patient when
known, ACDC's patient split); no arm sees them in training or model selection.

- 2D mix: JSRT (lung, heart), Shenzhen (lung), Polyp-Kvasir and Polyp-CVC (polyp, one dataset per
  centre so each is reported apart and keeps its own plan), ACDC per slice (RV, MYO, LV).
- 3D mix: Hippocampus (anterior, posterior) + ACDC as volumes (RV, MYO, LV).
- Equal compute: with a per-expert budget B, each expert trains B minutes and every universal arm
  (number of experts) x B.
- Arms: ``experts`` (one per dataset or centre, medalloy defaults and the experts benchmark's plan
  settings), ``universal`` (task + modality priors), ``no_priors`` (the same backbone, one output
  head per task, the same partial-label loss), ``task_priors_only``, ``transfer`` (2D: Shenzhen lung
  from a universal model trained without JSRT, which also gives the model's first unseen-source row,
  JSRT lung).
- Cross-source rows (as the experts benchmark's): an expert applied to another source's test cases,
  and the universal model asked as the training source (its preprocessing, modality and tasks) on
  the same cases. The universal model has seen both sources in training, the experts have not: the
  ``transfer`` arm's JSRT row is the universal model's unseen-source row.

``--only ARM`` runs some arms and merges them into the results (same budget and seed only), so a
long run can be split. Writes ``raw.json``, ``results.json`` and ``results.md`` in
``benchmarks/results/universal/`` (``--results DIR`` elsewhere); that folder holds the 2-minute table,
the earlier 6-minute runs are under ``benchmarks/results/archive/``. What the runs showed is in the
folder's ``NOTES.md``, written by people; ``results.md`` links to it and the script never writes it.
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
RESULTS = HERE / "results" / "universal"
DEFAULT_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", HERE.parent.parent / "shared" / "data"))

MIXES: dict[str, list[str]] = {
    "2d": ["JSRT", "Shenzhen", "Polyp-Kvasir", "Polyp-CVC", "ACDC"],
    "3d": ["Hippocampus", "ACDC"],
}
ARMS = ["experts", "universal", "no_priors", "task_priors_only", "transfer"]
PRIORS = {"universal": "task+modality", "no_priors": "none", "task_priors_only": "task"}
TABLE_KEY = {"experts": "expert", "universal": "universal", "no_priors": "no_priors", "task_priors_only": "task_priors_only"}
CROSS = [("Polyp-Kvasir", "Polyp-CVC"), ("Polyp-CVC", "Polyp-Kvasir"), ("JSRT", "Shenzhen"), ("Shenzhen", "JSRT")]
TRANSFER_LEFT_OUT = "JSRT"


def log(msg: str) -> None:
    print(f"[universal] {msg}", flush=True)


def plan_options(name: str, mix: str) -> dict[str, Any]:
    """The experts benchmark's planner settings (2D), or a 3D plan."""
    return dict(PLAN_OPTIONS.get(name, {})) if mix == "2d" else {"force_dim": 3}


def train_expert_arm(name: str, mix: str, data: Path, work: Path, budget: float, seed: int) -> dict[str, Any]:
    return train_benchmark_expert(name, data, work, work / "runs" / mix / "experts" / name, budget, seed, plan_options(name, mix), f"{mix} expert")


def train_universal_arm(
    arm: str, members: list[str], mix: str, data: Path, work: Path, budget: float, seed: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    from medalloy.planning.multi_dataset import PlanOptions
    from medalloy.recipes.universal import UniversalConfig, train_universal

    folders = {n: member_folder(n, data, work) for n in members}
    ids = {n: splits(n, dataset_path(n, data, work), seed) for n in members}
    options = {n: PlanOptions(**{k: v for k, v in plan_options(n, mix).items() if k != "force_dim"}) for n in members}
    cfg = UniversalConfig(dim=3 if mix == "3d" else 2, plan_options=options, priors=PRIORS.get(arm, "task+modality"), **(overrides or {}))
    cfg.train.steps, cfg.train.val_every, cfg.train.seed = 1_000_000, 200, seed
    cfg.train.time_budget_minutes = budget * len(members)
    run = work / "runs" / mix / arm
    log(f"{mix} {arm} ({cfg.priors}): {', '.join(members)}, {cfg.train.time_budget_minutes:g} min")
    res = train_universal(
        [folders[n] for n in members], run, config=cfg, overwrite=True, progress=sys.stderr.isatty(),
        splits={n: {"train": ids[n]["train"], "val": ids[n]["val"]} for n in members},
    )  # fmt: skip
    scores, secs = {}, []
    for n in members:
        scores[n], sec = predict_and_score(run, folders[n], ids[n]["test"], foreground(folders[n]), f"{mix}-{arm}-{n}", work)
        secs.append(sec)
    return {
        "run": str(run), "scores": scores, "seconds_per_case": round(float(np.mean(secs)), 3), "params": int(res["params"]),
        "minutes": round(res["seconds"] / 60, 2), "steps": int(res["steps"]), "datasets_per_step": cfg.datasets_per_step,
    }  # fmt: skip


def cross_rows(arm: str, entry: dict[str, Any], data: Path, work: Path, seed: int, members: list[str]) -> dict[str, Any]:
    """``train->test/label`` Dice and HD95 for the cross pairs whose two sources are in the mix."""
    rows = {}
    for train, test in CROSS:
        if train not in members or test not in members:
            continue
        train_path, test_path = member_folder(train, data, work), member_folder(test, data, work)
        shared = {k: v for k, v in foreground(test_path).items() if foreground(train_path).get(k) == v}
        run = Path(entry["run"]) if arm in PRIORS else Path(entry[train]["run"])
        as_dataset = train if arm in PRIORS else None  # one network for every source: asked as the first
        test_ids = splits(test, dataset_path(test, data, work), seed)["test"]
        scores, _ = predict_and_score(run, test_path, test_ids, shared, f"cross-{arm}-{train}-{test}", work, as_dataset=as_dataset)
        for label, s in scores.items():
            rows[f"{train}->{test}/{label}"] = s
    return rows


def run_arm(arm: str, mix: str, data: Path, work: Path, budget: float, seed: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    members = MIXES[mix]
    if arm == "experts":
        out = {n: train_expert_arm(n, mix, data, work, budget, seed) for n in members}
        if mix == "2d":
            out["cross"] = cross_rows(arm, out, data, work, seed, members)
        return out
    if arm == "transfer":
        kept = [n for n in members if n != TRANSFER_LEFT_OUT]
        out = train_universal_arm(arm, kept, mix, data, work, budget, seed, overrides)
        # the unseen source: JSRT lung, asked as Shenzhen (the lung dataset the model knows)
        jsrt, shenzhen = member_folder("JSRT", data, work), "Shenzhen"
        ids = splits("JSRT", dataset_path("JSRT", data, work), seed)["test"]
        out["unseen"], _ = predict_and_score(Path(out["run"]), jsrt, ids, {"lung": 1}, f"{mix}-transfer-unseen-JSRT", work, as_dataset=shenzhen)
        return out
    out = train_universal_arm(arm, members, mix, data, work, budget, seed, overrides)
    if mix == "2d":  # every arm that trains on both sources of a pair, as the experts (the robustness check)
        out["cross"] = cross_rows(arm, out, data, work, seed, members)
    return out


# -- results ------------------------------------------------------------------------------------
def table(raw: dict[str, Any], mix: str, metric: str = "dice") -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    arms = raw.get(mix, {})
    for arm, key in TABLE_KEY.items():
        entry = arms.get(arm)
        if not entry:
            continue
        for name in MIXES[mix]:
            scores = entry[name]["scores"] if arm == "experts" else entry["scores"].get(name, {})
            for label, s in scores.items():
                rows.setdefault(f"{name}/{label}", {})[key] = s[metric]
    return rows


def summary(raw: dict[str, Any], budget: float) -> dict[str, Any]:
    """The issue's results shape, from the raw per-arm entries."""
    out: dict[str, Any] = {"tasks": table(raw, "2d"), "tasks_3d": table(raw, "3d"), "hd95": table(raw, "2d", "hd95"), "hd95_3d": table(raw, "3d", "hd95")}
    two = raw.get("2d", {})
    if "transfer" in two:
        out["transfer"] = {"shenzhen_lung_without_jsrt": two["transfer"]["scores"]["Shenzhen"]["lung"]["dice"]}
        if "universal" in two:
            out["transfer"]["shenzhen_lung_with_jsrt"] = two["universal"]["scores"]["Shenzhen"]["lung"]["dice"]
        out["unseen_source"] = {"JSRT/lung": {"universal_without_jsrt": two["transfer"]["unseen"]["lung"]["dice"]}}
        if "experts" in two and "Shenzhen->JSRT/lung" in two["experts"].get("cross", {}):
            out["unseen_source"]["JSRT/lung"]["expert_shenzhen"] = two["experts"]["cross"]["Shenzhen->JSRT/lung"]["dice"]
    cross: dict[str, dict[str, float]] = {}
    for arm, key in TABLE_KEY.items():
        for k, s in two.get(arm, {}).get("cross", {}).items():
            cross.setdefault(k, {})[key] = s["dice"]
    out["cross_source"] = cross
    params: dict[str, Any] = {}
    minutes: dict[str, float] = {}
    seconds: dict[str, float] = {}
    for mix, suffix in (("2d", ""), ("3d", "_3d")):
        arms = raw.get(mix, {})
        if "universal" in arms:
            params[f"universal{suffix}"] = arms["universal"]["params"]
        if "experts" in arms:
            sizes = [arms["experts"][n]["params"] for n in MIXES[mix]]
            params[f"experts_total{suffix}"], params[f"expert_single{suffix}"] = int(sum(sizes)), int(max(sizes))
        for arm, entry in arms.items():
            if arm == "experts":
                minutes[f"experts{suffix}"] = round(sum(entry[n]["minutes"] for n in MIXES[mix]), 2)
                seconds[f"experts{suffix}"] = round(float(np.mean([entry[n]["seconds_per_case"] for n in MIXES[mix]])), 3)
            else:
                minutes[f"{arm}{suffix}"], seconds[f"{arm}{suffix}"] = entry["minutes"], entry["seconds_per_case"]
    out.update({"params": params, "train_minutes": minutes, "inference_seconds_per_case": seconds, "budget_per_expert_minutes": budget})
    return out


def _mean(rows: dict[str, dict[str, float]], key: str) -> float | None:
    vals = [r[key] for r in rows.values() if key in r]
    return round(float(np.mean(vals)), 4) if vals and len(vals) == len(rows) else None


def targets(res: dict[str, Any]) -> list[str]:
    lines = []
    for mix in ("tasks", "tasks_3d"):
        rows = res[mix]
        if not rows:
            continue
        e, u, n = _mean(rows, "expert"), _mean(rows, "universal"), _mean(rows, "no_priors")
        what = "2D" if mix == "tasks" else "3D"
        if e is not None and u is not None:
            lines.append(f"- {'met' if u >= e else 'missed'}: {what} universal mean Dice {u:.3f} vs experts {e:.3f} ({u - e:+.3f}; paper: +0.016)")
        if n is not None and u is not None:
            lines.append(f"- {'met' if u >= n else 'missed'}: {what} universal {u:.3f} vs no priors {n:.3f} ({u - n:+.3f})")
    cross = res["cross_source"]
    both = {k: v for k, v in cross.items() if "expert" in v and "universal" in v}
    if both:
        worse = [f"{k} {v['universal']:.3f} < {v['expert']:.3f}" for k, v in both.items() if v["universal"] < v["expert"]]
        lines.append(
            f"- {'met' if not worse else 'missed'}: universal >= experts on the cross-source rows"
            + (f" ({'; '.join(worse)})" if worse else "")
            + " (but the universal model saw both sources in training)"
        )
    unseen = res.get("unseen_source", {}).get("JSRT/lung", {})
    if "universal_without_jsrt" in unseen and "expert_shenzhen" in unseen:
        u, e = unseen["universal_without_jsrt"], unseen["expert_shenzhen"]
        lines.append(f"- {'met' if u >= e else 'missed'}: on a source neither saw (JSRT lung), universal without JSRT {u:.3f} vs the Shenzhen expert {e:.3f}")
    p = res["params"]
    if "universal" in p and "expert_single" in p:
        ok = p["universal"] <= 1.3 * p["expert_single"] and p["universal"] < p["experts_total"]
        lines.append(
            f"- {'met' if ok else 'missed'}: universal {p['universal'] / 1e6:.2f} M parameters <= 1.3 x one expert "
            f"({1.3 * p['expert_single'] / 1e6:.2f} M) and < the experts together ({p['experts_total'] / 1e6:.2f} M)"
        )
    return lines


def batching(raw: dict[str, Any]) -> str:
    """How the universal arms of these results batched, as each arm recorded it. Tables from before the
    record say so rather than guess: the 2-minute table's arms were run on different days with one and
    with two datasets a step, and its NOTES.md says which."""
    per_step = {e["datasets_per_step"] for mix in ("2d", "3d") for arm, e in raw.get(mix, {}).items() if arm != "experts" and "datasets_per_step" in e}
    if not per_step:
        return "batching not recorded by these arms"
    words = [("one dataset a step" if n == 1 else f"{n} datasets' batches a step") for n in sorted(per_step)]
    return " or ".join(words) + (" (the arms differ)" if len(words) > 1 else "")


def markdown(res: dict[str, Any], raw: dict[str, Any], results: Path = RESULTS) -> str:
    b = res["budget_per_expert_minutes"]
    setting = raw.get("setting", {})
    seed, overrides = int(setting.get("seed", 0)), setting.get("universal_config", {})
    where = results.resolve()
    shown = where.relative_to(HERE.parent) if where.is_relative_to(HERE.parent) else where
    out = [
        "# Universal model (Hermes) vs experts on real data",
        "",
        f"Equal compute on 2 CPU cores: each expert trains {b:g} min, each universal arm (number of experts) x {b:g} min. "
        "Held-out test cases of the experts benchmark (never used for training or model selection). Universal: each dataset at "
        f"its own plan's field of view and batch ({batching(raw)}), fusion at 64 channels. Produced by `python -m benchmarks.universal"
        + (f" --budget-minutes {b:g}" if b != 6 else "")
        + (f" --seed {seed}" if seed else "")
        + "".join(f" --set {k}={json.dumps(v)}" for k, v in overrides.items())
        + (f" --results {shown}" if where != RESULTS.resolve() else "")
        + "`.",
        "",
    ]
    for mix, title in (("tasks", "2D mix"), ("tasks_3d", "3D mix")):
        rows = res[mix]
        if not rows:
            continue
        hd = res["hd95" if mix == "tasks" else "hd95_3d"]
        keys = [k for k in TABLE_KEY.values() if any(k in r for r in rows.values())]
        out += [f"## {title} (Dice, HD95 in brackets)", "", "| task | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for task, r in rows.items():
            out.append(f"| {task} | " + " | ".join(f"{r[k]:.3f} ({hd[task][k]:.1f})" if k in r else "" for k in keys) + " |")
        means = [_mean(rows, k) for k in keys]
        out.append("| **mean** | " + " | ".join(f"**{m:.3f}**" if m is not None else "" for m in means) + " |")
        out.append("")
    if res["cross_source"]:
        cols = [key for key in TABLE_KEY.values() if any(key in v for v in res["cross_source"].values())]
        out += ["## Cross-source rows (Dice)", "", "Expert: trained on the first source only. The universal arms (universal, no priors, task priors "
                "only): asked as the first source (its preprocessing, modality and tasks); they have seen both sources in training.", "",
                "| train -> test / label | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]  # fmt: skip
        for k, v in res["cross_source"].items():
            out.append(f"| {k} | " + " | ".join(f"{v[key]:.3f}" if key in v else "" for key in cols) + " |")
        out.append("")
    if "transfer" in res:
        t = res["transfer"]
        out += ["## Transfer and an unseen source", ""]
        with_ = f"{t['shenzhen_lung_with_jsrt']:.3f}" if "shenzhen_lung_with_jsrt" in t else "not run"
        out.append(f"- Shenzhen lung: universal trained with JSRT {with_}, without JSRT {t['shenzhen_lung_without_jsrt']:.3f}.")
        u = res["unseen_source"]["JSRT/lung"]
        exp = f"; Shenzhen expert on JSRT {u['expert_shenzhen']:.3f}" if "expert_shenzhen" in u else ""
        out.append(f"- JSRT lung, a source neither saw: universal trained without JSRT {u['universal_without_jsrt']:.3f}{exp}.")
        out.append("")
    out += ["## Cost", "", "| arm | train min | steps | inference s/case | params |", "|---|---|---|---|---|"]
    for mix in ("2d", "3d"):
        suffix = "" if mix == "2d" else "_3d"
        for arm, entry in raw.get(mix, {}).items():
            if arm == "experts":
                steps, params = sum(entry[n]["steps"] for n in MIXES[mix]), sum(entry[n]["params"] for n in MIXES[mix])
                minutes, sec = res["train_minutes"]["experts" + suffix], res["inference_seconds_per_case"]["experts" + suffix]
                out.append(f"| {mix} experts ({len(MIXES[mix])}) | {minutes} | {steps} | {sec} | {params} |")
            else:
                out.append(f"| {mix} {arm} | {entry['minutes']} | {entry['steps']} | {entry['seconds_per_case']} | {entry['params']} |")
    out += ["", "## Targets", ""] + (targets(res) or ["- nothing to compare yet"])
    if (results / "NOTES.md").exists():  # a folder nobody has written notes for gets no dangling link
        out += ["", "Notes (written by people, not generated): [NOTES.md](NOTES.md)."]
    return "\n".join(out) + "\n"


def save(raw: dict[str, Any], results: Path, budget: float) -> dict[str, Any]:
    from medalloy.jsonio import write_text_atomic

    res = summary(raw, budget)
    results.mkdir(parents=True, exist_ok=True)
    write_text_atomic(results / "raw.json", json.dumps(raw, indent=2) + "\n")
    write_text_atomic(results / "results.json", json.dumps(res, indent=2) + "\n")
    write_text_atomic(results / "results.md", markdown(res, raw, results))
    return res


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs (values read as YAML: ``1``, ``null``, ``true``), checked against the universal config."""
    import yaml
    from pydantic import ValidationError

    from medalloy.recipes.config import first_error
    from medalloy.recipes.universal import UniversalConfig

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in UniversalConfig.model_fields:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY a field of the universal config (e.g. fusion_scales=1)")
        out[key] = yaml.safe_load(value)
    try:
        UniversalConfig(**out)  # a bad value fails here, before any training
    except ValidationError as e:
        raise ValueError(f"--set {' '.join(items)}: {first_error(e)}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-universal")
    p.add_argument("--budget-minutes", type=float, default=6.0, help="per expert; every universal arm gets (number of experts) x this")
    p.add_argument("--mix", nargs="*", choices=list(MIXES), default=list(MIXES))
    p.add_argument("--only", nargs="*", choices=ARMS, default=None, help="run these arms and merge them into the results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="universal-recipe settings for every universal arm (e.g. fusion_scales=1), recorded with the results",
    )
    p.add_argument("--report", action="store_true", help="only rewrite results.json / results.md from raw.json (e.g. after a change to the tables)")
    a = p.parse_args(argv)
    raw_path = a.results / "raw.json"
    if a.report:
        raw = json.loads(raw_path.read_text(encoding="utf-8"))
        save(raw, a.results, raw["setting"]["budget_per_expert_minutes"])
        return 0
    if not a.data.is_dir():
        print(f"universal.py: data folder {a.data} not found; pass --data", file=sys.stderr)
        return 1
    raw: dict[str, Any] = json.loads(raw_path.read_text(encoding="utf-8")) if raw_path.exists() else {}
    try:
        overrides = parse_overrides(a.set)
    except ValueError as e:
        print(f"universal.py: {e}", file=sys.stderr)
        return 1
    setting: dict[str, Any] = {"budget_per_expert_minutes": a.budget_minutes, "seed": a.seed}
    if overrides:  # only when given, so the results written before --set still merge
        setting["universal_config"] = overrides
    if raw and raw.get("setting") != setting:
        if a.only:
            print(f"universal.py: {raw_path} was made with {raw.get('setting')}; rerun every arm, or pass its budget, seed and --set", file=sys.stderr)
            return 1
        raw = {}
    raw["setting"] = setting
    for mix in a.mix:
        for arm in a.only or ARMS:
            if arm == "transfer" and mix != "2d":
                continue
            raw.setdefault(mix, {})[arm] = run_arm(arm, mix, a.data, a.work, a.budget_minutes, a.seed, overrides)
            save(raw, a.results, a.budget_minutes)
    res = save(raw, a.results, a.budget_minutes)
    print("\n".join(targets(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
