"""HTTP bodies of the infer route: requests read within the server's limits, responses sent in slices.

A request body is refused when it is too large (413, declared, streamed or once decompressed),
when the bodies all requests hold at once would pass `max_held_body_bytes` (503 with
Retry-After) and when it does not arrive within `body_timeout_s` (408). A client that leaves
mid-body gets `ClientGone`, which is no server fault.
"""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Callable, Iterator

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from noisyseg.serve.errors import (
    BadRequest,
    BodyTimeout,
    Busy,
    ClientGone,
    PayloadTooLarge,
    UnsupportedMediaType,
    quoted,
)
from noisyseg.serve.protocol import HEADER_LENGTH_HEADER, EncodedResponse, parse_length
from noisyseg.serve.settings import ServerSettings

_DECOMPRESSION_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class BodyBudget:
    """The bytes requests hold in memory at once, across all requests and both protocols: request
    bodies (HTTP) and messages (gRPC), the tensors decoded from them where those are not views of
    the body, and the answers.

    A request holds its share from the first byte until its answer is sent (or it fails). Only
    the event loop touches it, so no lock is needed.
    """

    def __init__(self, limit: int, on_idle: Callable[[], object] = lambda: None, large: int = 4 << 20) -> None:
        self.limit = limit
        self.held = 0
        # Called when the last request holding anything ends after one that held `large` bytes.
        self.on_idle = on_idle
        self.large = large
        self._large_since_idle = False

    @contextlib.contextmanager
    def share(self) -> Iterator[Callable[[int], None]]:
        """A `take(count)` function for one request; what it took is given back on exit."""
        taken = 0

        def take(count: int) -> None:
            nonlocal taken
            if taken + count > self.limit:  # not even with the server to itself: no use retrying
                raise PayloadTooLarge(
                    f"this request needs {taken + count} bytes for its body, decoded tensors and answer, over the "
                    f"{self.limit} bytes the server holds for all requests at once (--max-held-body-mb)"
                )
            if self.held + count > self.limit:
                raise Busy(
                    f"the server already holds {self.held} bytes of request bodies, decoded tensors and answers "
                    f"(limit {self.limit}); retry shortly"
                )
            self.held += count
            taken += count

        try:
            yield take
        finally:
            self.held -= taken
            self._large_since_idle |= taken >= self.large
            if self.held == 0 and self._large_since_idle:
                self._large_since_idle = False
                self.on_idle()


async def read_body(
    request: Request,
    settings: ServerSettings,
    take: Callable[[int], None],
    check_header: Callable[[bytes, int], object] | None = None,
) -> bytes | bytearray:
    """The request body, decompressed if the client compressed it, within every limit.

    For an uncompressed binary-extension body of declared length, `check_header(json_header,
    binary_length)` runs as soon as the JSON header has arrived, before the tensors are read:
    what it raises refuses the request without waiting for the rest of the upload."""
    limit = settings.max_body_bytes
    declared = request.headers.get("content-length")
    size = None
    if declared is not None:
        size = parse_length(declared, "header Content-Length")
        if size > limit:
            raise PayloadTooLarge(f"request body of {size} bytes exceeds the limit of {limit} bytes")
        take(size)  # all of it now, so slow uploads cannot pile up past the budget
    # (where the JSON header ends, the binary bytes after it), or None: no early check
    early = _early_header(request, size) if check_header is not None else None
    body = bytearray()
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            async for chunk in request.stream():
                if len(body) + len(chunk) > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                if declared is None:
                    take(len(chunk))
                body += chunk
                if early is not None and check_header is not None and len(body) >= early[0]:
                    check_header(bytes(body[: early[0]]), early[1])
                    early = None
    except TimeoutError:
        raise BodyTimeout(
            f"request body not received within {settings.body_timeout_s:g} s ({len(body)} bytes arrived)"
        ) from None
    except ClientDisconnect:
        raise ClientGone(f"client disconnected after sending {len(body)} bytes of the request body") from None
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in _DECOMPRESSION_WBITS:
        raise UnsupportedMediaType(f"Content-Encoding {quoted(encoding)} is not supported (use gzip, deflate or none)")
    data = _decompress(body, encoding, limit)
    take(len(data))
    return data


def _early_header(request: Request, size: int | None) -> tuple[int, int] | None:
    """(where the JSON header of a binary body ends, the binary bytes after it), when the header
    can be checked before the rest arrives: a declared, uncompressed body with a valid header
    length inside it."""
    header_length = request.headers.get(HEADER_LENGTH_HEADER)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if size is None or header_length is None or encoding != "identity":
        return None
    length = parse_length(header_length, f"header {HEADER_LENGTH_HEADER}")
    return (length, size - length) if 0 < length < size else None  # else `decode_request` says what is wrong


def _decompress(body: bytearray, encoding: str, limit: int) -> bytes:
    decompressor = zlib.decompressobj(_DECOMPRESSION_WBITS[encoding])
    try:
        # Bounded, so a small compressed body cannot expand without limit.
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as err:
        raise BadRequest(f"request body is not valid {encoding} data ({err})") from None
    if len(data) > limit or decompressor.unconsumed_tail:
        raise PayloadTooLarge(f"decompressed request body exceeds the limit of {limit} bytes")
    return data


class EncodedBodyResponse(Response):
    """An `EncodedResponse` sent chunk by chunk: the server's transport buffers one chunk at a
    time (uvicorn waits for the socket to drain), never a copy of the whole body."""

    def __init__(self, encoded: EncodedResponse, on_sent: Callable[[], object] = lambda: None) -> None:
        self.status_code = 200
        self.background = None
        self.chunks = encoded.chunks
        self.on_sent = on_sent
        self.init_headers({**encoded.headers, "content-length": str(encoded.size)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the chunks, then call `on_sent` (also when the client left halfway)."""
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for chunk in self.chunks:
                await send({"type": "http.response.body", "body": bytes(chunk), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.chunks = []
            self.on_sent()
