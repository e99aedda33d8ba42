"""What the checkpoint fixtures (tests/fixtures/checkpoints/) are asked: fixed inputs per method,
and the outputs of the network the current medalloy loads from each file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoints"
METHODS = ("expert", "universal", "amalgamate", "distill", "pretrain")
DATASET = "SynthCXR"  # the multi-dataset fixtures are asked as for this training dataset
TERNARY_MIN = 4096  # tensors of more values are stored as the seed, shape and scale that regenerate them


def fixture(method: str, folder: Path) -> Path:
    """The whole checkpoint fixture of ``method`` written into ``folder``: the stored small tensors
    and record, and the large tensors regenerated from ``<method>.ternary.json`` (sparse ternary
    values of each tensor's scale, drawn in the listed order from one seeded generator)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    stored = FIXTURES / f"{method}.safetensors"
    with safe_open(str(stored), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    spec = json.loads(stored.with_suffix(".ternary.json").read_text(encoding="utf-8"))
    g = torch.Generator().manual_seed(spec["seed"])
    for key, shape, scale in spec["tensors"]:
        u = torch.rand(shape, generator=g)
        tensors[key] = torch.tensor(scale, dtype=torch.float32) * ((u > 0.875).float() - (u < 0.125).float())
    path = folder / stored.name
    save_file(tensors, str(path), metadata=meta)
    return path


def _image(shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def answer(method: str, path: str | Path) -> dict[str, torch.Tensor]:
    """``{"input": ..., "output": ...}`` (and per-task outputs where the method has them) of the
    network loaded from ``path`` in fp32 on the CPU."""
    from medalloy.recipes.registry import load_checkpoint_model, load_checkpoint_tasks

    if method == "pretrain":
        from medalloy.recipes.pretrain import load_pretrained

        model, _, dec_tok, record = load_pretrained(path)
        size = record["plan"]["patch_size"]
        images = _image((2, 1, *size))
        tokens = torch.randint(4, dec_tok.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
        tokens[:, 0] = 1
        mask = torch.ones_like(tokens, dtype=torch.bool)
        out = model(images=images, findings=tokens, findings_mask=mask, impression=tokens, impression_enc=tokens, impression_enc_mask=mask)
        return {"input": images, "tokens": tokens, **{k: v.float().contiguous() for k, v in out.items() if isinstance(v, torch.Tensor)}}
    model, plan, _ = load_checkpoint_model(path, "cpu", DATASET if method in ("universal", "amalgamate") else None)
    x = _image((2, plan.in_channels, *plan.patch_size))
    result = {"input": x, "output": model(x).float().contiguous()}
    if method in ("universal", "amalgamate"):
        tasks, _, _, _ = load_checkpoint_tasks(path, ["lung"])
        result["lung"] = tasks(x).float().contiguous()
    return result
