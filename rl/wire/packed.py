"""Packed token ids and log-probs: the compact form of the bulk of submissions and batches.

A completion's token ids travel as the base64 of a little-endian int32 array, its log-probs as
the base64 of a little-endian float32 array, in place of JSON lists of numbers. The hub checks
them with array operations, keeps the base64 text and forwards it to the trainer unchanged;
the trainer reads it back with `np.frombuffer`. JSON lists stay accepted from workers that did
not negotiate the packed form (docs/protocol.md, "Packed arrays").
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pybase64
from pydantic import PlainSerializer, PlainValidator, WithJsonSchema

IDS_DTYPE = np.dtype("<i4")
"""Token ids: little-endian int32."""
LOGPROBS_DTYPE = np.dtype("<f4")
"""Log-probs: little-endian float32 (the precision the trainer keeps them in)."""
WIRE_ENCODINGS = ("packed", "json")
"""What this version speaks, preferred first: a worker says so at registration, the hub picks one."""


def choose_wire(offered: list[str] | None) -> str | None:
    """The hub's answer to a worker's offer: the first of WIRE_ENCODINGS it offered (None: it offered none)."""
    if offered is None:
        return None
    return next((w for w in WIRE_ENCODINGS if w in offered), "json")


class PackedError(ValueError):
    """A packed field that cannot be read: `field` names it (e.g. `token_ids`), the message says why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def pack(values, dtype: np.dtype) -> str:
    """The base64 text of `values` as a little-endian array of `dtype`."""
    return pybase64.b64encode_as_string(np.asarray(values, dtype=dtype).tobytes())


def pack_ids(ids) -> str:
    return pack(ids, IDS_DTYPE)


def pack_logprobs(logprobs) -> str:
    return pack(logprobs, LOGPROBS_DTYPE)


def unpack(text: str, dtype: np.dtype, field: str) -> np.ndarray:
    """The array a base64 text holds (read-only, no copy of the decoded bytes); `PackedError` if malformed."""
    try:  # strict: only the base64 alphabet, correct padding, nothing after it; SIMD (~10x binascii's a2b_base64)
        raw = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise PackedError(field, f"not base64 ({e})") from None
    if len(raw) % dtype.itemsize:
        raise PackedError(field, f"{len(raw)} bytes is not a whole number of {dtype.itemsize}-byte values")
    return np.frombuffer(raw, dtype=dtype)


def as_ids(value: str | list[int], field: str = "token_ids") -> np.ndarray:
    """Token ids from either form; a JSON list is range-checked as int32 first (past it: `PackedError`)."""
    if isinstance(value, str):
        return unpack(value, IDS_DTYPE, field)
    if value and (min(value) < -(2**31) or max(value) >= 2**31):  # min/max run in C
        raise PackedError(field, "token id outside int32")
    return np.array(value, dtype=IDS_DTYPE)


def count_ids(value: str | list[int]) -> int:
    """How many token ids `value` holds, without decoding a packed text (one the hub checked already)."""
    if isinstance(value, str):
        padding = 2 if value.endswith("==") else 1 if value.endswith("=") else 0
        return (len(value) // 4 * 3 - padding) // IDS_DTYPE.itemsize
    return len(value)


def as_logprobs(value: str | list[float], field: str = "logprobs") -> np.ndarray:
    """Log-probs from either form, as float32 (what the trainer keeps of a JSON float)."""
    if isinstance(value, str):
        return unpack(value, LOGPROBS_DTYPE, field)
    return np.array(value, dtype=LOGPROBS_DTYPE)


@dataclass(frozen=True)
class PackedCompletion:
    """One checked completion as the hub keeps it: arrays to read, base64 texts to forward."""

    ids: np.ndarray
    logprobs: np.ndarray
    finish_reason: str
    packed_ids: str
    """The worker's own text when it sent packed, else `pack_ids(ids)`."""
    packed_logprobs: str

    @classmethod
    def of(cls, token_ids: str | list[int], logprobs: str | list[float], finish_reason: str) -> PackedCompletion:
        """From either encoding (`PackedError` if unreadable); the values are not checked here."""
        ids, lps = as_ids(token_ids), as_logprobs(logprobs)
        ids_text = token_ids if isinstance(token_ids, str) else pack_ids(ids)
        lps_text = logprobs if isinstance(logprobs, str) else pack_logprobs(lps)
        return cls(ids, lps, finish_reason, ids_text, lps_text)

    def __len__(self) -> int:
        return len(self.ids)


def _validator(dtype: np.dtype, item: type):
    """Base64 text (what the hub sends) or a list (a batch built in Python) -> a list of `item`."""

    def validate(value: Any) -> list:
        if isinstance(value, str):
            return unpack(value, dtype, "packed array").tolist()
        if not isinstance(value, list | tuple) or any(isinstance(v, bool) or not isinstance(v, item | int)
                                                      for v in value):  # fmt: skip
            raise ValueError(f"expected base64 text or a list of {item.__name__}")
        out = [item(v) for v in value]
        if item is float and not np.isfinite(out).all():
            raise ValueError("non-finite log-prob")
        return out

    return PlainValidator(validate)


def _serializer(dtype: np.dtype):
    return PlainSerializer(lambda v: v if isinstance(v, str) else pack(v, dtype), return_type=str, when_used="json")


def _schema(what: str) -> WithJsonSchema:
    return WithJsonSchema({"type": "string", "contentEncoding": "base64", "description": what})


PackedIds = Annotated[
    list[int], _validator(IDS_DTYPE, int), _serializer(IDS_DTYPE), _schema("base64 of little-endian int32 token ids")
]
"""Token ids of a batch: a list in Python, base64 of little-endian int32 in JSON (the hub may hold the text)."""
PackedLogprobs = Annotated[
    list[float],
    _validator(LOGPROBS_DTYPE, float),
    _serializer(LOGPROBS_DTYPE),
    _schema("base64 of little-endian float32 log-probs"),
]
"""Log-probs of a batch: a list in Python, base64 of little-endian float32 in JSON."""
