"""HybridMED's pretraining objective (Jiang et al. arXiv 2410.00448; docs/methods/pretraining.md)::

    L = w_global L_global + w_token L_token + w_summary L_sum + w_caption L_cap + w_distill L_dis

over the terms of the chosen loss ``groups``: ``global`` (image <-> impression,
:mod:`~medalloy.losses.global_contrastive`), ``token`` (patch <-> findings word,
:mod:`~medalloy.losses.token_alignment`), ``generation`` (summary and caption,
:mod:`~medalloy.losses.language_model`, and, with a teacher, the caption branch distilled from the
teacher's summarization, :mod:`~medalloy.losses.generation_distill`). Stage 1 trains the summary
term alone (:meth:`HybridMEDObjective.summary_step`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import torch

from medalloy.losses.generation_distill import GenerationDistillLoss
from medalloy.losses.language_model import LanguageModelLoss
from medalloy.losses.token_alignment import TokenAlignmentLoss

TERMS = ("global", "token", "summary", "caption", "distill")


class HybridMEDObjective:
    """The weighted terms of the joint stage (and the summarization loss of stage 1 alone).

    ``groups``: of ``global``, ``token``, ``generation``; ``weights``: one per term of :data:`TERMS`;
    ``token_scope``: ``batch`` or ``pair`` (:class:`TokenAlignmentLoss`); ``pad_id``: the report
    tokenizer's padding id; ``distill_temperature``: of the generation distillation."""

    def __init__(self, groups: Collection[str], weights: Mapping[str, float], token_scope: str, pad_id: int, distill_temperature: float):
        missing = [t for t in TERMS if t not in weights]
        if missing:
            raise ValueError(f"no weight for the term(s) {missing}")
        self.groups, self.w = set(groups), {t: weights[t] for t in TERMS}
        self.token = TokenAlignmentLoss(scope=token_scope)
        self.lm = LanguageModelLoss(pad_id=pad_id)
        self.distill = GenerationDistillLoss(temperature=distill_temperature)

    def parts(self) -> tuple[str, ...]:
        """The model's outputs the groups need (``summary`` stands for both generation branches)."""
        p = []
        if "global" in self.groups:
            p.append("global")
        if "token" in self.groups:
            p.append("token")
        if "generation" in self.groups:
            p += ["summary", "caption"]
        return tuple(p)

    def summary_step(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        """Findings -> impression: the language-model loss of the summarization branch."""
        out = model(findings=batch["findings"], findings_mask=batch["findings_mask"], impression=batch["impression"], parts=("summary",))
        loss = self.lm(out["summary_logits"], batch["impression"][:, 1:])
        return {"loss": loss, "summary": loss.detach()}

    def joint_step(self, models: dict, batch: dict, teacher: torch.nn.Module | None) -> dict[str, torch.Tensor]:
        """``models``: ``model`` (HybridMED) and ``contrast`` (:class:`GlobalContrastiveLoss`, its
        temperature learnt); ``teacher``: the frozen stage-1 model, or None (no distillation term).
        Returns the weighted ``loss`` and each unweighted term, detached."""
        parts = self.parts()
        out = models["model"](
            images=batch["images"], findings=batch["findings"], findings_mask=batch["findings_mask"], impression=batch["impression"],
            impression_enc=batch["impression_enc"], impression_enc_mask=batch["impression_enc_mask"], parts=parts,
        )  # fmt: skip
        terms: dict[str, torch.Tensor] = {}
        if "global" in parts:
            terms["global"] = models["contrast"](out["image_global"], out["impression_global"], batch["same_impression"])
        if "token" in parts:
            terms["token"] = self.token(out["patches"], out["words"], batch["findings_mask"], batch["same_findings"])
        if "summary" in parts:
            target = batch["impression"][:, 1:]
            terms["summary"] = self.lm(out["summary_logits"], target)
            terms["caption"] = self.lm(out["caption_logits"], target)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(findings=batch["findings"], findings_mask=batch["findings_mask"], impression=batch["impression"], parts=("summary",))
                terms["distill"] = self.distill(
                    out["caption_logits"], t["summary_logits"], out["caption_hidden"], t["summary_hidden"], batch["impression_mask"][:, 1:]
                )
        loss = sum(self.w[k] * v for k, v in terms.items())
        return {"loss": loss, **{k: v.detach() for k, v in terms.items()}}


def mean_terms(rows: list[dict[str, torch.Tensor]], prefix: str = "val/") -> dict[str, float]:
    """The mean of each term over the step outputs ``rows`` (validation batches), keys prefixed."""
    keys = rows[0].keys()
    return {f"{prefix}{k}": float(np.mean([float(r[k]) for r in rows])) for k in keys}
