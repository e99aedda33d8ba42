"""Token-level image patch <-> report word alignment (GLoRIA, Huang et al. ICCV 2021; MGCA, Wang et
al. NeurIPS 2022), as HybridMED's patch <-> findings-word alignment (arXiv 2410.00448), in both directions.

Patch embeddings ``V (B, P, D)``, word embeddings ``E (B, W, D)``, ``word_mask (B, W)`` bool (True for
a real token; padded slots have no effect at all). For every image ``i`` and report ``j``:

Word -> patch: each real word ``w`` of report ``j`` attends over the patches ``v`` of image ``i``::

    a_wv   = softmax_v(cos(w, v) / attn_temperature)             (gamma1 = 1 / attn_temperature)
    c_w    = sum_v a_wv v                                        (the patches' embeddings as given)
    r_w    = cos(c_w, w)
    S(i, j) = agg_temperature * log sum_{w real} exp(r_w / agg_temperature)      (gamma2 = 1 / agg_temperature)

Patch -> word: the same with the roles swapped, each patch ``v`` of image ``i`` attending over the
real words of report ``j``, aggregated over the patches of ``i``::

    a_vw = softmax_{w real}(cos(v, w) / attn_temperature),  c_v = sum_w a_vw w,  r_v = cos(c_v, v)
    S'(i, j) = agg_temperature * log sum_v exp(r_v / agg_temperature)

Each ``(B, B)`` score matrix gives a symmetric InfoNCE with logits ``S / temperature``
(``gamma3 = 1 / temperature``; :func:`~medalloy.losses.global_contrastive.symmetric_info_nce`, with
the same optional soft ``positives (B, B)``)::

    loss = 0.5 * (InfoNCE(S / temperature) + InfoNCE(S' / temperature))

``scope="pair"`` (MGCA's cross-modal token alignment, Wang et al. NeurIPS 2022, without its
learned projections and word weights: medalloy's choice): tokens are contrasted only within a
matched image-report pair, so the cost is ``O(B W P)`` instead of ``O(B^2 W P)``. In pair ``b``, with
the contexts ``c_w`` (word -> patch) and ``c_v`` (patch -> word) as above::

    L_ww' = cos(w, c_w') / temperature      over the real words w, w' of report b    (W_b, W_b)
    L_vv' = cos(v, c_v') / temperature      over the patches v, v' of image b        (P, P)
    loss_b = 0.5 * (CE_sym(L_ww') + CE_sym(L_vv'))

where ``CE_sym(L) = 0.5 * (mean_i -log softmax_j(L)_ii + mean_j -log softmax_i(L)_jj)`` (each token
must pick its own context among the pair's, and each context its own token); the loss is the mean
of ``loss_b`` over the batch, each pair counting once whatever its length. ``positives`` do not
apply (no report is contrasted with another).

Vectorised over all ``(i, j)`` pairs: the largest intermediates are ``(B, B, W, P)``. The context
vectors are never materialised (that would be ``(B, B, W, D)``): ``c . w = sum_v a_wv (v . w)`` and
``|c|^2 = a^T G a`` with the Gram matrix ``G = V_i V_i^T (P, P)`` (``E_j E_j^T`` for patch -> word).
Computed in float32 (float64 inputs stay float64), outside autocast. Every report needs at least
one real word (``ValueError`` otherwise).
"""

from __future__ import annotations

import torch
from torch import nn

from medalloy.losses.global_contrastive import symmetric_info_nce

_EPS = 1e-8


def _working_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


class TokenAlignmentLoss(nn.Module):
    """``(patches (B, P, D), words (B, W, D), word_mask (B, W) bool[, positives (B, B) bool]) -> scalar``."""

    def __init__(self, attn_temperature: float = 0.25, agg_temperature: float = 0.2, temperature: float = 0.1, scope: str = "batch"):
        super().__init__()
        if scope not in ("batch", "pair"):
            raise ValueError(f"scope must be 'batch' or 'pair', not {scope!r}")
        self.scope = scope
        for name, value in (("attn_temperature", attn_temperature), ("agg_temperature", agg_temperature), ("temperature", temperature)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        self.attn_temperature = attn_temperature
        self.agg_temperature = agg_temperature
        self.temperature = temperature

    @staticmethod
    def _check(patches: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> None:
        b, p, d = patches.shape
        if words.ndim != 3 or words.shape[0] != b or words.shape[2] != d:
            raise ValueError(f"patches {tuple(patches.shape)} and words {tuple(words.shape)} must be (B, P, D) and (B, W, D)")
        if word_mask.shape != words.shape[:2] or word_mask.dtype != torch.bool:
            raise ValueError(f"word_mask must be a bool tensor of shape {tuple(words.shape[:2])}, got {word_mask.dtype} {tuple(word_mask.shape)}")
        if not bool(word_mask.any(1).all()):
            raise ValueError("every report needs at least one real word in word_mask")

    def scores(self, patches: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pair scores ``(S, S')``, each ``(B_images, B_reports)``: word -> patch and patch -> word."""
        self._check(patches, words, word_mask)
        with torch.autocast(device_type=patches.device.type, enabled=False):
            dtype = _working_dtype(patches, words)
            v = patches.to(dtype)
            # padded slots zeroed (so even non-finite padding cannot leak in) and masked below
            e = torch.where(word_mask[..., None], words.to(dtype), 0.0)
            v_norm = v.norm(dim=-1).clamp_min(_EPS)  # (B, P)
            e_norm = e.norm(dim=-1).clamp_min(_EPS)  # (B, W)
            dot = torch.einsum("ipd,jwd->ijwp", v, e)  # (B_i, B_j, W, P): v_ip . e_jw
            cos = dot / (e_norm[None, :, :, None] * v_norm[:, None, None, :])
            pad = ~word_mask[None, :, :, None]  # (1, B_j, W, 1)

            # word -> patch: attention over the patches of i (dim -1), aggregated over the real words of j
            a = torch.softmax(cos / self.attn_temperature, dim=-1)  # (B_i, B_j, W, P)
            c_dot_w = (a * dot).sum(-1)  # (B_i, B_j, W)
            gram_v = torch.einsum("ipd,iqd->ipq", v, v)  # (B_i, P, P)
            c_sq = (torch.matmul(a, gram_v[:, None]) * a).sum(-1)  # |c_w|^2, (B_i, B_j, W)
            r_w = c_dot_w / (c_sq.clamp_min(_EPS * _EPS).sqrt() * e_norm[None])
            r_w = r_w.masked_fill(pad[..., 0], float("-inf"))
            s_word = self.agg_temperature * torch.logsumexp(r_w / self.agg_temperature, dim=-1)  # (B_i, B_j)

            # patch -> word: attention over the real words of j (dim -2), aggregated over the patches of i
            a = torch.softmax((cos / self.attn_temperature).masked_fill(pad, float("-inf")), dim=-2)  # (B_i, B_j, W, P)
            c_dot_v = (a * dot).sum(-2)  # (B_i, B_j, P)
            gram_e = torch.einsum("jwd,jud->jwu", e, e)  # (B_j, W, W)
            at = a.transpose(-1, -2)  # (B_i, B_j, P, W)
            c_sq = (torch.matmul(at, gram_e[None]) * at).sum(-1)  # |c_v|^2, (B_i, B_j, P)
            r_v = c_dot_v / (c_sq.clamp_min(_EPS * _EPS).sqrt() * v_norm[:, None])
            s_patch = self.agg_temperature * torch.logsumexp(r_v / self.agg_temperature, dim=-1)  # (B_i, B_j)
        return s_word, s_patch

    def pair_loss(self, patches: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
        """``scope="pair"``: ``(B,)``, each matched pair's token contrast (module docstring)."""
        self._check(patches, words, word_mask)
        with torch.autocast(device_type=patches.device.type, enabled=False):
            dtype = _working_dtype(patches, words)
            v = torch.nn.functional.normalize(patches.to(dtype), dim=-1, eps=_EPS)
            real_words = torch.where(word_mask[..., None], words.to(dtype), 0.0)  # padded slots zeroed, as in scores()
            e = torch.nn.functional.normalize(real_words, dim=-1, eps=_EPS)
            cos = e @ v.transpose(1, 2)  # (B, W, P)
            pad = ~word_mask  # (B, W)
            # contexts from the given (unnormalised) embeddings, as in scores(); only their direction counts below
            c_word = torch.softmax(cos / self.attn_temperature, dim=-1) @ patches.to(dtype)  # (B, W, D)
            a = torch.softmax((cos / self.attn_temperature).masked_fill(pad[..., None], float("-inf")), dim=1)  # (B, W, P) over real words
            c_patch = a.transpose(1, 2) @ real_words  # (B, P, D)
            lw = e @ torch.nn.functional.normalize(c_word, dim=-1, eps=_EPS).transpose(1, 2) / self.temperature  # (B, W, W')
            lp = v @ torch.nn.functional.normalize(c_patch, dim=-1, eps=_EPS).transpose(1, 2) / self.temperature  # (B, P, P')
            n_words = word_mask.sum(1).to(dtype)
            # a softmax runs over real words only; a padded word's own row or column is dropped after
            rows = -torch.log_softmax(lw.masked_fill(pad[:, None, :], float("-inf")), -1).diagonal(dim1=1, dim2=2)
            cols = -torch.log_softmax(lw.masked_fill(pad[:, :, None], float("-inf")), -2).diagonal(dim1=1, dim2=2)
            rows, cols = (torch.where(pad, 0.0, x).sum(1) / n_words for x in (rows, cols))
            word_part = 0.5 * (rows + cols)
            patch_part = 0.5 * (-torch.log_softmax(lp, -1).diagonal(dim1=1, dim2=2).mean(1) - torch.log_softmax(lp, -2).diagonal(dim1=1, dim2=2).mean(1))
        return 0.5 * (word_part + patch_part)

    def forward(self, patches: torch.Tensor, words: torch.Tensor, word_mask: torch.Tensor, positives: torch.Tensor | None = None) -> torch.Tensor:
        if self.scope == "pair":
            return self.pair_loss(patches, words, word_mask).mean()
        s_word, s_patch = self.scores(patches, words, word_mask)
        return 0.5 * (symmetric_info_nce(s_word / self.temperature, positives) + symmetric_info_nce(s_patch / self.temperature, positives))
