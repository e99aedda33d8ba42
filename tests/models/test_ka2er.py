"""KA2ER's network: frozen experts (no gradient, eval mode, weights unchanged by training), the
amalgamation starts as the identity on the foundation, hierarchical attention weighs K + 1 slots,
tasks decode independently, and the ablations are the same class."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from medalloy.models.amalgamation import AmalgamationLayer, resize_to
from medalloy.models.features import STAGES_ATTR, FeatureTap
from medalloy.models.ka2er import ExpertBank, adapt_channels, build_ka2er, choose_taps, probe_stages
from medalloy.models.swin import run_swin_stages
from medalloy.models.unet import build_unet
from medalloy.planning.plan import NetworkPlan

pytest.importorskip("einops")


def _expert(cin: int, k: int, stages: int = 4) -> torch.nn.Module:
    net = NetworkPlan(kernels=[[3, 3]] * stages, strides=[[1, 1]] + [[2, 2]] * (stages - 1), filters=[8 * 2**i for i in range(stages)])
    return build_unet(net, cin, k).eval()


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


# -- the amalgamation layer's mechanism: each stage, the experts' path, the adaptive weighting ------


def _layer() -> AmalgamationLayer:
    """A small layer as if trained a little: ``proj_out`` is zero at the start (every stage would be
    invisible in the output) and the default gate scores all slots nearly alike (a uniform
    weighting would pass unseen)."""
    torch.manual_seed(0)
    layer = AmalgamationLayer(2, 16, [8, 4], width=16, heads=2)
    with torch.no_grad():
        layer.proj_out.weight.normal_(0, 0.3)
        layer.gate_q.weight.normal_(0, 0.5)
        layer.gate_k.weight.normal_(0, 0.5)
    return layer.eval()


def _inputs(seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(2, 16, 4, 4, generator=g)
    experts = [torch.randn(2, 8, 8, 8, generator=g), torch.randn(2, 4, 2, 2, generator=g)]  # finer and coarser than f
    return f, experts, torch.randn(2, 16, generator=g)


def _reference(layer: AmalgamationLayer, f, experts, condition):
    """Stages (1)-(3) of docs/methods/amalgamation.md written out from the layer's own submodules."""
    b, d, grid = f.shape[0], layer.width, tuple(f.shape[2:])
    pf = layer.proj_f(f)
    t = (pf + layer.pos(pf)).flatten(2).transpose(1, 2)
    x = layer.norm_self(t)
    t = t + layer.self_attn(x, x, x)[0]
    t = t + layer.mlp(layer.norm_mlp(t))
    q = layer.norm_q(t)
    slots = [t]
    for k, (proj, e) in enumerate(zip(layer.proj_e, experts)):
        kv = layer.norm_kv(proj(resize_to(e, grid)).flatten(2).transpose(1, 2) + layer.expert_embed[k])
        slots.append(t + layer.cross_attn(q, kv, kv)[0])
    gate = layer.gate_q(layer.norm_slots(t + condition[:, None, :]))
    scores = torch.stack([(gate * layer.gate_k(layer.norm_slots(s))).sum(-1) for s in slots], dim=-1) / d**0.5
    w = scores.softmax(-1)
    merged = sum(w[..., k : k + 1] * s for k, s in enumerate(slots))
    return f + layer.proj_out(merged.transpose(1, 2).reshape(b, d, *grid)), merged, w


class _NoAttention(torch.nn.Module):
    def forward(self, q, k, v, **_):
        return torch.zeros_like(q), None


class _Zero(torch.nn.Module):
    def forward(self, x):
        return torch.zeros_like(x)


def test_the_layer_is_its_three_stages_and_each_one_moves_the_output():
    layer = _layer()
    f, experts, c = _inputs()
    with torch.no_grad():
        out, merged, _ = layer(f, experts, c)
        ref_out, ref_merged, ref_w = _reference(layer, f, experts, c)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, ref_merged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.last_weights, ref_w, atol=1e-6, rtol=1e-5)
    # each stage taken out of the layer itself moves its contribution (out - f, ~3.7 here) by a clear
    # margin: the equality above is no accident of a stage that adds nothing
    removed = {
        "(1) self-attention": {"self_attn": _NoAttention()},
        "(1) its MLP": {"mlp": _Zero()},
        "(2) cross-attention to the experts": {"cross_attn": _NoAttention()},
        "(3) slot weighting (uniform without the gate query)": {"gate_q": _Zero()},
    }
    scale = (out - f).abs().max()
    for stage, parts in removed.items():
        cut = copy.deepcopy(layer)
        for name, module in parts.items():
            setattr(cut, name, module)
        with torch.no_grad():
            moved = (cut(f, experts, c)[0] - out).abs().max()
        assert moved > 0.1 * scale, stage  # measured 21-31 %
    torch.testing.assert_close(cut.last_weights, torch.full_like(cut.last_weights, 1 / 3))  # the cut gate is uniform indeed


def _muting(layer: AmalgamationLayer, slot: int):
    """Hooks that give ``slot`` a gate score of about -1e4 (weight exactly 0 after the softmax)."""
    seen = {}

    def keep_query(module, args, out):
        seen["q"] = out

    def mute(module, args, out):
        out = out.clone()
        q = seen["q"]
        out[..., slot, :] = -1e4 * q / q.square().sum(-1, keepdim=True)
        return out

    return [layer.gate_q.register_forward_hook(keep_query), layer.gate_k.register_forward_hook(mute)]


def test_an_experts_tokens_reach_the_output_through_its_slot_only():
    layer = _layer()
    f, experts, c = _inputs()
    nudged = [experts[0] + torch.randn(experts[0].shape, generator=torch.Generator().manual_seed(7)), experts[1]]
    with torch.no_grad():
        out = layer(f, experts, c)[0]
        moved = layer(f, nudged, c)[0]
    assert (moved - out).abs().max() > 0.05  # measured 0.17: expert 0's features change the merged output
    hooks = _muting(layer, slot=1)  # slot 0 is the foundation's own, slot 1 expert 0's
    try:
        with torch.no_grad():
            muted = layer(f, experts, c)[0]
            assert torch.equal(layer.last_weights[..., 1], torch.zeros_like(layer.last_weights[..., 1]))
            muted_nudged = layer(f, nudged, c)[0]
            other = layer(f, [experts[0], experts[1] + 1.0], c)[0]
    finally:
        for h in hooks:
            h.remove()
    assert (muted - out).abs().max() > 0.05  # taking expert 0's slot away changes the output
    torch.testing.assert_close(muted_nudged, muted, atol=1e-6, rtol=0)  # with its weight at 0, expert 0 no longer matters
    assert (other - muted).abs().max() > 0.05  # while expert 1 still does


def test_slot_weights_follow_the_input_and_the_task_condition():
    layer = _layer()
    f, experts, c = _inputs()
    other_f, _, other_c = _inputs(seed=2)
    with torch.no_grad():
        layer(f, experts, c)
        w = layer.last_weights
        layer(f, experts, other_c)
        w_task = layer.last_weights
        layer(other_f, experts, c)
        w_input = layer.last_weights
        layer(f, experts, None)
        w_none = layer.last_weights
    assert (w - 1 / 3).abs().max() > 0.3  # not uniform (measured 0.66)
    assert w.std(dim=1).min() > 0.02  # per position, not one weighting for the whole image
    assert (w_task - w).abs().max() > 0.3  # another task condition, other weights (measured 0.74)
    assert (w_none - w).abs().max() > 0.3  # the condition is used at all
    assert (w_input - w).abs().max() > 0.3  # other foundation features, other weights (measured 0.71)


# -- the task condition is a switch of its own, not a side effect of the decoder --------------------


def _weights_per_task(net, x, tasks: list[int]) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for t in tasks:
            net(x, torch.tensor([[t]]))
            out.append(net.amalgamation["bottleneck"].last_weights.clone())
    return out


def test_the_task_condition_is_a_switch_of_its_own():
    # the default is the behaviour before the switch: on with the prompt decoder, off with the plain
    # one, and seed for seed the same weights as asking for exactly that
    def seeded(**kw):
        torch.manual_seed(0)
        return build_ka2er(2, 3, 4, 12, **kw)

    for decoder, before in (("prompt", True), ("plain", False)):
        auto, explicit = seeded(decoder=decoder), seeded(decoder=decoder, task_adaptive=before)
        assert auto.task_adaptive is before and auto.task_embed is None
        a, e = auto.state_dict(), explicit.state_dict()
        assert a.keys() == e.keys() and all(torch.equal(a[k], e[k]) for k in a)
    for stages, hierarchical in (([], True), (["bottleneck"], False)):  # nothing would read the condition
        with pytest.raises(ValueError, match="hierarchical amalgamation stages"):
            seeded(decoder="plain", task_adaptive=True, stages=stages, hierarchical=hierarchical)
    plain = _net(decoder="plain")[0]
    asked = _net(decoder="plain", task_adaptive=True)[0]
    p, s = plain.state_dict(), asked.state_dict()
    assert set(s) - set(p) == {"task_embed.weight"} and all(torch.equal(p[k], s[k]) for k in p)  # one thing added, nothing else moved

    with torch.no_grad():  # as if trained: the default gate and the 0.02 embeddings move the weights little
        for net in (plain, asked):
            for layer in net.amalgamation.values():
                layer.gate_q.weight.normal_(0, 0.5)
                layer.gate_k.weight.normal_(0, 0.5)
            net.eval()
        asked.task_embed.weight.normal_(0, 1.0)
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    w0, w3 = _weights_per_task(plain, x, [0, 3])
    assert torch.equal(w0, w3)  # the plain decoder by default: stage 3 knows nothing of the task
    w0, w3 = _weights_per_task(asked, x, [0, 3])
    assert (w0 - w3).abs().max() > 0.3  # switched on: the task asked reaches stage 3 (measured 1.0)
    padded = _weights_per_task(asked, x, [0])[0]
    with torch.no_grad():
        asked(x, torch.tensor([[0, asked.null_task]]))
    torch.testing.assert_close(asked.amalgamation["bottleneck"].last_weights, padded)  # padding stays out of it


# -- resizing, channel adaptation and the expert bank's output, value by value ---------------------


def test_resize_averages_areas_when_finer_and_interpolates_linearly_when_coarser_per_axis():
    g = torch.Generator().manual_seed(0)
    # finer along one axis only (anisotropic grids): still the area mean, not a bilinear sample
    x = torch.randn(1, 2, 4, 8, generator=g)
    torch.testing.assert_close(resize_to(x, (4, 2)), x.reshape(1, 2, 4, 2, 4).mean(-1))
    x3 = torch.randn(1, 2, 4, 4, 4, generator=g)
    torch.testing.assert_close(resize_to(x3, (2, 2, 2)), x3.reshape(1, 2, 2, 2, 2, 2, 2, 2).mean((3, 5, 7)))
    # coarser: (bi/tri)linear with half-pixel centres (align_corners=False) reproduces a linear ramp at
    # the sample positions, clamped at the borders: 0, 1/4, 3/4, 1 when 2 cells become 4
    c = torch.tensor([0.0, 0.25, 0.75, 1.0])
    ramp = (2 * torch.arange(2.0)[:, None] + torch.arange(2.0)).reshape(1, 1, 2, 2)
    torch.testing.assert_close(resize_to(ramp, (4, 4)), (2 * c[:, None] + c).reshape(1, 1, 4, 4))
    d, h, w = torch.meshgrid(torch.arange(2.0), torch.arange(4.0), torch.arange(4.0), indexing="ij")
    ramp3 = (5 * d + 3 * h + w)[None, None]  # coarser along depth only, the same in-plane
    d4, h4, w4 = torch.meshgrid(c, torch.arange(4.0), torch.arange(4.0), indexing="ij")
    torch.testing.assert_close(resize_to(ramp3, (4, 4, 4)), (5 * d4 + 3 * h4 + w4)[None, None])


def test_a_grey_batch_is_repeated_into_every_channel_of_an_rgb_expert():
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(adapt_channels(x, 3), x.repeat(1, 3, 1, 1))


class _DeepSupervised(torch.nn.Module):
    """An expert that answers a list, full resolution first (nnU-Net's deep-supervision outputs)."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 2, 3, padding=1)
        setattr(self, STAGES_ATTR, {"bottleneck": "stem"})

    def forward(self, x):
        y = self.stem(x)
        return [y, y[..., ::2, ::2] + 1.0]


def test_an_expert_answering_a_list_gives_its_full_resolution_logits():
    torch.manual_seed(0)
    expert = _DeepSupervised()
    bank = ExpertBank([expert], [1], [{"enc4": "bottleneck"}])
    x = torch.randn(2, 1, 4, 4)
    feats, logits = bank(x)
    with torch.no_grad():
        full = expert.stem(x)
    torch.testing.assert_close(logits[0], full)
    torch.testing.assert_close(feats["enc4"][0], full)


# -- the network's own wiring: condition, image tokens, priors without a router, outputs ------------


def _tiny_expert(cin: int, k: int) -> torch.nn.Module:
    net = NetworkPlan(kernels=[[3, 3]] * 4, strides=[[1, 1]] + [[2, 2]] * 3, filters=[4, 8, 8, 8])
    return build_unet(net, cin, k).eval()


@pytest.fixture(scope="module")
def wired():
    """Two tiny experts, task 0 labelled by both (no router: the plain mean), task 1 by expert 0,
    task 2 by none. As if trained: unit-scale prompts (at 0.02 a wrong mean of them would hide
    under the tolerance) and non-zero output projections (the merged features reach the decoder)."""
    torch.manual_seed(0)
    experts = [_tiny_expert(1, 3), _tiny_expert(3, 2)]
    chosen = [choose_taps(probe_stages(e, c, [32, 32]), ["enc4", "bottleneck"]) for e, c in zip(experts, (1, 3))]
    net = build_ka2er(2, 3, 3, 12, experts, [1, 3], [t for t, _ in chosen], [c for _, c in chosen], task_experts=[[(0, 1), (1, 1)], [(0, 2)], []], route=False)
    with torch.no_grad():
        net.decoder.prompts.weight.normal_(0, 1.0)
        for layer in net.amalgamation.values():
            layer.proj_out.weight.normal_(0, 0.1)
    return net.eval()


def test_the_network_wires_condition_image_tokens_priors_and_expert_tokens(wired):
    net, null = wired, wired.null_task
    seen: dict = {}
    hooks = [
        net.amalgamation["bottleneck"].register_forward_hook(lambda m, a, o: seen.update(condition=a[2], bottleneck=o[0], tokens=o[2])),
        net.decoder.register_forward_hook(lambda m, a, o: seen.update(image=a[0], decoded=o)),
    ]
    ids = torch.tensor([[0, 1], [2, null]])
    try:
        with torch.no_grad(), FeatureTap(net, ["enc3", "bottleneck"], detach=True) as tap:
            out = net(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)), ids)
        tapped = tap.features
    finally:
        for h in hooks:
            h.remove()
    p = net.decoder.prompts.weight
    # the network's own stages are the amalgamated features where a layer merges (what a student's
    # feature distillation reads through FeatureTap), the foundation's elsewhere
    torch.testing.assert_close(tapped["bottleneck"], seen["bottleneck"])
    assert getattr(net, STAGES_ATTR)["enc0"] == "foundation.encoder1"
    # the task condition is the mean prompt of the tasks asked, padding left out
    torch.testing.assert_close(seen["condition"], torch.stack([(p[0] + p[1]) / 2, p[2]]))
    # the decoder reads the amalgamated bottleneck, projected, plus its depthwise positional term
    with torch.no_grad():
        img = net.image_proj(seen["bottleneck"])
        torch.testing.assert_close(seen["image"], (img + net.image_pos(img)).flatten(2).transpose(1, 2))
    # logits: the decoder's, plus each task's expert log-odds (task 0: the mean of both experts);
    # task 2 and the null task have no expert: the decoder's alone
    e0, e1 = out["expert_logits"]
    prior = torch.stack([((e0[0, 1] - e0[0, 0]) + (e1[0, 1] - e1[0, 0])) / 2, e0[0, 2] - e0[0, 0]])
    torch.testing.assert_close(out["logits"][0], seen["decoded"][0] + prior, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["logits"][1], seen["decoded"][1], atol=1e-5, rtol=1e-5)
    assert out["route_logits"] is None
    # what feature distillation compares: the merged tokens and each expert's projected ones
    assert set(out["expert_tokens"]) == {"enc4", "bottleneck"} and len(out["expert_tokens"]["bottleneck"]) == 2
    for a, b in zip(out["expert_tokens"]["bottleneck"], seen["tokens"]):
        torch.testing.assert_close(a, b)


def test_expert_priors_with_a_single_expert_on_the_experts_device():
    torch.manual_seed(0)
    expert = _tiny_expert(1, 3)
    taps, channels = choose_taps(probe_stages(expert, 1, [32, 32]), ["bottleneck"])
    net = build_ka2er(2, 1, 2, 12, [expert], [1], [taps], [channels], stages=["bottleneck"], decoder="plain", task_experts=[[(0, 2)], []])
    z = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        net.expert_gate.copy_(torch.tensor([0.5, 1.0, 1.0]))
        prior = net.expert_prior([z], torch.tensor([[0, 1, 2], [2, 0, 0]]))
    odds = 0.5 * (z[:, 2] - z[:, 0])
    torch.testing.assert_close(prior[0], torch.stack([odds[0], torch.zeros(4, 4), torch.zeros(4, 4)]))
    torch.testing.assert_close(prior[1], torch.stack([torch.zeros(4, 4), odds[1], odds[1]]))
    # every term on the experts' device (a GPU in training): the meta device stands in for it here
    net.expert_gate = torch.nn.Parameter(net.expert_gate.detach().to("meta"))
    meta = net.expert_prior([z.to("meta")], torch.tensor([[0, 1]], device="meta").expand(2, 2))
    assert meta.device.type == "meta" and meta.shape == (2, 2, 4, 4)


def test_the_options_reach_the_parts_they_name():
    net = build_ka2er(3, 1, 2, 12, stages=["bottleneck"], hierarchical=False, prior_probability=None)
    # a 3-D network's positional encoding is a depthwise 3-D conv (CPVT), one 3x3x3 filter per channel
    assert isinstance(net.image_pos, torch.nn.Conv3d) and net.image_pos.groups == net.image_pos.in_channels == 64
    assert net.image_pos.kernel_size == (3, 3, 3) and net.image_pos.padding == (1, 1, 1)
    assert not net.amalgamation["bottleneck"].hierarchical and hasattr(net.amalgamation["bottleneck"], "mix")
    torch.testing.assert_close(net.decoder.bias.weight, torch.zeros(3, 1))  # no prior probability: logit 0
    plain = build_ka2er(2, 1, 2, 12, stages=["bottleneck"], decoder="plain", task_adaptive=True)
    # the plain head starts at the rare-foreground prior too (logit of the default 0.01)
    torch.testing.assert_close(plain.decoder.bias.weight.detach(), torch.full((3, 1), float(torch.logit(torch.tensor(0.01)))))
    # the plain decoder's task condition starts as small as the prompt decoder's prompts (std 0.02)
    assert 0.015 < float(plain.task_embed.weight.detach().std()) < 0.025


def test_the_flat_ablation_adds_its_mixed_projection_to_the_foundation():
    torch.manual_seed(0)
    layer = AmalgamationLayer(2, 16, [8, 4], width=16, heads=2, hierarchical=False)
    with torch.no_grad():
        layer.proj_out.weight.normal_(0, 0.3)  # zero at the start: the sign of the residual would not show
    f, experts, _ = _inputs()
    with torch.no_grad():
        out, mixed, projected = layer(f, experts)
        pf = layer.proj_f(f)
        pe = [p(resize_to(e, (4, 4))) for p, e in zip(layer.proj_e, experts)]
        ref = layer.mix(torch.cat([pf + layer.pos(pf), *pe], dim=1))
        torch.testing.assert_close(out, f + layer.proj_out(ref))
    torch.testing.assert_close(mixed, ref.flatten(2).transpose(1, 2))
    for a, b in zip(projected, pe):
        torch.testing.assert_close(a, b.flatten(2).transpose(1, 2))


def test_the_router_reads_the_deepest_amalgamated_stage():
    torch.manual_seed(0)
    # six stages (strides 1 to 32): enc4 and bottleneck taps are different stages of each expert
    plan = NetworkPlan(kernels=[[3, 3]] * 6, strides=[[1, 1]] + [[2, 2]] * 5, filters=[4, 4, 8, 8, 8, 8])
    experts = [build_unet(plan, 1, 2).eval(), build_unet(plan, 1, 2).eval()]
    chosen = [choose_taps(probe_stages(e, 1, [64, 64]), ["enc4", "bottleneck"]) for e in experts]
    assert chosen[0][0] == {"enc4": "enc4", "bottleneck": "bottleneck"}
    net = build_ka2er(2, 1, 2, 12, experts, [1, 1], [t for t, _ in chosen], [c for _, c in chosen], decoder="plain", task_experts=[[(0, 1), (1, 1)], []])
    with torch.no_grad():
        net.router.weight.normal_()
        feats, _ = net.experts(torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1)))
        r = net.route_logits(feats)
    pooled = [F.layer_norm(f.mean((2, 3)), f.shape[1:2]) for f in feats["bottleneck"]]  # each expert standardised on its own
    torch.testing.assert_close(r, net.router(torch.cat(pooled, 1)).detach())


def test_a_3d_layer_is_its_three_stages_and_each_sample_its_own():
    torch.manual_seed(0)
    layer = AmalgamationLayer(3, 4, [2], width=8, heads=2)
    with torch.no_grad():  # as _layer: non-zero output, a gate that is not near uniform
        layer.proj_out.weight.normal_(0, 0.3)
        layer.gate_q.weight.normal_(0, 0.5)
        layer.gate_k.weight.normal_(0, 0.5)
    layer.eval()
    g = torch.Generator().manual_seed(1)
    f, experts, c = torch.randn(2, 4, 2, 2, 2, generator=g), [torch.randn(2, 2, 4, 4, 4, generator=g)], torch.randn(2, 8, generator=g)
    with torch.no_grad():
        out, merged, _ = layer(f, experts, c)
        ref_out, ref_merged, _ = _reference(layer, f, experts, c)
        alone = layer(f[1:], [experts[0][1:]], c[1:])[0]
        t = torch.randn(2, 5, 8, generator=g)
        mlp = layer.mlp[-1](F.gelu(layer.mlp[0](t)))
        torch.testing.assert_close(layer.mlp(t), mlp)  # the feed-forward is Linear, GELU, Linear
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged, ref_merged, atol=1e-5, rtol=1e-5)
    # attention runs over each sample's tokens, never across the batch
    torch.testing.assert_close(alone, out[1:], atol=1e-5, rtol=1e-5)
    # the positional encoding is a depthwise 3x3x3 conv (CPVT); one learned embedding per expert
    assert isinstance(layer.pos, torch.nn.Conv3d) and layer.pos.groups == 8 and layer.pos.kernel_size == (3, 3, 3)
    assert layer.expert_embed.shape == (1, 8)


def test_expert_embeddings_start_small():
    torch.manual_seed(0)
    layer = AmalgamationLayer(2, 4, [2] * 4, width=64, heads=4)
    # 0.02 as the prompts: added to the experts' projected tokens before their LayerNorm, a
    # unit-scale embedding would start by drowning what the expert says in who it is
    assert layer.expert_embed.shape == (4, 64)
    assert 0.015 < float(layer.expert_embed.detach().std()) < 0.025
