"""The report vocabulary: fixed by its texts (not by the process), dense padded ids, round trips."""

from __future__ import annotations

import subprocess
import sys

import pytest

from medalloy.data.tokenizer import TextTokenizer, train_report_tokenizer
from medalloy.errors import MedalloyError

TEXTS = ["No acute disease.", "Heart size is normal. No effusion.", "Small left effusion.", "Heart is enlarged.", "No effusion, no pneumothorax."] * 2


def test_vocabulary_by_frequency_then_alphabet():
    tok = train_report_tokenizer(TEXTS, vocab_size=100, min_frequency=2)
    vocab = tok.tokenizer.get_vocab()
    assert [w for w, _ in sorted(vocab.items(), key=lambda kv: kv[1])][:4] == ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    assert vocab["."] < vocab["no"] < vocab["effusion"]  # counts 12, 8, 6
    assert vocab["heart"] < vocab["is"]  # 4 each: ties alphabetical
    assert "disease" in vocab  # lower-cased, seen twice
    small = train_report_tokenizer(TEXTS, vocab_size=6)
    assert small.vocab_size == 6


def test_same_vocabulary_in_another_process():
    code = "from medalloy.data.tokenizer import train_report_tokenizer as t; import sys; sys.stdout.write(t(" + repr(TEXTS) + ", 50).to_json())"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(outs) == 1 and outs == {train_report_tokenizer(TEXTS, 50).to_json()}


def test_encode_pads_and_keeps_the_end_token():
    tok = train_report_tokenizer(TEXTS, vocab_size=100)
    ids, mask = tok.encode(["Heart is enlarged.", "No acute disease."], max_len=8)
    assert ids.shape == (2, 8) and ids[0, 0] == tok.bos_id
    assert ids[0].tolist()[:6] == [tok.bos_id, *tok.tokenizer.encode("Heart is enlarged.", add_special_tokens=False).ids, tok.eos_id]
    assert mask[0].tolist() == [True] * 6 + [False] * 2 and ids[0, 6:].eq(0).all()
    cut, cmask = tok.encode(["No effusion, no pneumothorax. Heart is enlarged."], max_len=5)
    assert cut[0, -1] == tok.eos_id and cmask.all()
    assert tok.decode(ids[0]) == "heart is enlarged."
    assert tok.decode(tok.encode(["Dog barks."], 8)[0][0]) == "[UNK] [UNK]."  # unseen words
    with pytest.raises(ValueError):
        tok.encode(["x"], 2)


def test_json_round_trip_and_bad_json():
    tok = train_report_tokenizer(TEXTS, vocab_size=100)
    again = TextTokenizer.from_json(tok.to_json())
    assert again.encode(TEXTS, 12)[0].equal(tok.encode(TEXTS, 12)[0])
    with pytest.raises(MedalloyError, match="not a tokenizer JSON"):
        TextTokenizer.from_json("{broken")
