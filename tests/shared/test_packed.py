"""The packed encoding of token ids and log-probs (rl/wire/packed.py): bytes, errors, the batch's fields."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from rl.wire.packed import (
    PackedError,
    as_ids,
    as_logprobs,
    choose_wire,
    pack_ids,
    pack_logprobs,
    unpack,
)
from rl.wire.protocol import Completion, ScoredCompletion, SubmitRequest, TaskResult


def test_little_endian_int32_and_float32_in_base64():
    assert base64.b64decode(pack_ids([1, 256, -1])) == b"\x01\x00\x00\x00\x00\x01\x00\x00\xff\xff\xff\xff"
    assert base64.b64decode(pack_logprobs([-0.5])) == b"\x00\x00\x00\xbf"
    assert as_ids(pack_ids([7, 0, 151_935])).tolist() == [7, 0, 151_935]
    assert as_logprobs(pack_logprobs([-0.1])).tolist() == [np.float32(-0.1)]


@pytest.mark.parametrize(
    ("text", "problem"),
    [("not base64!", "not base64"), ("AQID", "3 bytes is not a whole number"), ("AQIDBA", "not base64")],
)
def test_malformed_texts_name_the_field(text, problem):
    with pytest.raises(PackedError, match=f"token_ids: {problem}") as e:
        as_ids(text)
    assert e.value.field == "token_ids"


def test_json_lists_are_range_checked_before_packing():
    with pytest.raises(PackedError, match="int32"):
        as_ids([1, 2**40])
    assert as_ids([]).size == 0 and unpack("", np.dtype("<f4"), "x").size == 0


def test_choose_wire():
    assert choose_wire(None) is None  # an older worker: nothing added to its registration
    assert choose_wire(["json", "packed"]) == "packed"
    assert choose_wire(["json"]) == "json"


def test_batch_fields_are_lists_in_python_and_base64_in_json():
    scored = ScoredCompletion(token_ids=[3, 4], logprobs=[-0.25, -1.0], finish_reason="stop", reward=1.0,
                              components={})  # fmt: skip
    text = scored.model_dump_json()
    assert f'"token_ids":"{pack_ids([3, 4])}"' in text and f'"logprobs":"{pack_logprobs([-0.25, -1.0])}"' in text
    assert ScoredCompletion.model_validate_json(text) == scored
    forwarded = ScoredCompletion.model_construct(token_ids=pack_ids([3, 4]), logprobs=pack_logprobs([-0.25, -1.0]),
                                                 finish_reason="stop", reward=1.0, components={})  # fmt: skip
    assert forwarded.model_dump_json() == text  # the hub's texts go out as they came
    for bad in ('"token_ids":[1.5]', '"token_ids":"@@"', '"logprobs":[-1e999]'):
        with pytest.raises(ValueError):
            ScoredCompletion.model_validate_json(text.replace(text[1 : text.index(",")], bad, 1))


def test_submission_packed_keeps_every_value():
    lists = Completion(token_ids=[5, 6, 7], logprobs=[-0.5, -1.5, -0.0], finish_reason="length")
    request = SubmitRequest(worker_id="w", lease_id="l", policy_version=3,
                            results=[TaskResult(task_id=9, completions=[lists, lists])])  # fmt: skip
    packed = SubmitRequest.model_validate_json(request.packed().model_dump_json())
    for c in packed.results[0].completions:
        assert isinstance(c.token_ids, str) and isinstance(c.logprobs, str) and c.finish_reason == "length"
        assert as_ids(c.token_ids).tolist() == [5, 6, 7] and as_logprobs(c.logprobs).tolist() == [-0.5, -1.5, 0.0]
    assert packed.packed() == packed  # packing twice changes nothing
