"""The contribution ledger's tables in the hub's SQLite database (`run_dir/hub.sqlite`, beside rl/hub/ledger.py's).

contrib_contributors   contributor -> kind (identity | token), first and last activity
contrib_registrations  worker id -> contributor, token id, name: registration, token and identity kept apart
contrib_activity       per contributor, step, policy version, event and reason: groups, samples, tokens and
                       seconds, added up (hub-side counts). Events: submitted (seconds: generation time),
                       scored, rejected (reason: the refusal's), quarantined (seconds; reason: the token)
contrib_trained        per step, the receipt's entries in tree order (the trained work)
contrib_masked         per step and task, sequences and tokens the trainer masked, by reason
contrib_receipts       per step, the signed receipt

`report` and `report_steps` read a run's database read-only for `rl contributions RUN_DIR`.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from rl.wire.receipts import Receipt, ReceiptEntry, StepReceipt

_SCHEMA = """
CREATE TABLE IF NOT EXISTS contrib_contributors (contributor TEXT PRIMARY KEY, kind TEXT NOT NULL,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL);
CREATE TABLE IF NOT EXISTS contrib_registrations (worker_id TEXT PRIMARY KEY, contributor TEXT NOT NULL,
    token TEXT NOT NULL, name TEXT NOT NULL, registered REAL NOT NULL);
CREATE TABLE IF NOT EXISTS contrib_activity (contributor TEXT NOT NULL, step INTEGER NOT NULL,
    policy_version INTEGER NOT NULL, event TEXT NOT NULL, reason TEXT NOT NULL, groups INTEGER NOT NULL,
    samples INTEGER NOT NULL, tokens INTEGER NOT NULL, seconds REAL NOT NULL,
    PRIMARY KEY (contributor, step, policy_version, event, reason));
CREATE TABLE IF NOT EXISTS contrib_trained (step INTEGER NOT NULL, idx INTEGER NOT NULL, contributor TEXT NOT NULL,
    task_id INTEGER NOT NULL, policy_version INTEGER NOT NULL, samples INTEGER NOT NULL, tokens INTEGER NOT NULL,
    digest TEXT NOT NULL, PRIMARY KEY (step, idx));
CREATE INDEX IF NOT EXISTS contrib_trained_by_contributor ON contrib_trained (contributor, step);
CREATE TABLE IF NOT EXISTS contrib_masked (step INTEGER NOT NULL, contributor TEXT NOT NULL, task_id INTEGER NOT NULL,
    reason TEXT NOT NULL, samples INTEGER NOT NULL, tokens INTEGER NOT NULL, PRIMARY KEY (step, task_id, reason));
CREATE TABLE IF NOT EXISTS contrib_receipts (step INTEGER PRIMARY KEY, run_key TEXT NOT NULL, body TEXT NOT NULL,
    recorded REAL NOT NULL);
"""
_STEP_TABLES = ("contrib_trained", "contrib_masked", "contrib_receipts")


def _kind(contributor: str) -> str:
    return contributor.split(":", 1)[0].replace("ed25519", "identity")


class ContributionDB:
    """One connection to the contribution tables (None: in memory, for a hub without a run database).
    One call at a time (the hub serialises its writes)."""

    def __init__(self, path: Path | None) -> None:
        self.db = sqlite3.connect(":memory:" if path is None else str(path), isolation_level=None,
                                  check_same_thread=False, timeout=30.0)  # fmt: skip
        if path is not None:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # as rl/hub/ledger.py: a commit outlives the process
        self.db.executescript(_SCHEMA)
        self._totals: dict[str, tuple[int, int]] | None = None

    def _transaction(self, write) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            write()
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise

    def _seen(self, contributor: str, when: float) -> None:
        self.db.execute(
            "INSERT INTO contrib_contributors VALUES (?, ?, ?, ?) ON CONFLICT (contributor) DO UPDATE SET "
            "first_seen = MIN(first_seen, excluded.first_seen), last_seen = MAX(last_seen, excluded.last_seen)",
            (contributor, _kind(contributor), when, when),
        )

    def register(self, worker_id: str, contributor: str, token: str, name: str, now: float) -> None:
        def write() -> None:
            self._seen(contributor, now)
            self.db.execute("INSERT OR REPLACE INTO contrib_registrations VALUES (?, ?, ?, ?, ?)",
                            (worker_id, contributor, token, name, now))  # fmt: skip

        self._transaction(write)

    def add_activity(self, pending: dict, seen: dict[str, float]) -> None:
        """Add `{(contributor, step, version, event, reason): [groups, samples, tokens, seconds]}` in one commit."""

        def write() -> None:
            for contributor, when in seen.items():
                self._seen(contributor, when)
            self.db.executemany(
                "INSERT INTO contrib_activity VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT "
                "(contributor, step, policy_version, event, reason) DO UPDATE SET groups = groups + excluded.groups, "
                "samples = samples + excluded.samples, tokens = tokens + excluded.tokens, "
                "seconds = seconds + excluded.seconds",
                [(*key, *row) for key, row in pending.items()],
            )

        if pending or seen:
            self._transaction(write)

    def record_step(self, report: StepReceipt, now: float) -> None:
        """A step's receipt, entries and masked work, replacing that step and every later one, in one commit."""
        r = report.receipt

        def write() -> None:
            for table in _STEP_TABLES:
                self.db.execute(f"DELETE FROM {table} WHERE step >= ?", (r.step,))
            self.db.execute("INSERT INTO contrib_receipts VALUES (?, ?, ?, ?)",
                            (r.step, r.run_key, r.model_dump_json(), now))  # fmt: skip
            self.db.executemany(
                "INSERT INTO contrib_trained VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(r.step, i, e.contributor, e.task_id, e.policy_version, e.samples, e.tokens, e.digest)
                 for i, e in enumerate(report.entries)],
            )  # fmt: skip
            self.db.executemany(
                "INSERT OR REPLACE INTO contrib_masked VALUES (?, ?, ?, ?, ?, ?)",
                [(r.step, m.contributor, m.task_id, why, n, m.tokens.get(why, 0))
                 for m in report.masked for why, n in m.reasons.items()],
            )  # fmt: skip

        self._transaction(write)
        self._totals = None

    def contributor_tokens(self) -> dict[str, set[str]]:
        """Contributor -> the tokens (ids) it registered with, over the run."""
        out: dict[str, set[str]] = {}
        for contributor, token in self.db.execute("SELECT DISTINCT contributor, token FROM contrib_registrations"):
            out.setdefault(contributor, set()).add(token)
        return out

    def run_key(self) -> str | None:
        row = self.db.execute("SELECT run_key FROM contrib_receipts ORDER BY step LIMIT 1").fetchone()
        return row[0] if row else None

    def steps_of(self, contributor: str, from_step: int = 0) -> list[tuple[Receipt, list[ReceiptEntry]]]:
        """Every step from `from_step` on with entries of `contributor`: its receipt and all its entries in tree
        order."""
        query = "SELECT DISTINCT step FROM contrib_trained WHERE contributor = ? AND step >= ? ORDER BY step"
        steps = [s for (s,) in self.db.execute(query, (contributor, from_step))]
        out = []
        for step in steps:
            body = self.db.execute("SELECT body FROM contrib_receipts WHERE step = ?", (step,)).fetchone()[0]
            rows = self.db.execute("SELECT contributor, task_id, policy_version, samples, tokens, digest FROM "
                                   "contrib_trained WHERE step = ? ORDER BY idx", (step,))  # fmt: skip
            entries = [ReceiptEntry(contributor=c, task_id=t, policy_version=v, samples=s, tokens=n, digest=d)
                       for c, t, v, s, n, d in rows]  # fmt: skip
            out.append((Receipt.model_validate_json(body), entries))
        return out

    def trained_totals(self) -> dict[str, tuple[int, int, int]]:
        """Contributor -> (trained samples, trained tokens, masked samples) over the run."""
        if self._totals is None:
            rows = self.db.execute(
                "SELECT contributor, SUM(samples), SUM(tokens), 0 FROM contrib_trained GROUP BY 1 "
                "UNION ALL SELECT contributor, 0, 0, SUM(samples) FROM contrib_masked GROUP BY 1"
            )
            totals: dict[str, tuple[int, int, int]] = {}
            for c, *row in rows:
                totals[c] = tuple(a + int(b) for a, b in zip(totals.get(c, (0, 0, 0)), row, strict=True))
            self._totals = totals
        return self._totals

    def activity_totals(self) -> dict[str, dict[str, list]]:
        """Contributor -> event -> [groups, samples, tokens, seconds] over the run (as written)."""
        out: dict[str, dict[str, list]] = {}
        rows = self.db.execute("SELECT contributor, event, SUM(groups), SUM(samples), SUM(tokens), SUM(seconds) "
                               "FROM contrib_activity GROUP BY 1, 2")  # fmt: skip
        for c, event, *row in rows:
            out.setdefault(c, {})[event] = list(row)
        return out

    def seen_times(self) -> dict[str, list[float]]:
        """Contributor -> [first seen, last seen] (unix time)."""
        return {c: [first, last] for c, first, last in
                self.db.execute("SELECT contributor, first_seen, last_seen FROM contrib_contributors")}  # fmt: skip

    def close(self) -> None:
        self.db.close()


def _open(path: Path) -> sqlite3.Connection | None:
    """A run's hub database, read-only (None: it has no contribution tables)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no hub database (is this a run directory?)")
    db = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'contrib_contributors'").fetchone():
        db.close()
        return None
    return db


def report(path: Path) -> list[dict]:
    """Per contributor, from a run's hub database (opened read-only): trained groups, samples, tokens and share;
    masked work by reason and its rate; submitted, scored and rejected work (by reason) and the rejected rate;
    generation and quarantined seconds; policy versions used; tokens and registrations; first and last seen."""
    db = _open(path)
    if db is None:
        return []
    try:
        rows: dict[str, dict] = {
            c: _blank(c, kind, first, last) for c, kind, first, last in db.execute("SELECT * FROM contrib_contributors")
        }
        trained = "SELECT contributor, COUNT(*), SUM(samples), SUM(tokens) FROM contrib_trained GROUP BY 1"
        for c, groups, samples, tokens in db.execute(trained):
            row = rows.setdefault(c, _blank(c, _kind(c), None, None))
            row.update(trained_groups=groups, trained_samples=samples, trained_tokens=tokens)
        masked = "SELECT contributor, reason, SUM(samples), SUM(tokens) FROM contrib_masked GROUP BY 1, 2"
        for c, reason, n, tokens in db.execute(masked):
            if c in rows:
                rows[c]["masked"][reason] = n
                rows[c]["masked_samples"] += n
                rows[c]["masked_tokens"] += tokens
        activity = ("SELECT contributor, event, reason, SUM(groups), SUM(samples), SUM(tokens), SUM(seconds) "
                    "FROM contrib_activity GROUP BY 1, 2, 3")  # fmt: skip
        for c, event, reason, groups, samples, tokens, seconds in db.execute(activity):
            if c in rows:
                _add_event(rows[c], event, reason, groups, samples, tokens, seconds)
        versions = ("SELECT contributor, policy_version FROM contrib_activity WHERE event = 'submitted' UNION "
                    "SELECT contributor, policy_version FROM contrib_trained ORDER BY 1, 2")  # fmt: skip
        for c, version in db.execute(versions):
            if c in rows:
                rows[c]["versions"].append(version)
        registrations = ("SELECT contributor, GROUP_CONCAT(DISTINCT token), COUNT(*) FROM contrib_registrations "
                         "GROUP BY 1")  # fmt: skip
        for c, tokens, n in db.execute(registrations):
            if c in rows:
                rows[c]["tokens"], rows[c]["registrations"] = sorted(tokens.split(",")), n
    finally:
        db.close()
    total = sum(r["trained_tokens"] for r in rows.values())
    for r in rows.values():
        _rates(r, total)
    return sorted(rows.values(), key=lambda r: (-r["trained_tokens"], r["contributor"]))


def report_steps(path: Path) -> list[dict]:
    """Per contributor and step, the same counts (no registrations, no first/last seen). A trained or masked
    row's step is the optimizer step that trained it; a submitted, scored, rejected or quarantined one's is
    the number of batches the trainer had taken when it happened."""
    db = _open(path)
    if db is None:
        return []
    rows: dict[tuple[str, int], dict] = {}

    def row(c: str, step: int) -> dict:
        return rows.setdefault((c, step), {"step": step, **_blank(c, _kind(c), None, None)})

    try:
        for c, step, groups, samples, tokens in db.execute(
            "SELECT contributor, step, COUNT(*), SUM(samples), SUM(tokens) FROM contrib_trained GROUP BY 1, 2"
        ):
            row(c, step).update(trained_groups=groups, trained_samples=samples, trained_tokens=tokens)
        for c, step, reason, n, tokens in db.execute(
            "SELECT contributor, step, reason, SUM(samples), SUM(tokens) FROM contrib_masked GROUP BY 1, 2, 3"
        ):
            r = row(c, step)
            r["masked"][reason] = n
            r["masked_samples"] += n
            r["masked_tokens"] += tokens
        for c, step, event, reason, groups, samples, tokens, seconds in db.execute(
            "SELECT contributor, step, event, reason, SUM(groups), SUM(samples), SUM(tokens), SUM(seconds) "
            "FROM contrib_activity GROUP BY 1, 2, 3, 4"
        ):
            _add_event(row(c, step), event, reason, groups, samples, tokens, seconds)
        for c, step, version in db.execute(
            "SELECT contributor, step, policy_version FROM contrib_activity WHERE event = 'submitted' UNION "
            "SELECT contributor, step, policy_version FROM contrib_trained ORDER BY 1, 2, 3"
        ):
            row(c, step)["versions"].append(version)
    finally:
        db.close()
    totals: dict[int, int] = {}
    for (_, step), r in rows.items():
        totals[step] = totals.get(step, 0) + r["trained_tokens"]
    for (_, step), r in rows.items():
        _rates(r, totals[step])
        for k in ("first_seen", "last_seen", "tokens", "registrations"):
            del r[k]
    return sorted(rows.values(), key=lambda r: (r["step"], -r["trained_tokens"], r["contributor"]))


def _add_event(row: dict, event: str, reason: str, groups: int, samples: int, tokens: int, seconds: float) -> None:
    if event == "rejected":
        row["rejected"][reason] = row["rejected"].get(reason, 0) + groups
        row["rejected_groups"] += groups
        row["rejected_tokens"] += tokens
    elif event == "quarantined":
        row["quarantined_s"] += seconds
    elif event in ("submitted", "scored"):
        row[f"{event}_groups"] += groups
        row[f"{event}_samples"] += samples
        row[f"{event}_tokens"] += tokens
        if event == "submitted":
            row["generation_s"] += seconds


def _rates(r: dict, total_tokens: int) -> None:
    r["share"] = r["trained_tokens"] / total_tokens if total_tokens else 0.0
    checked = r["trained_samples"] + r["masked_samples"]
    r["masked_rate"] = r["masked_samples"] / checked if checked else 0.0
    offered = r["submitted_groups"] + r["rejected_groups"]
    r["rejected_rate"] = r["rejected_groups"] / offered if offered else 0.0


def _blank(contributor: str, kind: str, first: float | None, last: float | None) -> dict:
    return {"contributor": contributor, "kind": kind, "first_seen": first, "last_seen": last, "trained_groups": 0,
            "trained_samples": 0, "trained_tokens": 0, "masked_samples": 0, "masked_tokens": 0, "masked": {},
            "submitted_groups": 0, "submitted_samples": 0, "submitted_tokens": 0, "generation_s": 0.0,
            "scored_groups": 0, "scored_samples": 0, "scored_tokens": 0, "rejected_groups": 0, "rejected_tokens": 0,
            "rejected": {}, "quarantined_s": 0.0, "versions": [], "tokens": [], "registrations": 0}  # fmt: skip
