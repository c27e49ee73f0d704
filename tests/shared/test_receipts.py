"""Receipts and identities (rl/wire/receipts.py, rl/wire/identity.py): Merkle proofs, signatures, tampering.

Pure functions: a receipts file verifies offline with the run's public key alone, and any change to an entry,
a proof, a root or a signature, or a proof of another contributor's entry claimed as one's own, fails.
"""

from __future__ import annotations

import hashlib

import pytest

from rl.wire.identity import (
    IdentityError,
    challenge_message,
    load_key,
    load_or_create,
    parse_public,
    public_id,
    read_public,
    sign,
    verify,
    write_key,
)
from rl.wire.receipts import (
    Contributions,
    ReceiptEntry,
    audit_path,
    merkle_root,
    proofs_for,
    root_from_path,
    sign_step,
    token_digest,
    totals,
    verify_contributions,
)


def leaves(n: int) -> list[bytes]:
    return [hashlib.sha256(bytes([i])).digest() for i in range(n)]


def test_merkle_root_matches_rfc6962_for_small_trees():
    a, b, c = leaves(3)
    node = lambda x, y: hashlib.sha256(b"\x01" + x + y).digest()  # noqa: E731
    assert merkle_root([]) == hashlib.sha256(b"").digest()
    assert merkle_root([a]) == a
    assert merkle_root([a, b]) == node(a, b)
    assert merkle_root([a, b, c]) == node(node(a, b), c)  # split at the largest power of two below n


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8, 13, 33])
def test_every_proof_leads_to_the_root_and_no_other_index_or_size(n):
    ls = leaves(n)
    root = merkle_root(ls)
    for i in range(n):
        path = audit_path(ls, i)
        assert root_from_path(ls[i], i, n, path) == root
        assert len(path) <= max(1, (n - 1).bit_length())
        for j in range(n):
            if j != i:
                assert root_from_path(ls[i], j, n, path) != root
        if path:
            assert root_from_path(ls[i], i, n, path[:-1]) != root
            flipped = [bytes([path[0][0] ^ 1]) + path[0][1:], *path[1:]]
            assert root_from_path(ls[i], i, n, flipped) != root


def entry(contributor: str, task_id: int, ids=((1, 2, 3),)) -> ReceiptEntry:
    return ReceiptEntry(contributor=contributor, task_id=task_id, policy_version=0, samples=len(ids),
                        tokens=sum(map(len, ids)), digest=token_digest(ids))  # fmt: skip


@pytest.fixture
def run(tmp_path):
    key = write_key(tmp_path / "run.pem")
    alice = public_id(write_key(tmp_path / "alice.pem"))
    bob = public_id(write_key(tmp_path / "bob.pem"))
    steps = []
    for step in (1, 2):
        entries = [entry(alice, 10 * step), entry(bob, 10 * step + 1), entry("token:abc", 10 * step + 2),
                   entry(alice, 10 * step + 3, ids=((4,), (5, 6)))]  # fmt: skip
        steps.append((sign_step(key, public_id(key), step, entries), entries))
    return {"key": key, "run_key": public_id(key), "alice": alice, "bob": bob, "steps": steps}


def contributions(run, who: str) -> Contributions:
    return Contributions(contributor=who, run_key=run["run_key"],
                         receipts=[proofs_for(r, entries, who) for r, entries in run["steps"]])  # fmt: skip


def test_a_contributors_receipts_verify_offline(run):
    doc = contributions(run, run["alice"])
    assert verify_contributions(doc, run["run_key"]) == []
    assert totals(doc) == {"steps": 2, "groups": 4, "samples": 6, "tokens": 12}
    again = Contributions.model_validate_json(doc.model_dump_json())  # what a contributor keeps on disk
    assert verify_contributions(again, run["run_key"]) == []


def test_tampering_fails(run):
    good = contributions(run, run["alice"])
    cases = {
        "more tokens": lambda d: setattr(d.receipts[0].proofs[0].entry, "tokens", 999),
        "another task": lambda d: setattr(d.receipts[0].proofs[0].entry, "task_id", 77),
        "another digest": lambda d: setattr(d.receipts[0].proofs[0].entry, "digest", "0" * 64),
        "another index": lambda d: setattr(d.receipts[0].proofs[0], "index", 1),
        "a cut proof": lambda d: d.receipts[0].proofs[0].path.pop(),
        "another root": lambda d: setattr(d.receipts[0].receipt, "root", "ab" * 32),
        "a bigger tree": lambda d: setattr(d.receipts[0].receipt, "size", 5),
        "another step": lambda d: setattr(d.receipts[1].receipt, "step", 7),
        "a proof twice": lambda d: d.receipts[0].proofs.append(d.receipts[0].proofs[0]),
    }
    for what, tamper in cases.items():
        doc = good.model_copy(deep=True)
        tamper(doc)
        assert verify_contributions(doc, run["run_key"]), what


def test_a_proof_of_another_contributors_entry_fails(run):
    mine, theirs = contributions(run, run["alice"]), contributions(run, run["bob"])
    stolen = mine.model_copy(deep=True)
    stolen.receipts[0].proofs.append(theirs.receipts[0].proofs[0])  # bob's entry, as it is
    assert verify_contributions(stolen, run["run_key"]) == [
        f"step 1 task 11: the entry is {run['bob']}'s, not {run['alice']}'s"
    ]
    relabelled = theirs.receipts[0].proofs[0].model_copy(deep=True)
    relabelled.entry.contributor = run["alice"]  # bob's entry claimed under alice's name
    forged = mine.model_copy(deep=True)
    forged.receipts[0].proofs.append(relabelled)
    assert verify_contributions(forged, run["run_key"]) == [
        "step 1 task 11: the inclusion proof does not lead to the signed root"
    ]


def test_a_receipt_signed_by_another_key_fails(run, tmp_path):
    impostor = write_key(tmp_path / "impostor.pem")
    r, entries = run["steps"][0]
    forged = sign_step(impostor, run["run_key"], r.step, entries)  # claims the run's key
    doc = Contributions(contributor=run["alice"], run_key=run["run_key"],
                        receipts=[proofs_for(forged, entries, run["alice"])])  # fmt: skip
    assert verify_contributions(doc, run["run_key"]) == [f"step 1: the receipt is not signed by {run['run_key']}"]
    assert verify_contributions(contributions(run, run["alice"]), public_id(impostor))


def test_token_digest_depends_on_every_id_and_the_split():
    assert token_digest([[1, 2], [3]]) != token_digest([[1], [2, 3]])
    assert token_digest([[1, 2, 3]]) != token_digest([[1, 2, 4]])
    assert len(token_digest([])) == 64


def test_keys_files_and_challenges(tmp_path):
    key = write_key(tmp_path / "k.pem")
    assert (tmp_path / "k.pem").stat().st_mode & 0o777 == 0o600
    assert load_key(tmp_path / "k.pem").private_bytes_raw() == key.private_bytes_raw()
    pub = public_id(key)
    assert read_public(str(tmp_path / "k.pem.pub")) == pub == read_public(pub.upper().replace("ED25519", "ed25519"))
    with pytest.raises(FileExistsError):
        write_key(tmp_path / "k.pem")
    assert load_or_create(tmp_path / "k.pem").private_bytes_raw() == key.private_bytes_raw()
    message = challenge_message("abc", "register")
    signature = sign(key, message)
    assert verify(pub, message, signature)
    assert not verify(pub, challenge_message("abc", "contributions x"), signature)  # bound to its purpose
    assert not verify(pub, message, "00" * 64)
    assert not verify("ed25519:zz", message, signature)
    (tmp_path / "bad.pem").write_text("not a key")
    for bad, match in ((tmp_path / "bad.pem", "not an unencrypted PEM"), (tmp_path / "none.pem", "cannot read")):
        with pytest.raises(IdentityError, match=match):
            load_key(bad)
    with pytest.raises(IdentityError):
        parse_public(str(tmp_path / "k.pem.pub"))  # the hub never reads a path it was sent
