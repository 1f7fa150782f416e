"""The request log a server writes and `ab-report` / `drift` read: one SQLite file, one row per request.

Users are stored as a salted hash: the salt is a random secret kept beside the log (`<db>.salt`, readable by its
owner only), so the same user maps to the same hash within one log (sticky A/B analysis) but a list of known
user names cannot be hashed and matched against it. One request takes one feedback; a later one replaces it.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
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

# Logs written before feedback was one-per-request may hold several rows for one id: keep the latest.
ONE_FEEDBACK_PER_REQUEST = """
DELETE FROM feedback WHERE rowid NOT IN (SELECT MAX(rowid) FROM feedback GROUP BY request_id);
CREATE UNIQUE INDEX IF NOT EXISTS feedback_one_per_request ON feedback (request_id);
"""


def salt_path(db: Path) -> Path:
    return db.with_name(db.name + ".salt")


def load_or_create_salt(db: Path) -> bytes:
    path = salt_path(db)
    if path.is_file():
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    salt = secrets.token_bytes(16)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="ascii") as handle:
        handle.write(salt.hex())
    return salt


def create_private(path: Path) -> None:
    """Create the log file readable by its owner only (0600) before SQLite opens it: it holds prompts and outputs
    with --log-prompts, and SQLite gives its -wal and -shm files the database file's mode. An existing log keeps
    the mode it has."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass


@dataclass(frozen=True)
class LoggedRequest:
    """One answered request as the log keeps it (`prompt` and `output` None unless the server logs texts)."""

    request_id: str
    arm: str
    endpoint: str
    user: str | None
    latency_s: float
    tokens_in: int
    tokens_out: int
    format_ok: bool | None
    finish_reason: str
    prompt: str | None = None
    output: str | None = None


class RequestLog:
    """Thread-safe appends (the server answers from several threads); WAL so readers never block it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        create_private(path)
        self.connection = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.executescript(SCHEMA + ONE_FEEDBACK_PER_REQUEST)
        self.salt = load_or_create_salt(path)
        self.lock = threading.Lock()

    def user_hash(self, user: str | None) -> str | None:
        if not user:
            return None
        return hashlib.sha256(self.salt + user.encode("utf-8")).hexdigest()[:16]

    def add(self, request: LoggedRequest) -> None:
        """Record a request; its user is hashed here with the log's salt."""
        r = request
        with self.lock:
            self.connection.execute(
                "INSERT INTO requests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.request_id, time.time(), r.arm, r.endpoint, self.user_hash(r.user), r.latency_s, r.tokens_in,
                 r.tokens_out, None if r.format_ok is None else int(r.format_ok), r.finish_reason, r.prompt, r.output))

    def add_feedback(self, request_id: str, score: float, comment: str | None) -> bool:
        """Store (or replace) the feedback on a request; False when no such request was logged."""
        with self.lock:
            known = self.connection.execute("SELECT 1 FROM requests WHERE id = ?", (request_id,)).fetchone()
            if known is None:
                return False
            self.connection.execute(
                "INSERT INTO feedback VALUES (?, ?, ?, ?) ON CONFLICT (request_id) DO UPDATE SET "
                "ts = excluded.ts, score = excluded.score, comment = excluded.comment",
                (request_id, time.time(), score, comment))
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
