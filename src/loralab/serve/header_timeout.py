"""A bound on the time a request's headers may take to arrive.

uvicorn closes a connection that stays idle between requests, but any byte resets that
timer, so a client sending its headers a byte at a time (slowloris) holds a connection,
and its buffers, for as long as it likes. This is uvicorn's own HTTP/1.1 protocol with
one more timer: armed when the connection opens and after each response, it closes the
connection if the next request's headers are still incomplete when it fires. The body
has its own bound, in the app (``BODY_SECONDS``).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_SECONDS = 10.0


class HeaderTimeoutProtocol(H11Protocol):
    header_seconds = HEADER_SECONDS
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the headers are in
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # the next request's headers are awaited
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._header_timer = self.loop.call_later(self.header_seconds, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.info(
                "closed a connection whose request headers took over %gs", self.header_seconds
            )
            self.transport.close()
