"""Start an expert's encoder from another run's (``medalloy train expert DATASET --init RUN``).

``RUN`` is a ``medalloy train pretrain`` run (its image encoder) or an expert run (transfer from
another dataset), or one of their ``.safetensors`` checkpoints. Without ``--plan``, the new plan
takes the encoder's network (kernels, strides, filters) and rounds its patch up to what that
network divides, as nnU-Net moves plans between datasets for pretraining; with ``--plan`` the
two must fit stage for stage (:func:`~medalloy.models.image_encoder.load_encoder_into` names the
first stage that does not).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import ValidationError

from medalloy.engine import checkpoint as ckpt
from medalloy.errors import MedalloyError
from medalloy.models.image_encoder import encoder_state
from medalloy.planning.plan import Plan

# where each method's checkpoint keeps a DynUNet-shaped encoder: (module group, key prefix inside it)
ENCODER_GROUPS = {"pretrain": ("model/model", "image."), "expert": ("model/net", "")}


@dataclass
class InitEncoder:
    state: dict[str, torch.Tensor]
    plan: Plan
    method: str
    path: Path


def checkpoint_of(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        best = path / "checkpoints" / "best.safetensors"
        if not best.exists():
            raise MedalloyError("run folder has no checkpoints/best.safetensors", path, "give a finished pretrain or expert run, or its .safetensors file")
        return best
    return path


def read_init_encoder(path: str | Path) -> InitEncoder:
    """The encoder weights and the plan they were trained with."""
    file = checkpoint_of(path)
    record = ckpt.read_record(file)
    method = record.get("method")
    if method not in ENCODER_GROUPS:
        raise MedalloyError(f"a '{method}' checkpoint holds no U-Net encoder to start from", file, f"give a run of {' or '.join(ENCODER_GROUPS)}")
    if (record.get("plan") or {}).get("network", {}).get("architecture", "DynUNet") != "DynUNet":
        raise MedalloyError("the checkpoint's network is not a medalloy DynUNet", file, "start from a medalloy pretrain or expert run")
    try:
        plan = Plan.model_validate(record["plan"])
    except (KeyError, ValidationError):
        raise MedalloyError("checkpoint record has no valid plan", file, "give a run trained with this medalloy version") from None
    tensors, _ = ckpt.load_checkpoint(file)
    group, prefix = ENCODER_GROUPS[method]
    state = encoder_state({k[len(prefix) :]: v for k, v in ckpt.group(tensors, group).items() if k.startswith(prefix)})
    if not state:
        raise MedalloyError("checkpoint holds no encoder weights", file, "give a finished pretrain or expert run")
    return InitEncoder(state, plan, method, file)


def adopt_encoder_network(plan: Plan, init: InitEncoder) -> Plan:
    """``plan`` with the encoder's network; its patch rounded up to multiples of the network's
    total stride per axis. A plan of another dimension or channel count cannot take it."""
    if plan.dim != init.plan.dim:
        raise MedalloyError(f"the encoder is {init.plan.dim}D, the dataset's plan {plan.dim}D", init.path, "start from an encoder of the same dimension")
    if plan.in_channels != init.plan.in_channels:
        raise MedalloyError(
            f"stage 'enc0' does not fit: the encoder takes {init.plan.in_channels} channel(s), the dataset has {plan.in_channels}",
            init.path,
            "start from an encoder trained on images with the dataset's channels",
        )
    enc, own = init.plan.network, plan.network
    if (enc.kernels, enc.strides, enc.filters, enc.norm, enc.res_block) == (own.kernels, own.strides, own.filters, own.norm, own.res_block):
        return plan
    patch = [int(math.ceil(p / t) * t) for p, t in zip(plan.patch_size, enc.total_stride())]
    note = f"network taken from the encoder of {init.path} (--init): {len(enc.strides)} stages, filters {enc.filters}; patch {plan.patch_size} -> {patch}"
    network = own.model_copy(update={"kernels": enc.kernels, "strides": enc.strides, "filters": enc.filters, "norm": enc.norm, "res_block": enc.res_block})
    return plan.model_copy(update={"network": network, "patch_size": patch, "notes": [*plan.notes, note]})
