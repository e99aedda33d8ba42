"""HybridMED's network: the encoder is the expert U-Net's, the two decoder branches share all but
their cross-attention, decoding is causal."""

from __future__ import annotations

import pytest
import torch

from medalloy.errors import MedalloyError
from medalloy.models.features import FeatureTap
from medalloy.models.hybridmed import HybridMED
from medalloy.models.image_encoder import UNetEncoder, encoder_state, load_encoder_into
from medalloy.models.report_decoder import ReportDecoder
from medalloy.models.text_encoder import ScratchTextEncoder
from medalloy.models.unet import build_unet
from medalloy.planning.planner import plan_images_2d


@pytest.fixture(scope="module")
def plan():
    return plan_images_2d(32)


def test_encoder_is_the_expert_unet_encoder(plan):
    enc = UNetEncoder(plan.network, plan.in_channels, plan.num_classes)
    net = build_unet(plan.network, plan.in_channels, 2)
    state = enc.state_dict()
    assert set(state) == set(encoder_state(net.state_dict()))  # key for key
    assert load_encoder_into(net, state, "test") == len(state)
    x = torch.randn(2, 1, 32, 32)
    stages = ["enc0", "enc1", "enc2", "bottleneck"][-len(enc(x)) :]
    with FeatureTap(net, stages) as tap:
        net.eval()(x)
    feats = enc.eval()(x)
    for name, f in zip(stages, feats[-len(stages) :]):
        assert torch.allclose(tap.features[name], f, atol=1e-6), name


def test_encoder_of_another_plan_is_refused_naming_the_stage(plan):
    small = UNetEncoder(plan.network, plan.in_channels, plan.num_classes).state_dict()
    bigger = build_unet(plan_images_2d(64).network, plan.in_channels, 2)
    with pytest.raises(MedalloyError, match=r"stage 'enc\d|bottleneck"):
        load_encoder_into(bigger, small, "pre.safetensors")


def test_branches_share_self_attention_and_feed_forward():
    dec = ReportDecoder(vocab_size=20, width=16, layers=2, heads=2, max_len=8, dropout=0.0)
    for layer in dec.layers:
        assert set(layer.cross_attn) == {"caption", "summary"}
        assert layer.cross_attn["caption"] is not layer.cross_attn["summary"]
    tokens = torch.randint(1, 20, (2, 6))
    memory = torch.randn(2, 5, 16)
    logits, hidden = dec(tokens, memory, None, "caption")
    assert logits.shape == (2, 6, 20) and hidden.shape == (2, 6, 16)
    logits.square().mean().backward()
    layer = dec.layers[0]
    # one parameter object serves both branches: the captioning loss reaches the shared layers and
    # its own cross-attention, never the summarization branch's
    assert layer.self_attn.in_proj_weight.grad is not None and layer.ffn[0].weight.grad is not None
    assert layer.cross_attn["caption"].in_proj_weight.grad is not None
    assert layer.cross_attn["summary"].in_proj_weight.grad is None
    one_branch = sum(p.numel() for n, p in dec.named_parameters() if "summary" not in n)
    extra = sum(p.numel() for n, p in dec.named_parameters() if "summary" in n)
    assert extra == 2 * (4 * 16 * 16 + 4 * 16 + 2 * 16)  # per layer: attention in/out weights and biases, its LayerNorm
    assert one_branch + extra == sum(p.numel() for p in dec.parameters())


def test_decoder_is_causal_and_memory_padding_is_inert():
    torch.manual_seed(0)
    dec = ReportDecoder(vocab_size=20, width=16, layers=2, heads=2, max_len=8, dropout=0.0).eval()
    tokens = torch.randint(1, 20, (1, 6))
    memory = torch.randn(1, 4, 16)
    base, _ = dec(tokens, memory, None, "summary")
    changed = tokens.clone()
    changed[0, 4] = (changed[0, 4] % 19) + 1
    other, _ = dec(changed, memory, None, "summary")
    assert torch.allclose(base[:, :4], other[:, :4], atol=1e-6)
    assert not torch.allclose(base[:, 4:], other[:, 4:])
    padded = torch.cat([memory, torch.randn(1, 3, 16) * 50], 1)
    mask = torch.tensor([[True] * 4 + [False] * 3])
    with_pad, _ = dec(tokens, padded, mask, "summary")
    assert torch.allclose(base, with_pad, atol=1e-5)


def test_greedy_generation_stops_at_the_end_token():
    dec = ReportDecoder(vocab_size=6, width=8, layers=1, heads=2, max_len=8, dropout=0.0).eval()
    with torch.no_grad():
        dec.embed.weight.zero_()
        dec.embed.weight[3, 0] = 1.0  # hidden states all point along dim 0 after the final norm? force: bias the output to token 3
        for p in dec.layers.parameters():
            p.zero_()
        dec.norm.weight.zero_()
        dec.norm.bias.zero_()
        dec.norm.bias[0] = 1.0
    ids = dec.generate(torch.randn(2, 3, 8), None, "caption", bos_id=2, eos_id=3)
    assert ids.shape == (2, 1) and ids.eq(3).all()  # the end token at once, nothing after it


def test_hybridmed_outputs(plan):
    text = ScratchTextEncoder(vocab_size=30, width=16, layers=1, heads=2, max_len=12)
    model = HybridMED(
        plan.network, plan.in_channels, plan.num_classes, text, vocab_size=30, width=16, embed_dim=8, decoder_layers=1, heads=2, max_impression_len=6
    )
    images = torch.randn(3, 1, 32, 32)
    findings = torch.randint(4, 30, (3, 12))
    fmask = torch.ones_like(findings, dtype=torch.bool)
    impression = torch.randint(4, 30, (3, 6))
    out = model(images=images, findings=findings, findings_mask=fmask, impression=impression, impression_enc=impression, impression_enc_mask=impression > 0)
    n_tokens = sum((32 // 2**k) ** 2 for k in (2, 3))  # the last two stages: stride 4 and the bottleneck at stride 8
    assert out["image_global"].shape == (3, 8) and out["impression_global"].shape == (3, 8)
    assert out["patches"].shape == (3, n_tokens, 16) and out["words"].shape == (3, 12, 16)
    assert out["summary_logits"].shape == (3, 5, 30) and out["caption_logits"].shape == (3, 5, 30)
    only_global = model(images=images, impression_enc=impression, impression_enc_mask=impression > 0, parts=("global",))
    assert set(only_global) == {"image_global", "patches", "impression_global"}
