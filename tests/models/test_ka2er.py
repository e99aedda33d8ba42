"""KA2ER's network: frozen experts (no gradient, eval mode, weights unchanged by training), the
amalgamation starts as the identity on the foundation, hierarchical attention weighs K + 1 slots,
tasks decode independently, and the ablations are the same class."""

from __future__ import annotations

import copy

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
