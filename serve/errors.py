"""The errors a request can end in, each with the HTTP status it answers with (gRPC maps them to
its status codes in `grpc_server.py`), and how an error quotes what the client sent."""

from __future__ import annotations

from collections.abc import Mapping

# A client's names and values are quoted in errors cut to this many characters: a 16 KB model name
# would otherwise make an error message too large for a client (or gRPC's metadata) to take.
_QUOTED_CHARS = 80


class ServeError(Exception):
    """An error with the HTTP status it maps to; its message is returned as `{"error": ...}`."""

    status_code = 500
    headers: Mapping[str, str] = {}


class BadRequest(ServeError):
    status_code = 400


class Unauthorized(ServeError):
    status_code = 401


class NotFound(ServeError):
    status_code = 404


class PayloadTooLarge(ServeError):
    status_code = 413


class UnsupportedMediaType(ServeError):
    status_code = 415


class Unavailable(ServeError):
    status_code = 503


class Busy(Unavailable):
    """Too much is in flight right now; the client may retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_s)}


class BodyTimeout(ServeError):
    status_code = 408


class RequestTimeout(ServeError):
    status_code = 504


class ClientGone(ServeError):
    """The client closed the connection before its request was read: nobody to answer, no fault.

    499 is nginx's "client closed request"; it only ever appears in logs and metrics.
    """

    status_code = 499


def quoted(value: object) -> str:
    """A client's name or value as an error quotes it: its repr, cut to a bounded length."""
    text = repr(value)
    if len(text) <= _QUOTED_CHARS:
        return text
    return f"{text[:_QUOTED_CHARS]}... ({len(text)} characters)"
