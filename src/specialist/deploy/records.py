"""The request log a server writes and `ab-report` / `drift` read: one SQLite file, one row per request."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id TEXT PRIMARY KEY,
    ts REAL NOT NULL,
    arm TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    user_hash TEXT,
    latency_s REAL NOT NULL,
    tokens_in INTEGER NOT NULL,
    tokens_out INTEGER NOT NULL,
    format_ok INTEGER,
    finish_reason TEXT,
    prompt TEXT,
    output TEXT
);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT NOT NULL REFERENCES requests(id),
    ts REAL NOT NULL,
    score REAL NOT NULL,
    comment TEXT
);
CREATE INDEX IF NOT EXISTS requests_arm_ts ON requests (arm, ts);
"""


class RequestLog:
    """Thread-safe appends (the server answers from several threads); WAL so readers never block it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.connection = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.executescript(SCHEMA)
        self.lock = threading.Lock()

    def add(self, *, request_id: str, arm: str, endpoint: str, user: str | None, latency_s: float, tokens_in: int,
            tokens_out: int, format_ok: bool | None, finish_reason: str, prompt: str | None,
            output: str | None) -> None:
        with self.lock:
            self.connection.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, time.time(), arm, endpoint, user, latency_s, tokens_in, tokens_out,
                 None if format_ok is None else int(format_ok), finish_reason, prompt, output))

    def add_feedback(self, request_id: str, score: float, comment: str | None) -> bool:
        with self.lock:
            known = self.connection.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone()
            if known is None:
                return False
            self.connection.execute("INSERT INTO feedback VALUES (?, ?, ?, ?)", (request_id, time.time(), score, comment))
            return True

    def close(self) -> None:
        with self.lock:
            self.connection.close()


def read_requests(path: Path) -> list[dict]:
    if not path.is_file():
        from specialist.errors import ConfigError

        raise ConfigError(f"request log {path} not found", hint="pass the --db file a `specialist serve` wrote")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    rows = [dict(r) for r in connection.execute(
        "SELECT r.*, (SELECT AVG(score) FROM feedback f WHERE f.request_id = r.id) AS feedback "
        "FROM requests r ORDER BY ts")]
    connection.close()
    return rows
