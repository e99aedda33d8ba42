"""KA2ER's network: frozen experts (no gradient, eval mode, weights unchanged by training), the
amalgamation starts as the identity on the foundation, hierarchical attention weighs K + 1 slots,
tasks decode independently, and the ablations are the same class."""

from __future__ import annotations

import pytest
import torch

from medalloy.models.amalgamation import AmalgamationLayer, resize_to
from medalloy.models.ka2er import adapt_channels, build_ka2er, choose_taps, probe_stages
from medalloy.models.swin import run_swin_stages
from medalloy.models.unet import build_unet
from medalloy.planning.plan import NetworkPlan

pytest.importorskip("einops")


def _expert(cin: int, k: int, stages: int = 4) -> torch.nn.Module:
    net = NetworkPlan(kernels=[[3, 3]] * stages, strides=[[1, 1]] + [[2, 2]] * (stages - 1), filters=[8 * 2**i for i in range(stages)])
    return build_unet(net, cin, k, 2).eval()


def _net(**kw):
    torch.manual_seed(0)
    experts = [_expert(1, 3), _expert(3, 2, stages=6)]
    probes = [probe_stages(e, c, [64, 64]) for e, c in zip(experts, (1, 3))]
    chosen = [choose_taps(p, ["enc4", "bottleneck"]) for p in probes]
    net = build_ka2er(2, 3, 4, 12, experts, [1, 3], [t for t, _ in chosen], [c for _, c in chosen], **kw)
    return net, experts, chosen


def test_taps_take_the_deepest_stage_not_coarser_than_the_foundation():
    _, _, chosen = _net()
    # a 4-stage expert (strides 1, 2, 4, 8) gives its bottleneck to both; a 6-stage one (to 32) matches each scale
    assert chosen[0][0] == {"enc4": "bottleneck", "bottleneck": "bottleneck"} and chosen[0][1] == {"enc4": 64, "bottleneck": 64}
    assert chosen[1][0] == {"enc4": "enc4", "bottleneck": "bottleneck"} and chosen[1][1] == {"enc4": 128, "bottleneck": 256}


def test_channel_adaptation():
    x = torch.arange(12.0).reshape(1, 3, 2, 2)
    torch.testing.assert_close(adapt_channels(x, 1), x.mean(1, keepdim=True))
    assert adapt_channels(x[:, :1], 3).shape == (1, 3, 2, 2)
    with pytest.raises(ValueError):
        adapt_channels(torch.zeros(1, 2, 2, 2), 3)


def test_amalgamation_starts_as_the_identity_and_experts_stay_frozen():
    net, experts, _ = _net()
    x, tasks = torch.randn(2, 3, 64, 64), torch.tensor([[0, 1], [2, 3]])
    with torch.no_grad():
        out = net(x, tasks)
        features = {}

        def keep(stage, f):
            features[stage] = f
            return f

        run_swin_stages(net.foundation, x, keep)
        feats, _ = net.experts(x)
        amalgamated = {stage: layer(features[stage], feats[stage])[0] for stage, layer in net.amalgamation.items()}
    for stage in net.amalgamation:  # a zero-initialised output projection: training starts from the foundation
        torch.testing.assert_close(amalgamated[stage], features[stage])
    assert out["logits"].shape == (2, 2, 64, 64)
    assert [tuple(t.shape) for t in out["expert_logits"]] == [(2, 3, 64, 64), (2, 2, 64, 64)]

    before = {k: v.clone() for k, v in net.experts.state_dict().items()}
    assert not any(p.requires_grad for p in net.experts.parameters())
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    net.train()
    assert not net.experts.training  # train() on the whole network leaves the experts in eval mode
    for _ in range(3):
        out = net(x, tasks)
        loss = out["logits"].square().mean() + sum(m.square().mean() for m in out["merged"].values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in net.experts.state_dict().items())
    assert net.amalgamation["bottleneck"].proj_out.weight.abs().sum() > 0  # the layer itself learns
    assert all(p.grad is None for p in net.experts.parameters())


def test_stage_three_weighs_foundation_and_every_expert():
    torch.manual_seed(0)
    layer = AmalgamationLayer(2, 16, [8, 4], width=16, heads=2)
    f = torch.randn(2, 16, 4, 4)
    out, merged, projected = layer(f, [torch.randn(2, 8, 8, 8), torch.randn(2, 4, 2, 2)], condition=torch.randn(2, 16))
    w = layer.last_weights
    assert w.shape == (2, 16, 3) and torch.allclose(w.sum(-1), torch.ones(2, 16))
    assert merged.shape == (2, 16, 16) and [tuple(p.shape) for p in projected] == [(2, 16, 16), (2, 16, 16)]
    with pytest.raises(ValueError, match="2 experts"):
        layer(f, [torch.randn(2, 8, 4, 4)])
    flat = AmalgamationLayer(2, 16, [8, 4], width=16, heads=2, hierarchical=False)
    assert flat(f, [torch.randn(2, 8, 4, 4), torch.randn(2, 4, 4, 4)])[0].shape == f.shape


def test_resize_pools_finer_and_interpolates_coarser():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    torch.testing.assert_close(resize_to(x, (2, 2)), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert resize_to(x, (8, 8)).shape == (1, 1, 8, 8)


def _trained_a_little(net):
    """Non-zero output projections, so the experts actually change the features."""
    with torch.no_grad():
        for layer in net.amalgamation.values():
            layer.proj_out.weight.normal_(0, 0.1)
    return net.eval()


def test_tasks_decode_independently_and_padding_is_inert():
    net = _trained_a_little(_net(task_adaptive=False)[0])
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        one = net(x, torch.tensor([[2]]))["logits"]
        three = net(x, torch.tensor([[0, 2, 3]]))["logits"]
    torch.testing.assert_close(three[:, 1:2], one, atol=1e-5, rtol=1e-4)
    adaptive = _trained_a_little(_net(task_adaptive=True)[0])
    with torch.no_grad():
        a = adaptive(x, torch.tensor([[0, 1]]))["logits"]
        padded = adaptive(x, torch.tensor([[0, 1, adaptive.null_task]]))["logits"]
    torch.testing.assert_close(padded[:, :2], a, atol=1e-5, rtol=1e-4)  # null slots do not enter the task condition


def test_ablations_are_the_same_class():
    x, tasks = torch.randn(1, 3, 64, 64), torch.tensor([[1]])
    for kw in ({"hierarchical": False}, {"decoder": "plain"}):
        net = _net(**kw)[0].eval()
        with torch.no_grad():
            assert net(x, tasks)["logits"].shape == (1, 1, 64, 64)
    alone = build_ka2er(2, 3, 4, 12, decoder="plain", stages=[])
    assert alone.experts is None and not alone.amalgamation
    no_experts = build_ka2er(2, 3, 4, 12)
    with torch.no_grad():
        assert no_experts(x, tasks)["expert_logits"] == []
    with pytest.raises(ValueError, match="decoder"):
        build_ka2er(2, 3, 4, 12, decoder="sam")


def test_expert_priors_add_each_tasks_own_expert_log_odds():
    # tasks: 0 = class 1 of expert 0; 1 = class 2 of expert 0 and class 1 of expert 1 (shared: mean); 2, 3: none
    net = _net(task_experts=[[(0, 1)], [(0, 2), (1, 1)], [], []])[0].eval()
    torch.nn.init.zeros_(net.decoder.hyper[-1].weight)
    torch.nn.init.zeros_(net.decoder.hyper[-1].bias)  # the decoder says nothing: logits are bias + prior
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x, torch.tensor([[0, 1, 2], [1, 0, net.null_task]]))
    e0, e1 = out["expert_logits"]
    lo0, lo1, lo2 = e0[:, 1] - e0[:, 0], e0[:, 2] - e0[:, 0], e1[:, 1] - e1[:, 0]
    torch.testing.assert_close(out["logits"][:, 0][0], lo0[0])
    torch.testing.assert_close(out["logits"][1, 1], lo0[1])
    torch.testing.assert_close(out["logits"][0, 1], (lo1[0] + lo2[0]) / 2)
    assert torch.allclose(out["logits"][0, 2], torch.full_like(lo0[0], float(torch.logit(torch.tensor(0.01)))))  # no expert: the prior bias
    # the exclusive class form of expert 0's tasks is expert 0's own softmax (task 1 alone has two experts)
    solo = _net(task_experts=[[(0, 1)], [(0, 2)], [], []])[0].eval()
    torch.nn.init.zeros_(solo.decoder.hyper[-1].weight)
    torch.nn.init.zeros_(solo.decoder.hyper[-1].bias)
    with torch.no_grad():
        z = solo(x, torch.tensor([[0, 1]] * 2))["logits"]
        ref = solo.experts(x)[1][0]
    mine = torch.cat([torch.zeros_like(z[:, :1]), z], 1).softmax(1)
    torch.testing.assert_close(mine, ref.float().softmax(1), atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        solo.expert_gate[0] = 0.5
        half = solo(x, torch.tensor([[0]] * 2))["logits"]
    torch.testing.assert_close(half[:, 0], z[:, 0] / 2)
    with pytest.raises(ValueError, match="background"):
        _net(task_experts=[[(0, 0)], [], [], []])
    with pytest.raises(ValueError, match="one entry per task"):
        _net(task_experts=[[(0, 1)]])


def test_a_router_weighs_the_experts_of_a_shared_task_per_image():
    net = _net(task_experts=[[(0, 1), (1, 1)], [(0, 2)], [], []])[0].eval()
    torch.nn.init.zeros_(net.decoder.hyper[-1].weight)
    torch.nn.init.zeros_(net.decoder.hyper[-1].bias)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = net(x, torch.tensor([[0, 1]] * 2))
    e0, e1 = out["expert_logits"]
    lo0, lo1 = e0[:, 1] - e0[:, 0], e1[:, 1] - e1[:, 0]
    assert out["route_logits"].shape == (2, 2)
    torch.testing.assert_close(out["logits"][:, 0], (lo0 + lo1) / 2)  # an untrained router: the plain mean
    torch.testing.assert_close(out["logits"][:, 1], e0[:, 2] - e0[:, 0])  # one expert: no routing
    with torch.no_grad():
        net.router.bias.copy_(torch.tensor([-30.0, 30.0]))  # every image looks like expert 1's source
        routed = net(x, torch.tensor([[0]] * 2))["logits"]
    torch.testing.assert_close(routed[:, 0], lo1, atol=1e-4, rtol=1e-4)
    # the router reads the image: its weights on the pooled expert features move it per sample
    with torch.no_grad():
        net.router.bias.zero_()
        net.router.weight.normal_()
        r = net(x, torch.tensor([[0]] * 2))["route_logits"]
    assert not torch.allclose(r[0], r[1])
    assert _net(task_experts=[[(0, 1)], [(0, 2)], [], []])[0].router is None  # nothing shared: no router
