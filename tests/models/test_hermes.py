"""Hermes: prior fusion blocks and the task-conditioned network (shapes, conditioning, gradients)."""

from __future__ import annotations

import pytest
import torch

from medalloy.models import FeatureTap, build_unet
from medalloy.models.hermes import HermesNet, build_hermes, default_fusion_stages
from medalloy.models.prior_fusion import BidirectionalFusion, CrossAttention, PriorBank, PriorFusionLayer, num_heads
from medalloy.models.task_bound import TaskBound
from medalloy.models.unet import run_stages
from medalloy.planning.plan import ChannelNorm, NetworkPlan, Plan


def _plan(dim: int = 2, filters=(8, 16, 32, 64), patch: int = 32) -> Plan:
    n = len(filters)
    return Plan(
        dataset="Toy",
        dim=dim,
        in_channels=1,
        target_spacing=[1.0] * dim,
        patch_size=[patch] * dim,
        batch_size=2,
        normalization=[ChannelNorm(scheme="zscore")],
        label_values=[0, 1],
        labels={"background": 0, "a": 1},
        network=NetworkPlan(kernels=[[3] * dim] * n, strides=[[1] * dim] + [[2] * dim] * (n - 1), filters=list(filters)),
    )


def _hermes(plan: Plan, n_tasks: int, n_modalities: int, **kw) -> HermesNet:
    return build_hermes(plan.network, n_tasks, n_modalities, plan.in_channels, **kw)


def test_num_heads_uses_head_size_32():
    assert [num_heads(c) for c in (16, 32, 64, 320, 48)] == [1, 1, 2, 10, 1]


def test_run_stages_is_dynunets_own_forward():
    torch.manual_seed(0)
    net = build_unet(_plan().network, in_channels=1, out_channels=3).eval()
    x = torch.randn(2, 1, 32, 32)
    seen = []
    with torch.no_grad():
        ours = net.output_block(run_stages(net, x, lambda s, f: seen.append((s, f.shape[1])) or f))
        torch.testing.assert_close(ours, net(x))
    assert seen == [("enc0", 8), ("enc1", 16), ("enc2", 32), ("bottleneck", 64), ("dec2", 32), ("dec1", 16), ("dec0", 8)]
    # a replaced stage output reaches both the next block and the skip connection
    with torch.no_grad():
        changed = run_stages(net, x, lambda s, f: f * 0 if s == "enc2" else f)
    assert not torch.allclose(changed, run_stages(net, x))


def test_bidirectional_fusion_is_equivariant_to_positions_and_reads_the_priors():
    torch.manual_seed(0)
    block = BidirectionalFusion(32).eval()
    f = torch.randn(2, 32, 4, 5)
    p = torch.randn(2, 7, 32)
    with torch.no_grad():
        out_f, out_p = block(f, p)
        assert out_f.shape == f.shape and out_p.shape == p.shape
        # no positional terms: permuting positions permutes the output and leaves the priors alone
        perm = torch.randperm(20)
        pf, pp = block(f.flatten(2)[:, :, perm].reshape(f.shape), p)
        torch.testing.assert_close(pf.flatten(2), out_f.flatten(2)[:, :, perm])
        torch.testing.assert_close(pp, out_p)
        # each sample's features depend on its own priors only
        p2 = p.clone()
        p2[1] += torch.randn(7, 32)  # (a constant shift would vanish in the LayerNorm)
        f2, _ = block(f, p2)
        torch.testing.assert_close(f2[0], out_f[0])
        assert (f2[1] - out_f[1]).abs().mean() > 1e-3


@pytest.mark.parametrize("channels, heads", [(64, 2), (32, 1), (96, 3)])
def test_cross_attention_is_multihead_attentions_maths_and_loads_its_weights(channels, heads):
    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(channels, heads, batch_first=True)
    torch.manual_seed(0)
    ours = CrossAttention(channels, heads)
    # the same seed draws the same initial weights, and the parameter names and shapes are
    # nn.MultiheadAttention's, so checkpoints written with it load
    mha = reference.state_dict()
    assert sorted(ours.state_dict()) == sorted(mha)
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, mha[name], rtol=0, atol=0)
    q, kv = torch.randn(3, 50, channels), torch.randn(3, 7, channels)
    padding = torch.zeros(3, 7, dtype=torch.bool)
    padding[1, :3] = True
    padding[2, 6] = True
    expected = reference(q, kv, kv, key_padding_mask=padding, need_weights=False)[0]
    torch.testing.assert_close(ours(q, kv, padding), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(q, kv), reference(q, kv, kv, need_weights=False)[0], rtol=1e-5, atol=1e-6)


def _stages(levels: int) -> list[str]:
    enc = [f"enc{i}" for i in range(levels - 1)]
    return [*enc, "bottleneck", *[f"dec{i}" for i in reversed(range(levels - 1))]]


def test_fusion_sits_at_the_three_coarsest_scales_never_the_two_finest():
    # the paper's 5-level backbone: 1/4, 1/8, 1/16 (both rules agree)
    assert default_fusion_stages(_stages(5)) == ["enc2", "enc3", "bottleneck", "dec3", "dec2"]
    # a 6-level plan (256 px) keeps three scales: from 1/8, not 1/4
    assert default_fusion_stages(_stages(6)) == ["enc3", "enc4", "bottleneck", "dec4", "dec3"]
    assert default_fusion_stages(_stages(6), coarsest=None) == ["enc2", "enc3", "enc4", "bottleneck", "dec4", "dec3", "dec2"]
    # a shallow plan never fuses at the two finest scales, even with fewer than three left
    assert default_fusion_stages(_stages(4)) == ["enc2", "bottleneck", "dec2"]
    assert default_fusion_stages(_stages(3)) == ["bottleneck"]


def test_prior_bank_gathers_task_then_modality_tokens():
    bank = PriorBank(n_tasks=3, n_modalities=2, channels=8, tokens_per_modality=4)
    tokens = bank.gather(torch.tensor([[0, 2], [1, bank.null_task]]), torch.tensor([1, 0]))
    assert tokens.shape == (2, 2 + 4, 8)
    torch.testing.assert_close(tokens[1, 1], bank.task[3])
    torch.testing.assert_close(tokens[0, 2:], bank.modality[1])
    layer = PriorFusionLayer(8, 3, 2, depth=2, tokens_per_modality=4)
    f, t, m = layer(torch.randn(2, 8, 3, 3), torch.tensor([[0, 2], [1, 3]]), torch.tensor([1, 0]))
    assert (f.shape, t.shape, m.shape) == ((2, 8, 3, 3), (2, 2, 8), (2, 4, 8))


@pytest.mark.parametrize("dim", [2, 3])
def test_hermes_logits_per_requested_task(dim):
    torch.manual_seed(0)
    patch = 32 if dim == 2 else 16
    net = _hermes(_plan(dim, filters=(8, 16, 32) if dim == 3 else (8, 16, 32, 64), patch=patch), n_tasks=4, n_modalities=3)
    x = torch.randn(2, 1, *([patch] * dim))
    tasks = torch.tensor([[0, 1, 4], [2, 4, 4]])  # 4 = null task (padding)
    out = net(x, tasks, torch.tensor([0, 2]))
    assert out["logits"].shape == (2, 3, *([patch] * dim)) and out["modality_logits"].shape == (2, 3)
    # a task's map does not depend on where it sits in the list (tokens are per task)
    swapped = net(x, tasks[:, [1, 0, 2]], torch.tensor([0, 2]))["logits"]
    torch.testing.assert_close(swapped[0, 0], out["logits"][0, 1], atol=1e-5, rtol=1e-4)
    # different tasks give different maps for the same image
    assert (out["logits"][0, 0] - out["logits"][0, 1]).abs().mean() > 1e-4


def test_hermes_gradients_reach_every_used_parameter_and_only_requested_task_rows():
    torch.manual_seed(0)
    net = _hermes(_plan(), n_tasks=5, n_modalities=2)
    assert net.fusion_stages == ["enc2", "bottleneck", "dec2"] == default_fusion_stages(["enc0", "enc1", "enc2", "bottleneck", "dec2", "dec1", "dec0"])
    out = net(torch.randn(2, 1, 32, 32), torch.tensor([[0, 3], [3, 5]]), torch.tensor([0, 1]))
    (out["logits"].sum() + out["modality_logits"].sum()).backward()
    no_grad = [n for n, p in net.named_parameters() if p.grad is None]
    assert no_grad == []
    for layer in net.fusion.values():
        rows = layer.bank.task.grad.abs().sum(1)
        assert (rows[[0, 3, 5]] > 0).all() and (rows[[1, 2, 4]] == 0).all()


def test_task_bound_and_feature_tap():
    torch.manual_seed(0)
    net = _hermes(_plan(), n_tasks=3, n_modalities=2).eval()
    bound = TaskBound(net, [2, 0], modality_id=1)
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad(), FeatureTap(net, ["enc1", "bottleneck"]) as tap:
        logits = bound(x)
        direct = net(x, torch.tensor([[2, 0]] * 3), torch.tensor([1, 1, 1]))["logits"]
    torch.testing.assert_close(logits, direct)
    assert tap.features["enc1"].shape == (3, 16, 16, 16) and tap.features["bottleneck"].shape == (3, 64, 4, 4)
    with pytest.raises(ValueError, match="task_ids"):
        net(x, torch.tensor([0, 1, 2]), torch.tensor([0, 0, 0]))


def test_null_task_padding_leaves_every_output_unchanged():
    # Training pads task lists with the null task, inference (TaskBound) sends none: both must
    # see the same model, so the features may not read the null tokens.
    torch.manual_seed(0)
    net = _hermes(_plan(), n_tasks=3, n_modalities=2).eval()
    null = net.null_task
    x = torch.randn(2, 1, 32, 32)
    mod = torch.tensor([0, 1])
    with torch.no_grad():
        plain = net(x, torch.tensor([[2, 0], [1, 2]]), mod)
        padded = net(x, torch.tensor([[2, 0, null, null], [1, 2, null, null]]), mod)
        with FeatureTap(net, ["bottleneck", "dec2"]) as tap_plain:
            net(x, torch.tensor([[2, 0], [1, 2]]), mod)
        with FeatureTap(net, ["bottleneck", "dec2"]) as tap_padded:
            net(x, torch.tensor([[2, 0, null], [1, 2, null]]), mod)
    torch.testing.assert_close(padded["logits"][:, :2], plain["logits"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded["modality_logits"], plain["modality_logits"], atol=1e-5, rtol=1e-5)
    for stage in ("bottleneck", "dec2"):
        torch.testing.assert_close(tap_padded.features[stage], tap_plain.features[stage], atol=1e-5, rtol=1e-5)


def test_narrow_fusion_layer_runs_at_its_width_and_keeps_the_shape():
    torch.manual_seed(0)
    wide = PriorFusionLayer(128, n_tasks=3, n_modalities=2)
    narrow = PriorFusionLayer(128, n_tasks=3, n_modalities=2, width=32)
    assert narrow.width == 32 and narrow.bank.task.shape == (4, 32)
    n_wide, n_narrow = (sum(p.numel() for p in m.parameters()) for m in (wide, narrow))
    # a 32-wide block (~12.6 k) plus the two projections (2 x 128 x 32 + biases), not a 128-wide one (~200 k)
    assert n_narrow < n_wide / 10
    f = torch.randn(2, 128, 4, 4)
    out, tasks, modality = narrow(f, torch.tensor([[0], [2]]), torch.tensor([0, 1]))
    assert out.shape == f.shape and tasks.shape == (2, 1, 32) and modality.shape == (2, 10, 32)
    # residual through the projections: the block changes the features, but only through Up(z' - z)
    assert (out - f).abs().mean() > 1e-4
    torch.nn.init.zeros_(narrow.up.weight)
    torch.nn.init.zeros_(narrow.up.bias)
    torch.testing.assert_close(narrow(f, torch.tensor([[0], [2]]), torch.tensor([0, 1]))[0], f)


def test_universal_at_the_cli_default_is_within_1_3_experts():
    # the planner's 6-stage layout for a 256 px plan (filters 16..256), 8 tasks, 5 modalities
    from medalloy.planning.multi_dataset import shared_network
    from medalloy.recipes.universal import UniversalConfig

    cfg = UniversalConfig()
    _, network = shared_network(256, cfg.base_filters, cfg.max_filters)
    expert = sum(p.numel() for p in build_unet(network, in_channels=3, out_channels=3).parameters())
    net = build_hermes(network, 8, 5, in_channels=3, fusion_width=cfg.fusion_width, finest_skipped=cfg.fusion_finest_skipped, fusion_scales=cfg.fusion_scales)
    full = build_hermes(network, 8, 5, in_channels=3, fusion_scales=None)
    size = sum(p.numel() for p in net.parameters())
    assert size <= 1.3 * expert < sum(p.numel() for p in full.parameters())  # full-width fusion: ~2.4x


def test_task_priors_only_ignore_the_modality():
    torch.manual_seed(0)
    net = _hermes(_plan(), n_tasks=3, n_modalities=2, priors="task").eval()
    assert all(layer.bank.modality.numel() == 0 for layer in net.fusion.values()) and net.modality_head is None
    x, tasks = torch.randn(2, 1, 32, 32), torch.tensor([[0, 1], [2, 3]])
    with torch.no_grad():
        a, b = net(x, tasks, torch.tensor([0, 0])), net(x, tasks, torch.tensor([1, 1]))
    assert set(a) == {"logits"}
    torch.testing.assert_close(a["logits"], b["logits"])
    # the full model does read the modality
    full = _hermes(_plan(), n_tasks=3, n_modalities=2).eval()
    with torch.no_grad():
        assert (full(x, tasks, torch.tensor([0, 0]))["logits"] - full(x, tasks, torch.tensor([1, 1]))["logits"]).abs().max() > 1e-4


def test_no_priors_is_the_backbone_with_one_1x1_head_per_task():
    torch.manual_seed(0)
    net = _hermes(_plan(), n_tasks=3, n_modalities=2, priors="none").eval()
    assert len(net.fusion) == 0
    with torch.no_grad():
        net.task_bias.weight.normal_()
        x = torch.randn(2, 1, 32, 32)
        logits = net(x, torch.tensor([[2, 0], [1, 3]]), torch.tensor([0, 1]))["logits"]
        f = run_stages(net.backbone, x)
    for b, tasks in enumerate(([2, 0], [1, 3])):
        for j, t in enumerate(tasks):
            w, bias = net.task_weight.weight[t], net.task_bias.weight[t, 0]
            torch.testing.assert_close(logits[b, j], torch.einsum("chw,c->hw", f[b], w) + bias, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="priors must be one of"):
        _hermes(_plan(), n_tasks=3, n_modalities=2, priors="modality")


@pytest.mark.parametrize("priors", ["task+modality", "none"])
def test_prior_probability_starts_every_task_mostly_absent(priors):
    # RetinaNet's init: sigmoid of a fresh network's logits sits near the prior, not at 0.5 (which
    # cost the universal model hundreds of steps on ACDC's small classes)
    torch.manual_seed(0)
    x, ids, mod = torch.randn(2, 1, 32, 32), torch.tensor([[0, 1, 2], [2, 0, 1]]), torch.tensor([0, 1])
    with torch.no_grad():
        p = torch.sigmoid(_hermes(_plan(), 3, 2, priors=priors, prior_probability=0.01).eval()(x, ids, mod)["logits"])
        plain = torch.sigmoid(_hermes(_plan(), 3, 2, priors=priors).eval()(x, ids, mod)["logits"])
    assert 0.002 < float(p.median()) < 0.05
    assert 0.2 < float(plain.median()) < 0.8
    # records before the offset (priors, no prior_probability) build without it and load as they were
    assert not any("task_bias" in k for k in _hermes(_plan(), 3, 2).state_dict())


def _prototype_cosines(net, n_tasks: int, side: int) -> torch.Tensor:
    """Cosine similarity between the prototypes (task head output + anchor) of every pair of distinct tasks, for one image."""
    out = {}
    ids = torch.arange(n_tasks)[None]
    handle = net.task_head.register_forward_hook(lambda m, i, o: out.__setitem__("p", o))
    with torch.no_grad():
        net(torch.randn(1, 1, side, side), ids, torch.tensor([0]))
        p = out["p"][0] if net.task_weight is None else out["p"][0] + net.task_weight(ids[0])
    handle.remove()
    p = torch.nn.functional.normalize(p, dim=-1)
    return (p @ p.T)[~torch.eye(n_tasks, dtype=torch.bool)]


def test_task_anchors_start_every_task_in_its_own_direction():
    # Without anchors the prototypes come from tokens that start at 0.02 scale and read the same
    # image: every pair of tasks starts nearly parallel, so the classes of one label map begin as
    # one class. With anchors they start far apart. The planner's 6-level layout of a 128 px plan
    # and the recipe's fusion width: the deeper the net, the more fused scales, the more parallel.
    plan = _plan(filters=(16, 32, 64, 128, 256, 256), patch=128)
    torch.manual_seed(0)
    plain = _hermes(plan, n_tasks=4, n_modalities=2, fusion_width=64, prior_probability=0.01).eval()
    torch.manual_seed(0)
    anchored = _hermes(plan, n_tasks=4, n_modalities=2, fusion_width=64, prior_probability=0.01, task_anchors=True).eval()
    assert plain.task_weight is None and anchored.task_weight.weight.shape == (5, 16)
    assert _prototype_cosines(plain, 4, 128).min() > 0.85  # 0.93 measured
    assert _prototype_cosines(anchored, 4, 128).abs().mean() < 0.6  # 0.39 measured
    anchored = _hermes(_plan(), n_tasks=4, n_modalities=2, task_anchors=True).eval()
    # the anchor enters the logits: moving one task's anchor moves only that task's map
    x, ids, mod = torch.randn(2, 1, 32, 32), torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1])
    with torch.no_grad():
        before = anchored(x, ids, mod)["logits"]
        anchored.task_weight.weight[1] += 1.0
        after = anchored(x, ids, mod)["logits"]
    changed = (after - before).abs().flatten(2).amax(-1) > 1e-4
    assert changed.tolist() == [[False, True], [False, False]]


def _load_shared(src, dst) -> None:
    """Copy into ``dst`` (a no-priors net) the backbone, anchors and offsets of ``src``."""
    keys = dst.state_dict().keys()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in keys})


@pytest.mark.parametrize("width", [None, 16])
def test_identity_init_starts_as_the_no_priors_network_and_still_learns_its_priors(width):
    # with the fusion layers at identity and prototypes at their anchors, a fresh universal network
    # computes what the no-priors network with the same backbone, anchors and offsets computes
    torch.manual_seed(0)
    net = _hermes(_plan(), 3, 2, fusion_width=width, prior_probability=0.01, task_anchors=True, identity_init=True)
    plain = _hermes(_plan(), 3, 2, priors="none", prior_probability=0.01)
    _load_shared(net, plain)
    x, ids, mod = torch.randn(2, 1, 32, 32), torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1])
    out = net(x, ids, mod)
    torch.testing.assert_close(out["logits"], plain(x, ids, mod)["logits"], atol=1e-5, rtol=1e-5)
    # the zeroed output maps get gradients at once, so the priors are not dead weight
    out["logits"].square().mean().backward()
    for layer in net.fusion.values():
        zeroed = [layer.up] if layer.up is not None else [layer.blocks[0].feature_reads.out_proj, layer.blocks[0].feature_mlp[-1]]
        assert all(float(m.weight.grad.abs().sum()) > 0 for m in zeroed)
    assert float(net.task_head[-1].weight.grad.abs().sum()) > 0
    # one step later the priors act: the output now differs from the no-priors network's
    torch.optim.SGD(net.parameters(), lr=0.5).step()
    with torch.no_grad():
        moved = net(x, ids, mod)["logits"]
        _load_shared(net, plain)
        assert (moved - plain(x, ids, mod)["logits"]).abs().max() > 1e-3
    # without the flag a fresh network is not the no-priors one (random fusion output and task head, as before)
    torch.manual_seed(0)
    random = _hermes(_plan(), 3, 2, fusion_width=width, prior_probability=0.01, task_anchors=True)
    _load_shared(random, plain)
    with torch.no_grad():
        assert (random(x, ids, mod)["logits"] - plain(x, ids, mod)["logits"]).abs().max() > 1e-3


def test_prior_scale_keeps_fused_task_tokens_apart_and_leaves_the_identity_start():
    """At ViT's 0.02 a task token is swamped by what it reads from the image (fused tokens of three
    tasks at cosine ~0.6); at std 1 its identity survives the read. The scale changes no output of an
    identity-started network (the tokens only reach the output through zeroed maps)."""
    f = torch.randn(2, 128, 4, 4, generator=torch.Generator().manual_seed(1))
    task_ids, modality_ids = torch.tensor([[0, 1, 2], [3, 1, 0]]), torch.tensor([0, 1])

    def token_cosines(std: float) -> torch.Tensor:
        torch.manual_seed(0)
        layer = PriorFusionLayer(128, n_tasks=4, n_modalities=2, width=64, identity_init=True, prior_init_std=std)
        assert layer.bank.task.std().item() == pytest.approx(std, rel=0.3)
        out, tasks, _ = layer(f, task_ids, modality_ids)
        torch.testing.assert_close(out, f)
        t = torch.nn.functional.layer_norm(tasks, tasks.shape[-1:])
        cos = torch.nn.functional.cosine_similarity(t[:, :, None], t[:, None], dim=-1)
        return cos[:, [0, 0, 1], [1, 2, 2]]

    assert token_cosines(0.02).min() > 0.4
    assert token_cosines(1.0).abs().max() < 0.3


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Draw every parameter anew, LayerNorm affines and zero-started maps included: then every
    parameter, and which LayerNorm sits at which place, shows in the output (default LayerNorms
    are all the identity, so swapping two of them would change nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * noise)
            elif p.ndim == 1:
                p.copy_(0.3 * noise)
            else:
                p.copy_(noise * p.shape[-1] ** -0.5)
    return module


def _block_reference(block: BidirectionalFusion, f: torch.Tensor, p: torch.Tensor, padding: torch.Tensor | None = None):
    """The paper's order from the block's own parts: the priors read the image, then the features read the UPDATED priors."""
    p = p + block.prior_reads(block.norm_p1(p), block.norm_f1(f))
    p = p + block.prior_mlp(block.norm_p2(p))
    f = f + block.feature_reads(block.norm_f2(f), block.norm_p3(p), padding)
    f = f + block.feature_mlp(block.norm_f3(f))
    return f, p


def test_fusion_block_reads_the_image_into_the_priors_then_the_priors_into_the_features():
    torch.manual_seed(0)
    block = _randomise(BidirectionalFusion(64), seed=1).eval()
    f, p = torch.randn(2, 64, 3, 4), torch.randn(2, 5, 64)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 1] = True
    with torch.no_grad():
        out_f, out_p = block(f, p, padding)
        ref_f, ref_p = _block_reference(block, f.flatten(2).transpose(1, 2), p, padding)
    torch.testing.assert_close(out_p, ref_p)
    torch.testing.assert_close(out_f, ref_f.transpose(1, 2).reshape(f.shape))


def test_features_read_the_priors_after_the_priors_have_read_the_image():
    # Features never read one another, so one position can reach another only through the priors,
    # and only if the features read the priors after the image has been read into them: with the
    # reads swapped (or the features' read gone) the other positions could not see the change.
    torch.manual_seed(0)
    block = _randomise(BidirectionalFusion(32), seed=2).eval()
    f, p = torch.randn(1, 32, 3, 4), torch.randn(1, 6, 32)
    moved = f.clone()
    moved[0, :, 0, 0] += 2 * torch.randn(32)
    with torch.no_grad():
        out_f, out_p = block(f, p)
        new_f, new_p = block(moved, p)
        assert (new_p - out_p).abs().amax() > 1e-2  # the priors read the image
        others = (new_f - out_f).flatten(2)[0, :, 1:].abs().amax(0)  # every position but the moved one
        assert others.min() > 1e-3
        # the path is the features' read of the priors: without it the other positions are untouched
        torch.nn.init.zeros_(block.feature_reads.out_proj.weight)
        torch.nn.init.zeros_(block.feature_reads.out_proj.bias)
        cut = (block(moved, p)[0] - block(f, p)[0]).flatten(2)[0, :, 1:]
    torch.testing.assert_close(cut, torch.zeros_like(cut), rtol=0, atol=0)


@pytest.mark.parametrize("width", [None, 16])
def test_prior_fusion_layer_chains_its_blocks_between_down_and_up(width):
    torch.manual_seed(0)
    layer = _randomise(PriorFusionLayer(32, n_tasks=3, n_modalities=2, depth=2, tokens_per_modality=3, width=width), seed=3).eval()
    f = torch.randn(2, 32, 3, 3)
    task_ids, modality_ids = torch.tensor([[0, 2], [1, layer.bank.null_task]]), torch.tensor([1, 0])
    with torch.no_grad():
        out, tasks, modality = layer(f, task_ids, modality_ids)
        priors = torch.cat([layer.bank.task[task_ids], layer.bank.modality[modality_ids]], dim=1)
        padding = torch.cat([task_ids == layer.bank.null_task, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
        tokens = f.flatten(2).transpose(1, 2)
        z = tokens if layer.down is None else layer.down(tokens)
        fused = z
        for block in layer.blocks:  # each block reads the priors the previous one updated
            fused, priors = _block_reference(block, fused, priors, padding)
        expected = fused if layer.up is None else tokens + layer.up(fused - z)
    torch.testing.assert_close(out, expected.transpose(1, 2).reshape(f.shape))
    torch.testing.assert_close(tasks, priors[:, :2])
    torch.testing.assert_close(modality, priors[:, 2:])
    if layer.up is not None:
        # the residual is Up(z' - z): blocks that leave z alone leave f alone, whatever Up's weight is
        with torch.no_grad():
            torch.nn.init.zeros_(layer.up.bias)
            for block in layer.blocks:
                for m in (block.feature_reads.out_proj, block.feature_mlp[-1]):
                    torch.nn.init.zeros_(m.weight)
                    torch.nn.init.zeros_(m.bias)
        torch.testing.assert_close(layer(f, task_ids, modality_ids)[0], f)


def _fusion_recorder(net, ids, mod):
    """A stage hook that runs the network's fusion layers and keeps, per fused stage, its task
    tokens and its mean modality tokens (and the stage's name)."""
    tasks, modality, stages = [], [], []

    def fuse(stage, f):
        if stage not in net.fusion:
            return f
        f, t, m = net.fusion[stage](f, ids, mod)
        tasks.append(t)
        modality.append(m.mean(1))
        stages.append(stage)
        return f

    return fuse, tasks, modality, stages


def test_hermes_output_is_the_fused_backbone_dotted_with_task_prototypes():
    torch.manual_seed(0)
    net = _hermes(_plan(), n_tasks=3, n_modalities=2, tokens_per_modality=2, prior_probability=0.01, task_anchors=True).eval()
    x, ids, mod = torch.randn(2, 1, 32, 32), torch.tensor([[2, 0], [1, 3]]), torch.tensor([1, 0])
    fuse, tasks, modality, stages = _fusion_recorder(net, ids, mod)

    with torch.no_grad():
        net.task_bias.weight.normal_()
        out = net(x, ids, mod)
        f = run_stages(net.backbone, x, fuse)
        prototypes = net.task_head(torch.cat(tasks, dim=-1)) + net.task_weight(ids)
        logits = torch.einsum("bchw,btc->bthw", f, prototypes) + net.task_bias(ids)[..., None]
        modality_logits = net.modality_head(torch.cat(modality, dim=-1))
    assert stages == ["enc2", "bottleneck", "dec2"]
    torch.testing.assert_close(out["logits"], logits)
    torch.testing.assert_close(out["modality_logits"], modality_logits)


def test_each_samples_modality_tokens_condition_its_task_logits():
    # The modality reaches a task's map only through the features' read of the modality tokens
    # (task tokens read the image, never the other priors); each sample reads its own modality's.
    torch.manual_seed(0)
    net = _hermes(_plan(), n_tasks=3, n_modalities=2, prior_init_std=1.0).eval()
    x, ids = torch.randn(2, 1, 32, 32), torch.tensor([[0, 1], [2, 1]])
    with torch.no_grad():
        mixed, zero, one = (net(x, ids, torch.tensor(m)) for m in ([0, 1], [0, 0], [1, 1]))
    torch.testing.assert_close(mixed["logits"][0], zero["logits"][0])
    torch.testing.assert_close(mixed["logits"][1], one["logits"][1])
    torch.testing.assert_close(mixed["modality_logits"][0], zero["modality_logits"][0])
    torch.testing.assert_close(mixed["modality_logits"][1], one["modality_logits"][1])
    # everything else fixed, the other modality moves every task map of every sample
    assert ((zero["logits"] - one["logits"]).abs().flatten(2).amax(-1) > 1e-2).all()
    assert ((zero["modality_logits"] - one["modality_logits"]).abs().amax(-1) > 1e-2).all()


def test_each_task_slot_is_its_own_tasks_prototype_and_unrequested_tasks_are_inert():
    torch.manual_seed(0)
    # identity_init: the features do not read the priors, so a task token reaches only its own slot
    net = _hermes(_plan(), n_tasks=3, n_modalities=2, identity_init=True).eval()
    x, ids, mod = torch.randn(2, 1, 32, 32), torch.tensor([[0, 1], [1, 2]]), torch.tensor([0, 1])
    with torch.no_grad():
        before = net(x, ids, mod)["logits"]
        net.fusion["bottleneck"].bank.task[1] += torch.randn(64)
        after = net(x, ids, mod)["logits"]
    changed = (after - before).abs().flatten(2).amax(-1) > 1e-4
    assert changed.tolist() == [[False, True], [True, False]]
    # a task nobody asked for is not among the priors: its tokens change nothing anywhere
    torch.manual_seed(0)
    net = _hermes(_plan(), n_tasks=3, n_modalities=2).eval()
    ids = torch.tensor([[0, 1], [1, 0]])
    with torch.no_grad():
        before = net(x, ids, mod)
        for layer in net.fusion.values():
            layer.bank.task[2] += torch.randn(layer.width)
        after = net(x, ids, mod)
    torch.testing.assert_close(after["logits"], before["logits"], rtol=0, atol=0)
    torch.testing.assert_close(after["modality_logits"], before["modality_logits"], rtol=0, atol=0)


def test_num_heads_falls_back_to_the_largest_divisor_below_channels_over_32():
    # 100 channels: 3 heads would not divide, 2 do; 200: 6 -> 5 (not 7, 8 or 4)
    assert [num_heads(c) for c in (100, 112, 200, 224)] == [2, 2, 5, 7]
    block = BidirectionalFusion(100)
    assert block.prior_reads.heads == block.feature_reads.heads == 2


def test_cross_attention_matches_multihead_attention_with_trained_biases():
    # in_proj_bias starts at zero, so a fresh module cannot show whether the q and k/v biases are
    # applied; with every parameter drawn (as after training) it must still be nn.MultiheadAttention
    torch.manual_seed(0)
    ours = _randomise(CrossAttention(64, 2), seed=4)
    assert ours.in_proj_bias.abs().min() > 0
    reference = torch.nn.MultiheadAttention(64, 2, batch_first=True)
    reference.load_state_dict(ours.state_dict())
    q, kv = torch.randn(2, 9, 64), torch.randn(2, 5, 64)
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, :2] = True
    with torch.no_grad():
        expected = reference(q, kv, kv, key_padding_mask=padding, need_weights=False)[0]
        torch.testing.assert_close(ours(q, kv, padding), expected, rtol=1e-5, atol=1e-5)


def test_fusion_mlps_are_linear_gelu_linear_at_ratio_4():
    # the paper's MLP (ratio 4, GELU between the two maps), as the fusion layer builds it
    torch.manual_seed(0)
    layer = _randomise(PriorFusionLayer(32, n_tasks=2, n_modalities=2), seed=5)
    x = torch.randn(3, 7, 32)
    for mlp in (layer.blocks[0].prior_mlp, layer.blocks[0].feature_mlp):
        first, last = mlp[0], mlp[-1]
        assert (first.in_features, first.out_features, last.out_features) == (32, 128, 32)
        with torch.no_grad():
            expected = torch.nn.functional.gelu(x @ first.weight.T + first.bias) @ last.weight.T + last.bias
            torch.testing.assert_close(mlp(x), expected)


def test_prior_tables_start_at_the_requested_scale():
    # both tables (task and modality) are drawn at N(0, std^2), and build_hermes hands std down to every layer
    torch.manual_seed(0)
    bank = PriorBank(n_tasks=3, n_modalities=2, channels=64, tokens_per_modality=10, init_std=0.02)
    assert bank.task.std().item() == pytest.approx(0.02, rel=0.15)
    assert bank.modality.std().item() == pytest.approx(0.02, rel=0.15)
    for std in (0.02, 1.0):
        net = _hermes(_plan(), n_tasks=3, n_modalities=2, prior_init_std=std)
        for layer in net.fusion.values():
            assert layer.bank.task.std().item() == pytest.approx(std, rel=0.3)
            assert layer.bank.modality.std().item() == pytest.approx(std, rel=0.15)


@pytest.mark.parametrize("width", [None, 32, 64])
def test_full_width_fusion_layer_has_no_projections(width):
    # width >= channels: the blocks run on the features themselves (no Down/Up maps), and
    # identity_init zeroes the blocks' last feature maps
    torch.manual_seed(0)
    layer = PriorFusionLayer(32, n_tasks=3, n_modalities=2, width=width, identity_init=True)
    assert layer.width == 32 and layer.down is None and layer.up is None
    assert sum(p.numel() for p in layer.parameters()) == sum(p.numel() for m in (layer.bank, layer.blocks) for p in m.parameters())
    block = layer.blocks[0]
    assert all(int(torch.count_nonzero(m.weight)) == 0 for m in (block.feature_reads.out_proj, block.feature_mlp[-1]))


def test_build_hermes_hands_on_depth_scales_and_input_channels():
    torch.manual_seed(0)
    # fusion_scales=1 (the recipe's default): the bottleneck only, not the default three scales
    net = build_hermes(_plan().network, n_tasks=3, n_modalities=2, in_channels=2, depth=2, fusion_scales=1)
    assert net.fusion_stages == ["bottleneck"]
    assert all(len(layer.blocks) == 2 for layer in net.fusion.values())
    # the input's channels are in_channels
    out = net(torch.randn(1, 2, 32, 32), torch.tensor([[0]]), torch.tensor([0]))
    assert out["logits"].shape == (1, 1, 32, 32)
    # a HermesNet built without a stage list fuses at default_fusion_stages of its backbone
    backbone = build_unet(_plan().network, in_channels=1, out_channels=1)
    direct = HermesNet(backbone, [8, 16, 32, 64], n_tasks=3, n_modalities=2)
    assert direct.fusion_stages == ["enc2", "bottleneck", "dec2"]


def test_hermes_backbone_drops_deep_supervision_heads():
    # a shared network taken from an expert plan may carry deep supervision; its extra heads would
    # be parameters without gradients (DDP stalls on them)
    plan = _plan()
    plan = plan.model_copy(update={"network": plan.network.model_copy(update={"deep_supervision": True})})
    torch.manual_seed(0)
    net = _hermes(plan, n_tasks=3, n_modalities=2)
    assert not any("deep_supervision" in k for k in net.state_dict())
    out = net(torch.randn(1, 1, 32, 32), torch.tensor([[0, 1]]), torch.tensor([1]))
    (out["logits"].sum() + out["modality_logits"].sum()).backward()
    assert [n for n, p in net.named_parameters() if p.grad is None] == []


def test_task_and_modality_heads_are_layernorm_mlps():
    # prototype = Linear(GELU(Linear(LN(task tokens of every fused scale)))); modality logits =
    # Linear(LN(mean modality tokens of every fused scale)); checked with every parameter drawn
    torch.manual_seed(0)
    net = _hermes(_plan(), n_tasks=3, n_modalities=2, tokens_per_modality=2)
    _randomise(net.task_head, seed=6)
    _randomise(net.modality_head, seed=7)
    net.eval()
    x, ids, mod = torch.randn(2, 1, 32, 32), torch.tensor([[2, 0], [1, 3]]), torch.tensor([1, 0])
    fuse, tasks, modality, _ = _fusion_recorder(net, ids, mod)

    F = torch.nn.functional
    ln, fc1, fc2 = net.task_head[0], net.task_head[1], net.task_head[-1]
    mln, mfc = net.modality_head[0], net.modality_head[-1]
    assert isinstance(ln, torch.nn.LayerNorm) and isinstance(mln, torch.nn.LayerNorm)
    with torch.no_grad():
        out = net(x, ids, mod)
        f = run_stages(net.backbone, x, fuse)
        t, m = torch.cat(tasks, dim=-1), torch.cat(modality, dim=-1)
        d = t.shape[-1]
        prototypes = F.linear(F.gelu(F.linear(F.layer_norm(t, (d,), ln.weight, ln.bias), fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
        modality_logits = F.linear(F.layer_norm(m, (d,), mln.weight, mln.bias), mfc.weight, mfc.bias)
    assert fc1.weight.shape == (d, d) and fc2.weight.shape == (8, d)
    torch.testing.assert_close(out["logits"], torch.einsum("bchw,btc->bthw", f, prototypes))
    torch.testing.assert_close(out["modality_logits"], modality_logits)


def test_task_offsets_start_at_zero_without_priors_and_at_logit_p_with_them():
    torch.manual_seed(0)
    plain = _hermes(_plan(), n_tasks=3, n_modalities=2, priors="none")
    # one row per task plus the null task, as in a checkpoint
    assert plain.task_weight.weight.shape == (4, 8) and plain.task_bias.weight.shape == (4, 1)
    torch.testing.assert_close(plain.task_bias.weight, torch.zeros(4, 1), rtol=0, atol=0)
    prior = _hermes(_plan(), n_tasks=3, n_modalities=2, prior_probability=0.01)
    assert prior.task_bias.weight.shape == (4, 1)
    torch.testing.assert_close(prior.task_bias.weight, torch.full((4, 1), -4.59512), rtol=0, atol=1e-5)  # log(0.01 / 0.99)


def test_feature_tap_reads_the_fused_features_at_fused_stages():
    # distillation and amalgamation read a stage through FeatureTap: at a fused stage that is the
    # fusion layer's output (what the next block sees), not the backbone block's
    torch.manual_seed(0)
    net = _hermes(_plan(), n_tasks=3, n_modalities=2).eval()
    seen = {}
    hooks = [
        net.fusion["bottleneck"].register_forward_hook(lambda m, i, o: seen.__setitem__("fused", o[0])),
        net.backbone.bottleneck.register_forward_hook(lambda m, i, o: seen.__setitem__("raw", o)),
        net.backbone.downsamples[0].register_forward_hook(lambda m, i, o: seen.__setitem__("enc1", o)),
    ]
    with torch.no_grad(), FeatureTap(net, ["enc1", "bottleneck"]) as tap:
        net(torch.randn(2, 1, 32, 32), torch.tensor([[0, 1], [2, 0]]), torch.tensor([0, 1]))
    for h in hooks:
        h.remove()
    torch.testing.assert_close(tap.features["bottleneck"], seen["fused"], rtol=0, atol=0)
    assert (seen["fused"] - seen["raw"]).abs().max() > 1e-3
    torch.testing.assert_close(tap.features["enc1"], seen["enc1"], rtol=0, atol=0)
