"""Episodes in flight on disk: one row per training task in the hub's SQLite database (`run_dir/hub.sqlite`).

Written after every environment step, so a hub killed between two turns restarts with each episode
at its last completed turn (rl/hub/episodes.py). A row is deleted when its task's group is built
(a buffered group lost in a crash is generated again, like any pending task); rows of tasks
the ledger no longer holds pending are dropped on restart, and all rows on `rl train --resume`.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

_SCHEMA = "CREATE TABLE IF NOT EXISTS episodes (task_id INTEGER PRIMARY KEY, body TEXT NOT NULL)"


class EpisodeStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(_SCHEMA)

    def save(self, task_id: int, episodes: list[dict[str, Any]]) -> None:
        self.db.execute("INSERT OR REPLACE INTO episodes VALUES (?, ?)", (task_id, json.dumps(episodes)))

    def delete(self, task_id: int) -> None:
        self.db.execute("DELETE FROM episodes WHERE task_id = ?", (task_id,))

    def clear(self) -> None:
        """Forget every episode (`rl train --resume` went back to a checkpoint: its pending tasks start over)."""
        self.db.execute("DELETE FROM episodes")

    def load(self) -> dict[int, list[dict[str, Any]]]:
        return {tid: json.loads(body) for tid, body in self.db.execute("SELECT task_id, body FROM episodes")}

    def close(self) -> None:
        self.db.close()
