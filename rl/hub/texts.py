"""Token ids -> text, as the run's tokenizer decodes them, at a fraction of the Rust decoder's cost.

The hub decodes every completion it scores (8 per group, up to 1k tokens each): in a profile of the
hub at saturation, `decode_batch` was the largest single cost (docs/benchmarks.md). For byte-level BPE
tokenizers (GPT-2's scheme: SmolLM, Qwen, Llama 3, ...) a decode is the tokens' bytes joined and read as
UTF-8 (invalid bytes replaced), so it is one array gather from a buffer of every token's bytes, computed
once from the tokenizer itself. The table is proven against the tokenizer when it is
built (every id, in both modes, plus sequences that split characters across tokens); a tokenizer it does
not match, or of another kind, is decoded by its own Rust decoder as before.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import cache

import numpy as np

log = logging.getLogger(__name__)


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (`bytes_to_unicode`), reversed: char -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class TextDecoder:
    """`tokenizer.decode(ids, skip_special_tokens=...)` for many sequences at once (`__call__`)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        if self.backend is not None and getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self.backend = None  # transformers cleans the text after the backend: decode through it
        self.flat = np.zeros(0, dtype=np.uint8)
        """Every token's bytes, one after another; token i's are `flat[starts[i] : starts[i] + lengths[...][i]]`."""
        self.starts = np.zeros(0, dtype=np.int64)
        self.lengths: dict[bool, np.ndarray] | None = self._tables()
        """By `skip_special_tokens`: each token's byte count (special tokens 0 when skipped); None: no table."""

    def __call__(self, sequences: Sequence[Sequence[int] | np.ndarray], skip_special_tokens: bool = True) -> list[str]:
        if self.lengths is None:
            return self.slow(sequences, skip_special_tokens)
        arrays = [np.asarray(ids, dtype=np.int64) for ids in sequences]
        if not arrays:
            return []
        ids = np.concatenate(arrays)
        if ids.size and ids.min() < 0:
            raise ValueError("negative token id")
        if ids.size and ids.max() >= len(self.starts):  # the model's vocabulary may be padded past the tokenizer's
            pad = int(ids.max()) + 1 - len(self.starts)
            self.starts = np.concatenate([self.starts, np.zeros(pad, dtype=np.int64)])
            self.lengths = {k: np.concatenate([v, np.zeros(pad, dtype=np.int64)]) for k, v in self.lengths.items()}
        # Every sequence's bytes in one gather: token k's bytes go to ends[k] - lengths[k] .. ends[k].
        lengths = self.lengths[skip_special_tokens][ids]
        ends = np.cumsum(lengths)
        total = int(ends[-1]) if ends.size else 0
        raw = self.flat[np.arange(total) + np.repeat(self.starts[ids] - (ends - lengths), lengths)].tobytes()
        bounds = np.concatenate([[0], ends])[np.cumsum([0, *map(len, arrays)])].tolist()
        return [raw[a:b].decode("utf-8", "replace") for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def slow(self, sequences, skip_special_tokens: bool = True) -> list[str]:
        """The tokenizer's own decode: in one call to the Rust tokenizer where there is one (transformers'
        decode first copies every id through Python)."""
        lists = [ids.tolist() if isinstance(ids, np.ndarray) else list(ids) for ids in sequences]
        if self.backend is not None:
            return self.backend.decode_batch(lists, skip_special_tokens=skip_special_tokens)
        return [self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) for ids in lists]

    def _tables(self) -> dict[bool, np.ndarray] | None:
        """Each id's byte count (special tokens 0 in the `True` table), its bytes in `flat`; None where the
        tokenizer is not byte-level BPE or the tables do not decode exactly as it does."""
        be = self.backend
        if be is None or json.loads(be.to_str()).get("decoder", {}).get("type") != "ByteLevel":
            return None
        chars = _byte_of_char()
        size = be.get_vocab_size(with_added_tokens=True)
        added = be.get_added_tokens_decoder()
        pieces, special = [], np.zeros(size, dtype=bool)
        for i in range(size):
            token = be.id_to_token(i)
            if token is None:
                pieces.append(b"")  # the Rust decoder leaves out ids it has no token for
            elif all(c in chars for c in token):
                pieces.append(bytes(chars[c] for c in token))
            else:
                pieces.append(token.encode())  # what the byte-level decoder does with a token it cannot map
            special[i] = i in added and added[i].special
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        self.flat = np.frombuffer(b"".join(pieces), dtype=np.uint8)
        self.starts = np.cumsum(lengths) - lengths
        self.lengths = {False: lengths, True: np.where(special, 0, lengths)}
        if not self._agrees(size):
            log.warning("the tokenizer's byte table does not decode as the tokenizer does; using its own decoder")
            return None
        return self.lengths

    def _agrees(self, size: int) -> bool:
        """The tables decode as the tokenizer does: every id in runs of 256, and random sequences (whose
        neighbours split multi-byte characters), in both modes."""
        rng = np.random.default_rng(0)
        ids = np.arange(size)
        samples = [ids[i : i + 256] for i in range(0, size, 256)]
        samples += [rng.integers(0, size, 64) for _ in range(64)] + [rng.permutation(size)[:512]]
        return all(self(samples, skip) == self.slow(samples, skip) for skip in (False, True))
