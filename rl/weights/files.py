"""Policy weight files: deterministic safetensors shards written as a stream, and sparse deltas.

The byte format both sides agree on: the trainer writes it (store.py), workers rebuild it
(apply.py, rollout_workers/base_model.py). Shards: a version's tensors, in a fixed order, cut
into files of at most `shard_bytes`; the header is known first, so each tensor's bytes follow
as it arrives, hashed on the way. The bytes are a pure function of (names, shapes, dtype,
values), so one sha256 per shard proves a rebuilt shard exact. Deltas: per tensor whose bits
changed, the gaps between changed flat indices and the new bits minus the old ones (wrapping
integer arithmetic, so applying it is exact), zstd-compressed; applying one to the base shard
and re-serialising gives the new shard bit for bit; or, applied to an engine's live tensors
(inplace.py), the new tensors, each checked against its own sha256 (`tensor_sha256`).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rl.wire.protocol import PolicyFile, ShardLayout

INDEX_FILE = "model.safetensors.index.json"
SINGLE_SHARD = "model.safetensors"
DELTA_SUFFIX = ".delta.zst"
ZSTD_LEVEL = 3
_DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
"""Unsigned integer view of an element of each size: wrapping arithmetic on raw bits."""


class WeightFileError(ValueError):
    """A shard or delta that does not match what it should be (truncated, reordered, foreign)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass(frozen=True)
class ShardSpec:
    name: str
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def delta_name(self) -> str:
        return self.name.removesuffix(".safetensors") + DELTA_SUFFIX


def plan_shards(tensors: Iterable[TensorSpec], shard_bytes: int) -> list[ShardSpec]:
    """Cut `tensors` (in order) into shards of at most `shard_bytes`; HF names (`model-00001-of-00003...`)."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in tensors:
        if groups[-1] and size + spec.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    n = len(groups)
    names = [SINGLE_SHARD] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return [ShardSpec(name, tuple(group)) for name, group in zip(names, groups, strict=True)]


def index_json(shards: list[ShardSpec]) -> bytes | None:
    """`model.safetensors.index.json` for a sharded version (None for one shard), as HF writes it."""
    if len(shards) == 1:
        return None
    index = {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {t.name: s.name for s in shards for t in s.tensors},
    }
    return json.dumps(index, indent=2, sort_keys=True).encode()


def _header(tensors: Iterable[TensorSpec]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        entries[t.name] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return memoryview(flat.contiguous().view(torch.uint8).numpy())


class ShardWriter:
    """Writes one shard to `path`: header first, then each tensor's bytes as it arrives, hashed on the way."""

    def __init__(self, path: Path, spec: ShardSpec) -> None:
        self.path, self.spec = Path(path), spec
        self._next = 0
        self._sha = hashlib.sha256()
        self._file = open(self.path, "wb")  # noqa: SIM115 - closed in finish()
        self._put(_header(spec.tensors))

    def _put(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._sha.update(data)

    @property
    def done(self) -> bool:
        return self._next == len(self.spec.tensors)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.spec.tensors[self._next] if not self.done else None
        if expected is None or name != expected.name:
            raise WeightFileError(f"{self.spec.name}: got tensor {name!r}, expected {expected and expected.name!r}")
        if tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise WeightFileError(
                f"{self.spec.name}: tensor {name} is {tuple(tensor.shape)} {tensor.dtype}, "
                f"expected {expected.shape} {expected.dtype}"
            )
        self._put(tensor_bytes(tensor))
        self._next += 1

    def finish(self) -> PolicyFile:
        if not self.done:
            raise WeightFileError(f"{self.spec.name}: only {self._next} of {len(self.spec.tensors)} tensors written")
        self._file.close()
        return PolicyFile(name=self.spec.name, size=self.path.stat().st_size, sha256=self._sha.hexdigest())

    def abort(self) -> None:
        self._file.close()


def write_shards(
    directory: Path, shards: list[ShardSpec], tensors: Iterable[tuple[str, torch.Tensor]]
) -> list[PolicyFile]:
    """Stream `tensors` (in plan order, any dtype: cast to the plan's) into `shards` under `directory`."""
    out: list[PolicyFile] = []
    source = iter(tensors)
    for spec in shards:
        writer = ShardWriter(Path(directory) / spec.name, spec)
        try:
            for expected in spec.tensors:
                item = next(source, None)
                if item is None:
                    raise WeightFileError(f"the tensors ended before {expected.name} ({spec.name})")
                name, tensor = item
                writer.write(name, tensor.detach().to("cpu", expected.dtype))
            out.append(writer.finish())
        except BaseException:
            writer.abort()
            raise
    extra = next(source, None)
    if extra is not None:
        raise WeightFileError(f"tensor {extra[0]!r} is not in the shard plan")
    return out


def read_shard(path: Path, spec: ShardSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of shard `path` (memory-mapped), checked against `spec`: names, order, shapes, dtypes."""
    from safetensors import safe_open

    header = _header(spec.tensors)
    with open(path, "rb") as f:
        if f.read(len(header)) != header:
            raise WeightFileError(f"{path.name} does not have the expected layout (header differs)")
    if path.stat().st_size != len(header) + spec.nbytes:
        raise WeightFileError(f"{path.name} is {path.stat().st_size} bytes, expected {len(header) + spec.nbytes}")
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for t in spec.tensors:
            yield t.name, f.get_tensor(t.name)


# --------------------------------------------------------------------------- deltas


def _bits(tensor: torch.Tensor) -> np.ndarray:
    flat = tensor.detach().reshape(-1).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy().view(_BITS[flat.element_size()])


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of one tensor's bytes as its shard holds them (what a manifest's `tensor_sha256` records)."""
    return hashlib.sha256(tensor_bytes(tensor.detach().cpu())).hexdigest()


@dataclass
class ChangeHashes:
    """Per tensor a delta changes: sha256 of the whole new tensor (`tensor_sha256`), and of its changed
    elements' new bits in index order. A worker applying the delta in place checks one or the other."""

    tensors: dict[str, str] = field(default_factory=dict)
    changes: dict[str, str] = field(default_factory=dict)


def encode_delta(
    old: Iterable[tuple[str, torch.Tensor]],
    new: Iterable[tuple[str, torch.Tensor]],
    hashes: ChangeHashes | None = None,
) -> tuple[bytes, int]:
    """A compressed delta turning the tensors `old` into `new` (same names and shapes, in order).

    Returns the zstd bytes and the number of changed elements; `hashes`, when given, gets the
    hashes of each changed tensor of `new` (what a worker applying in place checks).
    The payload is a header line
    (JSON: per changed tensor its name, count of changes, element size, index width) followed by
    each tensor's index gaps (uint32, or uint64 for tensors of 2^32+ elements) and bit differences.
    """
    import zstandard

    entries, chunks, changed_total = [], [], 0
    for (name, a), (name_b, b) in zip(old, new, strict=True):
        if name != name_b or a.shape != b.shape or a.dtype != b.dtype:
            raise WeightFileError(
                f"delta between different tensors: {name} {tuple(a.shape)} vs {name_b} {tuple(b.shape)}"
            )
        old_bits, new_bits = _bits(a), _bits(b)
        index = np.flatnonzero(old_bits != new_bits)
        if index.size == 0:
            continue
        wide = old_bits.size >= 2**32
        gaps = np.diff(index, prepend=-1).astype(np.uint64 if wide else np.uint32)
        diff = new_bits[index] - old_bits[index]  # unsigned: wraps, exactly invertible
        entries.append({"name": name, "count": int(index.size), "wide": wide})
        if hashes is not None:
            hashes.tensors[name] = tensor_sha256(b)
            hashes.changes[name] = hashlib.sha256(new_bits[index].tobytes()).hexdigest()
        chunks += [gaps.tobytes(), diff.tobytes()]
        changed_total += int(index.size)
    head = json.dumps(entries, separators=(",", ":")).encode() + b"\n"
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(head + b"".join(chunks)), changed_total


def open_delta(delta: bytes) -> tuple[dict[str, dict], bytes]:
    """A delta's header entries (by tensor name, in file order) and its body (rl/weights/inplace.py reads it too)."""
    import zstandard

    try:
        raw = zstandard.ZstdDecompressor().decompress(delta)
        head, _, body = raw.partition(b"\n")
        return {e["name"]: e for e in json.loads(head)}, body
    except (zstandard.ZstdError, ValueError, KeyError, TypeError) as e:
        raise WeightFileError(f"unreadable delta ({e})") from None


def delta_changes(
    name: str, entry: dict, body: bytes, pos: int, bits_dtype: np.dtype, numel: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """One tensor's changes in a delta body at `pos`: its changed flat indices (int64), their bit
    differences (`bits_dtype`: the tensor's unsigned element type), and the position after them."""
    count, width = entry["count"], 8 if entry["wide"] else 4
    try:
        gaps = np.frombuffer(body, np.uint64 if entry["wide"] else np.uint32, count, pos)
        pos += count * width
        diff = np.frombuffer(body, bits_dtype, count, pos)
        pos += count * diff.itemsize
    except ValueError:
        raise WeightFileError(f"the delta for {name} is truncated") from None
    index = np.cumsum(gaps, dtype=np.int64) - 1
    if count and (index[0] < 0 or index[-1] >= numel):
        raise WeightFileError(f"delta for {name} indexes outside the tensor")
    if count > 1 and not gaps[1:].all():
        raise WeightFileError(f"delta for {name} changes an element twice")
    return index, diff, pos


def unsigned_bits(element_size: int) -> type:
    """The unsigned integer type of an element of `element_size` bytes: wrapping arithmetic on raw bits."""
    return _BITS[element_size]


def apply_delta(base: Iterable[tuple[str, torch.Tensor]], delta: bytes) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors of `base` with `delta` applied (new tensors; `base` is not modified)."""
    entries, body = open_delta(delta)
    pos, seen = 0, 0
    for name, tensor in base:
        entry = entries.get(name)
        if entry is None:
            yield name, tensor
            continue
        seen += 1
        bits = _bits(tensor).copy()
        index, diff, pos = delta_changes(name, entry, body, pos, bits.dtype, bits.size)
        bits[index] += diff
        out = torch.from_numpy(bits.view(np.uint8)).view(tensor.dtype if tensor.dtype != torch.bool else torch.uint8)
        out = out.reshape(tensor.shape)
        yield name, out.to(torch.bool) if tensor.dtype == torch.bool else out
    if seen != len(entries) or pos != len(body):
        raise WeightFileError("the delta does not fit its base shard (tensors or lengths differ)")


_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def shard_spec_of(path: Path) -> ShardSpec:
    """The layout of an existing shard, from its header (tensors in file order)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
        tensors = tuple(TensorSpec(n, tuple(e["shape"]), _CODE_DTYPES[e["dtype"]]) for n, e in entries)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise WeightFileError(f"{path.name} is not a readable safetensors shard ({e})") from None
    return ShardSpec(path.name, tensors)


def shard_layout(spec: ShardSpec) -> ShardLayout:
    """How the hub describes a shard on the wire (`GET /v1/policy/base/weights`)."""
    return ShardLayout(name=spec.name, tensors=[(t.name, list(t.shape), _DTYPE_CODES[t.dtype]) for t in spec.tensors])


def spec_of_layout(layout: ShardLayout) -> ShardSpec:
    """The writer's spec of a shard the hub described (`shard_layout`'s inverse)."""
    try:
        tensors = tuple(TensorSpec(name, tuple(shape), _CODE_DTYPES[code]) for name, shape, code in layout.tensors)
    except KeyError as e:
        raise WeightFileError(f"{layout.name}: unknown dtype {e}") from None
    return ShardSpec(layout.name, tensors)
