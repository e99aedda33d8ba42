"""CPU speed of medalloy's engine, side by side with plain PyTorch, in one run.

    python -m benchmarks.speed [--data ../shared/data] [--steps 200]

Phases (each in its own process, so its peak resident memory is its own):
- overhead:  images/s of the engine's training step vs a bare PyTorch loop (same network, batches,
             loss, optimiser, autocast, clipping), on pre-built JSRT batches;
- data:      share of step time spent waiting for the next batch with the default sampler;
- precision: the same JSRT expert trained fp32 and bf16 for the same steps: speed and held-out Dice;
- infer2d / infer3d: latency per 2D image (JSRT) and per 3D volume (Hippocampus, sliding window)
             in fp32, bf16 and channels-last.
Writes `benchmarks/results/speed/results.json` and `results.md`; people's notes on the results are in
NOTES.md beside them, which this script never writes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "speed"
DEFAULT_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", HERE.parent.parent / "shared" / "data"))
JSRT, HIPPO = "Dataset102_JSRT", "Dataset105_Hippocampus"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _jsrt_parts(data: Path, n_cases: int = 60):
    """Plan, prepared training cases and a sampler for JSRT (the 2D reference task)."""
    from benchmarks.common import splits
    from medalloy.data.dataset import RawDataset
    from medalloy.data.sampling import PatchSampler
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset
    from medalloy.recipes.scaffold import cache_cases as prepare_cases

    ds = RawDataset(data / JSRT)
    plan = plan_dataset(ds, fingerprint(ds, progress=False))
    split = splits("JSRT", data / JSRT)
    train = [ds.case(c) for c in split["train"][:n_cases]]
    prepared = prepare_cases(ds, train, plan, pad=True, seed=0, desc="cache", progress=False)
    sampler = PatchSampler(prepared, plan.patch_size, plan.batch_size, plan.dim, seed=0, foreground_oversample=plan.foreground_oversample)
    return ds, plan, split, sampler


def phase_overhead(data: Path, steps: int) -> dict[str, Any]:
    """Engine step vs bare loop on the same in-memory batches; alternated, best of 2 each."""
    import torch

    from medalloy.engine.precision import autocast, resolve_precision
    from medalloy.engine.trainer import TrainConfig, Trainer, TrainSpec
    from medalloy.losses import DiceCELoss
    from medalloy.models.unet import build_unet

    _, plan, _, sampler = _jsrt_parts(data, n_cases=20)
    batches = [sampler(i) for i in range(8)]
    precision = resolve_precision("auto", torch.device("cpu"))
    loss_fn = DiceCELoss()

    def bare() -> float:
        torch.manual_seed(0)
        net = build_unet(plan.network, plan.in_channels, plan.num_classes)
        opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=3e-5)
        net.train()
        t0 = 0.0
        for i in range(steps + 5):
            if i == 5:
                t0 = time.perf_counter()
            b = batches[i % len(batches)]
            with autocast(precision, torch.device("cpu")):
                loss = loss_fn(net(b["image"]), b["label"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            opt.step()
        return steps * plan.batch_size / (time.perf_counter() - t0)

    def engine(tmp: Path) -> float:
        torch.manual_seed(0)
        net = build_unet(plan.network, plan.in_channels, plan.num_classes)

        def step_fn(models, batch):
            return {"loss": loss_fn(models["net"](batch["image"]), batch["label"])}

        spec = TrainSpec(models={"net": net}, trainable=["net"], step_fn=step_fn, batches=lambda s, d: batches[s % len(batches)], record={"method": "speed"})
        cfg = TrainConfig(steps=steps + 5, lr=3e-3, val_every=10**9, checkpoint_every=10**9, progress=False)
        trainer = Trainer(spec, cfg, tmp)
        # time the same window as the bare loop: from step 5 to the end, before the final checkpoint
        marks: dict[str, float] = {}
        spec.on_step_end.append(lambda step, _s: marks.__setitem__("t5", time.perf_counter()) if step == 5 else None)
        spec.on_step_end.append(lambda step, _s: marks.__setitem__("tend", time.perf_counter()) if step == steps + 4 else None)
        trainer.fit()
        # the last step (with checkpoint and curve) is excluded on both sides: steps-1 timed steps
        return (steps - 1) * plan.batch_size / (marks["tend"] - marks["t5"])

    import tempfile

    results = {"bare": [], "engine": []}
    for _ in range(2):
        results["bare"].append(bare())
        with tempfile.TemporaryDirectory() as tmp:
            results["engine"].append(engine(Path(tmp)))
    b, e = max(results["bare"]), max(results["engine"])
    return {
        "bare_images_per_s": round(b, 2),
        "engine_images_per_s": round(e, 2),
        "ratio": round(e / b, 3),
        "batch_size": plan.batch_size,
        "patch_size": plan.patch_size,
        "precision": precision,
        "steps": steps,
        "runs": {k: [round(v, 2) for v in vs] for k, vs in results.items()},
    }


def phase_data(data: Path, steps: int) -> dict[str, Any]:
    """The real sampler (cached cases, augmentation) feeding the engine: share of time waiting for data."""
    import tempfile

    import torch

    from medalloy.engine.trainer import TrainConfig, Trainer, TrainSpec
    from medalloy.losses import DiceCELoss
    from medalloy.models.unet import build_unet

    _, plan, _, sampler = _jsrt_parts(data)
    torch.manual_seed(0)
    net = build_unet(plan.network, plan.in_channels, plan.num_classes)
    loss_fn = DiceCELoss()
    spec = TrainSpec(
        models={"net": net},
        trainable=["net"],
        batches=sampler,
        record={"method": "speed"},
        step_fn=lambda m, b: {"loss": loss_fn(m["net"](b["image"]), b["label"])},
    )
    with tempfile.TemporaryDirectory() as tmp:
        res = Trainer(spec, TrainConfig(steps=steps, lr=3e-3, val_every=10**9, progress=False), tmp).fit()
    return {"data_fraction": round(res["data_fraction"], 4), "images_per_s": round(res["images_per_s"], 2), "steps": steps, "workers": 0}


def phase_precision(data: Path, steps: int, precision: str, work: Path) -> dict[str, Any]:
    """Train the JSRT expert for a fixed number of steps in one precision; held-out Dice."""
    from benchmarks.common import copy_ground_truth, evaluate
    from medalloy.predict import predict_cases
    from medalloy.recipes.expert import train_expert

    ds, _, split, _ = _jsrt_parts(data, n_cases=1)
    run = work / f"jsrt-{precision}"
    res = train_expert(
        ds.root,
        run,
        split={"train": split["train"], "val": split["val"]},
        overwrite=True,
        progress=False,
        steps=steps,
        precision=precision,
        val_every=steps,
        seed=0,
    )
    train_rss = peak_rss_mib()
    pred, gt = work / f"pred-{precision}", work / "gt-jsrt"
    import shutil

    shutil.rmtree(pred, ignore_errors=True)
    shutil.rmtree(gt, ignore_errors=True)
    predict_cases(run, ds.root, split["test"], pred, device="cpu", progress=False)
    copy_ground_truth(ds.root, split["test"], gt, ds.spec.labels)
    row = evaluate(pred, gt, ds.spec.labels, work / f"eval-{precision}")
    return {
        "precision": precision,
        "steps": steps,
        "train_seconds": round(res["seconds"], 1),
        "images_per_s": round(res["images_per_s"], 2),
        "dice": {k: v["dice"] for k, v in row.items()},
        "train_peak_rss_mib": round(train_rss, 1),
    }


def _latency(predictor, cases, repeats: int = 1) -> float:
    import torch

    with torch.inference_mode():
        predictor.predict(*cases[0])  # warm-up (oneDNN kernels, allocator)
        t0 = time.perf_counter()
        for _ in range(repeats):
            for image, meta in cases:
                predictor.predict(image, meta)
    return (time.perf_counter() - t0) / (repeats * len(cases))


def phase_infer(data: Path, dataset: str, n: int) -> dict[str, Any]:
    """Latency per case of an (untrained: speed does not depend on weights) network from the plan."""
    import torch

    from medalloy.data.dataset import RawDataset
    from medalloy.engine.inference import Predictor
    from medalloy.models.unet import build_unet
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset

    ds = RawDataset(data / dataset)
    plan = plan_dataset(ds, fingerprint(ds, max_cases=40, progress=False))
    cases = []
    for c in ds.cases[:n]:
        image, _, meta = ds.load(c)
        cases.append((image, meta))
    model = build_unet(plan.network, plan.in_channels, plan.num_classes)
    settings = [("fp32", False), ("bf16", False)]
    if plan.dim == 2:
        settings += [("fp32", True), ("bf16", True)]
    out = {"dataset": ds.name, "dim": plan.dim, "patch_size": plan.patch_size, "cases": n, "seconds_per_case": {}}
    for precision, cl in settings:
        predictor = Predictor(model, plan, precision=precision, channels_last=cl)
        key = precision + ("+channels_last" if cl else "")
        out["seconds_per_case"][key] = round(_latency(predictor, cases), 4)
        model = model.to(memory_format=torch.contiguous_format)  # the next setting starts from the default layout
    out["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return out


def run_phase(args: list[str]) -> dict[str, Any]:
    """Run one phase in a fresh interpreter; its last stdout line is its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.speed", "--phase", *args]
    print(f"[speed] {' '.join(args)}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent)  # the benchmarks package is found from the repository root
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"phase {args[0]} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(r: dict[str, Any]) -> str:
    o, d, p, i2, i3 = r["engine_overhead"], r["data_loading"], r["bf16_vs_fp32"], r["inference_2d"], r["inference_3d"]
    t = r["targets"]
    ok = lambda b: "met" if b else "**missed**"  # noqa: E731
    lines = [
        "# CPU speed",
        "",
        f"{r['cpu']}, {r['threads']} torch threads, torch {r['torch']}. Produced by `python -m benchmarks.speed`.",
        "",
        "| measure | value | target | |",
        "|---|---|---|---|",
        f"| engine step vs bare PyTorch loop (images/s) | {o['engine_images_per_s']} vs {o['bare_images_per_s']} = {o['ratio']:.3f} | >= 0.90 | {ok(t['engine_ratio'])} |",
        f"| time waiting for data (default sampler, {d['workers']} workers) | {100 * d['data_fraction']:.1f} % | < 10 % | {ok(t['data_fraction'])} |",
        f"| bf16 vs fp32 training speed | {p['speed_ratio']:.2f}x | >= 1.8x | {ok(t['bf16_speed'])} |",
        f"| bf16 - fp32 held-out Dice after {p['fp32']['steps']} steps | {p['dice_difference']:+.4f} (mean over labels) | within 0.01 | {ok(t['bf16_dice'])} |",
        f"| peak resident memory, 2D training | {p['bf16']['train_peak_rss_mib']:.0f} MiB | < 4096 MiB | {ok(t['train_memory'])} |",
        "",
        f"JSRT 2D training, batch {o['batch_size']} x {o['patch_size']}: fp32 {p['fp32']['images_per_s']} images/s, "
        f"bf16 {p['bf16']['images_per_s']} images/s; Dice fp32 {p['fp32']['dice']}, bf16 {p['bf16']['dice']}.",
        "",
        "## Inference latency (seconds per case)",
        "",
        "| task | " + " | ".join(i2["seconds_per_case"]) + " | peak RSS MiB |",
        "|---|" + "---|" * (len(i2["seconds_per_case"]) + 1),
        f"| {i2['dataset']} 2D {i2['patch_size']} | " + " | ".join(f"{v:.4f}" for v in i2["seconds_per_case"].values()) + f" | {i2['peak_rss_mib']:.0f} |",
        f"| {i3['dataset']} 3D {i3['patch_size']} (sliding window) | "
        + " | ".join(f"{i3['seconds_per_case'].get(k, float('nan')):.4f}" if k in i3["seconds_per_case"] else "-" for k in i2["seconds_per_case"])
        + f" | {i3['peak_rss_mib']:.0f} |",
        "",
        f"Defaults: training precision `auto` = {r['defaults']['train_precision']}; inference {r['defaults']['inference']}.",
    ]
    lines += ["", f"bf16 matrix units this CPU reports in /proc/cpuinfo: {r.get('bf16_units', 'not recorded')}."]
    lines += ["", "Notes (written by people, not generated): [NOTES.md](NOTES.md)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--steps", type=int, default=200, help="training steps of the precision comparison")
    ap.add_argument("--overhead-steps", type=int, default=60)
    ap.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-speed")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--phase", nargs="+", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.phase:
        name, *rest = a.phase
        fn = {
            "overhead": lambda: phase_overhead(a.data, int(rest[0])),
            "data": lambda: phase_data(a.data, int(rest[0])),
            "precision": lambda: phase_precision(a.data, int(rest[0]), rest[1], a.work),
            "infer": lambda: phase_infer(a.data, rest[0], int(rest[1])),
        }[name]
        print(json.dumps(fn()))
        return 0

    import torch

    from medalloy.engine.precision import resolve_precision

    if not a.data.is_dir():
        print(f"speed.py: data folder {a.data} not found; pass --data", file=sys.stderr)
        return 1
    common = ["--data", str(a.data), "--work", str(a.work)]
    overhead = run_phase(["overhead", str(a.overhead_steps), *common])
    data = run_phase(["data", str(a.overhead_steps), *common])
    fp32 = run_phase(["precision", str(a.steps), "fp32", *common])
    bf16 = run_phase(["precision", str(a.steps), "bf16", *common])
    infer2d = run_phase(["infer", JSRT, "20", *common])
    infer3d = run_phase(["infer", HIPPO, "10", *common])
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    prec = {
        "fp32": fp32,
        "bf16": bf16,
        "speed_ratio": round(bf16["images_per_s"] / fp32["images_per_s"], 3),
        "dice_difference": round(mean(bf16["dice"]) - mean(fp32["dice"]), 4),
    }
    fastest = min(infer2d["seconds_per_case"], key=infer2d["seconds_per_case"].get)
    from medalloy.engine.machine import cpu_model

    cpu = cpu_model()
    flags = Path("/proc/cpuinfo").read_text(encoding="utf-8") if Path("/proc/cpuinfo").exists() else ""
    units = [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    result = {
        "cpu": cpu,
        "bf16_units": ", ".join(units) or "none",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "engine_overhead": overhead,
        "data_loading": data,
        "bf16_vs_fp32": prec,
        "inference_2d": infer2d,
        "inference_3d": infer3d,
        "memory": {
            "train_2d_peak_rss_mib": bf16["train_peak_rss_mib"],
            "infer_2d_peak_rss_mib": infer2d["peak_rss_mib"],
            "infer_3d_peak_rss_mib": infer3d["peak_rss_mib"],
        },
        "targets": {
            "engine_ratio": overhead["ratio"] >= 0.90,
            "data_fraction": data["data_fraction"] < 0.10,
            "bf16_speed": prec["speed_ratio"] >= 1.8,
            "bf16_dice": abs(prec["dice_difference"]) <= 0.01,
            "train_memory": bf16["train_peak_rss_mib"] < 4096,
        },
        "defaults": {"train_precision": resolve_precision("auto", torch.device("cpu")), "inference": f"fastest measured 2D setting: {fastest}"},
    }
    a.results.mkdir(parents=True, exist_ok=True)
    for path, text in ((a.results / "results.json", json.dumps(result, indent=2) + "\n"), (a.results / "results.md", markdown(result))):
        tmp = path.with_name(".tmp-" + path.name)
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
