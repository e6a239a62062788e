"""A TCP proxy between a test and a database server, for injecting network faults.

Not a test module. ``async with Proxy(host, port) as proxy`` listens on an ephemeral
port of 127.0.0.1 and forwards every connection to ``host:port``; point a database
URL at it with ``proxy.route(url)``. While it runs, a test can:

- ``cut()``: reset every current connection (both sides), as a crashed router would;
- ``refuse(True)``: reset every new connection as soon as it is accepted, so
  connecting fails at once ("database unreachable");
- ``stall(True)``: forward nothing in either direction, not even a close, without
  closing anything ("database stalls"); ``stall(False)`` resumes;
- ``delay(seconds)``: hold every chunk that long before forwarding it;
- ``cut_after(marker)``: forward the next client-to-server chunk containing
  ``marker``, swallow the server's answer to it, then reset that connection
  ("dropped between the INSERT and its answer");
- ``stall_after(marker)``: forward that chunk, then stall everything before the
  answer can pass.

When a stall ends, held bytes are forwarded, except those whose sender has since
reset its connection: TCP drops the unacknowledged data of a reset socket. (A
sender that closed in an orderly way still has its bytes delivered, late: a
request can reach the server after its client gave up on it.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from sqlalchemy.engine import make_url

_CHUNK = 65536
_LINGER_RESET = struct.pack("ii", 1, 0)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close a connection with a TCP RST rather than an orderly FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    writer.transport.abort()


@dataclass
class _Trap:
    marker: bytes
    action: Literal["cut", "stall"]
    #: Set once the chunk was forwarded and the action taken.
    sprung: asyncio.Event


class _Link:
    """One client connection and the upstream connection it is forwarded to."""

    def __init__(self, client: asyncio.StreamWriter, upstream: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []
        #: A cut_after() trap fired on this link: swallow the answer, then reset.
        self.trap: _Trap | None = None
        self.closed = False
        #: The port the server sees this connection coming from.
        self.upstream_port: int = upstream.get_extra_info("sockname")[1]

    def close(self, *, abrupt: bool) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.client, self.upstream):
            if abrupt:
                _reset(writer)
            else:
                writer.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()


class Proxy:
    """Forwards 127.0.0.1:<port> to ``host:port``, with faults on command."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._refusing = False
        self._delay = 0.0
        self._trap: _Trap | None = None
        #: Connections accepted and forwarded, and connections reset by refuse().
        self.accepted = 0
        self.refused = 0

    @classmethod
    def to(cls, url: str) -> Proxy:
        """A proxy to the server of a database URL."""
        parsed = make_url(url)
        return cls(parsed.host or "127.0.0.1", parsed.port or 0)

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        tasks = [task for link in self._links for task in link.tasks]
        self.cut()
        self._flowing.set()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not running: use `async with Proxy(...)`")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def route(self, url: str) -> str:
        """``url`` with its host and port replaced by the proxy's."""
        routed = make_url(url).set(host="127.0.0.1", port=self.port)
        return routed.render_as_string(hide_password=False)

    # -- what is going on ------------------------------------------------------------------

    @property
    def connections(self) -> int:
        """Connections currently open through the proxy."""
        return len(self._links)

    def upstream_ports(self) -> set[int]:
        """The client ports the server sees for the connections currently open."""
        return {link.upstream_port for link in self._links}

    # -- faults ----------------------------------------------------------------------------

    def cut(self) -> int:
        """Reset every current connection, on both sides; return how many."""
        links = list(self._links)
        for link in links:
            link.close(abrupt=True)
        self._links.clear()
        return len(links)

    def refuse(self, refusing: bool = True) -> None:
        """Reset new connections as soon as they are accepted (current ones live on)."""
        self._refusing = refusing

    def stall(self, stalled: bool = True) -> None:
        """Stop (or resume) forwarding in both directions, closing nothing."""
        if stalled:
            self._flowing.clear()
        else:
            self._flowing.set()

    def delay(self, seconds: float) -> None:
        """Hold every chunk, in either direction, ``seconds`` before forwarding it."""
        if seconds < 0:
            raise ValueError(f"delay must not be negative, got {seconds}")
        self._delay = seconds

    def cut_after(self, marker: bytes) -> asyncio.Event:
        """Arm a one-shot trap; the event is set once the connection has been reset.

        The next client-to-server chunk containing ``marker`` is forwarded; the
        server's answer to it is swallowed, then both sides are reset. The server
        has thus processed the request, and the client never hears the outcome.
        """
        return self._arm(marker, "cut")

    def stall_after(self, marker: bytes) -> asyncio.Event:
        """Arm a one-shot trap: forward the next chunk containing ``marker``, then stall."""
        return self._arm(marker, "stall")

    def _arm(self, marker: bytes, action: Literal["cut", "stall"]) -> asyncio.Event:
        if not marker:
            raise ValueError("marker must not be empty")
        self._trap = _Trap(marker, action, asyncio.Event())
        return self._trap.sprung

    # -- forwarding ------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self.refused += 1
            _reset(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(writer)
            return
        if self._server is None:  # closed while connecting
            _reset(writer)
            _reset(up_writer)
            return
        self.accepted += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        link.tasks = [
            asyncio.create_task(self._pump(link, reader, up_writer, to_server=True)),
            asyncio.create_task(self._pump(link, up_reader, writer, to_server=False)),
        ]

    async def _pump(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        to_server: bool,
    ) -> None:
        try:
            while not link.closed:
                try:
                    data = await reader.read(_CHUNK)
                except OSError:
                    data = b""
                if self._delay:
                    await asyncio.sleep(self._delay)
                await self._flowing.wait()
                if link.closed:
                    return
                if not data:
                    self._drop(link, abrupt=reader.exception() is not None)
                    return
                if reader.exception() is not None:
                    # The sender was reset while we held its bytes: TCP would drop them.
                    self._drop(link, abrupt=True)
                    return
                if not to_server and link.trap is not None:
                    # The answer to the trapped request: swallow it and reset.
                    sprung = link.trap.sprung
                    self._drop(link, abrupt=True)
                    sprung.set()
                    return
                trap = self._trap
                if to_server and trap is not None and trap.marker in data:
                    self._trap = None
                    if trap.action == "stall":
                        writer.write(data)
                        # Before any answer can be read and passed on.
                        self._flowing.clear()
                        trap.sprung.set()
                        await writer.drain()
                        continue
                    link.trap = trap
                writer.write(data)
                await writer.drain()
        except (OSError, EOFError):
            self._drop(link, abrupt=True)

    def _drop(self, link: _Link, *, abrupt: bool) -> None:
        self._links.discard(link)
        link.close(abrupt=abrupt)
