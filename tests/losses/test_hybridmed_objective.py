"""HybridMED's objective: each term is its loss of the model's outputs, the total their weighted
sum, the groups choose the terms and the teacher the distillation term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medalloy.losses import GenerationDistillLoss, GlobalContrastiveLoss, LanguageModelLoss, TokenAlignmentLoss
from medalloy.losses.hybridmed_objective import TERMS, HybridMEDObjective, mean_terms

B, T, V, D = 3, 5, 11, 4
WEIGHTS = {"global": 0.5, "token": 2.0, "summary": 3.0, "caption": 5.0, "distill": 7.0}  # distinct, so a swapped weight shows


class Stub(nn.Module):
    """Fixed outputs of every part (a seed of its own), recording which parts it was asked for."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        shapes = {
            "image_global": (B, D), "impression_global": (B, D), "patches": (B, 6, D), "words": (B, T, D),
            "summary_logits": (B, T - 1, V), "caption_logits": (B, T - 1, V), "summary_hidden": (B, T - 1, D), "caption_hidden": (B, T - 1, D),
        }  # fmt: skip
        self.out = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
        self.asked: list[tuple[str, ...]] = []
        self.given: list[dict] = []

    def forward(self, parts=(), **inputs):
        self.asked.append(tuple(parts))
        self.given.append(inputs)
        return dict(self.out)


def _handed(given: dict, batch: dict, names: tuple[str, ...]) -> bool:
    """The model got exactly the batch's tensors of ``names`` (the same objects), and nothing else."""
    return set(given) == set(names) and all(given[n] is batch[n] for n in names)


JOINT_INPUTS = ("images", "findings", "findings_mask", "impression", "impression_enc", "impression_enc_mask")
SUMMARY_INPUTS = ("findings", "findings_mask", "impression")


def _same(i: int, j: int) -> torch.Tensor:
    same = torch.eye(B, dtype=torch.bool)
    same[i, j] = same[j, i] = True
    return same


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(9)
    impression = torch.randint(1, V, (B, T), generator=g)
    impression[0, -2:] = 0  # padding the loss must skip
    mask = impression != 0
    return {
        "images": torch.zeros(B, 1, 8, 8), "findings": torch.ones(B, T, dtype=torch.long), "findings_mask": torch.ones(B, T, dtype=torch.bool),
        "impression": impression, "impression_mask": mask, "impression_enc": impression, "impression_enc_mask": mask,
        "same_impression": _same(0, 1), "same_findings": _same(1, 2),  # two identical texts: positives beside the diagonal
    }  # fmt: skip


def test_joint_step_is_the_weighted_sum_of_each_terms_own_loss():
    objective = HybridMEDObjective(["global", "token", "generation"], WEIGHTS, "batch", pad_id=0, distill_temperature=2.0)
    model, teacher, contrast = Stub(1), Stub(2), GlobalContrastiveLoss()
    batch = _batch()
    out = objective.joint_step({"model": model, "contrast": contrast}, batch, teacher)
    m, t, target = model.out, teacher.out, batch["impression"][:, 1:]
    lm = LanguageModelLoss(pad_id=0)
    expected = {
        "global": contrast(m["image_global"], m["impression_global"], batch["same_impression"]),
        "token": TokenAlignmentLoss(scope="batch")(m["patches"], m["words"], batch["findings_mask"], batch["same_findings"]),
        "summary": lm(m["summary_logits"], target),
        "caption": lm(m["caption_logits"], target),
        "distill": GenerationDistillLoss(temperature=2.0)(
            m["caption_logits"], t["summary_logits"], m["caption_hidden"], t["summary_hidden"], batch["impression_mask"][:, 1:]
        ),
    }
    assert set(out) == {"loss", *TERMS}
    for k, v in expected.items():
        assert float(out[k]) == pytest.approx(float(v), rel=1e-6), k
        assert float(v) > 0, k
    assert float(out["loss"]) == pytest.approx(sum(WEIGHTS[k] * float(v) for k, v in expected.items()), rel=1e-6)
    assert model.asked == [("global", "token", "summary", "caption")] and teacher.asked == [("summary",)]
    assert _handed(model.given[0], batch, JOINT_INPUTS) and _handed(teacher.given[0], batch, SUMMARY_INPUTS)
    identical_texts_ignored = contrast(m["image_global"], m["impression_global"], torch.eye(B, dtype=torch.bool))
    assert float(identical_texts_ignored) != pytest.approx(float(out["global"]), rel=1e-4)  # the positives matter here
    own_pairs_only = TokenAlignmentLoss(scope="batch")(m["patches"], m["words"], batch["findings_mask"], torch.eye(B, dtype=torch.bool))
    assert float(own_pairs_only) != pytest.approx(float(out["token"]), rel=1e-4)


@pytest.mark.parametrize(("groups", "terms"), [(["global"], {"global"}), (["global", "token"], {"global", "token"}), (["generation"], {"summary", "caption"})])
def test_groups_choose_the_terms_and_no_teacher_no_distillation(groups, terms):
    objective = HybridMEDObjective(groups, WEIGHTS, "pair", pad_id=0, distill_temperature=1.0)
    model = Stub(1)
    out = objective.joint_step({"model": model, "contrast": GlobalContrastiveLoss()}, _batch(), None)
    assert set(out) == {"loss", *terms}
    assert float(out["loss"]) == pytest.approx(sum(WEIGHTS[k] * float(out[k]) for k in terms), rel=1e-6)
    assert model.asked == [objective.parts()]


def test_summary_step_is_the_summarization_branchs_language_model_loss():
    objective = HybridMEDObjective(["generation"], WEIGHTS, "batch", pad_id=0, distill_temperature=2.0)
    model, batch = Stub(3), _batch()
    out = objective.summary_step(model, batch)
    reference = LanguageModelLoss(pad_id=0)(model.out["summary_logits"], batch["impression"][:, 1:])
    assert float(out["loss"]) == pytest.approx(float(reference), rel=1e-6) and float(out["summary"]) == float(out["loss"])
    assert model.asked == [("summary",)] and _handed(model.given[0], batch, SUMMARY_INPUTS)


def test_a_missing_weight_is_refused_and_mean_terms_averages_each_key():
    with pytest.raises(ValueError, match="distill"):
        HybridMEDObjective(["global"], {k: 1.0 for k in TERMS if k != "distill"}, "batch", 0, 1.0)
    rows = [{"loss": torch.tensor(1.0), "global": torch.tensor(2.0)}, {"loss": torch.tensor(3.0), "global": torch.tensor(6.0)}]
    assert mean_terms(rows) == {"val/loss": 2.0, "val/global": 4.0}
    assert mean_terms(rows, prefix="x/") == {"x/loss": 2.0, "x/global": 4.0}
