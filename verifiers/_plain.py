"""Plain data and framed messages between the code sandboxes (stdlib only; runs inside them).

The test harness (`_code_harness.py`) and the candidate's process
(`_code_runner.py`) live in different sandboxes and talk over two pipes. What
crosses is plain data only: None, bool, int, float, str, bytes, complex, and
list / tuple / set / frozenset / dict of those, matched by exact type (no
subclasses, so no object with a custom `__eq__` ever reaches the harness).
Containers are tagged (`{"$": "tuple", "v": [...]}`) so a tuple stays a tuple;
anything else is refused with `TypeError` on the way out and `ValueError` on
the way in, unless the caller passes `ref`/`deref`: then it crosses as an
opaque numbered reference (the harness can call a candidate's object or read
its attributes through a proxy, but never compares with it). Messages are JSON
with a 4-byte big-endian length in front.
"""

import json
import os
import struct

HEADER = struct.Struct(">I")
MAX_DEPTH = 50
SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}
SCALARS = (bool, int, float, str)


def encode(obj, ref=None, depth=0):
    """`obj` as JSON-ready data; `TypeError` for anything that is not plain data.

    `ref(obj) -> int`, if given, is asked for every value that is not plain data and the
    value crosses as an opaque reference `{"$": "ref", "v": id}` (the candidate's objects).
    """
    if depth > MAX_DEPTH:
        raise TypeError("value nested too deeply")
    kind = type(obj)
    if obj is None or kind in SCALARS:
        return obj
    for tag, cls in SEQUENCES.items():
        if kind is cls:
            return {"$": tag, "v": [encode(x, ref, depth + 1) for x in obj]}
    if kind is dict:
        return {"$": "dict", "v": [[encode(k, ref, depth + 1), encode(v, ref, depth + 1)] for k, v in obj.items()]}
    if kind is bytes:
        return {"$": "bytes", "v": obj.hex()}
    if kind is complex:
        return {"$": "complex", "v": [obj.real, obj.imag]}
    if ref is not None:
        return {"$": "ref", "v": ref(obj)}
    raise TypeError(f"type {kind.__name__} is not plain data")


def decode(data, deref=None, depth=0):
    """Inverse of `encode`; `ValueError` for anything `encode` cannot have produced.

    `deref(id)`, if given, turns a reference back into an object (a proxy, on the harness's side).
    """
    if depth > MAX_DEPTH:
        raise ValueError("value nested too deeply")
    if data is None or type(data) in SCALARS:
        return data
    if type(data) is not dict or set(data) != {"$", "v"}:
        raise ValueError("not plain data")
    tag, value = data["$"], data["v"]
    try:
        if tag in SEQUENCES and type(value) is list:
            return SEQUENCES[tag](decode(x, deref, depth + 1) for x in value)
        if tag == "dict" and type(value) is list:
            return {decode(k, deref, depth + 1): decode(v, deref, depth + 1) for k, v in value}
        if tag == "bytes" and type(value) is str:
            return bytes.fromhex(value)
        if tag == "complex" and type(value) is list and all(type(x) is float for x in value):
            return complex(*value)
        if tag == "ref" and deref is not None and type(value) is int and value >= 0:
            return deref(value)
    except (TypeError, ValueError, LookupError) as e:  # unhashable members or keys, bad pairs or hex, unknown ref
        raise ValueError(f"malformed {tag}: {e}") from None
    raise ValueError(f"not plain data (tag {tag!r})")


def send(fd, message):
    """Write one framed JSON message (blocking)."""
    data = json.dumps(message).encode()
    view = memoryview(HEADER.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd, size):
    buf = bytearray()
    while len(buf) < size:
        chunk = os.read(fd, size - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def recv(fd, limit):
    """Next framed JSON message, None at end of input; `ValueError` if it is bigger than `limit` or not JSON."""
    head = _read_exactly(fd, HEADER.size)
    if head is None:
        return None
    (size,) = HEADER.unpack(head)
    if size > limit:
        raise ValueError(f"message of {size} bytes is over the {limit} byte limit")
    data = _read_exactly(fd, size)
    if data is None:
        return None
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError("message nested too deeply") from None
