"""HTTP connections: uvicorn's h11 protocol with a deadline on each request's line and headers.

uvicorn times out an idle keep-alive connection, but not one that has started a request and
sends its headers a byte at a time (or a new connection that sends nothing): such connections
would stay open for good. Here every request's line and headers must arrive within
`header_timeout_s` of the connection opening or of the previous response; otherwise the server
answers 408 and closes the connection. The body has its own limit (`--body-timeout-s`).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from noisyseg.serve.protocol import error_body

logger = logging.getLogger(__name__)


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class, closing connections whose headers take over `timeout_s`."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the headers are in (or the connection ended)
                self._cancel_header_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # The next request on this keep-alive connection gets its own deadline.
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm_header_timer()

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(timeout_s, self._headers_timed_out)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            logger.info("closing the connection of %s: request headers not received within %g s", client, timeout_s)
            body = error_body(f"request headers not received within {timeout_s:g} s")
            headers = [
                (b"content-type", b"application/json"),
                (b"connection", b"close"),
                (b"content-length", str(len(body)).encode()),
            ]
            try:
                for event in (h11.Response(status_code=408, headers=headers), h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event) or b"")
            except h11.LocalProtocolError:  # a state h11 cannot answer from: just close
                pass
            self.transport.close()

    return HeaderTimeoutProtocol
