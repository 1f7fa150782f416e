"""The error every part of `specialist serve` answers with, in OpenAI's shape: the request checks, the handlers
and the workers (a full queue, a shutdown) raise an `ApiError`, and serve.py turns it into the response."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from specialist.deploy.serve_settings import ServeSettings


class ApiError(Exception):
    """An answer in OpenAI's error shape; `code` is also the kind counted in /metrics."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind, self.headers = (
            status, message, code, param, kind, headers)


def busy_error(settings: ServeSettings, message: str = "server busy: the queue is full, retry shortly") -> ApiError:
    return ApiError(503, message, "queue_full", kind="server_error",
                    headers={"Retry-After": str(settings.retry_after_s)})
