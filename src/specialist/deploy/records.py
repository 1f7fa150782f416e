"""The request log a server writes and `ab-report` / `drift` read: one SQLite file, one row per request.

Users are stored as a salted hash: the salt is a random secret kept beside the log (`<db>.salt`, readable by its
owner only), so the same user maps to the same hash within one log (sticky A/B analysis) but a list of known
user names cannot be hashed and matched against it. One request takes one feedback; a later one replaces it.

A shadow arm's answer to a request is a row of `shadow` keyed by the live request's id: never served, only compared.
With `scrub`, prompts and answers pass `data.clean.Scrubber` (the rules `prepare` applies) before they are stored;
with `max_rows` / `max_age_s` the oldest requests (and their feedback and shadow answers) are deleted as new ones
arrive, so a long-running server's log stays bounded.
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
CREATE TABLE IF NOT EXISTS shadow (
    request_id TEXT NOT NULL,
    arm TEXT NOT NULL,
    ts REAL NOT NULL,
    latency_s REAL NOT NULL,
    tokens_out INTEGER NOT NULL,
    format_ok INTEGER,
    agrees INTEGER NOT NULL,
    output TEXT,
    PRIMARY KEY (request_id, arm)
);
CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts);
"""
# columns added after the first release: (name, type), added to an older log when it is opened
ADDED_COLUMNS = (("confidence", "REAL"),)
REQUEST_COLUMNS = ("id", "ts", "arm", "endpoint", "user_hash", "latency_s", "tokens_in", "tokens_out", "format_ok",
                   "finish_reason", "prompt", "output", "confidence")
PRUNE_EVERY = 100  # inserts between retention sweeps: a DELETE per request would cost more than the insert

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
    confidence: float | None = None  # a classifier arm's probability of its answer (what harvest ranks by)


class RequestLog:
    """Thread-safe appends (the server answers from several threads); WAL so readers never block it."""

    def __init__(self, path: Path, scrub: bool = False, max_rows: int | None = None,
                 max_age_s: float | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        create_private(path)
        self.connection = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.connection.execute("PRAGMA journal_mode=WAL")
        self.connection.execute("PRAGMA synchronous=NORMAL")  # WAL keeps the log consistent; a crash loses ms
        self.connection.executescript(SCHEMA + ONE_FEEDBACK_PER_REQUEST)
        _add_missing_columns(self.connection)
        self.salt = load_or_create_salt(path)
        self.lock = threading.Lock()
        self.scrubber = _log_scrubber() if scrub else None
        self.max_rows, self.max_age_s = max_rows, max_age_s
        self.inserts = 0

    def clean(self, text: str | None) -> str | None:
        """`text` as it may be stored: scrubbed of secrets and personal data when the log scrubs."""
        if text is None or self.scrubber is None:
            return text
        return self.scrubber(text)

    def user_hash(self, user: str | None) -> str | None:
        if not user:
            return None
        return hashlib.sha256(self.salt + user.encode("utf-8")).hexdigest()[:16]

    def add(self, request: LoggedRequest) -> None:
        """Record a request; its user is hashed here with the log's salt, text scrubbed when the log scrubs."""
        r = request
        values = (r.request_id, time.time(), r.arm, r.endpoint, self.user_hash(r.user), r.latency_s, r.tokens_in,
                  r.tokens_out, None if r.format_ok is None else int(r.format_ok), r.finish_reason,
                  self.clean(r.prompt), self.clean(r.output), r.confidence)
        with self.lock:
            self.connection.execute(f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES "
                                    f"({', '.join('?' * len(REQUEST_COLUMNS))})", values)
            self._count_insert()

    def add_shadow(self, *, request_id: str, arm: str, latency_s: float, tokens_out: int, format_ok: bool | None,
                   agrees: bool, output: str | None) -> None:
        """Record a shadow arm's answer to the live request `request_id` (never served)."""
        with self.lock:
            self.connection.execute(
                "INSERT OR REPLACE INTO shadow VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (request_id, arm, time.time(), latency_s, tokens_out, None if format_ok is None else int(format_ok),
                 int(agrees), self.clean(output)))

    def _count_insert(self) -> None:
        self.inserts += 1
        if self.inserts % PRUNE_EVERY == 0:
            self.prune()

    def prune(self, now: float | None = None) -> int:
        """Delete the requests past the age or row limit (oldest first) with their feedback and shadow answers;
        how many requests went. Called with the lock held (or alone)."""
        if self.max_rows is None and self.max_age_s is None:
            return 0
        cutoff = -1.0 if self.max_age_s is None else (now or time.time()) - self.max_age_s
        if self.max_rows is not None:
            row = self.connection.execute("SELECT ts FROM requests ORDER BY ts DESC LIMIT 1 OFFSET ?",
                                          (self.max_rows,)).fetchone()
            cutoff = max(cutoff, row[0] if row else -1.0)
        doomed = "SELECT id FROM requests WHERE ts <= ?"
        self.connection.execute("BEGIN")
        self.connection.execute(f"DELETE FROM feedback WHERE request_id IN ({doomed})", (cutoff,))
        self.connection.execute(f"DELETE FROM shadow WHERE request_id IN ({doomed})", (cutoff,))
        gone = self.connection.execute("DELETE FROM requests WHERE ts <= ?", (cutoff,)).rowcount
        self.connection.execute("COMMIT")
        return gone

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


def _add_missing_columns(connection: sqlite3.Connection) -> None:
    """A log written before a column existed gains it (NULL in the old rows), so one reader reads every log."""
    present = {row[1] for row in connection.execute("PRAGMA table_info(requests)")}
    for name, kind in ADDED_COLUMNS:
        if name not in present:
            connection.execute(f"ALTER TABLE requests ADD COLUMN {name} {kind}")


def _log_scrubber():
    from specialist.data.clean import SCRUB_KINDS, Scrubber

    return Scrubber(SCRUB_KINDS)


def _open_read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        from specialist.errors import ConfigError

        raise ConfigError(f"request log {path} not found", hint="pass the --db file a `specialist serve` wrote")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    connection.row_factory = sqlite3.Row
    return connection


def read_requests(path: Path) -> list[dict]:
    connection = _open_read_only(path)
    try:
        rows = [dict(r) for r in connection.execute(
            "SELECT r.*, (SELECT AVG(score) FROM feedback f WHERE f.request_id = r.id) AS feedback "
            "FROM requests r ORDER BY ts")]
    finally:
        connection.close()
    for row in rows:
        row.setdefault("confidence", None)  # a log older than the column, opened read-only, lacks it
    return rows


def read_shadows(path: Path) -> list[dict]:
    """Every shadow answer, with its live request's arm, format verdict, output, latency and feedback."""
    connection = _open_read_only(path)
    try:
        if connection.execute("SELECT 1 FROM sqlite_master WHERE name = 'shadow'").fetchone() is None:
            return []  # a log from before shadow arms
        return [dict(r) for r in connection.execute(
            "SELECT s.*, r.arm AS live_arm, r.format_ok AS live_format_ok, r.latency_s AS live_latency_s, "
            "r.output AS live_output, (SELECT AVG(score) FROM feedback f WHERE f.request_id = s.request_id) "
            "AS feedback FROM shadow s JOIN requests r ON r.id = s.request_id ORDER BY s.ts")]
    finally:
        connection.close()
