"""Distillation losses against direct numpy computations of their docstring formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medalloy.losses import ChannelWiseLoss, KernelMMDLoss, LogitKDLoss, SpatialAffinityLoss
from medalloy.losses.affinity import grid_for, pool_to_grid


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
