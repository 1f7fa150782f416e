"""What `specialist serve` is configured with (`ServeSettings`) and the checks its keys must pass, apart from the
HTTP handlers (serve.py), the request bodies (serve_requests.py) and the workers (dispatch.py) that all read it."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from specialist.deploy.shadow import ShadowSettings


@dataclass
class ServeSettings:
    split: dict[str, float]
    db: Path
    api_key: str | None = None
    log_prompts: bool = False
    max_batch: int = 8
    max_wait_ms: float = 10.0
    queue_size: int = 64
    max_tokens_limit: int = 512
    max_prompt_tokens: int = 2048
    max_request_bytes: int = 64 * 1024
    retry_after_s: int = 1
    drain_seconds: float = 5.0
    feedback_range: tuple[float, float] = (-1.0, 1.0)
    max_comment_chars: int = 2000
    shadow: ShadowSettings = field(default_factory=ShadowSettings)
    admin_key: str | None = None  # POST /admin/arms/{name}; None: the admin endpoint answers 403
    admin_roots: tuple[Path, ...] = ()  # the folders an admin swap may load a run or export from
    scrub_logs: bool = False
    log_max_rows: int | None = None
    log_max_age_s: float | None = None

    def __post_init__(self) -> None:
        check_api_key(self.api_key)
        check_admin_key(self.admin_key, self.api_key)


def check_api_key(key: str | None) -> None:
    """Refuse a key no client can send: empty (an unset variable expanded into --api-key would otherwise serve
    with no authentication at all), or holding characters outside printable ASCII (headers travel as Latin-1 and
    are stripped of surrounding blanks, so such a key never matches, yet the server would start)."""
    if key is None:
        return
    from specialist.errors import ConfigError

    if not key:
        raise ConfigError("--api-key is empty: the server would answer without authentication",
                          hint="give a key (e.g. `openssl rand -hex 32`), or leave --api-key and "
                               "SPECIALIST_API_KEY out to serve without one on purpose")
    if not all("!" <= ch <= "~" for ch in key):
        raise ConfigError("--api-key holds characters a client cannot send in an Authorization header "
                          "(spaces, control or non-ASCII characters)",
                          hint="use printable ASCII only, e.g. `openssl rand -hex 32`")


MIN_ADMIN_KEY_CHARS = 16


def check_admin_key(key: str | None, api_key: str | None) -> None:
    """The admin key swaps the models users are served: it must be long, sendable, and not the API key (every
    client holds that one)."""
    if key is None:
        return
    from specialist.errors import ConfigError

    check_api_key(key)
    if len(key) < MIN_ADMIN_KEY_CHARS:
        raise ConfigError(f"--admin-key is under {MIN_ADMIN_KEY_CHARS} characters",
                          hint="use e.g. `openssl rand -hex 32`")
    if api_key is not None and secrets.compare_digest(key, api_key):
        raise ConfigError("--admin-key equals --api-key: every API client could swap the served models",
                          hint="give the admin endpoint a key of its own")
