"""Distillation losses against direct numpy / float64 torch computations of their docstring formulas;
each term as the distillation recipe calls it trains the student (and the kernel's adapter) with the
reference's gradient and never the teacher."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medalloy.losses import ChannelWiseLoss, KernelMMDLoss, LogitKDLoss, SpatialAffinityLoss
from medalloy.losses.affinity import grid_for, pool_to_grid
from medalloy.recipes.distill import confidence


def _softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_logit_kd_softmax_is_t2_times_the_pixelwise_kl():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 5, 4, generator=g)
    T = 3.0
    ps, pt = _softmax(s.numpy() / T, 1), _softmax(t.numpy() / T, 1)
    ref = T * T * (pt * (np.log(pt) - np.log(ps))).sum(1).mean()
    assert LogitKDLoss(T)(s, t).item() == pytest.approx(ref, rel=1e-5)
    assert LogitKDLoss(T)(t, t).item() == pytest.approx(0.0, abs=1e-6)


def test_logit_kd_binary_per_task_ignores_padded_slots():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 2, 6, 6, generator=g), torch.randn(2, 2, 6, 6, generator=g)
    w = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    T = 2.0
    qs, qt = 1 / (1 + np.exp(-s.numpy() / T)), 1 / (1 + np.exp(-t.numpy() / T))
    kl = (qt * (np.log(qt) - np.log(qs)) + (1 - qt) * (np.log(1 - qt) - np.log(1 - qs))).reshape(2, 2, -1).mean(-1)
    ref = T * T * (kl * w.numpy()).sum() / w.sum().item()
    loss = LogitKDLoss(T, binary=True)
    assert loss(s, t, w).item() == pytest.approx(ref, rel=1e-5)
    s2 = s.clone()
    s2[1, 1] += 5.0  # the padded slot: no effect
    assert loss(s2, t, w).item() == pytest.approx(ref, rel=1e-5)


def test_spatial_affinity_is_skd_and_needs_no_common_width():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 7, 8, 8, generator=g)
    loss = SpatialAffinityLoss(max_positions=16, weighting="none")
    assert grid_for((8, 8), 16) == (4, 4)

    def affinity(f):
        p = f.reshape(2, f.shape[1], 4, 2, 4, 2).mean((3, 5)).reshape(2, f.shape[1], 16)
        p = p / np.linalg.norm(p, axis=1, keepdims=True)
        return np.einsum("bci,bcj->bij", p, p)

    ref = ((affinity(s.numpy()) - affinity(t.numpy())) ** 2).mean()
    assert loss(s, t).item() == pytest.approx(ref, rel=1e-5)
    # cosine affinity: positive per-channel-vector scaling of the student changes nothing
    assert loss(s * 3.0, t).item() == pytest.approx(ref, rel=1e-5)


def test_confidence_weighting_drops_the_pairs_the_teacher_is_unsure_of():
    g = torch.Generator().manual_seed(3)
    t = torch.randn(1, 4, 4, 4, generator=g)
    s = t.clone()
    s[:, :, :2] = torch.randn(1, 4, 2, 4, generator=g)  # the student differs only in the top half
    confidence = torch.ones(1, 4, 4)
    confidence[:, :2] = 0.0  # where the teacher is unsure
    weighted = SpatialAffinityLoss(max_positions=16)
    assert SpatialAffinityLoss(max_positions=16, weighting="none")(s, t).item() > 1e-3
    assert weighted(s, t, confidence).item() == pytest.approx(0.0, abs=1e-7)
    assert weighted(s, t, torch.ones(1, 4, 4)).item() > 1e-3


def test_batch_scope_relates_positions_across_images():
    g = torch.Generator().manual_seed(7)
    t = torch.randn(2, 5, 4, 4, generator=g)
    # the student's second image is the teacher's with its channels permuted: every image's own
    # cosine relations are the teacher's, the relations between the two images are not
    s = t.clone()
    s[1] = t[1, torch.tensor([3, 0, 4, 1, 2])]
    assert SpatialAffinityLoss(max_positions=16, weighting="none")(s, t).item() == pytest.approx(0.0, abs=1e-7)
    cross = SpatialAffinityLoss(max_positions=8, weighting="none", scope="batch")  # 8 // 2 = 4 positions an image

    def affinity(f):
        p = f.reshape(2, 5, 2, 2, 2, 2).mean((3, 5)).reshape(2, 5, 4)
        p = np.concatenate([p[0], p[1]], axis=1)  # (C, 8): image 0's positions, then image 1's
        p = p / np.linalg.norm(p, axis=0, keepdims=True)
        return p.T @ p

    ref = ((affinity(s.numpy()) - affinity(t.numpy())) ** 2).mean()
    assert ref > 1e-3
    assert cross(s, t).item() == pytest.approx(ref, rel=1e-5)
    # confidence over the same set: an unsure second image leaves only the first image's own pairs, which agree
    confidence = torch.ones(2, 4, 4)
    confidence[1] = 0.0
    assert SpatialAffinityLoss(max_positions=8, scope="batch")(s, t, confidence).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="scope"):
        SpatialAffinityLoss(scope="site")


def test_poly_kernel_mmd_equals_the_gram_matrix_distance_and_the_kernel_formula():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(2, 5, 4, 4, generator=g), torch.randn(2, 5, 4, 4, generator=g)
    grid = grid_for((4, 4), 16)

    def unit(f):
        p = pool_to_grid(f, grid).numpy()
        return p / np.linalg.norm(p, axis=1, keepdims=True)

    us, ut = unit(s), unit(t)
    n = us.shape[-1]
    gram = lambda f: np.einsum("bci,bdi->bcd", f, f)  # noqa: E731
    via_gram = (((gram(ut) - gram(us)) ** 2).sum((1, 2)) / n**2).mean()
    k = lambda a, b: np.einsum("bci,bcj->bij", a, b) ** 2  # noqa: E731
    via_kernel = (k(ut, ut).mean((1, 2)) + k(us, us).mean((1, 2)) - 2 * k(ut, us).mean((1, 2))).mean()
    assert via_gram == pytest.approx(via_kernel, rel=1e-6)
    assert KernelMMDLoss("poly", max_positions=16)(s, t).item() == pytest.approx(via_gram, rel=1e-5)
    rbf = KernelMMDLoss("rbf", max_positions=16, sigma=0.7)
    kr = lambda a, b: np.exp(-((a[:, :, :, None] - b[:, :, None, :]) ** 2).sum(1) / (2 * 0.49))  # noqa: E731
    ref = (kr(ut, ut).mean((1, 2)) + kr(us, us).mean((1, 2)) - 2 * kr(ut, us).mean((1, 2))).mean()
    assert rbf(s, t).item() == pytest.approx(ref, rel=1e-4)
    assert rbf(t, t).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="adapter"):
        KernelMMDLoss()(s[:, :3], t)


def test_channel_wise_distillation_is_the_kl_of_per_channel_spatial_softmaxes():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 3, 5, 5, generator=g), torch.randn(2, 3, 5, 5, generator=g)
    T = 4.0
    ps, pt = _softmax(s.numpy().reshape(2, 3, -1) / T, -1), _softmax(t.numpy().reshape(2, 3, -1) / T, -1)
    ref = T * T * (pt * (np.log(pt) - np.log(ps))).sum(-1).mean()
    assert ChannelWiseLoss(T)(s, t).item() == pytest.approx(ref, rel=1e-5)
    # the teacher gets no gradient, the student does
    s.requires_grad_(True)
    t.requires_grad_(True)
    ChannelWiseLoss(T)(s, t).backward()
    assert t.grad is None and s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------- independent torch references
# float64, written from the module docstrings with none of the modules' helpers, so that their
# autograd gradients are a reference for the losses' gradients too
def _block_pool(f, grid):
    """``(B, C, *sp) -> (B, C, N)``: the mean of each equal block (every size a multiple of its grid axis), cells row-major."""
    b, c, *sp = f.shape
    blocks = [b, c]
    for size, cells in zip(sp, grid):
        blocks += [cells, size // cells]
    return f.reshape(blocks).mean(dim=tuple(range(3, 2 + 2 * len(sp), 2))).reshape(b, c, -1)


def _unit(p):
    return p / torch.sqrt((p * p).sum(1, keepdim=True))


def _ref_affinity(student, teacher, grid, confidence=None, one_set=False):
    ps, pt = _block_pool(student.double(), grid), _block_pool(teacher.double(), grid)
    c = None if confidence is None else _block_pool(confidence.double()[:, None], grid)[:, 0]
    if one_set:  # image 0's positions, then image 1's, ...
        ps, pt = torch.cat(list(ps), 1)[None], torch.cat(list(pt), 1)[None]
        c = None if c is None else c.reshape(1, -1)

    def a(p):
        u = _unit(p)
        return torch.einsum("bci,bcj->bij", u, u)

    d = (a(ps) - a(pt)) ** 2
    if c is None:
        return d.mean()
    pair = c[:, :, None] * c[:, None, :]
    return (pair * d).sum() / pair.sum()


def _ref_mmd(student, teacher, grid, kernel, sigma=1.0):
    """Per sample ``mean k(t, t) + mean k(s, s) - 2 mean k(t, s)`` over unit position vectors, mean over the batch (the kernel form, not the Gram one)."""
    us, ut = _unit(_block_pool(student.double(), grid)), _unit(_block_pool(teacher.double(), grid))

    def k(x, y):
        if kernel == "poly":
            return torch.einsum("bci,bcj->bij", x, y) ** 2
        return torch.exp(-((x[:, :, :, None] - y[:, :, None, :]) ** 2).sum(1) / (2 * sigma**2))

    return (k(ut, ut).mean((1, 2)) + k(us, us).mean((1, 2)) - 2 * k(ut, us).mean((1, 2))).mean()


def _ref_kd(student, teacher, temp, weight=None):
    zs, zt = student.double() / temp, teacher.double() / temp
    if weight is None:  # softmax over the classes at each position
        pt = torch.exp(zt) / torch.exp(zt).sum(1, keepdim=True)
        ps = torch.exp(zs) / torch.exp(zs).sum(1, keepdim=True)
        return temp**2 * (pt * (torch.log(pt) - torch.log(ps))).sum(1).mean()
    qs, qt = 1 / (1 + torch.exp(-zs)), 1 / (1 + torch.exp(-zt))
    kl = qt * (torch.log(qt) - torch.log(qs)) + (1 - qt) * (torch.log(1 - qt) - torch.log(1 - qs))
    per_task = kl.reshape(*kl.shape[:2], -1).mean(-1)
    return temp**2 * (per_task * weight.double()).sum() / weight.double().sum()


def _ref_cwd(student, teacher, temp):
    zs, zt = student.double().flatten(2) / temp, teacher.double().flatten(2) / temp
    pt = torch.exp(zt) / torch.exp(zt).sum(-1, keepdim=True)
    ps = torch.exp(zs) / torch.exp(zs).sum(-1, keepdim=True)
    return temp**2 * (pt * (torch.log(pt) - torch.log(ps))).sum(-1).mean()


# ---------------------------------------------------------------------------------------------- gradients
# Every term as recipes/distill.py's step_fn calls it, with max_positions=16: the image grid is
# (4, 4) / (2, 2, 2), the batch scope's (16 // 2 = 8 positions an image) (2, 2) / (2, 2, 2).
IMAGE_GRID = {2: (4, 4), 3: (2, 2, 2)}
CROSS_GRID = {2: (2, 2), 3: (2, 2, 2)}
SPATIAL = {2: (8, 8), 3: (4, 4, 4)}
TERMS = ("logits", "logits_sigmoid", "cwd", "affinity", "pairwise", "cross", "kernel_poly", "kernel_rbf")


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("term", TERMS)
def test_each_term_alone_trains_the_student_with_the_reference_gradient_and_never_the_teacher(term, dim):
    g = torch.Generator().manual_seed(10 + dim)
    sp = SPATIAL[dim]
    on_logits = term in ("logits", "logits_sigmoid", "cwd")
    s = torch.randn(2, 3, *sp, generator=g).requires_grad_(True)
    t = torch.randn(2, 3 if on_logits else 5, *sp, generator=g).requires_grad_(True)
    conf = torch.rand(2, *sp, generator=g).requires_grad_(True)  # never all 0 / 1: the weighting's normalisation counts
    s64 = s.detach().double().requires_grad_(True)
    adapter = None
    if term == "logits":
        loss, ref = LogitKDLoss(2.0)(s, t), _ref_kd(s64, t.detach(), 2.0)
    elif term == "logits_sigmoid":
        w = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
        loss, ref = LogitKDLoss(2.0, binary=True)(s, t, w), _ref_kd(s64, t.detach(), 2.0, w)
    elif term == "cwd":
        loss, ref = ChannelWiseLoss(4.0)(s, t), _ref_cwd(s64, t.detach(), 4.0)
    elif term == "affinity":
        loss = SpatialAffinityLoss(16, weighting="confidence")(s, t, conf)
        ref = _ref_affinity(s64, t.detach(), IMAGE_GRID[dim], conf.detach())
    elif term == "pairwise":  # SKD: the recipe passes the confidence, which "none" weighting ignores
        loss = SpatialAffinityLoss(16, weighting="none")(s, t, conf)
        ref = _ref_affinity(s64, t.detach(), IMAGE_GRID[dim])
    elif term == "cross":
        loss = SpatialAffinityLoss(16, weighting="confidence", scope="batch")(s, t, conf)
        ref = _ref_affinity(s64, t.detach(), CROSS_GRID[dim], conf.detach(), one_set=True)
    else:  # kernel: the student through its 1x1 adapter to the teacher's width, trained with it
        torch.manual_seed(0)
        adapter = (torch.nn.Conv2d if dim == 2 else torch.nn.Conv3d)(3, 5, 1)
        kernel = term.split("_")[1]
        loss = KernelMMDLoss(kernel, 16)(adapter(s), t)
        w64, b64 = adapter.weight.detach().double().flatten(1).requires_grad_(True), adapter.bias.detach().double().requires_grad_(True)
        adapted = torch.einsum("oc,bc...->bo...", w64, s64) + b64.reshape(1, -1, *[1] * dim)
        ref = _ref_mmd(adapted, t.detach(), IMAGE_GRID[dim], kernel)
    assert ref.item() > 1e-3  # a clearly non-zero term, so a zero gradient would be a bug
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    # a student detached inside the loss leaves a loss that trains nothing
    assert loss.requires_grad
    loss.backward()
    # the losses detach the teacher (and the confidence derived from it): not even zeros flow there
    assert t.grad is None
    assert conf.grad is None
    wanted = torch.autograd.grad(ref, [s64] + ([w64, b64] if adapter is not None else []))
    assert s.grad is not None and s.grad.abs().max().item() > 1e-4
    torch.testing.assert_close(s.grad.double(), wanted[0], rtol=1e-4, atol=1e-5 * wanted[0].abs().max().item())
    if adapter is not None:
        assert adapter.weight.grad.abs().max().item() > 1e-4
        torch.testing.assert_close(adapter.weight.grad.double().flatten(1), wanted[1], rtol=1e-4, atol=1e-5 * wanted[1].abs().max().item())
        torch.testing.assert_close(adapter.bias.grad.double(), wanted[2], rtol=1e-4, atol=1e-5 * wanted[1].abs().max().item())


def test_a_position_the_teacher_is_unsure_of_gets_no_relation_gradient():
    g = torch.Generator().manual_seed(20)
    s = torch.randn(1, 3, 4, 4, generator=g).requires_grad_(True)
    t = torch.randn(1, 4, 4, 4, generator=g)
    conf = torch.rand(1, 4, 4, generator=g) * 0.5 + 0.25
    conf[:, :2, :2] = 0.0  # exactly the top-left cell of the (2, 2) grid: every pair through it weighs 0
    SpatialAffinityLoss(4, weighting="confidence")(s, t, conf).backward()
    assert torch.all(s.grad[:, :, :2, :2] == 0)
    assert s.grad[:, :, 2:].abs().min().item() > 0


def test_binary_logit_kd_sends_no_gradient_to_a_padded_task_slot():
    g = torch.Generator().manual_seed(21)
    s = torch.randn(2, 2, 3, 3, generator=g).requires_grad_(True)
    t = torch.randn(2, 2, 3, 3, generator=g)
    LogitKDLoss(2.0, binary=True)(s, t, torch.tensor([[1.0, 1.0], [1.0, 0.0]])).backward()
    assert torch.all(s.grad[1, 1] == 0)
    assert s.grad[0].abs().min().item() > 0 and s.grad[1, 0].abs().min().item() > 0


# ---------------------------------------------------------------------------------------------- values, by hand
def test_confidence_weighted_affinity_is_the_hand_computed_weighted_mean_over_the_batch():
    # B = 2, C = 2, 4 x 4 pooled to (2, 2): positions are 2 x 2 blocks, read row by row
    g = torch.Generator().manual_seed(22)
    s, t = torch.randn(2, 2, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    conf = torch.tensor([[[0.9, 0.7, 0.2, 0.1], [0.5, 0.3, 0.0, 0.4], [1.0, 0.8, 0.6, 0.6], [0.2, 0.2, 0.9, 0.5]],
                         [[0.1, 0.1, 0.3, 0.1], [0.1, 0.1, 0.2, 0.2], [0.0, 0.2, 0.1, 0.1], [0.1, 0.2, 0.3, 0.1]]])  # fmt: skip

    def cells(f):  # f (C, 4, 4) -> 4 positions, each the list of its C block means
        return [[sum(f[ch, 2 * r + dr, 2 * q + dq].item() for dr in (0, 1) for dq in (0, 1)) / 4 for ch in range(f.shape[0])] for r in (0, 1) for q in (0, 1)]

    def affinity(f):
        v = cells(f)
        norm = [math.sqrt(sum(a * a for a in x)) for x in v]
        return [[sum(a * b for a, b in zip(v[i], v[j])) / (norm[i] * norm[j]) for j in range(4)] for i in range(4)]

    num = den = plain = per_image = 0.0
    for b in range(2):
        a_s, a_t = affinity(s[b]), affinity(t[b])
        c = [x[0] for x in cells(conf[b][None])]
        num_b = den_b = 0.0
        for i in range(4):
            for j in range(4):
                num_b += c[i] * c[j] * (a_s[i][j] - a_t[i][j]) ** 2
                den_b += c[i] * c[j]
                plain += (a_s[i][j] - a_t[i][j]) ** 2 / 32
        num, den, per_image = num + num_b, den + den_b, per_image + num_b / den_b / 2
    ref = num / den
    # the reference tells apart the unnormalised sum, the unweighted mean and a per-image normalisation
    assert min(abs(ref - num), abs(ref - plain), abs(ref - per_image)) > 1e-3 * ref
    assert SpatialAffinityLoss(4, weighting="confidence")(s, t, conf).item() == pytest.approx(ref, rel=1e-5)
    # the weights only matter relative to each other
    assert SpatialAffinityLoss(4, weighting="confidence")(s, t, 0.5 * conf).item() == pytest.approx(ref, rel=1e-5)
    # the baselines' unweighted term (skd) ignores the confidence the recipe hands it
    assert SpatialAffinityLoss(4, weighting="none")(s, t, conf).item() == pytest.approx(plain, rel=1e-5)


def test_batch_scope_confidence_weights_cross_image_pairs_by_both_images_confidence():
    g = torch.Generator().manual_seed(23)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    conf = torch.rand(2, 4, 4, generator=g)
    ref = _ref_affinity(s, t, (2, 2), conf, one_set=True)
    assert abs(ref - _ref_affinity(s, t, (2, 2), conf)).item() > 1e-3 * ref.item()  # not the image scope
    assert SpatialAffinityLoss(8, weighting="confidence", scope="batch")(s, t, conf).item() == pytest.approx(ref.item(), rel=1e-5)


def test_features_of_different_resolutions_are_pooled_to_the_coarser_grid():
    # student 8 x 8, teacher 4 x 4, 4 positions: the student's 4 x 4 blocks against the teacher's 2 x 2 ones
    g = torch.Generator().manual_seed(24)
    s, t = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    conf = torch.rand(2, 4, 4, generator=g)  # the teacher's resolution, as the recipe's confidence

    def ref_affinity(weighted):
        ps, pt = _block_pool(s.double(), (2, 2)), _block_pool(t.double(), (2, 2))
        a = lambda p: torch.einsum("bci,bcj->bij", _unit(p), _unit(p))  # noqa: E731
        d = (a(ps) - a(pt)) ** 2
        c = _block_pool(conf.double()[:, None], (2, 2))[:, 0]
        pair = c[:, :, None] * c[:, None, :] if weighted else torch.ones_like(d)
        return ((pair * d).sum() / pair.sum()).item()

    assert SpatialAffinityLoss(4, weighting="none")(s, t).item() == pytest.approx(ref_affinity(False), rel=1e-5)
    assert SpatialAffinityLoss(4)(s, t, conf).item() == pytest.approx(ref_affinity(True), rel=1e-5)
    us, ut = _unit(_block_pool(s.double(), (2, 2))), _unit(_block_pool(t.double(), (2, 2)))
    k = lambda x, y: torch.einsum("bci,bcj->bij", x, y) ** 2  # noqa: E731
    mmd = (k(ut, ut).mean((1, 2)) + k(us, us).mean((1, 2)) - 2 * k(ut, us).mean((1, 2))).mean().item()
    assert mmd > 1e-3
    assert KernelMMDLoss("poly", 4)(s, t).item() == pytest.approx(mmd, rel=1e-5)


def test_teacher_confidence_is_one_minus_the_normalised_entropy_by_hand():
    # two positions of a 3-class softmax teacher; two tasks of a sigmoid one (mean of the per-task values)
    z = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    want = []
    for row in z.tolist():
        e = [math.exp(v) for v in row]
        p = [v / sum(e) for v in e]
        want.append(1 - (-sum(q * math.log(q) for q in p)) / math.log(3))
    got = confidence(z.T.reshape(1, 3, 1, 2), "softmax").flatten().tolist()
    assert got == pytest.approx(want, rel=1e-5)
    zt = [[2.0, -0.5], [0.0, 3.0]]  # (position, task)
    want = []
    for row in zt:
        h = [-(q * math.log(q) + (1 - q) * math.log(1 - q)) / math.log(2) for q in (1 / (1 + math.exp(-v)) for v in row)]
        want.append(1 - sum(h) / len(h))
    got = confidence(torch.tensor(zt).T.reshape(1, 2, 1, 2), "sigmoid").flatten().tolist()
    assert got == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------------------- edge cases the recipes reach
def test_uniform_confidence_however_small_is_the_unweighted_mean():
    # a teacher unsure everywhere alike weighs every pair alike: the weights' sum (here 4 x 4 x 0.05^2
    # per image, far below 1) only normalises, it must not leak into the value
    g = torch.Generator().manual_seed(30)
    s, t = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 2, 4, 4, generator=g)
    plain = _ref_affinity(s, t, (2, 2)).item()
    assert plain > 1e-3
    for scope in ("image", "batch"):
        got = SpatialAffinityLoss(4 if scope == "image" else 8, weighting="confidence", scope=scope)(s, t, torch.full((2, 4, 4), 0.05))
        ref = _ref_affinity(s, t, (2, 2), one_set=scope == "batch").item()
        assert got.item() == pytest.approx(ref, rel=1e-5)


def test_fewer_positions_than_two_per_axis_pool_each_axis_to_one_cell():
    # max_positions 4 in 3-D (the recipe allows >= 4): floor(4 ** (1/3)) = 1, so one cell a volume,
    # never a 2 x 2 x 2 grid of 8 > 4 positions; the batch scope gets there with 8 // 2 = 4 an image
    assert grid_for((4, 4, 4), 4) == (1, 1, 1)
    assert grid_for((4, 4), 3) == (1, 1)
    assert grid_for((4, 4), 4) == (2, 2)
    g = torch.Generator().manual_seed(31)
    s, t = torch.randn(2, 3, 4, 4, 4, generator=g), torch.randn(2, 5, 4, 4, 4, generator=g)
    ref = _ref_affinity(s, t, (1, 1, 1), one_set=True).item()
    assert ref > 1e-3  # one position an image: only the cross-image relation is left
    assert SpatialAffinityLoss(8, weighting="none", scope="batch")(s, t).item() == pytest.approx(ref, rel=1e-5)


def test_affinity_refuses_student_and_teacher_batches_that_differ():
    # a batch of one would otherwise broadcast silently against the teacher's two images
    g = torch.Generator().manual_seed(32)
    with pytest.raises(ValueError, match="pair up"):
        SpatialAffinityLoss(4, weighting="none")(torch.randn(1, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g))


def test_logit_kd_softmax_is_over_the_class_axis_for_any_number_of_spatial_axes():
    # (B, K, N) logits, e.g. a flattened sequence of positions: the classes are axis 1 there too
    g = torch.Generator().manual_seed(33)
    s, t = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    for temp in (2.0, 1.0, 0.5):  # the recipes accept any temperature > 0, 1 (plain KD) included
        assert LogitKDLoss(temp)(s, t).item() == pytest.approx(_ref_kd(s, t, temp).item(), rel=1e-5)
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            LogitKDLoss(bad)


def test_binary_logit_kd_without_weights_and_with_fractional_weights():
    g = torch.Generator().manual_seed(34)
    s, t = torch.randn(2, 2, 3, 3, generator=g), torch.randn(2, 2, 3, 3, generator=g)
    loss = LogitKDLoss(2.0, binary=True)
    # no weight: every slot counts once
    assert loss(s, t).item() == pytest.approx(_ref_kd(s, t, 2.0, torch.ones(2, 2)).item(), rel=1e-5)
    # a weighted mean: weights summing to less than 1 are normalised like any others
    w = torch.tensor([[0.1, 0.3], [0.2, 0.0]])
    ref = _ref_kd(s, t, 2.0, w).item()
    assert abs(ref - _ref_kd(s, t, 2.0, torch.ones(2, 2)).item()) > 1e-3 * ref
    assert loss(s, t, w).item() == pytest.approx(ref, rel=1e-5)
