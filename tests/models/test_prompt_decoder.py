"""KA2ER's task decoders on their own (tiny widths, no network around them): the prompt decoder is
SAM's two-way layout written out step by step, and the plain head's per-task tables."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from medalloy.models.prompt_decoder import PlainTaskHead, PromptMaskDecoder


def _decoder() -> PromptMaskDecoder:
    """A tiny decoder as if trained: at initialisation every LayerNorm is the identity affine map
    (weight 1, bias 0), so using one norm for another, or dropping one, would go unseen."""
    torch.manual_seed(0)
    dec = PromptMaskDecoder(n_tasks=3, width=8, feature_channels=4, depth=2, heads=2)
    with torch.no_grad():
        for m in dec.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.5)
        dec.bias.weight.normal_(0, 1.0)
        dec.output_token.normal_(0, 1.0)
        dec.prompts.weight.normal_(0, 1.0)
    return dec.eval()


class _NoAttention(torch.nn.Module):
    def forward(self, q, k, v, **_):
        return torch.zeros_like(q), None


def _reference(dec: PromptMaskDecoder, image: torch.Tensor, features: torch.Tensor, task_ids: torch.Tensor) -> torch.Tensor:
    """The module docstring's recipe, one task at a time: [prompt, output token] and the image
    tokens attend to each other per block, a last tokens -> image attention, the output token
    through the hypernetwork is a 1x1 kernel on the features, plus the task's bias."""
    b, t = task_ids.shape
    logits = torch.zeros(b, t, *features.shape[2:])
    for i in range(b):
        for j in range(t):
            task = int(task_ids[i, j])
            toks = torch.stack([dec.prompts.weight[task], dec.output_token[0, 0]])[None]  # (1, 2, D)
            img = image[i : i + 1]
            for blk in dec.blocks:
                n0, n1, n2, n3 = blk.norms
                toks = n0(toks + blk.self_attn(toks, toks, toks)[0])
                toks = n1(toks + blk.to_image(toks, img, img)[0])
                first, last = blk.mlp[0], blk.mlp[-1]
                toks = n2(toks + last(F.gelu(first(toks))))
                img = n3(img + blk.to_tokens(img, toks, toks)[0])
            toks = dec.final_norm(toks + dec.final(toks, img, img)[0])
            kernel = dec.hyper[-1](F.gelu(dec.hyper[0](toks[0, 1])))  # the output token, not the prompt
            logits[i, j] = (features[i] * kernel.view(-1, *[1] * (features.ndim - 2))).sum(0) + dec.bias.weight[task, 0]
    return logits


def test_the_prompt_decoder_is_the_two_way_layout_step_by_step():
    dec = _decoder()
    g = torch.Generator().manual_seed(1)
    image, features = 3 * torch.randn(2, 6, 8, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    task_ids = torch.tensor([[0, 2], [1, dec.prompts.num_embeddings - 1]])  # the null task decodes like any other
    with torch.no_grad():
        out = dec(image, features, task_ids)
        ref = _reference(dec, image, features, task_ids)
    assert out.shape == (2, 2, 3, 5) and len(dec.blocks) == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # no step of the reference is matched by accident of adding nothing: each attention of the first
    # block and the final one, taken out, moves the logits (their spread is ~1) by a clear margin
    for name in ("blocks.0.self_attn", "blocks.0.to_image", "blocks.0.to_tokens", "final"):
        cut = copy.deepcopy(dec)
        parent, _, attr = name.rpartition(".")
        setattr(cut.get_submodule(parent) if parent else cut, attr, _NoAttention())
        with torch.no_grad():
            moved = (cut(image, features, task_ids) - out).abs().max()
        assert moved > 0.04, name  # measured 0.06-0.69


def test_the_plain_head_has_one_row_per_task_and_the_null_task_at_unit_logit_scale():
    torch.manual_seed(0)
    head = PlainTaskHead(n_tasks=7, feature_channels=64, prior_logit=-4.6)
    # rows 0..6 for the tasks and row 7 for the null task that pads task lists: checkpoints of this
    # layout load into the network a registry of 7 tasks builds
    assert head.weight.weight.shape == (8, 64) and head.bias.weight.shape == (8, 1)
    # std 1/sqrt(C): an initial kernel <w, z> on unit-variance features has unit variance, whatever C
    std = float(head.weight.weight.detach().std())
    assert abs(std - 64**-0.5) < 0.1 * 64**-0.5, std
    torch.testing.assert_close(head.bias.weight, torch.full((8, 1), -4.6))
    z = torch.randn(2, 64, 3, 3, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[3, 0], [7, 3]])
    with torch.no_grad():
        out = head(z, ids)
    for i in range(2):
        for j in range(2):
            ref = (z[i] * head.weight.weight[ids[i, j]][:, None, None]).sum(0) - 4.6
            torch.testing.assert_close(out[i, j], ref, atol=1e-5, rtol=1e-5)


def test_the_prompt_decoder_starts_from_small_tokens_and_one_row_per_task():
    torch.manual_seed(0)
    dec = PromptMaskDecoder(n_tasks=7, width=64, feature_channels=4, prior_logit=-4.6)
    # a prompt per task plus the null task that pads task lists (the network's null_task is n_tasks)
    assert dec.prompts.weight.shape == (8, 64) and dec.bias.weight.shape == (8, 1)
    torch.testing.assert_close(dec.bias.weight.detach(), torch.full((8, 1), -4.6))
    # SAM's / ViT's 0.02 for learned tokens: the prompts are also the amalgamation's task
    # condition, added to unit-scale LayerNorm inputs, where they start as a nudge, not a takeover
    assert dec.output_token.shape == (1, 1, 64)
    for name, w in (("prompts", dec.prompts.weight), ("output token", dec.output_token)):
        assert 0.015 < float(w.detach().std()) < 0.025, name
