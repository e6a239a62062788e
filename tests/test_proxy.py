"""The fault-injecting TCP proxy of ``_proxy.py``, against a small echo server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from _proxy import Proxy


class EchoServer:
    """Echoes every chunk back, and keeps what it received for the tests to check."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.got_data = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        with contextlib.suppress(OSError):
            while data := await reader.read(4096):
                self.received += data
                self.got_data.set()
                writer.write(data)
                await writer.drain()
        writer.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = EchoServer()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(echo: EchoServer) -> AsyncIterator[Proxy]:
    async with Proxy("127.0.0.1", echo.port) as proxy:
        yield proxy


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def _connect(proxy: Proxy) -> AsyncIterator[Stream]:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _closed(reader: asyncio.StreamReader) -> bool:
    """True when the peer closed or reset the connection (within a second)."""
    try:
        async with asyncio.timeout(1):
            return await reader.read(100) == b""
    except ConnectionResetError:
        return True


async def _round_trip(stream: Stream, data: bytes) -> bytes:
    reader, writer = stream
    writer.write(data)
    async with asyncio.timeout(2):
        return await reader.readexactly(len(data))


async def test_forwards_both_ways(proxy: Proxy, echo: EchoServer) -> None:
    async with _connect(proxy) as stream:
        assert await _round_trip(stream, b"hello") == b"hello"
        assert proxy.connections == 1
        assert proxy.upstream_ports() and proxy.accepted == 1
    assert echo.received == b"hello"


def test_route_points_a_url_at_the_proxy() -> None:
    proxy = Proxy.to("postgresql+asyncpg://user:pw@db.example:5432/test")
    assert proxy.target == ("db.example", 5432)
    with pytest.raises(RuntimeError, match="not running"):
        proxy.route("postgresql+asyncpg://user:pw@db.example:5432/test")


async def test_route_keeps_credentials(proxy: Proxy) -> None:
    routed = proxy.route("postgresql+asyncpg://user:pw@db.example:5432/test")
    assert routed == f"postgresql+asyncpg://user:pw@127.0.0.1:{proxy.port}/test"


async def test_cut_resets_current_connections_only(proxy: Proxy) -> None:
    async with _connect(proxy) as first:
        assert await _round_trip(first, b"a") == b"a"
        assert proxy.cut() == 1
        assert await _closed(first[0])
        assert proxy.connections == 0
        async with _connect(proxy) as second:
            assert await _round_trip(second, b"b") == b"b"


async def test_refuse_resets_new_connections_until_lifted(proxy: Proxy) -> None:
    async with _connect(proxy) as before:
        proxy.refuse(True)
        async with _connect(proxy) as refused:
            assert await _closed(refused[0])
        assert proxy.refused == 1
        # A connection made before the refusal keeps working.
        assert await _round_trip(before, b"x") == b"x"
        proxy.refuse(False)
        async with _connect(proxy) as after:
            assert await _round_trip(after, b"y") == b"y"


async def test_stall_holds_bytes_without_closing(proxy: Proxy, echo: EchoServer) -> None:
    async with _connect(proxy) as (reader, writer):
        proxy.stall(True)
        writer.write(b"held")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await reader.read(100)
        assert echo.received == b""
        assert proxy.connections == 1
        proxy.stall(False)
        async with asyncio.timeout(2):
            assert await reader.readexactly(4) == b"held"


async def test_delay_slows_every_chunk(proxy: Proxy) -> None:
    async with _connect(proxy) as stream:
        proxy.delay(0.1)
        started = time.monotonic()
        assert await _round_trip(stream, b"slow") == b"slow"
        # One delay on the way in, one on the way back.
        assert time.monotonic() - started >= 0.2
    with pytest.raises(ValueError, match="negative"):
        proxy.delay(-1)


async def test_cut_after_delivers_the_request_and_drops_its_answer(
    proxy: Proxy, echo: EchoServer
) -> None:
    async with _connect(proxy) as (reader, writer):
        assert await _round_trip((reader, writer), b"warm-up;") == b"warm-up;"
        sprung = proxy.cut_after(b"INSERT")
        writer.write(b"not this one;")
        assert await reader.readexactly(13) == b"not this one;"
        assert not sprung.is_set()
        writer.write(b"INSERT INTO t;")
        assert await _closed(reader)
        async with asyncio.timeout(2):
            await sprung.wait()
    assert echo.received.endswith(b"INSERT INTO t;")
    assert proxy.connections == 0


async def test_stall_after_delivers_the_request_then_stalls(proxy: Proxy, echo: EchoServer) -> None:
    async with _connect(proxy) as (reader, writer):
        sprung = proxy.stall_after(b"INSERT")
        echo.got_data.clear()
        writer.write(b"INSERT 1;")
        async with asyncio.timeout(2):
            await sprung.wait()
            await echo.got_data.wait()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await reader.read(100)
        proxy.stall(False)
        async with asyncio.timeout(2):
            assert await reader.readexactly(9) == b"INSERT 1;"


async def test_closing_the_proxy_resets_its_connections(echo: EchoServer) -> None:
    async with Proxy("127.0.0.1", echo.port) as proxy, _connect(proxy) as stream:
        assert await _round_trip(stream, b"z") == b"z"
        await proxy.aclose()
        assert await _closed(stream[0])
