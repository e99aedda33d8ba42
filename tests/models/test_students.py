"""Students: the plan's topology at the widest width within the parameter budget."""

from __future__ import annotations

import pytest
import torch

from medalloy.errors import MedalloyError
from medalloy.models.students import student_filters, student_model
from medalloy.models.unet import build_unet, count_parameters
from medalloy.planning.multi_dataset import shared_network
from medalloy.planning.plan import ChannelNorm, Plan
from medalloy.recipes.students import STUDENT_SIZES, build_student, default_stem


def _plan(patch: int = 224, dim: int = 2) -> Plan:
    _, network = shared_network(patch, 16, 256, dim)
    return Plan(
        dataset="Toy", dim=dim, in_channels=1, target_spacing=[1.0] * dim, patch_size=[patch] * dim, batch_size=2,
        normalization=[ChannelNorm(scheme="zscore")], label_values=[0, 1, 2], labels={"background": 0, "a": 1, "b": 2}, network=network,
    )  # fmt: skip


def _teacher(plan: Plan) -> torch.nn.Module:
    return build_unet(plan.network, plan.in_channels, plan.num_classes)


def _student(plan: Plan, filters: list[int], **kw) -> torch.nn.Module:
    return student_model(plan.network, plan.in_channels, plan.num_classes, filters, **kw)


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_student_is_the_widest_of_the_plans_topology_within_its_budget(size):
    plan = _plan()
    student = build_student(plan, size)
    n = count_parameters(student)
    assert n <= STUDENT_SIZES[size]
    assert student.strides == plan.network.strides and student.kernel_size == plan.network.kernels
    # one step wider would not fit: the budget is used, not merely respected
    wider = plan.network.model_copy(update={"filters": student_filters(student.filters[0] + 1, len(plan.network.strides))})
    assert count_parameters(build_unet(wider, in_channels=1, out_channels=3)) > STUDENT_SIZES[size]
    teacher = _teacher(plan)
    assert count_parameters(teacher) >= 5 * n
    out = student(torch.zeros(1, 1, 224, 224))
    assert out.shape == (1, 3, 224, 224)


def test_stem_student_drops_the_full_resolution_stage_and_keeps_the_teachers_resolutions():
    from medalloy.models.features import FeatureTap
    from medalloy.models.flops import forward_gflops

    plan = _plan()
    plain, stem = build_student(plan, "tiny"), build_student(plan, "tiny", stem=True)
    assert count_parameters(stem) <= STUDENT_SIZES["tiny"]
    assert stem.net.strides == plan.network.strides[1:] and stem.net.strides[0] == [2, 2]
    assert "enc0" not in stem.medalloy_stages and "dec0" not in stem.medalloy_stages
    x = torch.randn(1, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    teacher = _teacher(plan)
    with torch.no_grad(), FeatureTap(teacher) as tt, FeatureTap(stem) as ts:
        out = stem(x)
        teacher(x)
    assert out.shape == (1, 3, 224, 224)  # logits back at the input size
    # a stage of the stem student has the resolution of the teacher's stage of the same name
    assert set(ts.features) < set(tt.features)
    assert all(ts.features[k].shape[2:] == tt.features[k].shape[2:] for k in ts.features)
    assert forward_gflops(stem, (1, 224, 224)) < 0.6 * forward_gflops(plain, (1, 224, 224))
    net = plan.network
    two = plan.model_copy(update={"network": net.model_copy(update={"strides": net.strides[:2], "kernels": net.kernels[:2], "filters": net.filters[:2]})})
    with pytest.raises(MedalloyError, match="at least 4 stages"):
        build_student(two, "tiny", stem=True)


def test_stem_of_two_folds_pixels_into_channels_and_starts_at_a_quarter():
    from medalloy.models.features import FeatureTap
    from medalloy.models.flops import forward_gflops
    from medalloy.models.students import space_to_depth

    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(space_to_depth(x, [2, 2]), torch.nn.functional.pixel_unshuffle(x, 2), rtol=0, atol=0)
    v = torch.arange(2 * 4 * 6 * 8.0).reshape(1, 2, 4, 6, 8)
    folded = space_to_depth(v, [1, 2, 2])  # an anisotropic 3D stride folds only the pooled axes
    assert folded.shape == (1, 8, 4, 3, 4) and torch.equal(folded.flatten().sort().values, v.flatten())

    plan = _plan()
    one, two = build_student(plan, "tiny", stem=1), build_student(plan, "tiny", stem=2)
    assert count_parameters(two) <= STUDENT_SIZES["tiny"]
    assert two.net.strides == plan.network.strides[2:] and two.fold == [2, 2]
    assert two.net.input_block.conv1.conv.in_channels == 4  # one grey channel, 2 x 2 pixels
    assert not {"enc0", "enc1", "dec0", "dec1"} & set(two.medalloy_stages)
    x = torch.randn(1, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    teacher = _teacher(plan)
    with torch.no_grad(), FeatureTap(teacher) as tt, FeatureTap(two) as ts:
        out = two(x)
        teacher(x)
    assert out.shape == (1, 3, 224, 224)
    assert all(ts.features[k].shape[2:] == tt.features[k].shape[2:] for k in ts.features)  # names keep the teacher's resolutions
    assert forward_gflops(two, (1, 224, 224)) < 0.6 * forward_gflops(one, (1, 224, 224))
    net = plan.network
    three = plan.model_copy(update={"network": net.model_copy(update={"strides": net.strides[:3], "kernels": net.kernels[:3], "filters": net.filters[:3]})})
    with pytest.raises(MedalloyError, match="depth 2 needs a plan of at least 5 stages"):
        build_student(three, "tiny", stem=2)


def test_shuffle_head_unfolds_each_coarse_position_into_its_own_pixels():
    from medalloy.models.students import depth_to_space, space_to_depth

    x = torch.randn(2, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(depth_to_space(space_to_depth(x, [2, 2]), [2, 2]), x)
    y = torch.randn(1, 12, 4, 6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(depth_to_space(y, [2, 2]), torch.nn.functional.pixel_shuffle(y, 2))
    v = torch.randn(1, 2, 4, 6, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(depth_to_space(space_to_depth(v, [1, 2, 2]), [1, 2, 2]), v)

    plan = _plan()
    shuffle, smooth = build_student(plan, "tiny", stem=2, upsample="shuffle"), build_student(plan, "tiny", stem=2)
    assert shuffle.filters == smooth.filters and shuffle.stride == [4, 4]
    assert shuffle.net.output_block.conv.conv.out_channels == 3 * 16  # K classes x the stem's 4 x 4 pixels
    assert count_parameters(shuffle) - count_parameters(smooth) == (shuffle.filters[0] + 1) * (48 - 3)  # the 1 x 1 head's extra outputs (weights + biases)
    # the head puts coarse channel k * 16 + 4 i + j at pixel (4 y + i, 4 x + j) of class k: a
    # full-resolution pattern no interpolation of the coarse map can draw
    coarse = torch.zeros(1, 48, 56, 56)
    coarse[:, 1 * 16 + 4 * 2 + 3] = 1.0  # class 1, offset (2, 3) in every 4 x 4 block
    shuffle.net.forward = lambda _: coarse  # type: ignore[method-assign]
    out = shuffle(torch.zeros(1, 1, 224, 224))
    assert out.shape == (1, 3, 224, 224) and out.sum() == 56 * 56
    assert out[0, 1, 2::4, 3::4].min() == 1.0 and out[0, 0].abs().sum() == 0
    with pytest.raises(MedalloyError, match="unknown upsample 'nearest'"):
        build_student(plan, "tiny", stem=2, upsample="nearest")


def test_default_stem_is_the_deepest_that_keeps_enough_pixels_and_stages():
    assert default_stem(_plan(224)) == 2  # starts at 56 px
    assert default_stem(_plan(224), deepest=1) == 1
    assert default_stem(_plan(96)) == 1  # 96 / 4 = 24 < 32, 96 / 2 = 48
    assert default_stem(_plan(48)) == 0  # 24 px after one pooling
    # 32 px where the student starts are enough and 31 are not, at either depth: one six-stage network,
    # only the patch changes, so the side alone decides
    six = _plan(128)
    sides = {(128, 128): 2, (128, 124): 1, (64, 64): 1, (62, 64): 0}
    assert {s: default_stem(six.model_copy(update={"patch_size": list(s)})) for s in sides} == sides
    # the shortest axis decides: a 3D patch with an unpooled first axis of 20 voxels gets none
    net = _plan(160).network
    anisotropic = _plan(160).model_copy(
        update={
            "dim": 3,
            "patch_size": [20, 160, 160],
            "network": net.model_copy(update={"strides": [[1, *s] for s in net.strides], "kernels": [[1, *k] for k in net.kernels]}),
        }
    )
    assert default_stem(anisotropic) == 0
    # too few stages for a stem of two: one is left
    net = _plan(224).network
    short = _plan(224).model_copy(
        update={"network": net.model_copy(update={"strides": net.strides[:4], "kernels": net.kernels[:4], "filters": net.filters[:4]})}
    )
    assert default_stem(short) == 1
    build_student(short, "tiny", stem=default_stem(short))  # what it returns is a student that builds


def test_student_sizes_are_checked():
    with pytest.raises(MedalloyError, match="unknown student size 'huge'"):
        build_student(_plan(), "huge")
    with pytest.raises(MedalloyError, match="fits 1000 parameters"):
        build_student(_plan(), 1000)
    assert count_parameters(build_student(_plan(64, dim=3), "tiny")) <= STUDENT_SIZES["tiny"]


def test_separable_student_is_wider_within_the_same_budget_and_keeps_the_topology():
    from torch import nn

    from medalloy.models.features import FeatureTap, stage_names
    from medalloy.models.students import make_separable

    plan = _plan()
    plain, sep = build_student(plan, "tiny"), build_student(plan, "tiny", separable=True)
    assert count_parameters(sep) <= STUDENT_SIZES["tiny"] and sep.filters[0] > plain.filters[0]
    convs = [m for m in sep.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1]
    # every k x k convolution is depthwise but the first, which reads the one image channel
    assert convs[0].groups == 1 and convs[0].in_channels == 1
    assert all(m.groups == m.in_channels for m in convs[1:]) and len(convs) > 10
    x = torch.randn(1, 1, 224, 224)
    with FeatureTap(sep, ["bottleneck", "dec1"]) as tap:
        assert sep(x).shape == (1, 3, 224, 224)
    assert stage_names(sep) == stage_names(plain) and tap.features["dec1"].shape[-1] == 112
    # the factorisation keeps each layer's function class: a separable conv equals a full conv whose
    # k x k kernel is the outer product of the depthwise and pointwise weights
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    wrapper = nn.Sequential(conv)
    make_separable(wrapper)
    depthwise, pointwise = wrapper[0][0], wrapper[0][1]
    full = nn.Conv2d(4, 6, 3, padding=1, bias=False)
    with torch.no_grad():
        full.weight.copy_(pointwise.weight[:, :, 0, 0, None, None] * depthwise.weight[None, :, 0])
        y = torch.randn(2, 4, 8, 8)
        torch.testing.assert_close(wrapper(y), full(y))


def test_a_plan_json_gives_the_students_filters_and_must_keep_the_teachers_strides(tmp_path):
    from medalloy.planning.plan import save_plan

    plan = _plan()
    n = len(plan.network.strides)
    own = plan.model_copy(update={"network": plan.network.model_copy(update={"filters": [5 + i for i in range(n)]})})
    path = save_plan(own, tmp_path / "student.json")
    full = build_student(plan, str(path))
    assert full.filters == [5 + i for i in range(n)] and full.strides == plan.network.strides
    stem = build_student(plan, str(path), stem=2)  # the dropped stages take their filters with them
    assert stem.net.filters == [5 + i for i in range(2, n)]
    assert stem(torch.zeros(1, 1, 224, 224)).shape == (1, 3, 224, 224)
    strides = [list(s) for s in plan.network.strides]
    strides[2] = [1, 2]
    other = own.model_copy(update={"network": own.network.model_copy(update={"strides": strides})})
    bad = save_plan(other, tmp_path / "other.json")
    with pytest.raises(MedalloyError) as err:
        build_student(plan, str(bad))
    assert "stage 2" in str(err.value) and "other.json" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(MedalloyError, match="not found|missing|no such"):
        build_student(plan, str(tmp_path / "absent.json"))


def test_default_stem_stops_at_two_where_a_stem_of_three_would_also_fit():
    # 256 / 8 = 32 px would allow a third dropped stage; the distill recipe relies on the default cap of two
    assert default_stem(_plan(256)) == 2
    assert default_stem(_plan(256), deepest=3) == 3  # the cap decides, not the side


@pytest.mark.parametrize(
    "conv",
    [
        lambda: torch.nn.Conv2d(4, 6, 3, padding=1, bias=True),  # the pointwise half takes over the bias
        lambda: torch.nn.Conv2d(4, 6, 2),  # k = 2 is still a spatial kernel
        lambda: torch.nn.Conv3d(4, 6, (1, 3, 3), padding=(0, 1, 1)),  # an anisotropic 3D plan's in-plane kernel
        lambda: torch.nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False),
        lambda: torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False),
    ],
    ids=["bias", "k2", "aniso3d", "dilated", "strided"],
)
def test_make_separable_keeps_each_convolutions_geometry_and_bias(conv):
    from torch.nn import functional as F

    from medalloy.models.students import make_separable

    torch.manual_seed(0)
    conv = conv()
    geometry = {"stride": conv.stride, "padding": conv.padding, "dilation": conv.dilation}
    wrapper = torch.nn.Sequential(conv)
    make_separable(wrapper)
    depthwise, pointwise = wrapper[0][0], wrapper[0][1]
    assert depthwise.groups == 4 and depthwise.bias is None and (pointwise.bias is None) == (conv.bias is None)
    torch.nn.init.normal_(depthwise.weight)
    torch.nn.init.normal_(pointwise.weight)
    if pointwise.bias is not None:
        torch.nn.init.normal_(pointwise.bias)
    # reference: one full convolution with the original geometry and the outer-product kernel
    spatial = (1,) * (conv.weight.dim() - 2)
    kernel = pointwise.weight.reshape(6, 4, *spatial) * depthwise.weight.reshape(1, 4, *conv.kernel_size)
    x = torch.randn(2, 4, *([6] * (conv.weight.dim() - 4)), 9, 9)
    full = F.conv3d if conv.weight.dim() == 5 else F.conv2d
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), full(x, kernel, pointwise.bias, **geometry), rtol=1e-5, atol=1e-5)


def test_make_separable_leaves_pointwise_convolutions_alone():
    from medalloy.models.students import make_separable

    head = torch.nn.Conv2d(8, 3, 1)
    wrapper = make_separable(torch.nn.Sequential(head))
    assert wrapper[0] is head
    # in a student that is the 1 x 1 output head: a depthwise 1 x 1 in front of it would only add
    # filters[0] weights to the budget and rescale its input
    sep = build_student(_plan(), "tiny", separable=True)
    assert type(sep.output_block.conv.conv) is torch.nn.Conv2d and sep.output_block.conv.conv.kernel_size == (1, 1)


@pytest.mark.parametrize("dim", [2, 3])
def test_stem_logits_return_by_half_pixel_linear_interpolation(dim):
    plan = _plan(32, dim=dim)
    student = _student(plan, [4, 4, 4], stem=1)
    # a coarse map that is linear in the coarse index along every axis: (bi/tri)linear interpolation
    # reproduces it in the interior and holds the edge value beyond the outer pixel centres
    idx = torch.meshgrid(*[torch.arange(16.0)] * dim, indexing="ij")
    coarse = sum(idx).expand(1, 3, *[16] * dim).contiguous()
    student.net.forward = lambda _: coarse  # type: ignore[method-assign]
    with torch.no_grad():
        out = student(torch.zeros(1, 1, *[32] * dim))
    src = ((torch.arange(32.0) + 0.5) / 2 - 0.5).clamp(0, 15)  # align_corners=False: pixel centres map to centres
    fine = torch.meshgrid(*[src] * dim, indexing="ij")
    assert out.shape == (1, 3, *[32] * dim)
    torch.testing.assert_close(out[0, 2], sum(fine), rtol=0, atol=1e-5)


def test_student_filters_double_up_to_four_times_the_base():
    assert student_filters(11, 6) == [11, 22, 44, 44, 44, 44]
    assert student_filters(3, 2) == [3, 6]
    # the width docs/methods/distillation.md reports for the 224 px radiograph plan's tiny student
    assert build_student(_plan(), "tiny").filters == [11, 22, 44, 44, 44, 44]


def test_budget_is_inclusive_from_the_narrowest_base_and_a_digit_string_is_a_count():
    plan = _plan(64)
    stages = len(plan.network.strides)
    cost = {b: count_parameters(_student(plan, student_filters(b, stages))) for b in (2, 3, 5)}
    assert build_student(plan, cost[5]).filters[0] == 5  # exactly the budget fits
    assert build_student(plan, cost[5] - 1).filters[0] == 4
    assert build_student(plan, str(cost[5])).filters[0] == 5  # how the CLI / a YAML config gives a count
    assert build_student(plan, cost[3] - 1).filters[0] == 2  # the narrowest student is base 2


def test_stem_of_two_folds_every_input_channel():
    plan = _plan().model_copy(update={"in_channels": 2, "normalization": [ChannelNorm(scheme="zscore")] * 2})
    two = _student(plan, [4, 4, 4, 4], stem=2)
    assert two.net.input_block.conv1.conv.in_channels == 2 * 4  # two channels, 2 x 2 pixels each
    with torch.no_grad():
        assert two(torch.zeros(1, 2, 64, 64)).shape == (1, 3, 64, 64)


def test_out_channels_separable_and_upsample_reach_the_student_from_a_budget_or_a_plan_json(tmp_path):
    from medalloy.planning.plan import save_plan

    plan = _plan(64)  # five stages: room for a stem of two
    # a universal teacher's head has more outputs than the plan's classes: the student follows it
    budget = build_student(plan, "tiny", out_channels=5).eval()
    with torch.no_grad():
        assert budget(torch.zeros(1, 1, 64, 64)).shape == (1, 5, 64, 64)
    path = save_plan(plan.model_copy(update={"network": plan.network.model_copy(update={"filters": [4] * 5})}), tmp_path / "student.json")
    own = build_student(plan, str(path), out_channels=5, separable=True, stem=2, upsample="shuffle").eval()
    assert own.upsample == "shuffle" and own.net.output_block.conv.conv.out_channels == 5 * 16
    assert any(isinstance(m, torch.nn.Conv2d) and m.groups == m.in_channels > 1 for m in own.modules())
    with torch.no_grad():
        assert own(torch.zeros(1, 1, 64, 64)).shape == (1, 5, 64, 64)


def test_student_drops_the_teachers_deep_supervision():
    plan = _plan(64)
    plan = plan.model_copy(update={"network": plan.network.model_copy(update={"deep_supervision": True})})
    student = build_student(plan, "tiny")
    assert student.training and student(torch.zeros(1, 1, 64, 64)).shape == (1, 3, 64, 64)  # one output, no stacked heads


def test_stem_stride_and_fold_multiply_the_dropped_stages_axis_by_axis():
    # an anisotropic 3D plan: the first pooling leaves the through-plane axis alone
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    net = _plan(32, dim=3).network.model_copy(update={"strides": strides, "kernels": [[1, 3, 3]] * 2 + [[3, 3, 3]] * 3, "filters": [2] * 5})
    plan = _plan(32, dim=3).model_copy(update={"patch_size": [16, 32, 32], "network": net})
    two = _student(plan, [2, 2, 2], stem=2, upsample="shuffle")
    assert two.fold == [1, 2, 2] and two.stride == [2, 4, 4]  # [1, 2, 2] x [2, 2, 2]
    assert two.net.output_block.conv.conv.out_channels == 3 * 2 * 4 * 4
    with torch.no_grad():
        assert two(torch.zeros(1, 1, 16, 32, 32)).shape == (1, 3, 16, 32, 32)
    one = _student(_plan(32), [2, 2, 2], stem=1, upsample="shuffle")
    assert one.fold is None and one.stride == [2, 2]
    with torch.no_grad():
        assert one(torch.zeros(1, 1, 32, 32)).shape == (1, 3, 32, 32)
