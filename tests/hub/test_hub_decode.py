"""The hub decodes completions for scoring through the Rust tokenizer in one batch call: same text as
`tokenizer.decode(ids, skip_special_tokens=...)`, special tokens included in the input."""

from __future__ import annotations

import random

import pytest

from rl.hub.service import decode_texts


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_batch_decode_matches_decode(tiny_tokenizer, skip_special_tokens):
    rng = random.Random(0)
    vocab = len(tiny_tokenizer)
    special = list(tiny_tokenizer.all_special_ids)
    sequences = [[rng.randrange(vocab) for _ in range(rng.randint(1, 64))] + special for _ in range(32)]
    sequences.append(special)
    expected = [tiny_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in sequences]
    assert decode_texts(tiny_tokenizer, sequences, skip_special_tokens=skip_special_tokens) == expected
