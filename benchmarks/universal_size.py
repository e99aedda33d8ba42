"""Size and step cost of the universal (Hermes) network against one expert of the same layout.

    python -m benchmarks.universal_size [--steps 15]

For the planner's 6-stage layout of a 128 px and a 256 px plan (filters 16..256; 8 tasks, 5
modalities, 3 channels): parameters, and the median time of a training step (forward + backward +
SGD, bf16 autocast, the torch threads as set) at the planner's batch for that patch, for several
fusion widths and placements, beside the plain DynUNet expert. Writes ``size.json`` and ``size.md`` in
``benchmarks/results/universal/`` (docs/research/hermes.md "Size" quotes them).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# (name, fusion width, fusion scales): every scale from 1/4 (None), the three coarsest (3, from 1/8 at these 6-level plans)
# or the bottleneck alone (1, the recipe's `fusion_scales` default)
VARIANTS = [
    ("full width, from 1/4", None, None), ("width 128, from 1/4", 128, None), ("width 64, from 1/4", 64, None),
    ("width 32, from 1/4", 32, None), ("width 64, three coarsest scales (the default until 2026-12-04)", 64, 3),
    ("width 64, bottleneck only (default)", 64, 1),
]  # fmt: skip


def forward_seconds(model, x, args, steps: int) -> float:
    """Median inference forward (bf16 autocast, ``inference_mode``), as in validation and prediction."""
    import torch

    times = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(steps + 2):
            t0 = time.perf_counter()
            model(x, *args)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_seconds(model, x, args, steps: int) -> float:
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    times = []
    for i in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, *args)
            out = out["logits"] if isinstance(out, dict) else out
        out.float().mean().backward()
        opt.step()
        opt.zero_grad()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--results", type=Path, default=HERE / "results" / "universal")
    a = p.parse_args(argv)
    import torch

    from medalloy.models.hermes import build_hermes
    from medalloy.models.unet import build_unet, count_parameters
    from medalloy.planning.multi_dataset import shared_network
    from medalloy.planning.planner import batch_size_2d

    torch.manual_seed(0)
    rows = []
    for patch in (128, 256):
        _, network = shared_network(patch, 16, 256)
        batch = batch_size_2d([patch, patch])
        x = torch.randn(batch, 3, patch, patch)
        tasks, modality = torch.zeros(batch, 2, dtype=torch.long), torch.zeros(batch, dtype=torch.long)
        expert = build_unet(network, in_channels=3, out_channels=3)
        e_params, e_sec, e_fwd = count_parameters(expert), step_seconds(expert, x, (), a.steps), forward_seconds(expert.eval(), x, (), a.steps)
        for name, width, scales in VARIANTS:
            net = build_hermes(network, 8, 5, in_channels=3, fusion_width=width, fusion_scales=scales)
            sec = step_seconds(net, x, (tasks, modality), a.steps)
            fwd = forward_seconds(net.eval(), x, (tasks, modality), a.steps)
            rows.append({"patch": patch, "batch": batch, "fusion": name, "params": count_parameters(net), "expert_params": e_params,
                         "step_s": round(sec, 4), "expert_step_s": round(e_sec, 4),
                         "forward_s": round(fwd, 4), "expert_forward_s": round(e_fwd, 4)})  # fmt: skip
            print(f"{patch} px x{batch} {name}: {rows[-1]['params'] / 1e6:.2f} M ({rows[-1]['params'] / e_params:.2f} x), "
                  f"step {sec / e_sec:.2f} x, inference {fwd / e_fwd:.2f} x", flush=True)  # fmt: skip
    a.results.mkdir(parents=True, exist_ok=True)
    (a.results / "size.json").write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows}, indent=2) + "\n", encoding="utf-8")
    md = [
        "# Universal network: size and step cost vs one expert",
        "",
        f"Forward + backward + SGD, bf16 autocast, {torch.get_num_threads()} threads, median of {a.steps} steps after 2 warm-up steps, "
        "at the planner's batch for the patch. Produced by `python -m benchmarks.universal_size`.",
        "",
        "Inference: the forward pass alone (bf16 autocast, `inference_mode`, same batch), as validation and prediction run it.",
        "",
        "| patch x batch | fusion | parameters | x one expert | step s | x an expert's step | inference s | x an expert's |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['patch']} x {r['batch']} | {r['fusion']} | {r['params'] / 1e6:.2f} M | {r['params'] / r['expert_params']:.2f} | "
            f"{r['step_s']:.3f} | {r['step_s'] / r['expert_step_s']:.2f} | {r['forward_s']:.3f} | {r['forward_s'] / r['expert_forward_s']:.2f} |"
        )
    (a.results / "size.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
