"""The hub's ledger on disk: an embedded SQLite database (WAL) in the run directory, `run_dir/hub.sqlite`.

It lets a hub that died be restarted (by `rl train`, rl/cli/launcher.py) with no prompt lost
and none trained twice. It holds the hub's `Ledger` (rl/wire/protocol.py: data position,
pending task ids, consumed and batch counts), the published policy version, the last
batch handed to the trainer, answer and all (`replay(pull_id)` answers a retried pull), and
each operator's trust record (rl/hub/trust.py: evidence and quarantine outlive a hub restart).
The service (rl/hub/service.py) saves snapshots, each writing only what changed, in one
transaction: with a batch before answering its pull, before answering a publish, otherwise
every `FLUSH_INTERVAL_S`. A restarted hub re-queues every pending id; `rl train --resume`
instead `reset`s the database to the checkpoint's ledger. Why this is enough:
docs/operations.md, "When the hub dies".
"""

from __future__ import annotations

import errno
import logging
import sqlite3
from pathlib import Path

from rl.wire.protocol import Ledger

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 0.5
"""Longest the position after new leases stays unwritten (see the module docstring)."""

SCHEMA_VERSION = 1

EXIT_DISK_FULL = 74
"""The hub's exit code when its disk is full: `rl train` then stops naming the full disk instead of restarting it."""


def disk_full(exc: BaseException) -> bool:
    """Whether an error means the hub's disk is full (a file write, or SQLite's own 'database or disk is full')."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS pending (task_id INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS last_batch (pull_id TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS operators (operator TEXT PRIMARY KEY, record TEXT NOT NULL);
"""
_LEDGER_KEYS = ("seed", "num_rows", "position", "consumed", "batches")


class LedgerStoreError(RuntimeError):
    """The database cannot be used (another schema, unreadable); the message names the file."""


def remove(path: Path) -> None:
    """Delete the database with its WAL and shared-memory files (a WAL left behind must not outlive its db)."""
    path = Path(path)
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)


class LedgerStore:
    """One hub's connection to its ledger database. Not thread-safe: the caller runs one call at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: we open transactions ourselves, so one save is one commit.
            # check_same_thread=False: the hub writes from a worker thread, one write at a time.
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            # A commit survives the hub process dying, not the machine; a machine crash ends the run
            # and `--resume` starts from the checkpoint's ledger, so an fsync per commit buys nothing.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            raise LedgerStoreError(f"hub ledger {self.path} is unreadable ({e}); delete it to start over") from e
        schema = meta.get("schema", SCHEMA_VERSION)
        if schema != SCHEMA_VERSION:
            raise LedgerStoreError(f"hub ledger {self.path} has schema {schema}, this version reads {SCHEMA_VERSION}")
        self._meta: dict[str, int] = meta
        self._pending: set[int] = {row[0] for row in self.db.execute("SELECT task_id FROM pending")}
        last = self.db.execute("SELECT pull_id, body FROM last_batch").fetchone()
        self._last_batch: tuple[str, bytes] | None = (last[0], bytes(last[1])) if last else None
        self._operators: dict[str, str] = dict(self.db.execute("SELECT operator, record FROM operators").fetchall())

    # ------------------------------------------------------------------ reading

    @property
    def ledger(self) -> Ledger | None:
        """The ledger as last committed; None for a database that never saved one."""
        if not all(k in self._meta for k in _LEDGER_KEYS):
            return None
        return Ledger(**{k: self._meta[k] for k in _LEDGER_KEYS}, pending=sorted(self._pending))

    @property
    def policy_version(self) -> int:
        """The published version as last committed (-1: none)."""
        return self._meta.get("policy_version", -1)

    @property
    def operators(self) -> dict[str, str]:
        """Operator (token id) -> its trust record (JSON, rl/hub/trust.py), as last committed."""
        return dict(self._operators)

    def replay(self, pull_id: str | None) -> bytes | None:
        """The answer body of the last batch handed out, if it was for this pull (a retry)."""
        if pull_id is None or self._last_batch is None or self._last_batch[0] != pull_id:
            return None
        return self._last_batch[1]

    # ------------------------------------------------------------------ writing

    def save(self, ledger: Ledger, policy_version: int, batch: tuple[str, bytes] | None = None,
             operators: dict[str, str] | None = None) -> bool:  # fmt: skip
        """Write what changed since the last save (and `batch`: pull id, answer body; `operators`: trust
        records, only the changed ones are written) in one commit.

        Returns whether anything was written. Raises only if the disk refuses the write;
        what was committed before stays intact.
        """
        meta = {k: getattr(ledger, k) for k in _LEDGER_KEYS} | {
            "policy_version": policy_version,
            "schema": SCHEMA_VERSION,
        }
        meta_changes = {k: v for k, v in meta.items() if self._meta.get(k) != v}
        pending = set(ledger.pending)
        added, removed = pending - self._pending, self._pending - pending
        records = {op: r for op, r in (operators or {}).items() if self._operators.get(op) != r}
        if not (meta_changes or added or removed or batch or records):
            return False
        try:
            self.db.execute("BEGIN IMMEDIATE")
            self._write(meta_changes, added, removed, batch)
            self.db.executemany("INSERT OR REPLACE INTO operators (operator, record) VALUES (?, ?)", records.items())
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise
        self._meta.update(meta_changes)
        self._pending = pending
        self._operators.update(records)
        if batch is not None:
            self._last_batch = batch
        return True

    def _write(self, meta: dict[str, int], added: set[int], removed: set[int], batch) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", meta.items())
        self.db.executemany("INSERT INTO pending (task_id) VALUES (?)", ((t,) for t in sorted(added)))
        self.db.executemany("DELETE FROM pending WHERE task_id = ?", ((t,) for t in sorted(removed)))
        if batch is not None:  # only the last one is ever asked for again
            self.db.execute("DELETE FROM last_batch")
            self.db.execute("INSERT INTO last_batch (pull_id, body) VALUES (?, ?)", batch)

    def reset(self, ledger: Ledger | None) -> None:
        """Replace the data ledger with `ledger` (a checkpoint's: the trainer rolled back to it), or empty.

        Operators' trust records stay: a quarantine is not undone by resuming from an older checkpoint."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for table in ("meta", "pending", "last_batch"):
                self.db.execute(f"DELETE FROM {table}")
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self._meta, self._pending, self._last_batch = {}, set(), None
        if ledger is not None:
            self.save(ledger, -1)

    def close(self) -> None:
        self.db.close()
