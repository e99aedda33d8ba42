"""Image-report pretraining losses against hand computations (plain loops, explicit math) of their docstring formulas."""

from __future__ import annotations

import math

import pytest
import torch

from medalloy.losses import GenerationDistillLoss, GlobalContrastiveLoss, LanguageModelLoss, TokenAlignmentLoss
from medalloy.losses.global_contrastive import symmetric_info_nce


# ---------------------------------------------------------------------------------------------- hand references
def _norm(v):
    return math.sqrt(sum(x * x for x in v))


def _cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / (_norm(a) * _norm(b))


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def _softmax(row):
    return [math.exp(x) for x in _log_softmax(row)]


def _hand_info_nce(logits, positives=None):
    """0.5 * (soft CE over rows + soft CE over columns), targets uniform over the positives (default: the diagonal)."""
    b = len(logits)
    pos = positives if positives is not None else [[i == j for j in range(b)] for i in range(b)]
    row = 0.0
    for i in range(b):
        lp = _log_softmax(logits[i])
        n = sum(pos[i])
        row -= sum(lp[j] / n for j in range(b) if pos[i][j])
    col = 0.0
    for j in range(b):
        lp = _log_softmax([logits[i][j] for i in range(b)])
        n = sum(pos[i][j] for i in range(b))
        col -= sum(lp[i] / n for i in range(b) if pos[i][j])
    return 0.5 * (row / b + col / b)


def _hand_global(image, text, scale, positives=None):
    img = [[x / _norm(r) for x in r] for r in image.tolist()]
    txt = [[x / _norm(r) for x in r] for r in text.tolist()]
    logits = [[scale * sum(a * c for a, c in zip(img[i], txt[j])) for j in range(len(txt))] for i in range(len(img))]
    return _hand_info_nce(logits, None if positives is None else positives.tolist())


def _hand_pair_score(queries, keys, attn_t, agg_t):
    """Each query attends over the keys (softmax of cos / attn_t), context = sum a k, r = cos(context, query); LSE-aggregate."""
    rs = []
    for q in queries:
        a = _softmax([_cos(q, k) / attn_t for k in keys])
        c = [sum(a[n] * keys[n][d] for n in range(len(keys))) for d in range(len(q))]
        rs.append(_cos(c, q))
    return agg_t * math.log(sum(math.exp(r / agg_t) for r in rs))


def _hand_token_scores(patches, words, mask, attn_t, agg_t):
    b = patches.shape[0]
    s_word = [[0.0] * b for _ in range(b)]
    s_patch = [[0.0] * b for _ in range(b)]
    for i in range(b):
        v = patches[i].tolist()
        for j in range(b):
            e = [w for w, m in zip(words[j].tolist(), mask[j].tolist()) if m]
            s_word[i][j] = _hand_pair_score(e, v, attn_t, agg_t)
            s_patch[i][j] = _hand_pair_score(v, e, attn_t, agg_t)
    return s_word, s_patch


# ---------------------------------------------------------------------------------------------- global contrastive
def test_global_contrastive_is_the_symmetric_info_nce_of_scaled_cosines():
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(3, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, generator=g, dtype=torch.float64)
    loss = GlobalContrastiveLoss(init_temperature=0.5)
    assert loss.temperature == pytest.approx(0.5, rel=1e-6)
    assert loss(image, text).item() == pytest.approx(_hand_global(image, text, 2.0), rel=1e-6)
    # the scale is clamped to max_scale
    clamped = GlobalContrastiveLoss(init_temperature=0.001, max_scale=10.0)
    assert clamped.temperature == pytest.approx(0.1, rel=1e-6)
    assert clamped(image, text).item() == pytest.approx(_hand_global(image, text, 10.0), rel=1e-6)


def test_global_contrastive_is_lower_for_matched_than_for_shuffled_pairs():
    g = torch.Generator().manual_seed(1)
    image = torch.randn(8, 16, generator=g)
    text = image + 0.1 * torch.randn(8, 16, generator=g)
    loss = GlobalContrastiveLoss()
    shuffled = text[torch.roll(torch.arange(8), 1)]
    assert loss(image, text).item() < loss(image, shuffled).item()


def test_global_contrastive_identical_texts_are_positives_not_negatives():
    g = torch.Generator().manual_seed(2)
    image, text = torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.float64)
    text[1] = text[0] + 0.3 * torch.randn(2, generator=g, dtype=torch.float64)  # the same impression, encoded with dropout
    positives = torch.tensor([[True, True, False], [True, True, False], [False, False, True]])
    loss = GlobalContrastiveLoss(init_temperature=0.25)
    with_pos, without = loss(image, text, positives).item(), loss(image, text).item()
    assert with_pos == pytest.approx(_hand_global(image, text, 4.0, positives), rel=1e-6)
    assert without == pytest.approx(_hand_global(image, text, 4.0), rel=1e-6)
    assert abs(with_pos - without) > 1e-3
    # explicitly for row 0 (image 0 -> texts): the target is 1/2 on texts 0 and 1
    lp = _log_softmax([4.0 * _cos(image[0].tolist(), text[j].tolist()) for j in range(3)])
    lp_col = _log_softmax([4.0 * _cos(image[i].tolist(), text[0].tolist()) for i in range(3)])  # column 0 (text 0 -> images)
    assert -(0.5 * lp[0] + 0.5 * lp[1]) != pytest.approx(-lp[0], rel=1e-3)
    assert -(0.5 * lp_col[0] + 0.5 * lp_col[1]) != pytest.approx(-lp_col[0], rel=1e-3)
    bad = positives.clone()
    bad[2, 2] = False
    with pytest.raises(ValueError, match="diagonal"):
        loss(image, text, bad)
    with pytest.raises(ValueError, match="bool"):
        loss(image, text, positives.float())


def test_global_contrastive_exactly_equal_texts_give_the_one_hot_value_and_gradients():
    # with exactly equal embeddings, uniform soft targets and one-hot targets coincide (see the module docstring)
    g = torch.Generator().manual_seed(10)
    image = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    encoded = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    positives = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]).bool()
    loss = GlobalContrastiveLoss(init_temperature=0.1)
    values, grads = [], []
    for pos in (None, positives):
        image.grad = encoded.grad = None
        value = loss(image, torch.cat([encoded[:1], encoded]), pos)  # texts 0 and 1: one encoder output
        value.backward()
        values.append(value.item())
        grads.append((image.grad.clone(), encoded.grad.clone()))
    assert values[1] == pytest.approx(_hand_global(image.detach(), torch.cat([encoded[:1], encoded]).detach(), 10.0, positives), rel=1e-6)
    assert values[0] == pytest.approx(values[1], rel=1e-12)
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])


def test_global_contrastive_temperature_learns_or_stays_fixed():
    g = torch.Generator().manual_seed(3)
    image = torch.randn(4, 5, generator=g, requires_grad=True)
    text = torch.randn(4, 5, generator=g)
    loss = GlobalContrastiveLoss()
    assert [n for n, _ in loss.named_parameters()] == ["logit_scale"]
    assert loss.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    loss(image, text).backward()
    assert loss.logit_scale.grad is not None and loss.logit_scale.grad.abs().item() > 0
    assert image.grad.abs().sum() > 0
    fixed = GlobalContrastiveLoss(learnable=False)
    assert list(fixed.parameters()) == [] and "logit_scale" in dict(fixed.named_buffers())
    assert fixed(image, text).item() == pytest.approx(loss(image, text).item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------- token alignment
def test_token_alignment_pair_score_by_hand():
    # one image with patches (1, 0), (0, 2); one report with words (1, 0), (0, 1) and a padded slot
    patches = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)
    words = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, -3.0]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])
    attn_t, agg_t = 0.25, 0.2
    s_word, s_patch = TokenAlignmentLoss(attn_t, agg_t, 0.1).scores(patches, words, mask)
    a1, a2 = math.exp(4) / (math.exp(4) + 1), 1 / (math.exp(4) + 1)  # softmax([cos=1, cos=0] / 0.25)
    # word -> patch: word (1, 0) gets context (a1, 2 a2), word (0, 1) gets context (a2, 2 a1)
    r1 = a1 / math.sqrt(a1**2 + 4 * a2**2)
    r2 = 2 * a1 / math.sqrt(a2**2 + 4 * a1**2)
    assert s_word[0, 0].item() == pytest.approx(agg_t * math.log(math.exp(r1 / agg_t) + math.exp(r2 / agg_t)), rel=1e-12)
    # patch -> word: patch (1, 0) gets context (a1, a2), patch (0, 2) gets (a2, a1); both r = a1 / |(a1, a2)|
    r = a1 / math.sqrt(a1**2 + a2**2)
    assert s_patch[0, 0].item() == pytest.approx(agg_t * math.log(2 * math.exp(r / agg_t)), rel=1e-12)


def test_token_alignment_equals_the_hand_computed_loss():
    g = torch.Generator().manual_seed(4)
    b, p, w, d = 3, 4, 5, 3
    patches = torch.randn(b, p, d, generator=g, dtype=torch.float64)
    words = torch.randn(b, w, d, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True, False, False, False, False]])
    attn_t, agg_t, t = 0.25, 0.2, 0.1
    loss = TokenAlignmentLoss(attn_t, agg_t, t)
    s_word, s_patch = loss.scores(patches, words, mask)
    hw, hp = _hand_token_scores(patches, words, mask, attn_t, agg_t)
    for i in range(b):
        assert s_patch[i].tolist() == pytest.approx(hp[i], rel=1e-10)
        assert s_word[i].tolist() == pytest.approx(hw[i], rel=1e-10)
    scaled = lambda s: [[x / t for x in row] for row in s]  # noqa: E731
    ref = 0.5 * (_hand_info_nce(scaled(hw)) + _hand_info_nce(scaled(hp)))
    assert loss(patches, words, mask).item() == pytest.approx(ref, rel=1e-10)
    positives = torch.tensor([[True, False, True], [False, True, False], [True, False, True]])
    ref_pos = 0.5 * (_hand_info_nce(scaled(hw), positives.tolist()) + _hand_info_nce(scaled(hp), positives.tolist()))
    assert loss(patches, words, mask, positives).item() == pytest.approx(ref_pos, rel=1e-10)


def test_token_alignment_ignores_padded_words():
    g = torch.Generator().manual_seed(5)
    b, p, w, d = 3, 6, 4, 5
    patches = torch.randn(b, p, d, generator=g, dtype=torch.float64)
    words = torch.randn(b, w, d, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, True, True, True], [True, True, False, False], [True, True, True, False]])
    loss = TokenAlignmentLoss()
    base = loss(patches, words, mask)
    base.backward()
    assert words.grad[~mask].abs().max().item() == 0.0 and words.grad[mask].abs().sum() > 0
    # append padded slots with random values, and scramble the existing padded slots
    extra = 10 * torch.randn(b, 3, d, generator=g, dtype=torch.float64)
    longer = torch.cat([words.detach(), extra], 1)
    longer[~torch.cat([mask, torch.ones(b, 3, dtype=torch.bool)], 1)] = 7.0 * torch.randn(int((~mask).sum()), d, generator=g, dtype=torch.float64)
    longer_mask = torch.cat([mask, torch.zeros(b, 3, dtype=torch.bool)], 1)
    assert loss(patches, longer, longer_mask).item() == pytest.approx(base.item(), abs=1e-6)
    # even non-finite padding has no effect
    longer[:, -1] = float("nan")
    assert loss(patches, longer, longer_mask).item() == pytest.approx(base.item(), abs=1e-6)


def test_token_alignment_float32_gradients_and_checks():
    g = torch.Generator().manual_seed(6)
    patches = torch.randn(4, 9, 8, generator=g, requires_grad=True)
    words = torch.randn(4, 6, 8, generator=g, requires_grad=True)
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[:, 0] = True
    loss = TokenAlignmentLoss()(patches, words, mask)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(patches.grad).all() and torch.isfinite(words.grad).all() and patches.grad.abs().sum() > 0
    ref = TokenAlignmentLoss()(patches.detach().double(), words.detach().double(), mask)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4)
    empty = mask.clone()
    empty[2] = False
    with pytest.raises(ValueError, match="at least one real word"):
        TokenAlignmentLoss()(patches, words, empty)


# ---------------------------------------------------------------------------------------------- language model
def test_language_model_loss_is_the_mean_nll_over_non_pad_targets():
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    targets = torch.tensor([[3, 1, 0, 0], [2, 4, 4, 0]])
    ref, n = 0.0, 0
    for b in range(2):
        for t in range(4):
            if targets[b, t] != 0:
                ref -= _log_softmax(logits[b, t].tolist())[targets[b, t].item()]
                n += 1
    loss = LanguageModelLoss(pad_id=0)
    assert loss(logits, targets).item() == pytest.approx(ref / n, rel=1e-10)
    # logits at pad positions change nothing
    changed = logits.clone()
    changed[0, 2:] = 100 * torch.randn(2, 5, generator=g, dtype=torch.float64)
    changed[1, 3] = float("inf")
    assert loss(changed, targets).item() == pytest.approx(ref / n, rel=1e-10)
    # label smoothing: (1 - eps) nll + eps * mean_v (-log p_v)
    eps, ref_s = 0.1, 0.0
    for b in range(2):
        for t in range(4):
            if targets[b, t] != 0:
                lp = _log_softmax(logits[b, t].tolist())
                ref_s += -(1 - eps) * lp[targets[b, t].item()] - eps * sum(lp) / 5
    assert LanguageModelLoss(0, eps)(logits, targets).item() == pytest.approx(ref_s / n, rel=1e-10)
    # another pad id: 0 is then a real token
    assert LanguageModelLoss(pad_id=4)(logits, targets).item() != pytest.approx(ref / n, rel=1e-6)


def test_language_model_loss_all_pad_is_zero_with_a_gradient_path():
    logits = torch.randn(2, 3, 6, requires_grad=True)
    loss = LanguageModelLoss(pad_id=1)(logits, torch.ones(2, 3, dtype=torch.long))
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum().item() == 0.0


# ---------------------------------------------------------------------------------------------- generation distillation
def _hand_distill(zs, zt, hs, ht, mask, tau, w):
    kl, mse, n = 0.0, 0.0, 0
    for b in range(zs.shape[0]):
        for t in range(zs.shape[1]):
            if not mask[b, t]:
                continue
            ls = _log_softmax([x / tau for x in zs[b, t].tolist()])
            lt = _log_softmax([x / tau for x in zt[b, t].tolist()])
            kl += sum(math.exp(q) * (q - p) for p, q in zip(ls, lt))
            h = hs.shape[2]
            mse += sum((hs[b, t, k].item() - ht[b, t, k].item()) ** 2 for k in range(h)) / h
            n += 1
    return tau * tau * kl / n + w * mse / n, kl / n, mse / n


def test_generation_distill_by_hand_with_t2_scaling_and_hidden_term():
    g = torch.Generator().manual_seed(8)
    zs, zt = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    hs, ht = torch.randn(2, 3, 5, generator=g, dtype=torch.float64), torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    for tau in (1.0, 2.0, 3.0):
        ref, kl, _ = _hand_distill(zs, zt, hs, ht, mask, tau, 0.0)
        assert ref == pytest.approx(tau * tau * kl)
        assert GenerationDistillLoss(tau, hidden_weight=0.0)(zs, zt, hs, ht, mask).item() == pytest.approx(ref, rel=1e-10)
    ref, _, mse = _hand_distill(zs, zt, hs, ht, mask, 2.0, 0.5)
    assert GenerationDistillLoss(2.0, 0.5)(zs, zt, hs, ht, mask).item() == pytest.approx(ref, rel=1e-10)
    # the hidden term alone: identical logits
    assert GenerationDistillLoss(2.0, 0.5)(zt, zt, hs, ht, mask).item() == pytest.approx(0.5 * mse, rel=1e-10)
    # masked-out positions change nothing
    zs2, hs2 = zs.clone(), hs.clone()
    zs2[~mask] += 50.0 * torch.randn(int((~mask).sum()), 4, generator=g, dtype=torch.float64)
    hs2[~mask] -= 3.0
    assert GenerationDistillLoss(2.0, 0.5)(zs2, zt, hs2, ht, mask).item() == pytest.approx(ref, rel=1e-10)


def test_generation_distill_zero_for_a_perfect_student_and_no_grad_to_the_teacher():
    g = torch.Generator().manual_seed(9)
    zt, ht = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 6, generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    loss = GenerationDistillLoss()
    assert loss(zt.clone(), zt, ht.clone(), ht, mask).item() == pytest.approx(0.0, abs=1e-6)
    zs, hs = torch.randn(2, 4, 7, generator=g, requires_grad=True), torch.randn(2, 4, 6, generator=g, requires_grad=True)
    zt.requires_grad_(True)
    ht.requires_grad_(True)
    loss(zs, zt, hs, ht, mask).backward()
    assert zt.grad is None and ht.grad is None
    assert zs.grad.abs().sum() > 0 and hs.grad.abs().sum() > 0
    assert loss(zs, zt, hs, ht, torch.zeros(2, 4, dtype=torch.bool)).item() == 0.0


def _hand_pair_token_loss(patches, words, mask, attn_t, t):
    """Loops over the formula of TokenAlignmentLoss(scope="pair") for each pair, then the batch mean."""

    def cos(x, y):
        return sum(a * b for a, b in zip(x, y)) / (math.sqrt(sum(a * a for a in x)) * math.sqrt(sum(b * b for b in y)))

    def ce_sym(logits):
        n = len(logits)
        row = sum(-(logits[i][i] - math.log(sum(math.exp(x) for x in logits[i]))) for i in range(n)) / n
        col = sum(-(logits[j][j] - math.log(sum(math.exp(logits[i][j]) for i in range(n)))) for j in range(n)) / n
        return 0.5 * (row + col)

    def contexts(queries, keys):
        out = []
        for q in queries:
            a = [math.exp(cos(q, k) / attn_t) for k in keys]
            z = sum(a)
            out.append([sum(a[i] / z * keys[i][d] for i in range(len(keys))) for d in range(len(q))])
        return out

    losses = []
    for b in range(patches.shape[0]):
        v = patches[b].tolist()
        w = [x for x, m in zip(words[b].tolist(), mask[b].tolist()) if m]
        cw, cv = contexts(w, v), contexts(v, w)
        lw = [[cos(x, c) / t for c in cw] for x in w]
        lp = [[cos(x, c) / t for c in cv] for x in v]
        losses.append(0.5 * (ce_sym(lw) + ce_sym(lp)))
    return sum(losses) / len(losses)


def test_token_alignment_pair_scope_equals_the_hand_computed_loss_and_ignores_other_pairs_and_padding():
    g = torch.Generator().manual_seed(6)
    b, p, w, d = 3, 4, 5, 3
    patches = torch.randn(b, p, d, generator=g, dtype=torch.float64, requires_grad=True)
    words = torch.randn(b, w, d, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True, False, True, True, False]])
    loss = TokenAlignmentLoss(0.25, 0.2, 0.1, scope="pair")
    value = loss(patches, words, mask)
    assert value.item() == pytest.approx(_hand_pair_token_loss(patches.detach(), words.detach(), mask, 0.25, 0.1), rel=1e-10)
    # each pair alone: the batch loss is the mean of the pairs' losses (no report is contrasted with another image)
    alone = [loss(patches[i : i + 1], words[i : i + 1], mask[i : i + 1]).item() for i in range(b)]
    assert value.item() == pytest.approx(sum(alone) / b, rel=1e-10)
    assert loss(patches, words, mask, torch.ones(b, b, dtype=torch.bool)).item() == pytest.approx(value.item(), rel=1e-12)
    # padded words: no effect on the value, no gradient, finite gradients everywhere
    value.backward()
    assert torch.isfinite(words.grad).all() and torch.isfinite(patches.grad).all()
    assert words.grad[~mask].abs().max().item() == 0.0
    garbage = words.detach().clone()
    garbage[~mask] = 1e6
    assert loss(patches.detach(), garbage, mask).item() == pytest.approx(value.item(), rel=1e-10)
    # the batch scope's all-pairs contrast is another loss
    assert TokenAlignmentLoss(0.25, 0.2, 0.1)(patches.detach(), words.detach(), mask).item() != pytest.approx(value.item(), rel=1e-3)
    with pytest.raises(ValueError, match="scope"):
        TokenAlignmentLoss(scope="image")


# ---------------------------------------------------------------------------------------------- pinned by the mutation run
def test_pretrain_losses_defaults_are_the_documented_constants():
    # the pretrain recipe builds GlobalContrastiveLoss() and TokenAlignmentLoss(scope=...) with their defaults and
    # GenerationDistillLoss without hidden_weight: CLIP's scale cap 100, GLoRIA's 0.25 / 0.2 / 0.1, T = 2 and weight 1
    g = torch.Generator().manual_seed(11)
    image, text = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    clip = GlobalContrastiveLoss()
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(1000.0))
    assert clip.scale().item() == pytest.approx(100.0, rel=1e-6)
    assert clip(image, text).item() == pytest.approx(_hand_global(image, text, 100.0), rel=1e-6)

    b, p, w, d = 2, 3, 4, 3
    patches, words = torch.randn(b, p, d, generator=g, dtype=torch.float64), torch.randn(b, w, d, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    hw, hp = _hand_token_scores(patches, words, mask, 0.25, 0.2)
    scaled = lambda s: [[x / 0.1 for x in row] for row in s]  # noqa: E731
    ref = 0.5 * (_hand_info_nce(scaled(hw)) + _hand_info_nce(scaled(hp)))
    assert TokenAlignmentLoss()(patches, words, mask).item() == pytest.approx(ref, rel=1e-10)
    pair_ref = _hand_pair_token_loss(patches, words, mask, 0.25, 0.1)
    assert TokenAlignmentLoss(scope="pair")(patches, words, mask).item() == pytest.approx(pair_ref, rel=1e-10)

    zs, zt = torch.randn(1, 3, 4, generator=g, dtype=torch.float64), torch.randn(1, 3, 4, generator=g, dtype=torch.float64)
    hs, ht = torch.randn(1, 3, 2, generator=g, dtype=torch.float64), torch.randn(1, 3, 2, generator=g, dtype=torch.float64)
    dmask = torch.tensor([[True, True, False]])
    assert GenerationDistillLoss()(zs, zt, hs, ht, dmask).item() == pytest.approx(_hand_distill(zs, zt, hs, ht, dmask, 2.0, 1.0)[0], rel=1e-10)

    # the tokenizer's [PAD] is id 0 (data/tokenizer.py insists on it)
    logits, targets = torch.randn(1, 3, 4, generator=g, dtype=torch.float64), torch.tensor([[2, 0, 1]])
    nll = [-_log_softmax(logits[0, t].tolist())[targets[0, t].item()] for t in (0, 2)]
    assert LanguageModelLoss()(logits, targets).item() == pytest.approx(sum(nll) / 2, rel=1e-10)


def test_global_contrastive_soft_targets_divide_each_row_and_column_by_its_own_positives():
    # positives that are not an equivalence relation: row and column counts differ (3, 2, 1 against 1, 2, 3), so
    # dividing a row by its column's count, or the reverse, gives another loss
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(3, 3, generator=g, dtype=torch.float64)
    positives = torch.tensor([[True, True, True], [False, True, True], [False, False, True]])
    ref = _hand_info_nce(logits.tolist(), positives.tolist())
    assert symmetric_info_nce(logits, positives).item() == pytest.approx(ref, rel=1e-12)
    assert symmetric_info_nce(logits, positives.t().contiguous()).item() == pytest.approx(_hand_info_nce(logits.tolist(), positives.t().tolist()), rel=1e-12)
    # float64 embeddings stay float64 end to end (targets 1/3 included): agreement to 1e-12
    image, text = torch.randn(3, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    value = GlobalContrastiveLoss(init_temperature=0.5)(image, text, positives)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(_hand_global(image, text, 2.0, positives), rel=1e-12)


def test_global_contrastive_computes_in_float32_for_half_inputs_and_under_autocast():
    g = torch.Generator().manual_seed(13)
    image, text = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    loss = GlobalContrastiveLoss(init_temperature=0.1)
    ref = _hand_global(image.double(), text.double(), 10.0)
    # bf16 logits at scale 10 would be off by ~1e-2; float32 is good to ~1e-6
    plain = loss(image, text)
    assert plain.dtype == torch.float32 and plain.item() == pytest.approx(ref, rel=1e-5)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        amp = loss(image, text)
    assert amp.dtype == torch.float32 and amp.item() == pytest.approx(ref, rel=1e-5)
    ib, tb = image.bfloat16(), text.bfloat16()
    half = loss(ib, tb)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(_hand_global(ib.double(), tb.double(), 10.0), rel=1e-5)


def test_symmetric_info_nce_builds_its_targets_on_the_logits_device():
    # the meta device stands in for a GPU: a target left on the CPU would raise a device mismatch
    out = symmetric_info_nce(torch.zeros(3, 3, device="meta"))
    assert out.device.type == "meta" and out.shape == ()


def test_pretrain_losses_argument_checks():
    with pytest.raises(ValueError, match="init_temperature"):
        GlobalContrastiveLoss(init_temperature=0.0)
    with pytest.raises(ValueError, match="max_scale"):
        GlobalContrastiveLoss(max_scale=0.0)
    assert GlobalContrastiveLoss(max_scale=0.5).scale().item() == pytest.approx(0.5)  # a cap below 1 is valid
    with pytest.raises(ValueError, match=r"must both be \(B, D\)"):
        GlobalContrastiveLoss()(torch.zeros(3, 4), torch.zeros(3, 5))

    for kw in ("attn_temperature", "agg_temperature", "temperature"):
        with pytest.raises(ValueError, match=f"^{kw} must be > 0"):
            TokenAlignmentLoss(**{kw: 0.0})
    loss = TokenAlignmentLoss(scope="pair")
    patches, words, mask = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.ones(2, 5, dtype=torch.bool)
    # one report for two images would broadcast silently in the pair scope
    with pytest.raises(ValueError, match=r"must be \(B, P, D\) and \(B, W, D\)"):
        loss(patches, words[:1], mask[:1])
    with pytest.raises(ValueError, match=r"must be \(B, P, D\) and \(B, W, D\)"):
        loss(patches, words[..., :3], mask)
    with pytest.raises(ValueError, match="word_mask must be a bool tensor"):
        loss(patches, words, mask.float())
    with pytest.raises(ValueError, match="word_mask must be a bool tensor"):
        loss(patches, words, mask[:, :4])

    with pytest.raises(ValueError, match="label_smoothing"):
        LanguageModelLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        LanguageModelLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match=r"must be \(B, T, V\)"):
        LanguageModelLoss()(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))

    with pytest.raises(ValueError, match="temperature"):
        GenerationDistillLoss(temperature=0.0)
    z, h, m = torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"teacher logits .* must be the same \(B, T, V\)"):
        GenerationDistillLoss()(z[0], z[0], h, h, m)
    with pytest.raises(ValueError, match="must be the same"):
        GenerationDistillLoss()(z, z, h, h[..., :4], m)


def test_token_alignment_computes_in_the_widest_input_float_and_outside_autocast():
    g = torch.Generator().manual_seed(14)
    b, p, w, d = 2, 4, 5, 3
    p32, w32 = torch.randn(b, p, d, generator=g), torch.randn(b, w, d, generator=g)
    mask = torch.tensor([[True, True, True, True, False], [True, True, False, False, False]])
    for scope in ("batch", "pair"):
        loss = TokenAlignmentLoss(scope=scope)
        ref = loss(p32.double(), w32.double(), mask)
        # one float64 input: the whole loss in float64, whichever input it is
        for pp, ww in ((p32, w32.double()), (p32.double(), w32)):
            mixed = loss(pp, ww, mask)
            assert mixed.dtype == torch.float64 and mixed.item() == pytest.approx(ref.item(), rel=1e-12)
        # float32 stays float32, and an enclosing autocast does not drop it to bf16 (off by ~1e-2 at these temperatures)
        single = loss(p32, w32, mask)
        assert single.dtype == torch.float32 and single.item() == pytest.approx(ref.item(), rel=1e-5)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            amp = loss(p32, w32, mask)
        assert amp.dtype == torch.float32 and amp.item() == pytest.approx(ref.item(), rel=1e-5)


def test_token_alignment_pair_loss_is_each_pairs_own_loss():
    g = torch.Generator().manual_seed(15)
    b, p, w, d = 3, 4, 5, 3
    patches, words = torch.randn(b, p, d, generator=g, dtype=torch.float64), torch.randn(b, w, d, generator=g, dtype=torch.float64)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [True, True, True, False, False]])
    loss = TokenAlignmentLoss(scope="pair")
    per_pair = loss.pair_loss(patches, words, mask)
    assert per_pair.shape == (b,)
    for i in range(b):
        alone = _hand_pair_token_loss(patches[i : i + 1], words[i : i + 1], mask[i : i + 1], 0.25, 0.1)
        assert per_pair[i].item() == pytest.approx(alone, rel=1e-10)


def test_language_model_loss_single_token_ignored_pad_id_and_bf16():
    g = torch.Generator().manual_seed(16)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    one = torch.tensor([[0, 3, 0], [0, 0, 0]])  # a single real token: its own nll, not half of it
    assert LanguageModelLoss(pad_id=0)(logits, one).item() == pytest.approx(-_log_softmax(logits[0, 1].tolist())[3], rel=1e-10)
    # a pad id outside the vocabulary is ignored, not looked up (-1 here: -100 is cross_entropy's own default)
    targets = torch.tensor([[1, 4, -1], [2, -1, -1]])
    ref = -sum(_log_softmax(logits[b, t].tolist())[targets[b, t].item()] for b, t in ((0, 0), (0, 1), (1, 0))) / 3
    assert LanguageModelLoss(pad_id=-1)(logits, targets).item() == pytest.approx(ref, rel=1e-10)
    wild = logits.clone()
    wild[1, 1:] = float("inf")
    assert LanguageModelLoss(pad_id=-1)(wild, targets).item() == pytest.approx(ref, rel=1e-10)
    # bf16 logits are computed in float32
    lb = logits.float().bfloat16()
    ref_b = -sum(_log_softmax(lb[b, t].double().tolist())[targets[b, t].item()] for b, t in ((0, 0), (0, 1), (1, 0))) / 3
    half = LanguageModelLoss(pad_id=-1)(lb, targets)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(ref_b, rel=1e-6)


def test_generation_distill_single_position_and_bf16_inputs():
    g = torch.Generator().manual_seed(17)
    zs, zt = torch.randn(2, 3, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, generator=g, dtype=torch.float64)
    hs, ht = torch.randn(2, 3, 4, generator=g, dtype=torch.float64), torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[1, 2] = True  # N = 1: the position's own KL and MSE
    loss = GenerationDistillLoss(2.0, 0.5)
    assert loss(zs, zt, hs, ht, one).item() == pytest.approx(_hand_distill(zs, zt, hs, ht, one, 2.0, 0.5)[0], rel=1e-10)
    # bf16 inputs are computed in float32
    mask = torch.tensor([[True, True, False], [True, False, True]])
    bf = [x.float().bfloat16() for x in (zs, zt, hs, ht)]
    out = loss(*bf, mask)
    ref = _hand_distill(*[x.double() for x in bf], mask, 2.0, 0.5)[0]
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref, rel=1e-5)
