"""The Redis circuit breaker's probe, against a server on a real socket."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import redis.asyncio as aioredis

from meeting.breaker import RedisBreaker
from tests.test_ws import until


async def test_a_probe_reply_the_client_cannot_parse_does_not_keep_the_breaker_open(caplog: pytest.LogCaptureFixture) -> None:
    """A server whose first two PING replies are not UTF-8 (a decoding client raises
    UnicodeDecodeError, not a RedisError), then PONG: the probe must log, keep probing and
    close the breaker, not die and leave Redis unused for good. A real Redis cannot be made
    to answer that, so this is a minimal RESP server on a real socket."""
    pings = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal pings
        try:
            while line := await reader.readline():  # *N, then N times $len and the argument
                args = []
                for _ in range(int(line[1:])):
                    await reader.readline()
                    args.append((await reader.readline()).strip().upper())
                if args[:1] == [b"PING"]:
                    pings += 1
                    writer.write(b"+\xff\r\n" if pings <= 2 else b"+PONG\r\n")
                else:  # the client's handshake (HELLO, CLIENT SETINFO ...)
                    writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, decode_responses=True)
    breaker = RedisBreaker(client, log_interval=30.0, probe_timeout=1.0)
    try:
        with caplog.at_level(logging.ERROR, logger="meeting.breaker"):
            breaker.failed(ConnectionError("test: Redis went away"), "a test")
            assert breaker.open
            await until(lambda: breaker.available, timeout=10)
        assert pings == 3
        assert [r.getMessage() for r in caplog.records if r.name == "meeting.breaker" and r.levelno == logging.ERROR] \
            == ["redis probe failed unexpectedly; probing again"] * 2
    finally:
        await breaker.close()
        await client.aclose()
        server.close()
        await server.wait_closed()
