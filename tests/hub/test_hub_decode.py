"""The hub decodes completions for scoring (rl/hub/texts.py): the same text as
`tokenizer.decode(ids, skip_special_tokens=...)`, special tokens included in the input, whether it
decodes through its byte table (byte-level BPE tokenizers) or the tokenizer's own decoder."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rl.hub import texts
from rl.hub.texts import TextDecoder


def _sequences(tokenizer, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = len(tokenizer)
    special = list(tokenizer.all_special_ids)
    sequences = [[rng.randrange(vocab) for _ in range(rng.randint(1, 64))] + special for _ in range(32)]
    return [*sequences, special, []]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_batch_decode_matches_decode(tiny_tokenizer, skip_special_tokens):
    decode = TextDecoder(tiny_tokenizer)
    assert decode.lengths is not None  # byte-level BPE: decoded through the table
    sequences = _sequences(tiny_tokenizer)
    expected = [tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]
    assert decode(sequences, skip_special_tokens=skip_special_tokens) == expected
    arrays = [np.array(ids, dtype=np.int32) for ids in sequences]  # what the hub keeps of a submission
    assert decode(arrays, skip_special_tokens=skip_special_tokens) == expected
    assert decode.slow(sequences, skip_special_tokens=skip_special_tokens) == expected


@pytest.fixture(scope="module")
def tiny_decoder(tiny_tokenizer) -> TextDecoder:
    return TextDecoder(tiny_tokenizer)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_table_decodes_any_sequence_as_the_tokenizer(tiny_tokenizer, tiny_decoder, data):
    """Any ids, in any order: characters split across tokens, lone continuation bytes, special tokens."""
    decode = tiny_decoder
    ids = data.draw(st.lists(st.integers(0, len(tiny_tokenizer) - 1), max_size=80))
    skip = data.draw(st.booleans())
    assert decode([ids], skip) == [tiny_tokenizer.decode(ids, skip_special_tokens=skip)]


def test_ids_past_the_tokenizer_decode_as_the_tokenizer_does(tiny_tokenizer):
    """A model's embedding may be padded past the tokenizer's vocabulary (Qwen2.5's is): such ids are
    left out, as the Rust decoder leaves them out."""
    decode = TextDecoder(tiny_tokenizer)
    ids = [5, len(tiny_tokenizer) + 7, 6]
    assert decode([ids], False) == decode.slow([ids], False) == [tiny_tokenizer.decode([5, 6])]
    with pytest.raises(ValueError, match="negative"):
        decode([[-1]])


def test_other_tokenizers_decode_with_their_own_decoder(tiny_model_dir, tmp_path):
    """A tokenizer that is not byte-level BPE (here a WordPiece decoder) is decoded by itself."""
    from tokenizers import decoders
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.backend_tokenizer.decoder = decoders.WordPiece()
    decode = TextDecoder(tok)
    assert decode.lengths is None
    sequences = _sequences(tok, seed=1)
    assert decode(sequences, False) == [tok.decode(ids, skip_special_tokens=False) for ids in sequences]


def test_a_table_that_disagrees_is_not_used(tiny_tokenizer, monkeypatch, caplog):
    """The table is proven against the tokenizer when built: a wrong one is refused, loudly."""
    right = texts._byte_of_char()
    wrong = {c: (b + 1) % 256 for c, b in right.items()}
    monkeypatch.setattr(texts, "_byte_of_char", lambda: wrong)
    with caplog.at_level(logging.WARNING, logger="rl.hub.texts"):
        decode = TextDecoder(tiny_tokenizer)
    assert decode.lengths is None and "does not decode as the tokenizer" in caplog.text
    sequences = _sequences(tiny_tokenizer)
    assert decode(sequences, False) == [tiny_tokenizer.decode(ids, skip_special_tokens=False) for ids in sequences]
