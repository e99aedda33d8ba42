"""Hermes (Gao et al., CVPR 2024): one segmentation network for many tasks, conditioned on
learnable task and modality priors fused into the backbone at several scales.

The backbone is MONAI's DynUNet, its blocks unchanged: :class:`HermesNet` runs them in DynUNet's
own order (input block, downsamples, bottleneck, then upsamples with the matching skip) and fuses
a stage's output before the next block and the skip see it (the encoder stages at 1/4 resolution
and coarser, the bottleneck, and the decoder stages at the same scales; none at the two finest
scales, as in the paper). DynUNet's output layer is replaced by the task-prototype head.

``HermesNet(x (B, C_in, *sp), task_ids (B, T), modality_ids (B,))`` returns

- ``logits`` ``(B, T, *sp)``: one sigmoid logit map per requested task, the dot product of the
  finest decoder features with a per-task prototype made from the task tokens of every fused
  scale (concatenated, LayerNorm, two-layer MLP), plus a learned per-task anchor vector
  (``task_anchors``, ours: see :class:`HermesNet`);
- ``modality_logits`` ``(B, n_modalities)``: from the mean modality tokens of every fused scale
  (absent without modality priors, ``tokens_per_modality=0``).

Ablations of the benchmark in the same class: ``tokens_per_modality=0`` (task priors only) and
``fusion_stages=[]`` (no priors: the backbone with one 1x1 output head per task).

Task lists of different lengths are padded with ``net.null_task``; its channels are ignored by the
loss (that is how partially labelled datasets share one batch).
"""

from __future__ import annotations

import torch
from monai.networks.nets import DynUNet
from torch import nn

from medalloy.models.features import STAGES_ATTR
from medalloy.models.prior_fusion import PriorFusionLayer
from medalloy.models.unet import UNetLayout, build_unet, run_stages


def stage_channels(net: DynUNet, filters: list[int]) -> dict[str, int]:
    """Output channels of every named stage of a medalloy DynUNet."""
    stages = getattr(net, STAGES_ATTR)
    channels = {}
    for name in stages:
        if name == "bottleneck":
            channels[name] = filters[-1]
        else:
            channels[name] = filters[int(name[3:])]
    return channels


def default_fusion_stages(stages: list[str], finest_skipped: int = 2, coarsest: int | None = 3) -> list[str]:
    """The encoder and decoder stages of the ``coarsest`` coarsest scales (the bottleneck's
    included), never one of the ``finest_skipped`` finest. The paper's 5-level backbone fuses at
    1/4, 1/8 and 1/16: its three coarsest scales, which are also all but its two finest; a deeper
    plan (6 levels for a 256 px image) keeps three scales, so the fusion's cost does not grow with
    the image (``coarsest=None``: every scale but the ``finest_skipped`` finest)."""
    levels = 1 + max(int(s[3:]) for s in stages if s != "bottleneck") + 1  # the bottleneck is the last level
    first = finest_skipped if coarsest is None else max(finest_skipped, levels - coarsest)
    return [s for s in stages if s == "bottleneck" or int(s[3:]) >= first]


class HermesNet(nn.Module):
    """A DynUNet with prior fusion layers, a task-prototype head and a modality head."""

    def __init__(
        self,
        backbone: DynUNet,
        filters: list[int],
        n_tasks: int,
        n_modalities: int,
        fusion_stages: list[str] | None = None,
        depth: int = 1,
        tokens_per_modality: int = 10,
        fusion_width: int | None = None,
        prior_probability: float | None = None,
        task_anchors: bool = False,
        identity_init: bool = False,
        prior_init_std: float = 0.02,
    ):
        super().__init__()
        self.backbone = backbone
        self.n_tasks, self.n_modalities = n_tasks, n_modalities
        paths = getattr(backbone, STAGES_ATTR)
        channels = stage_channels(backbone, filters)
        self.fusion_stages = list(fusion_stages) if fusion_stages is not None else default_fusion_stages(list(paths))
        unknown = [s for s in self.fusion_stages if s not in paths]
        if unknown:
            raise ValueError(f"unknown fusion stages {unknown}; the backbone has {list(paths)}")
        self.fusion = nn.ModuleDict(
            {
                s: PriorFusionLayer(channels[s], n_tasks, n_modalities, depth, tokens_per_modality, fusion_width, identity_init, prior_init_std)
                for s in self.fusion_stages
            }
        )
        out_dim = channels["dec0"]
        if self.fusion:
            token_dim = sum(layer.width for layer in self.fusion.values())
            self.task_head = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, token_dim), nn.GELU(), nn.Linear(token_dim, out_dim))
        # One vector per task, N(0, 1/C0): without priors it is the whole 1x1 output head (the "no
        # priors" baseline); with priors (``task_anchors``) an anchor added to the fused prototype.
        # Task tokens start at 0.02 scale and read the same image, so the prototypes the head makes
        # from them start almost equal (cosine ~0.99 between any two tasks, measured): the classes of
        # one label map (ACDC's RV / MYO / LV) then begin as one class, and the hardest of them never
        # split off (trained RV vs LV prototypes: cosine 0.99, RV Dice 0.01). The anchor gives every
        # task its own direction from the start; the priors then modulate it per image
        # (docs/research/hermes.md "Task anchors").
        if not self.fusion or task_anchors:
            self.task_weight = nn.Embedding(n_tasks + 1, out_dim)
            nn.init.normal_(self.task_weight.weight, std=out_dim**-0.5)
        else:
            self.task_weight = None
        if identity_init and self.fusion and self.task_weight is not None:
            # the prototype starts as the anchor alone: with the fusion layers at identity, a fresh
            # network is the no-priors one (its backbone, a vector and an offset per task), and the
            # priors add only what training finds useful (docs/research/hermes.md)
            nn.init.zeros_(self.task_head[-1].weight)
            nn.init.zeros_(self.task_head[-1].bias)
        # a learned logit offset per task, started at the prior probability (RetinaNet's init): every
        # task begins by predicting "mostly absent", as the experts' softmax quickly learns to, instead
        # of spending its first hundreds of steps pulling 0.5 everywhere down (docs/research/hermes.md)
        if prior_probability is not None or not self.fusion:
            self.task_bias = nn.Embedding(n_tasks + 1, 1)
            start = 0.0 if prior_probability is None else float(torch.logit(torch.tensor(prior_probability)))
            nn.init.constant_(self.task_bias.weight, start)
        else:
            self.task_bias = None
        self.modality_head = nn.Sequential(nn.LayerNorm(token_dim), nn.Linear(token_dim, n_modalities)) if self.fusion and tokens_per_modality else None
        # FeatureTap reads the fused features of fused stages (a fusion layer's first output)
        setattr(self, STAGES_ATTR, {s: (f"fusion.{s}" if s in self.fusion else f"backbone.{p}") for s, p in paths.items()})

    @property
    def null_task(self) -> int:
        return self.n_tasks

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        if task_ids.ndim != 2 or task_ids.shape[0] != x.shape[0] or modality_ids.shape != (x.shape[0],):
            raise ValueError(f"need task_ids (B, T) and modality_ids (B,) for B={x.shape[0]}; got {tuple(task_ids.shape)}, {tuple(modality_ids.shape)}")
        task_ids, modality_ids = task_ids.long(), modality_ids.long()
        tasks, modality = [], []

        def fused(stage: str, f: torch.Tensor) -> torch.Tensor:
            if stage not in self.fusion:
                return f
            f, t, m = self.fusion[stage](f, task_ids, modality_ids)
            tasks.append(t)
            if m.shape[1]:
                modality.append(m.mean(1))
            return f

        f = run_stages(self.backbone, x, fused)
        if not self.fusion:
            return {"logits": self._offset(torch.einsum("bc...,btc->bt...", f, self.task_weight(task_ids).to(f.dtype)), task_ids)}  # weight (B, T, C0)
        prototypes = self.task_head(torch.cat(tasks, dim=-1))  # (B, T, C0)
        if self.task_weight is not None:
            prototypes = prototypes + self.task_weight(task_ids)
        logits = self._offset(torch.einsum("bc...,btc->bt...", f, prototypes.to(f.dtype)), task_ids)
        if self.modality_head is None:
            return {"logits": logits}
        return {"logits": logits, "modality_logits": self.modality_head(torch.cat(modality, dim=-1))}

    def _offset(self, logits: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
        if self.task_bias is None:
            return logits
        bias = self.task_bias(task_ids).to(logits.dtype)  # (B, T, 1)
        return logits + bias.view(*bias.shape[:2], *([1] * (logits.ndim - 2)))


PRIORS = ("task+modality", "task", "none")


def build_hermes(
    network: UNetLayout,
    n_tasks: int,
    n_modalities: int,
    in_channels: int,
    depth: int = 1,
    tokens_per_modality: int = 10,
    fusion_width: int | None = None,
    priors: str = "task+modality",
    finest_skipped: int = 2,
    prior_probability: float | None = None,
    fusion_scales: int | None = 3,
    task_anchors: bool = False,
    identity_init: bool = False,
    prior_init_std: float = 0.02,
) -> HermesNet:
    """A :class:`HermesNet` on the DynUNet of ``network`` reading ``in_channels``, without deep supervision. ``priors``:
    ``task+modality`` (Hermes), ``task`` (no modality tokens) or ``none`` (no fusion: one head per task);
    fusion at every scale but the ``finest_skipped`` finest (2: from 1/4 resolution, the paper's),
    and only at the ``fusion_scales`` coarsest (3: the paper's count, see :func:`default_fusion_stages`;
    None: no such limit);
    ``task_anchors``: add a learned vector per task to its prototype (see :class:`HermesNet`);
    ``prior_probability``: every task's logit offset starts at ``logit(prior_probability)`` (None: no
    offset with priors, 0 without, as before); ``identity_init``: every fusion layer starts as the
    identity and, with anchors, every prototype as its anchor (a fresh network computes what the
    no-priors one of the same backbone weights does); ``prior_init_std``: the task and modality
    tables start at N(0, std^2) (see :class:`~medalloy.models.prior_fusion.PriorBank`)."""
    if priors not in PRIORS:
        raise ValueError(f"priors must be one of {', '.join(PRIORS)}, not {priors!r}")
    backbone = build_unet(network, in_channels=in_channels, out_channels=1, deep_supervision=False)
    # the task-prototype head replaces DynUNet's output layer: unused parameters would stall DDP
    backbone.output_block = nn.Identity()
    return HermesNet(
        backbone,
        list(network.filters),
        n_tasks,
        n_modalities,
        fusion_stages=[] if priors == "none" else default_fusion_stages(list(getattr(backbone, STAGES_ATTR)), finest_skipped, fusion_scales),
        depth=depth,
        tokens_per_modality=0 if priors == "task" else tokens_per_modality,
        fusion_width=fusion_width,
        prior_probability=prior_probability,
        task_anchors=task_anchors,
        identity_init=identity_init,
        prior_init_std=prior_init_std,
    )
