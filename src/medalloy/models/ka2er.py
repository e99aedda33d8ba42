"""KA2ER (Gao et al. 2024): a SwinUNETR foundation and frozen task experts encode the same input;
amalgamation layers merge the experts' hidden features into the foundation's at its deepest
stages; a prompt-driven mask decoder answers one sigmoid map per task asked.

``KA2ERNet(x (B, C, *sp), task_ids (B, T), modality_ids (B,) | None)`` returns

- ``logits`` ``(B, T, *sp)``: one sigmoid logit map per task asked;
  with ``task_experts``, a task its own expert labels gets that expert's log-odds added
  (``z_c - z_0`` of its softmax classes, scaled by a learned per-task gate that starts at 1), so
  the decoder learns a correction of the expert, not the whole mask (our choice; see below);
- ``expert_logits``: each expert's own output ``(B, K_k, *sp)`` on the same input (for distillation);
- ``route_logits`` ``(B, K)`` or ``None``: the router's scores of which expert's source the image is from;
- ``merged`` / ``expert_tokens``: per amalgamated stage, the merged tokens ``(B, N, D)`` and each
  expert's projected tokens ``[(B, N, D)]`` (for feature distillation).

Experts live inside the network (so one checkpoint answers on its own) but never train: their
parameters do not require gradients, they stay in eval mode whatever ``train()`` is called, and
they run under ``no_grad`` (not ``inference_mode``: their features feed trainable projections).
Each expert sees the input with its own channel count (a grey expert gets the channel mean of an
RGB input, an RGB expert a grey input repeated) and gives the features of one of its stages per
amalgamated foundation stage, the deepest with no coarser stride (chosen once by :func:`choose_taps`).

Expert priors (``task_experts[t] = [(k, c), ...]``: task ``t`` is class ``c`` of expert ``k``;
an empty list for a task no expert labels): the paper merges only hidden features; on a CPU budget a decoder from
scratch relearns an expert's fine boundaries far slower than the amalgamation can use them, so
the own expert's output is a skip to the task's logits. Its decoder bias starts at 0 (not the
rare-foreground prior), so an untrained model answers as its expert does (up to the decoder's
small random term): with the ``exclusive`` class form, ``softmax([0, z^e_c - z^e_0 ...])`` is the
expert's own softmax. Where several experts label one task (lung of JSRT and of Shenzhen, polyp of
two centres), an image-level router (a linear layer on the experts' pooled deepest features, each
expert's standardised, zero
at the start: the plain mean) weighs them; training teaches it which expert's dataset an image
comes from (``route_logits``; the recipe's cross-entropy), so an image gets the expert of the
source it resembles, also when asked as another source.

Ablations of the benchmark in the same class: ``hierarchical=False`` (concatenate + 1x1 conv),
``decoder="plain"`` (one 1x1 head per task; stage 3 then has no task condition unless
``task_adaptive=True`` asks for one, read from a task embedding of the network's own), no experts
(the layer is self-attention only), no amalgamation stages and a plain decoder (the foundation alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from medalloy.models.amalgamation import AmalgamationLayer, conv1x1, tokens
from medalloy.models.features import STAGES_ATTR, FeatureTap, stage_names
from medalloy.models.prompt_decoder import PlainTaskHead, PromptMaskDecoder
from medalloy.models.swin import build_swinunetr, run_swin_stages, swin_stage_channels, swin_stage_stride

AMALGAMATION_STAGES = ("enc4", "bottleneck")


def adapt_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """The input with ``channels`` channels: kept, averaged to one, or one repeated."""
    if x.shape[1] == channels:
        return x
    if channels == 1:
        return x.mean(1, keepdim=True)
    if x.shape[1] == 1:
        return x.expand(-1, channels, *x.shape[2:])
    raise ValueError(f"cannot give a {channels}-channel expert a {x.shape[1]}-channel input")


@torch.no_grad()
def probe_stages(model: nn.Module, in_channels: int, shape: list[int]) -> dict[str, tuple[int, int]]:
    """``{stage: (channels, stride)}`` of a network's encoder stages and bottleneck, from one
    forward pass of zeros of ``shape`` (sides the network accepts)."""
    names = [s for s in stage_names(model) if s.startswith("enc") or s == "bottleneck"]
    was = model.training
    model.eval()
    with FeatureTap(model, names, detach=True) as tap:
        model(torch.zeros(1, in_channels, *shape, device=next(model.parameters()).device))
    model.train(was)
    return {s: (int(f.shape[1]), int(round(shape[0] / f.shape[2]))) for s, f in tap.features.items()}


def choose_taps(probed: dict[str, tuple[int, int]], stages: list[str]) -> tuple[dict[str, str], dict[str, int]]:
    """For each foundation stage, the expert stage with the largest stride not coarser than it
    (the deeper on ties) and its channels."""
    taps, channels = {}, {}
    order = list(probed)
    for stage in stages:
        stride = swin_stage_stride(stage)
        fitting = [s for s in order if probed[s][1] <= stride] or order[:1]
        best = max(fitting, key=lambda s: (probed[s][1], order.index(s)))
        taps[stage], channels[stage] = best, probed[best][0]
    return taps, channels


class ExpertBank(nn.Module):
    """Frozen experts: ``x -> ({foundation stage: [(B, C_k, *g_k)]}, [(B, K_k, *sp)])``."""

    def __init__(self, experts: list[nn.Module], in_channels: list[int], taps: list[dict[str, str]]):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.in_channels, self.taps = list(in_channels), [dict(t) for t in taps]
        for p in self.experts.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> ExpertBank:  # noqa: ARG002 - experts are always in eval mode
        return super().train(False)

    def __len__(self) -> int:
        return len(self.experts)

    def forward(self, x: torch.Tensor) -> tuple[dict[str, list[torch.Tensor]], list[torch.Tensor]]:
        features: dict[str, list[torch.Tensor]] = {}
        logits = []
        with torch.no_grad():
            for expert, channels, taps in zip(self.experts, self.in_channels, self.taps):
                with FeatureTap(expert, sorted(set(taps.values())), detach=True) as tap:
                    out = expert(adapt_channels(x, channels))
                logits.append(out[0] if isinstance(out, (list, tuple)) else out)
                for stage, source in taps.items():
                    features.setdefault(stage, []).append(tap.features[source])
        return features, logits


class KA2ERNet(nn.Module):
    """A SwinUNETR foundation, frozen experts, amalgamation layers and a task decoder."""

    def __init__(
        self,
        foundation: nn.Module,
        feature_size: int,
        n_tasks: int,
        experts: ExpertBank | None = None,
        expert_channels: list[dict[str, int]] | None = None,
        stages: list[str] | tuple[str, ...] = AMALGAMATION_STAGES,
        width: int = 64,
        heads: int = 4,
        hierarchical: bool = True,
        decoder: str = "prompt",
        decoder_depth: int = 2,
        task_adaptive: bool | None = None,
        prior_probability: float | None = 0.01,
        task_experts: list[list[tuple[int, int]]] | None = None,
        route: bool = True,
    ):
        super().__init__()
        dim = foundation.swinViT.patch_embed.proj.weight.ndim - 2
        self.foundation = foundation
        self.foundation.out = nn.Identity()  # the task decoder replaces SwinUNETR's output layer (unused parameters stall DDP)
        self.experts = experts if experts is not None and len(experts) else None
        channels = swin_stage_channels(feature_size)
        per_expert = expert_channels or []
        if len(per_expert) != (len(self.experts) if self.experts else 0):
            raise ValueError("give the channels of every expert's tapped stages")
        self.amalgamation = nn.ModuleDict({s: AmalgamationLayer(dim, channels[s], [c[s] for c in per_expert], width, heads, hierarchical) for s in stages})
        prior = 0.0 if prior_probability is None else float(torch.logit(torch.tensor(prior_probability)))
        # stage 3's task condition is its own switch: None (auto) keeps it where the prompt decoder
        # has task embeddings to give and drops it with the plain one (the behaviour before the switch)
        self.n_tasks = n_tasks
        self.task_adaptive = decoder == "prompt" if task_adaptive is None else bool(task_adaptive)
        if decoder == "prompt":
            self.image_proj = conv1x1(dim, channels["bottleneck"], width)
            self.image_pos = (nn.Conv2d if dim == 2 else nn.Conv3d)(width, width, 3, padding=1, groups=width)
            self.decoder: nn.Module = PromptMaskDecoder(n_tasks, width, channels["dec0"], decoder_depth, heads, prior)
        elif decoder == "plain":
            self.decoder = PlainTaskHead(n_tasks, channels["dec0"], prior)
        else:
            raise ValueError(f"decoder must be 'prompt' or 'plain', not {decoder!r}")
        self.task_embed: nn.Embedding | None = None
        if self.task_adaptive and decoder == "plain":
            # created only here, so every other configuration draws the same weights from a seed as before
            if not hierarchical or not self.amalgamation:
                raise ValueError("a task condition with the plain decoder needs hierarchical amalgamation stages to read it")
            self.task_embed = nn.Embedding(n_tasks + 1, width)  # + the null task, as the prompt decoder's
            nn.init.normal_(self.task_embed.weight, std=0.02)
        self.task_experts = self._check_task_experts(task_experts, n_tasks)
        self.router: nn.Module | None = None
        if self.task_experts and route and self.amalgamation and any(len(e) > 1 for e in self.task_experts):
            deepest = max(self.amalgamation, key=swin_stage_stride)
            self.route_stage = deepest
            self.router = nn.Linear(sum(c[deepest] for c in per_expert), len(self.experts))
            nn.init.zeros_(self.router.weight)  # uniform at the start: the plain mean of the experts
            nn.init.zeros_(self.router.bias)
        if self.task_experts:
            self.expert_gate = nn.Parameter(torch.ones(n_tasks + 1))
            with torch.no_grad():
                for t, entry in enumerate(self.task_experts):
                    if entry:
                        self.decoder.bias.weight[t] = 0.0  # the expert's log-odds are the prior here
        paths = {s: f"foundation.{p}" for s, p in getattr(foundation, STAGES_ATTR).items()}
        paths.update({s: f"amalgamation.{s}" for s in self.amalgamation if s in paths})
        setattr(self, STAGES_ATTR, paths)

    @property
    def null_task(self) -> int:
        return self.n_tasks

    def _check_task_experts(self, pairs: list[list[tuple[int, int]]] | None, n_tasks: int) -> list[list[tuple[int, int]]]:
        if not pairs or self.experts is None:
            return []
        if len(pairs) != n_tasks:
            raise ValueError(f"task_experts needs one entry per task ({n_tasks}), got {len(pairs)}")
        out = []
        for entry in pairs:
            checked = []
            for k, c in entry:
                if not 0 <= int(k) < len(self.experts) or int(c) < 1:
                    raise ValueError(f"task_experts entry {(k, c)}: no expert {k}, or class {c} is the background")
                checked.append((int(k), int(c)))
            out.append(checked)
        return out if any(out) else []

    def route_logits(self, expert_features: dict[str, list[torch.Tensor]]) -> torch.Tensor | None:
        """``(B, K)``: which expert's training source the image looks like, from the experts' own
        (frozen) deepest tapped features, pooled over space; ``None`` without a router."""
        if self.router is None:
            return None
        # each expert's pooled features standardised on their own: their scales differ by orders of
        # magnitude, and raw ones make the router's logits swing by tens per optimizer step
        pooled = [f.float().mean(dim=tuple(range(2, f.ndim))) for f in expert_features[self.route_stage]]
        pooled = torch.cat([F.layer_norm(p, p.shape[1:]) for p in pooled], dim=1)
        return self.router(pooled)

    def expert_prior(self, expert_logits: list[torch.Tensor], task_ids: torch.Tensor, route: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, T, *sp)``: per asked task, its experts' log-odds ``z_c - z_0`` times its gate, 0
        where no expert labels it; where several do (datasets sharing a task), weighted per image
        by the router's softmax over those experts (the plain mean without one)."""
        ref = expert_logits[0]
        spatial = [1] * (ref.ndim - 2)
        zero = torch.zeros(ref.shape[0], *ref.shape[2:], dtype=torch.float32, device=ref.device)

        def combined(entry: list[tuple[int, int]]) -> torch.Tensor:
            if not entry:
                return zero
            odds = torch.stack([(expert_logits[k][:, c] - expert_logits[k][:, 0]).float() for k, c in entry], dim=1)  # (B, n, *sp)
            if route is None or len(entry) == 1:
                return odds.mean(1)
            w = route[:, [k for k, _ in entry]].float().softmax(1)  # (B, n)
            return (odds * w.view(*w.shape, *spatial)).sum(1)

        every = torch.stack([*(combined(e) for e in self.task_experts), zero], dim=1) * self.expert_gate.view(1, -1, *spatial)  # + the null task
        rows = torch.arange(task_ids.shape[0], device=task_ids.device)[:, None]
        return every[rows, task_ids]

    def _condition(self, task_ids: torch.Tensor) -> torch.Tensor | None:
        if not self.task_adaptive:
            return None
        real = (task_ids != self.null_task).float()[..., None]  # padded slots say nothing of the task set
        prompts = self.decoder.prompts(task_ids) if self.task_embed is None else self.task_embed(task_ids)
        return (prompts * real).sum(1) / real.sum(1).clamp_min(1.0)

    def forward(self, x: torch.Tensor, task_ids: torch.Tensor, modality_ids: torch.Tensor | None = None) -> dict:
        if task_ids.ndim != 2 or task_ids.shape[0] != x.shape[0]:
            raise ValueError(f"need task_ids (B, T) for B={x.shape[0]}; got {tuple(task_ids.shape)}")
        task_ids = task_ids.long()
        expert_features, expert_logits = self.experts(x) if self.experts is not None else ({}, [])
        condition = self._condition(task_ids)
        merged, projected, deepest = {}, {}, []

        def after(stage: str, f: torch.Tensor) -> torch.Tensor:
            if stage in self.amalgamation:
                f, merged[stage], projected[stage] = self.amalgamation[stage](f, expert_features.get(stage, []), condition)
            if stage == "bottleneck":
                deepest.append(f)
            return f

        z = run_swin_stages(self.foundation, x, after)
        if isinstance(self.decoder, PromptMaskDecoder):
            img = self.image_proj(deepest[0])
            logits = self.decoder(tokens(img + self.image_pos(img)), z, task_ids)
        else:
            logits = self.decoder(z, task_ids)
        route = self.route_logits(expert_features)
        if self.task_experts:
            logits = logits.float() + self.expert_prior(expert_logits, task_ids, route)
        return {"logits": logits, "expert_logits": expert_logits, "merged": merged, "expert_tokens": projected, "route_logits": route}


def build_ka2er(
    spatial_dims: int,
    in_channels: int,
    n_tasks: int,
    feature_size: int = 12,
    experts: list[nn.Module] | None = None,
    expert_in_channels: list[int] | None = None,
    expert_taps: list[dict[str, str]] | None = None,
    expert_channels: list[dict[str, int]] | None = None,
    **options,
) -> KA2ERNet:
    """A :class:`KA2ERNet` on a fresh SwinUNETR; ``options`` go to :class:`KA2ERNet`."""
    foundation = build_swinunetr(spatial_dims, in_channels, feature_size)
    bank = ExpertBank(experts, expert_in_channels or [], expert_taps or []) if experts else None
    return KA2ERNet(foundation, feature_size, n_tasks, bank, expert_channels if experts else None, **options)
