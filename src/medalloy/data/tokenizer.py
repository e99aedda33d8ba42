"""Report text to token ids and back (Hugging Face ``tokenizers``).

Without a packaged language model, medalloy learns a word vocabulary from the reports
themselves (lower-cased, BERT-style pre-tokenisation); the vocabulary travels inside the checkpoint
as JSON, never as a pickle. A packaged model (MiniLM) brings its own ``tokenizer.json``.

Sequences are ``[BOS] tokens [EOS]`` padded with ``[PAD]`` (id 0 in both kinds) to a fixed length,
so batches are dense tensors; the mask is True on real tokens.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from medalloy.errors import MedalloyError

SPECIAL = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
_PUNCT_BEFORE = re.compile(r" ([.,;:!?)%])")
_PUNCT_AFTER = re.compile(r"([(]) ")


class TextTokenizer:
    """A ``tokenizers.Tokenizer`` with the ids medalloy needs (pad, begin, end of sequence)."""

    def __init__(self, tokenizer: Tokenizer, pad: str = "[PAD]", bos: str = "[BOS]", eos: str = "[EOS]"):
        self.tokenizer = tokenizer
        ids = {name: tokenizer.token_to_id(name) for name in (pad, bos, eos)}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise MedalloyError(f"tokenizer lacks the special token(s) {missing}", fix="use a tokenizer trained by medalloy or a BERT tokenizer.json")
        self.pad_id, self.bos_id, self.eos_id = ids[pad], ids[bos], ids[eos]
        self.special_names = (pad, bos, eos)
        if self.pad_id != 0:
            raise MedalloyError(f"tokenizer's padding id is {self.pad_id}, not 0", fix="use a tokenizer whose [PAD] is id 0")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (N, max_len) int64, mask (N, max_len) bool)``: ``[BOS] text [EOS]``, cut to ``max_len``
        (the end token is kept when a text is cut, so every sequence ends)."""
        if max_len < 3:
            raise ValueError("max_len must leave room for [BOS], a token and [EOS]")
        ids = torch.zeros(len(texts), max_len, dtype=torch.long)
        for i, enc in enumerate(self.tokenizer.encode_batch(list(texts), add_special_tokens=False)):
            body = enc.ids[: max_len - 2]
            seq = [self.bos_id, *body, self.eos_id]
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return ids, ids != self.pad_id

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of one sequence, stopping at the first end token; special tokens dropped."""
        out = []
        for t in ids.tolist() if isinstance(ids, torch.Tensor) else ids:
            if t == self.eos_id:
                break
            if t not in (self.pad_id, self.bos_id):
                out.append(int(t))
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return _PUNCT_AFTER.sub(r"\1", _PUNCT_BEFORE.sub(r"\1", text))  # word-level decoding spaces every token

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @classmethod
    def from_json(cls, text: str, special: Sequence[str] = ("[PAD]", "[BOS]", "[EOS]")) -> TextTokenizer:
        try:
            tok = Tokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises its own exception type
            raise MedalloyError(f"not a tokenizer JSON ({str(exc).splitlines()[0][:80]})", fix="use the checkpoint of a medalloy pretraining run") from None
        return cls(tok, *special)

    @classmethod
    def from_file(cls, path: str | Path, special: Sequence[str] = ("[PAD]", "[BOS]", "[EOS]")) -> TextTokenizer:
        path = Path(path)
        if not path.is_file():
            raise MedalloyError("tokenizer file not found", path, "reinstall the package that ships it")
        return cls.from_json(path.read_text(encoding="utf-8"), special)


def minilm_tokenizer(model_dir: Path) -> TextTokenizer:
    """MiniLM's own (BERT WordPiece) tokenizer from the folder of the packaged model
    (:func:`medalloy.models.text_encoder.minilm_dir`: data may not import models, so the caller finds it)."""
    return TextTokenizer.from_file(Path(model_dir) / "tokenizer.json", special=("[PAD]", "[CLS]", "[SEP]"))


def train_report_tokenizer(texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2) -> TextTokenizer:
    """A lower-cased word vocabulary of at most ``vocab_size`` entries learnt from ``texts``: the
    words seen at least ``min_frequency`` times, most frequent first (ties alphabetical), others
    ``[UNK]``. Counted here rather than by ``tokenizers``' trainers, whose tie-breaking changes from
    one process to the next (the same reports gave different WordPiece vocabularies), so a seed
    fixes the vocabulary as it fixes everything else."""
    from collections import Counter

    tok = Tokenizer(models.WordLevel(vocab={name: i for i, name in enumerate(SPECIAL)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        words = tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))
        counts.update(w for w, _span in words)
    ranked = sorted((w for w, c in counts.items() if c >= min_frequency and w not in SPECIAL), key=lambda w: (-counts[w], w))
    vocab = {name: i for i, name in enumerate(SPECIAL)}
    for word in ranked[: max(0, vocab_size - len(SPECIAL))]:
        vocab[word] = len(vocab)
    tok.model = models.WordLevel(vocab=vocab, unk_token="[UNK]")
    return TextTokenizer(tok)
