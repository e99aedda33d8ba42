"""Short probes behind statements in the method notes, each a plain PyTorch loop on real data
(fixed seeds, fixed steps), so the numbers can be rerun:

- ``head``: ACDC, the expert's DynUNet + softmax Dice/CE against the universal no-priors network +
  exclusive class loss, with task logits from 0 and from logit(0.01); loss parts every 20 steps
  (docs/research/hermes.md, "ACDC").
- ``width``: JSRT, a tiny student's filter profile (6..48: the first rule; 11..44: the current one)
  trained alone with Dice + CE; predicted share of each class every 25 steps (docs/methods/distillation.md).
- ``latency``: batch-1 latency at JSRT's 224 px plan of the teacher's network, the tiny student at
  full resolution, with a stem of one (``--stem``) and the default stem (two), plain and
  depthwise-separable (``--separable``), untrained (weights do not change the time): eager fp32, bf16
  autocast, ONNX Runtime fp32; median of 50 after 5 warm-up calls, 2 threads; and GFLOPs
  (docs/methods/distillation.md, "stem"). Run it alone on the machine.
- ``prototypes``: what a trained universal model's task head adds to each task's anchor
  (``--universal CKPT``, repeatable; each dataset's tasks, on a seeded noise patch and on a batch
  of real training patches): norms of the anchors and of the head's part, the mean cosine between
  the tasks' head parts, effective prototypes and fused task tokens, how far the head's part moves
  between noise and real input, and the cosine between datasets of the part their tasks share
  (docs/research/hermes.md, "What the task head learns").
- ``students``: the tiny student's filters, parameters and GFLOPs at JSRT's 224 px and the polyp
  128 px plans, plain and depthwise-separable (``--separable``), at full resolution and at the
  default stem (docs/methods/distillation.md, "separable"); no training, no timing.
- ``token_loss``: the token-level alignment loss (losses/token_alignment.py) in its two scopes,
  all pairs of the batch (``batch``) and within each pair (``pair``), at pretraining's sizes (batch
  16, 100 finding words, 245 patches, embedding 128; random embeddings, a tenth of the words
  padding): forward + backward time, median of 20 after 3 warm-up calls, one thread
  (docs/methods/pretraining.md, "Token-level contrast within each pair"). Run it alone.
- ``profile``: torch.profiler shares of the CPU time of a trained teacher and student
  (``--runs DIR``: benchmarks/distill.py's work folder) at 224 px, bf16, batch 1 (benchmarks/results/distill/NOTES.md).

    python -m benchmarks.probes [head width profile latency students token_loss] [--steps 120]
    python -m benchmarks.probes prototypes --universal RUN/checkpoints/best.safetensors [...]

Writes ``benchmarks/results/probes/results.json`` (merged per probe).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import PLAN_OPTIONS, dataset_path, splits

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "probes"
DEFAULT_DATA = Path(os.environ.get("MEDALLOY_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def _sampler(name: str, data: Path, work: Path, plan, cases: int = 60):
    from medalloy.data.dataset import RawDataset
    from medalloy.data.sampling import PatchSampler
    from medalloy.recipes.scaffold import cache_cases, cases_of

    folder = dataset_path(name, data, work)
    ds = RawDataset(folder)
    prep = cache_cases(ds, cases_of(ds, splits(name, folder, 0)["train"][:cases]), plan, pad=True, seed=0, desc="cache", progress=False)
    return PatchSampler(prep, plan.patch_size, plan.batch_size, plan.dim, 0, 0.33)


def _plan(name: str, data: Path, work: Path):
    from medalloy.data.dataset import RawDataset
    from medalloy.planning.fingerprint import fingerprint
    from medalloy.planning.planner import plan_dataset

    ds = RawDataset(dataset_path(name, data, work))
    return plan_dataset(ds, fingerprint(ds, progress=False), **PLAN_OPTIONS.get(name, {}))


def _train(net, loss_fn, sampler, steps: int, every: int, report) -> list[dict[str, Any]]:
    import torch

    torch.manual_seed(0)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=3e-5)
    rows = []
    for step in range(steps):
        b = sampler(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = net(b["image"])
        loss, parts = loss_fn(z, b["label"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
        opt.step()
        if step % every == 0 or step == steps - 1:
            rows.append(
                {"step": step, "loss": round(float(loss.detach()), 3), **{k: round(float(v.detach()), 3) for k, v in parts.items()}, **report(z.detach(), b)}
            )
    return rows


def probe_head(data: Path, work: Path, steps: int) -> dict[str, Any]:
    import torch

    from medalloy.losses import DiceCELoss, TaskBCEDiceLoss
    from medalloy.models.hermes import build_hermes
    from medalloy.models.unet import build_unet

    plan = _plan("ACDC", data, work)
    sampler = _sampler("ACDC", data, work, plan)
    out = {}
    dice_ce = DiceCELoss()

    def expert_loss(z, lab):
        return dice_ce(z, lab), {"ce": torch.nn.functional.cross_entropy(z.float(), lab[:, 0])}

    torch.manual_seed(0)
    out["expert"] = _train(build_unet(plan.network, in_channels=1, out_channels=4), expert_loss, sampler, steps, 20, lambda z, b: {})
    for prior in (None, 0.01):
        torch.manual_seed(0)
        net = build_hermes(plan.network, 3, 2, plan.in_channels, priors="none", prior_probability=prior)
        loss = TaskBCEDiceLoss(num_tasks=4, exclusive=True)

        def wrapped(x, net=net):
            ids = torch.tensor([[0, 1, 2]] * x.shape[0])
            return net(x, ids, torch.zeros(x.shape[0], dtype=torch.long))["logits"]

        def uni_loss(z, lab, loss=loss):
            tgt = torch.stack([(lab[:, 0] == k + 1).float() for k in range(3)], 1)
            total = loss(z, tgt, torch.ones(z.shape[:2]), torch.tensor([[0, 1, 2]] * z.shape[0]))
            return total, {"ce": loss.last["bce"], "dice": loss.last["dice"]}

        class Net(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, x):
                return wrapped(x, self.inner)

        out[f"universal_prior_{prior}"] = _train(Net(net), uni_loss, sampler, steps, 20, lambda z, b: {})
    return out


def probe_width(data: Path, work: Path, steps: int) -> dict[str, Any]:
    import torch

    from medalloy.losses import DiceCELoss
    from medalloy.models.unet import build_unet

    plan = _plan("JSRT", data, work)
    sampler = _sampler("JSRT", data, work, plan)
    dice_ce = DiceCELoss()
    out = {}
    for filters in ([6, 12, 24, 48, 48, 48], [11, 22, 44, 44, 44, 44]):
        torch.manual_seed(0)
        net = build_unet(plan.network.model_copy(update={"filters": filters, "deep_supervision": False}), in_channels=1, out_channels=3)
        share = lambda z, b: {"predicted_share": [round(float((z.argmax(1) == k).float().mean()), 3) for k in range(3)]}  # noqa: E731
        out["x".join(map(str, filters))] = _train(net, lambda z, lab: (dice_ce(z, lab), {}), sampler, steps, 25, share)
    return out


def probe_profile(runs: Path) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from medalloy.predict import load_model

    torch.set_num_threads(1)
    out = {}
    for name in ("teacher", "relation_kd"):
        model, plan, _ = load_model(runs / "cxr" / name / "checkpoints" / "best.safetensors")
        x = torch.randn(1, plan.in_channels, *plan.patch_size)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(3):
                model(x)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    model(x)
        rows = sorted(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), key=lambda r: -r[1])
        total = sum(t for _, t in rows)
        out[name] = {k: round(100 * t / total, 1) for k, t in rows[:8]}
    return out


def probe_latency(data: Path, work: Path) -> dict[str, Any]:
    import tempfile

    import onnxruntime as ort
    import torch

    from medalloy.engine.latency import median_ms, model_latency_ms
    from medalloy.models.flops import forward_gflops
    from medalloy.models.unet import build_unet, count_parameters
    from medalloy.recipes.students import build_student, default_stem

    torch.set_num_threads(2)
    torch.manual_seed(0)
    plan = _plan("JSRT", data, work)
    shape = (plan.in_channels, *plan.patch_size)
    deep = default_stem(plan)  # the recipe's default student (a stem of two at 224 px), plain and separable
    nets = {
        "teacher": build_unet(plan.network, plan.in_channels, plan.num_classes),
        "student": build_student(plan, "tiny"), "student_stem": build_student(plan, "tiny", stem=True),
        "student_default": build_student(plan, "tiny", stem=deep), "student_default_separable": build_student(plan, "tiny", separable=True, stem=deep),
    }  # fmt: skip
    out: dict[str, Any] = {"patch": list(plan.patch_size)}
    x = torch.randn(1, *shape)
    for name, net in nets.items():
        net.eval()
        row = {"params": count_parameters(net), "gflops": round(forward_gflops(net, shape), 3)}
        row["eager_fp32_ms"] = round(model_latency_ms(net, shape, "fp32"), 2)
        row["bf16_ms"] = round(model_latency_ms(net, shape, "bf16"), 2)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{name}.onnx"
            torch.onnx.export(net, (torch.randn(2, *shape),), str(path), input_names=["image"], output_names=["logits"], opset_version=18, dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))  # fmt: skip
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            feed = {"image": x.numpy()}
            row["onnx_fp32_ms"] = round(median_ms(lambda s=sess, f=feed: s.run(None, f)), 2)
        out[name] = row
        print(f"[probes] latency {name}: {row}", flush=True)
    best = {k: min(v[m] for m in ("eager_fp32_ms", "bf16_ms", "onnx_fp32_ms")) for k, v in out.items() if k != "patch"}
    out["speedup_fastest"] = {k: round(best["teacher"] / best[k], 2) for k in best if k != "teacher"}
    return out


def _mean_offdiag_cos(v):
    """Mean cosine between the rows of ``v`` (B, T, C) over every pair of tasks, averaged over B."""
    import torch.nn.functional as F

    c = F.cosine_similarity(v[:, :, None], v[:, None], dim=-1)
    t = v.shape[1]
    return float((c.sum((1, 2)) - t).mean() / (t * (t - 1)))


def probe_prototypes(checkpoints: list[Path], data: Path, work: Path) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from medalloy.recipes.universal import load_universal

    out: dict[str, Any] = {}
    for path in checkpoints:
        net, registry, plans, _ = load_universal(path)
        if net.task_weight is None or not net.fusion:
            raise SystemExit(f"probes.py: {path} has no task anchors and fused priors; this probe reads both")
        seen: dict[str, torch.Tensor] = {}
        net.task_head.register_forward_hook(lambda m, i, o, seen=seen: seen.update(tokens=i[0].detach(), head=o.detach()))
        rows: dict[str, Any] = {}
        shared: dict[str, torch.Tensor] = {}
        for name, info in registry.datasets.items():
            plan, ids = plans[name], list(info["task_ids"])
            real = _sampler(name, data, work, plan, cases=4)(0)["image"].float()
            g = torch.Generator().manual_seed(0)
            noise = torch.randn(real.shape, generator=g)
            row: dict[str, Any] = {"tasks": [registry.tasks[i] for i in ids]}
            task_ids = torch.tensor([ids] * real.shape[0])
            anchors = net.task_weight(task_ids).detach()
            row["anchor_norm"] = [round(float(v), 3) for v in anchors[0].norm(dim=-1)]
            head = {}
            for kind, x in (("noise", noise), ("real", real)):
                with torch.no_grad():
                    net(x, task_ids, torch.full((x.shape[0],), int(info["modality_id"])))
                head[kind] = seen["head"]
                tokens = F.layer_norm(seen["tokens"], seen["tokens"].shape[-1:])
                row[kind] = {
                    "head_norm": [round(float(v), 3) for v in seen["head"].norm(dim=-1).mean(0)],
                    "head_cos": round(_mean_offdiag_cos(seen["head"]), 3),
                    "prototype_cos": round(_mean_offdiag_cos(seen["head"] + anchors), 3),
                    "token_cos": round(_mean_offdiag_cos(tokens), 3),
                }
            # 1 - cos between a task's head part on noise and on real patches: 0 = the image does not matter
            row["head_noise_vs_real"] = round(float(1 - F.cosine_similarity(head["noise"].mean(0), head["real"].mean(0), dim=-1).mean()), 4)
            rows[name] = row
            shared[name] = head["real"].mean((0, 1))
            print(f"[probes] prototypes {path.parent.parent.name} {name}: {row}", flush=True)
        # is the tasks' shared part one "foreground" vector for every dataset?
        names = list(shared)
        rows["shared_part_cos_across_datasets"] = {
            f"{a}/{b}": round(float(F.cosine_similarity(shared[a], shared[b], dim=0)), 3) for i, a in enumerate(names) for b in names[i + 1 :]
        }
        out[str(path)] = rows
    return out


def probe_students(data: Path, work: Path) -> dict[str, Any]:
    from medalloy.models.flops import forward_gflops
    from medalloy.models.unet import count_parameters
    from medalloy.recipes.students import build_student, default_stem

    out: dict[str, Any] = {}
    for name in ("JSRT", "Polyp-Kvasir"):
        plan = _plan(name, data, work)
        shape = (plan.in_channels, *plan.patch_size)
        rows: dict[str, Any] = {"patch": list(plan.patch_size), "default_stem": default_stem(plan)}
        for stem in sorted({0, default_stem(plan)}):
            for separable in (False, True):
                net = build_student(plan, "tiny", separable=separable, stem=stem)
                key = f"stem{stem}{'_separable' if separable else ''}"
                rows[key] = {"filters": [int(f) for f in net.filters], "params": count_parameters(net), "gflops": round(forward_gflops(net, shape), 3)}
                print(f"[probes] students {name} {key}: {rows[key]}", flush=True)
        out[name] = rows
    return out


def probe_token_loss(batch: int = 16, words: int = 100, patches: int = 245, dim: int = 128, runs: int = 20, warmup: int = 3) -> dict[str, Any]:
    import time

    import torch

    from medalloy.losses.token_alignment import TokenAlignmentLoss

    g = torch.Generator().manual_seed(0)
    v = torch.randn(batch, patches, dim, generator=g)
    e = torch.randn(batch, words, dim, generator=g)
    mask = torch.ones(batch, words, dtype=torch.bool)
    mask[:, words - words // 10 :] = False
    out: dict[str, Any] = {"batch": batch, "words": words, "patches": patches, "dim": dim, "threads": 1, "runs": runs}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for scope in ("batch", "pair"):
            loss_fn = TokenAlignmentLoss(scope=scope)
            times = []
            for i in range(warmup + runs):
                vi, ei = v.clone().requires_grad_(), e.clone().requires_grad_()
                t0 = time.perf_counter()
                loss_fn(vi, ei, mask).backward()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            out[f"{scope}_ms"] = round(1000 * float(np.median(times)), 2)
            print(f"[probes] token_loss {scope}: {out[f'{scope}_ms']} ms forward + backward", flush=True)
    finally:
        torch.set_num_threads(threads)
    out["ratio"] = round(out["batch_ms"] / out["pair_ms"], 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "probes", nargs="*", default=["head", "width", "profile"], choices=["head", "width", "profile", "latency", "prototypes", "students", "token_loss"]
    )
    p.add_argument("--universal", type=Path, action="append", default=[], help="a universal checkpoint (prototypes; repeat for more)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=HERE.parent / "runs" / "bench-probes")
    p.add_argument("--runs", type=Path, default=HERE.parent / "runs" / "bench-distill" / "runs")
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--results", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    if not a.data.is_dir():
        print(f"probes.py: data folder {a.data} not found; pass --data", file=sys.stderr)
        return 1
    if "prototypes" in a.probes and not a.universal:
        print("probes.py: the prototypes probe reads trained checkpoints; pass --universal RUN/checkpoints/best.safetensors", file=sys.stderr)
        return 1
    path = a.results / "results.json"
    for name in a.probes:
        probes = {
            "head": lambda: probe_head(a.data, a.work, a.steps),
            "width": lambda: probe_width(a.data, a.work, a.steps),
            "profile": lambda: probe_profile(a.runs),
            "latency": lambda: probe_latency(a.data, a.work),
            "prototypes": lambda: probe_prototypes(a.universal, a.data, a.work),
            "students": lambda: probe_students(a.data, a.work),
            "token_loss": probe_token_loss,
        }
        res = probes[name]()
        old = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}  # probes may run side by side
        old[name] = {"steps": a.steps, "results": res} if name in ("head", "width") else {"results": res}
        a.results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old, indent=2, default=lambda v: float(np.asarray(v))) + "\n", encoding="utf-8")
        print(f"[probes] {name}: written to {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
