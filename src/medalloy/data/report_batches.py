"""Batches of image-report pairs for pretraining (:mod:`medalloy.recipes.pretrain`): reports
tokenised once (:class:`TextSet`), images cached once (:func:`cache_images`), and seeded batches
drawn from them (:class:`PairBatches`), each cut to its longest sequence.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from medalloy.data.radiograph import augment_batch, load_radiograph
from medalloy.data.reports import ReportPair
from medalloy.data.tokenizer import TextTokenizer
from medalloy.seeding import step_rng


@dataclass
class TextSet:
    """Tokenised findings ``(N, max_findings_len)`` and impressions ``(N, max_impression_len)`` of N
    reports, with their masks; ``*_key`` ``(N,)`` are the texts compared for "the same report"
    (identical texts are positives, not negatives, in the contrastive losses)."""

    findings: torch.Tensor
    findings_mask: torch.Tensor
    impression: torch.Tensor
    impression_mask: torch.Tensor
    findings_key: np.ndarray
    impression_key: np.ndarray

    def __len__(self) -> int:
        return int(self.findings.shape[0])


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def encode_reports(pairs: list[ReportPair], enc_tok: TextTokenizer, dec_tok: TextTokenizer, max_findings_len: int, max_impression_len: int) -> TextSet:
    """Findings as the text encoder reads them (``enc_tok``), impressions as the decoder writes them (``dec_tok``)."""
    f, fm = enc_tok.encode([p.findings for p in pairs], max_findings_len)
    i, im = dec_tok.encode([p.impression for p in pairs], max_impression_len)
    return TextSet(f, fm, i, im, np.array([_key(p.findings) for p in pairs]), np.array([_key(p.impression) for p in pairs]))


def encode_impressions(texts: list[str], tok: TextTokenizer, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts as the global branch sees them (the text encoder's tokenizer): ids and mask ``(N, max_len)``."""
    return tok.encode(texts, max_len)


def cache_images(pairs: list[ReportPair], size: int, desc: str, progress: bool) -> torch.Tensor:
    """Every pair's radiograph, ``(N, 1, size, size)`` float32 (:func:`~medalloy.data.radiograph.load_radiograph`)."""
    out = np.zeros((len(pairs), 1, size, size), dtype=np.float32)
    for k, p in enumerate(tqdm(pairs, desc=desc, unit="image", disable=not progress, leave=False)):
        out[k] = load_radiograph(p.image, size)
    return torch.from_numpy(out)


def _used(mask: torch.Tensor) -> int:
    """Columns up to the longest sequence of a batch (at least 2: a begin and an end token)."""
    return max(2, int(mask.sum(1).max()))


def _positives(keys: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(keys[:, None] == keys[None, :])


class PairBatches:
    """Batch ``step`` of ``batch`` reports drawn without replacement from a seeded generator of
    ``(seed, step, rank)``; images (if any) augmented by the same generator."""

    def __init__(
        self,
        texts: TextSet,
        images: torch.Tensor | None,
        batch: int,
        seed: int,
        tag: str,
        augment: bool,
        impression_enc: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        self.texts, self.images, self.batch, self.seed, self.tag, self.augment = texts, images, min(batch, len(texts)), seed, tag, augment
        self.impression_enc = impression_enc

    def take(self, idx: np.ndarray, rng: np.random.Generator | None) -> dict[str, Any]:
        """The reports ``idx``: token ids and masks ``(b, T)``, ``same_*`` ``(b, b)``, images ``(b, 1, H, W)``."""
        t = torch.from_numpy(idx)
        fm, im = self.texts.findings_mask[t], self.texts.impression_mask[t]
        nf, ni = _used(fm), _used(im)  # padding every batch shares costs attention for nothing: cut it
        out: dict[str, Any] = {
            "findings": self.texts.findings[t, :nf],
            "findings_mask": fm[:, :nf],
            "impression": self.texts.impression[t, :ni],
            "impression_mask": im[:, :ni],
            "same_findings": _positives(self.texts.findings_key[idx]),
            "same_impression": _positives(self.texts.impression_key[idx]),
        }
        if self.impression_enc is not None:
            em = self.impression_enc[1][t]
            ne = _used(em)
            out["impression_enc"], out["impression_enc_mask"] = self.impression_enc[0][t, :ne], em[:, :ne]
        if self.images is not None:
            img = self.images[t]
            out["images"] = augment_batch(img, rng) if (self.augment and rng is not None) else img
        return out

    def __call__(self, step: int, dist: Any) -> dict[str, Any]:
        rng = step_rng(self.seed, self.tag, step, dist.rank)
        return self.take(rng.choice(len(self.texts), self.batch, replace=False), rng)

    def chunks(self) -> Iterator[dict[str, Any]]:
        """The whole set in order, unaugmented, in batches (validation)."""
        for s in range(0, len(self.texts), self.batch):
            yield self.take(np.arange(s, min(s + self.batch, len(self.texts))), None)
