"""Signed receipts of trained work: entries, Merkle trees and proofs, the run key's signature, offline checks.

Per trained step the trainer signs a `Receipt` with the run's key: the Merkle root (RFC 6962 hashing) over
that step's `ReceiptEntry`s, one per group with trained sequences: contributor, task id, policy version,
trained samples and tokens, and the sha256 of the trained token ids. The hub stores them with the masked
work (`StepReceipt`, `POST /v1/receipts`) and answers a contributor with its receipts and an inclusion proof
per entry (`Contributions`, `GET /v1/contributions/{contributor}`). `verify_contributions` checks such a file
offline with nothing but the run's public key. The trainer's, the hub's and the CLI's one implementation.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence

from pydantic import Field

from rl.wire.identity import sign, verify
from rl.wire.protocol import MAX_COUNT, PUBLIC_KEY, SIGNATURE, Wire

CONTRIBUTOR_PATTERN = r"^(ed25519:[0-9a-f]{64}|token:[0-9a-z]{1,64}|worker:[A-Za-z0-9._-]{1,64})$"
"""An identity's public key, or `token:<token id>` for work registered without one."""
HASH_PATTERN = r"^[0-9a-f]{64}$"
MAX_PROOF = 64
"""Longest inclusion proof (a tree of 2^64 entries)."""


class ReceiptEntry(Wire):
    """One group's trained work in one step."""

    contributor: str = Field(pattern=CONTRIBUTOR_PATTERN)
    task_id: int = Field(ge=0, le=2**63 - 1)
    policy_version: int = Field(ge=0, le=MAX_COUNT)
    samples: int = Field(ge=1, le=2**31 - 1)
    """Completions of the group that were trained (not masked)."""
    tokens: int = Field(ge=0, le=2**62)
    """Their completion tokens."""
    digest: str = Field(pattern=HASH_PATTERN)
    """`token_digest` of their token ids."""

    def leaf(self) -> bytes:
        """The entry's Merkle leaf hash: sha256(0x00 || canonical JSON)."""
        fields = [self.contributor, self.task_id, self.policy_version, self.samples, self.tokens, self.digest]
        return _sha(b"\x00" + json.dumps(fields, separators=(",", ":")).encode())


class Receipt(Wire):
    """The run key's signature over one step's Merkle root."""

    run_key: str = Field(pattern=PUBLIC_KEY)
    step: int = Field(ge=0, le=MAX_COUNT)
    """The optimizer step that trained these entries, numbered as in metrics.jsonl and batches.jsonl (first: 1)."""
    root: str = Field(pattern=HASH_PATTERN)
    size: int = Field(ge=0, le=2**31 - 1)
    """Entries under the root."""
    signature: str = Field(pattern=SIGNATURE)

    def message(self) -> bytes:
        return receipt_message(self.run_key, self.step, self.root, self.size)

    def valid(self) -> bool:
        return verify(self.run_key, self.message(), self.signature)


class MaskedWork(Wire):
    """Sequences of one group the trainer masked out of the loss, by reason (never counted as contributed)."""

    contributor: str = Field(pattern=CONTRIBUTOR_PATTERN)
    task_id: int = Field(ge=0, le=2**63 - 1)
    reasons: dict[str, int] = Field(max_length=32)
    """Masked sequences by reason (rl/trainer/provenance.py)."""
    tokens: dict[str, int] = Field(default_factory=dict, max_length=32)
    """Their completion tokens, by the same reasons."""


class StepReceipt(Wire):
    """What the trainer sends the hub after a step (`POST /v1/receipts`): the receipt, its entries in tree order,
    and what it masked."""

    receipt: Receipt
    entries: list[ReceiptEntry] = Field(max_length=65536)
    masked: list[MaskedWork] = Field(default_factory=list, max_length=65536)


class EntryProof(Wire):
    index: int = Field(ge=0)
    entry: ReceiptEntry
    path: list[str] = Field(max_length=MAX_PROOF)
    """Sibling hashes from the leaf up (RFC 6962 audit path)."""


class ContributorReceipt(Wire):
    receipt: Receipt
    proofs: list[EntryProof] = Field(max_length=65536)


class Contributions(Wire):
    """A contributor's receipts with an inclusion proof per entry of its own: what it keeps and shows."""

    contributor: str = Field(pattern=CONTRIBUTOR_PATTERN)
    run_key: str = Field(pattern=PUBLIC_KEY)
    receipts: list[ContributorReceipt] = Field(default_factory=list, max_length=MAX_COUNT)


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def receipt_message(run_key: str, step: int, root: str, size: int) -> bytes:
    return f"scatter-rl receipt v1\n{run_key}\n{step}\n{root}\n{size}".encode()


def token_digest(sequences: Sequence[Sequence[int]]) -> str:
    """sha256 over the trained completions in group order: per completion its length, then its ids (uint32 LE)."""
    h = hashlib.sha256()
    for ids in sequences:
        h.update(struct.pack("<I", len(ids)))
        h.update(struct.pack(f"<{len(ids)}I", *ids))
    return h.hexdigest()


# --------------------------------------------------------------------------- Merkle tree (RFC 6962)


def _node(left: bytes, right: bytes) -> bytes:
    return _sha(b"\x01" + left + right)


def _split(n: int) -> int:
    """The largest power of two below n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """RFC 6962 Merkle tree hash of the leaf hashes (the empty tree: sha256 of nothing)."""
    if not leaves:
        return _sha(b"")
    if len(leaves) == 1:
        return leaves[0]
    k = _split(len(leaves))
    return _node(merkle_root(leaves[:k]), merkle_root(leaves[k:]))


def audit_path(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The sibling hashes proving leaf `index`, from the leaf up."""
    if len(leaves) <= 1:
        return []
    k = _split(len(leaves))
    if index < k:
        return [*audit_path(leaves[:k], index), merkle_root(leaves[k:])]
    return [*audit_path(leaves[k:], index - k), merkle_root(leaves[:k])]


def root_from_path(leaf: bytes, index: int, size: int, path: Sequence[bytes]) -> bytes | None:
    """The root a proof leads to (None when its length does not fit the tree's size)."""
    if not 0 <= index < size:
        return None
    if size == 1:
        return leaf if not path else None
    if not path:
        return None
    k = _split(size)
    if index < k:
        sub = root_from_path(leaf, index, k, path[:-1])
        return None if sub is None else _node(sub, path[-1])
    sub = root_from_path(leaf, index - k, size - k, path[:-1])
    return None if sub is None else _node(path[-1], sub)


# --------------------------------------------------------------------------- signing and checking


def sign_step(key, run_key: str, step: int, entries: Sequence[ReceiptEntry]) -> Receipt:
    """The run key's receipt over `entries` (tree order = list order)."""
    root = merkle_root([e.leaf() for e in entries]).hex()
    signature = sign(key, receipt_message(run_key, step, root, len(entries)))
    return Receipt(run_key=run_key, step=step, root=root, size=len(entries), signature=signature)


def proofs_for(receipt: Receipt, entries: Sequence[ReceiptEntry], contributor: str) -> ContributorReceipt:
    """`contributor`'s entries of a step with their inclusion proofs."""
    leaves = [e.leaf() for e in entries]
    proofs = [
        EntryProof(index=i, entry=e, path=[h.hex() for h in audit_path(leaves, i)])
        for i, e in enumerate(entries)
        if e.contributor == contributor
    ]
    return ContributorReceipt(receipt=receipt, proofs=proofs)


def check_proof(receipt: Receipt, proof: EntryProof) -> bool:
    try:
        path = [bytes.fromhex(h) for h in proof.path]
    except ValueError:
        return False
    root = root_from_path(proof.entry.leaf(), proof.index, receipt.size, path)
    return root is not None and root.hex() == receipt.root


def verify_contributions(doc: Contributions, run_key: str) -> list[str]:
    """Every problem of a contributor's receipts file under the run's public key `run_key`; empty: all verify.

    Checked: each receipt is signed by `run_key`; each entry is the file's contributor's and its proof leads
    to the signed root; no (step, task) is claimed twice.
    """
    problems = []
    if doc.run_key != run_key:
        problems.append(f"the file names run key {doc.run_key}, not {run_key}")
    seen: set[tuple[int, int]] = set()
    for r in doc.receipts:
        step = r.receipt.step
        if r.receipt.run_key != run_key or not r.receipt.valid():
            problems.append(f"step {step}: the receipt is not signed by {run_key}")
            continue
        for p in r.proofs:
            where = f"step {step} task {p.entry.task_id}"
            if p.entry.contributor != doc.contributor:
                problems.append(f"{where}: the entry is {p.entry.contributor}'s, not {doc.contributor}'s")
            elif not check_proof(r.receipt, p):
                problems.append(f"{where}: the inclusion proof does not lead to the signed root")
            elif (step, p.entry.task_id) in seen:
                problems.append(f"{where}: claimed twice")
            seen.add((step, p.entry.task_id))
    return problems


def totals(doc: Contributions) -> dict[str, int]:
    """Steps, groups, samples and tokens a receipts file proves (count only after `verify_contributions`)."""
    proofs = [p for r in doc.receipts for p in r.proofs]
    return {
        "steps": sum(1 for r in doc.receipts if r.proofs),
        "groups": len(proofs),
        "samples": sum(p.entry.samples for p in proofs),
        "tokens": sum(p.entry.tokens for p in proofs),
    }
