"""Ed25519 keys: contributor identities (`rl identity new`) and a run's own signing key.

A key file holds the private key (PEM, PKCS#8, mode 0600); `<file>.pub` beside it holds the public
key as `ed25519:<64 hex digits>`, the string the hub, receipts and reports name a contributor or a run
by. A contributor proves it holds a key by signing a hub challenge (`challenge_message`): for a
registration, or to fetch its receipts. docs/contributions.md says what this does and does not prove.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

PREFIX = "ed25519:"


class IdentityError(ValueError):
    """A key file or a public key string that cannot be used; the message names it."""


def public_id(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PREFIX + raw.hex()


def public_path(path: Path) -> Path:
    return Path(f"{path}.pub")


def write_key(path: Path, key: Ed25519PrivateKey | None = None) -> Ed25519PrivateKey:
    """Write a (new) private key to `path` (0600) and its public key to `path.pub`; refuses to overwrite."""
    path = Path(path)
    key = key or Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never replaces a key
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path(path).write_text(public_id(key) + "\n")
    return key


def load_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as e:
        raise IdentityError(f"cannot read key file {path}: {e.strerror}") from None
    except (ValueError, TypeError) as e:
        raise IdentityError(f"{path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an Ed25519 key")
    return key


def load_or_create(path: Path) -> Ed25519PrivateKey:
    """The key at `path`, made first if there is none (a run's signing key)."""
    if Path(path).exists():
        return load_key(path)
    try:
        return write_key(path)
    except FileExistsError:  # made by another process meanwhile
        return load_key(path)


def parse_public(text: str) -> Ed25519PublicKey:
    """`ed25519:<hex>` (never read as a path: the hub parses keys workers send)."""
    raw = text.removeprefix(PREFIX)
    if not text.startswith(PREFIX) or len(raw) != 64:
        raise IdentityError(f"not an Ed25519 public key: {text[:80]!r} (want ed25519:<64 hex digits>)")
    try:
        return Ed25519PublicKey.from_public_bytes(bytes.fromhex(raw))
    except ValueError as e:
        raise IdentityError(f"not an Ed25519 public key: {text[:80]!r} ({e})") from None


def read_public(text: str) -> str:
    """`ed25519:<hex>` of a public key given on a command line: the string itself, or a `.pub` file holding it."""
    text = text.strip()
    if not text.startswith(PREFIX) and Path(text).is_file():
        text = Path(text).read_text().strip()
    raw = parse_public(text.lower()).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PREFIX + raw.hex()


def sign(key: Ed25519PrivateKey, message: bytes) -> str:
    return key.sign(message).hex()


def verify(public: str, message: bytes, signature: str) -> bool:
    """Whether `signature` (hex) is `public`'s signature of `message`; False for anything malformed."""
    try:
        parse_public(public).verify(bytes.fromhex(signature), message)
    except (IdentityError, ValueError, InvalidSignature):
        return False
    return True


def challenge_message(challenge: str, purpose: str) -> bytes:
    """What a contributor signs to prove its key to a hub: the hub's one-time challenge and what it is for
    (`register`, or `contributions <contributor>`), so a signature made for one cannot serve the other."""
    return f"scatter-rl identity v1\n{purpose}\n{challenge}".encode()
