"""One pub/sub connection read in bulk, for the brokers (meeting.broker, meeting.cluster_broker).

redis-py's `PubSub.get_message` handles one reply per call: a read under its own
timeout, its retry and observability wrappers, a dict per message. In a fan-out
nearly every reply is a message (one per recipient), and most of them are this
instance's own echoes, which the broker only counts and drops: that per-message
machinery was a quarter of the server's time in `fanout`. Here a read takes
whatever one socket read brought and parses every complete reply in it at once
(hiredis when installed, else the small RESP reader below), so the broker can
drop an echo by looking at its first bytes, before anything is built for it.

The connection is made by redis-py's own connection class, from the client's
pool settings (URL, TLS, credentials, client name), and is not the pool's: it is
never reconnected or handed to anyone else. Nothing but the broker's reader reads
it, and only the broker writes to it (SUBSCRIBE and friends, PING).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError

try:
    import hiredis
except ImportError:  # the `speed` extra is optional
    hiredis = None

READ_SIZE = 256 * 1024  # bytes taken from the socket per read (what the kernel has, up to this)

#: A parsed reply: a list for pub/sub messages and confirmations (hiredis gives RESP3 pushes
#: as a list subclass), bytes (+PONG), an int, None, or a ResponseError for an error reply.
Reply = Any


class _Incomplete(Exception):
    pass


class RespReader:
    """RESP2 (and RESP3 push) replies from a byte stream, with hiredis.Reader's `feed`/`gets`
    interface: for an installation without hiredis. Pub/sub replies are flat arrays of bulk
    strings and integers, which is all this has to be quick at."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        self._buf += data

    def gets(self) -> Reply:
        """The next complete reply, or False when the buffer holds none."""
        start = self._pos
        try:
            reply = self._parse()
        except _Incomplete:
            self._pos = start
            return False
        except ValueError as exc:  # a malformed length or integer: as hiredis, a protocol error (reconnect)
            raise InvalidResponse(f"malformed reply on the pub/sub connection: {exc}") from exc
        if self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        elif self._pos > READ_SIZE:
            del self._buf[:self._pos]
            self._pos = 0
        return reply

    def _line(self) -> bytes:
        end = self._buf.find(b"\r\n", self._pos)
        if end < 0:
            raise _Incomplete
        line = bytes(self._buf[self._pos:end])
        self._pos = end + 2
        return line

    def _parse(self) -> Reply:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"*" or kind == b">":
            count = int(rest)
            return None if count < 0 else [self._parse() for _ in range(count)]
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            end = self._pos + size
            if end + 2 > len(self._buf):
                raise _Incomplete
            data = bytes(self._buf[self._pos:end])
            self._pos = end + 2
            return data
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return ResponseError(rest.decode(errors="replace"))
        raise InvalidResponse(f"unexpected reply type {kind!r} on the pub/sub connection")


def new_reader() -> Any:
    if hiredis is not None:
        return hiredis.Reader(protocolError=InvalidResponse, replyError=ResponseError)
    return RespReader()


class Subscriber:
    """A pub/sub connection to one Redis node: commands out, replies in by the batch."""

    def __init__(self, client: aioredis.Redis):
        self._conn = client.connection_pool.make_connection()
        self._parser = new_reader()
        self._stream: asyncio.StreamReader | None = None

    async def open(self) -> None:
        await self._conn.connect()
        # Read here only, by the batch (see the module docstring). `_reader` is redis-py's
        # private stream: if a release renames or replaces it, fail as a connection error,
        # which the broker's reader retries and reports, rather than dying on AttributeError.
        stream = getattr(self._conn, "_reader", None)
        if not isinstance(stream, asyncio.StreamReader):
            await self._conn.disconnect()
            raise RedisConnectionError("this redis-py's connection has no asyncio stream to read pub/sub replies from")
        self._stream = stream

    async def command(self, *args: Any) -> None:
        """Send without reading: the answer arrives through `read` like everything else.
        A dropped connection is not reopened here (redis-py would): the reader must see
        the drop, resubscribe everything and resync."""
        if self._stream is None or not self._conn.is_connected:
            raise RedisConnectionError("the pub/sub connection is not open")
        await self._conn.send_packed_command(self._conn.pack_command(*args), check_health=False)

    async def subscribe(self, *channels: str) -> None:
        await self.command("SUBSCRIBE", *channels)

    async def unsubscribe(self, *channels: str) -> None:
        await self.command("UNSUBSCRIBE", *channels)

    async def ssubscribe(self, *channels: str) -> None:
        await self.command("SSUBSCRIBE", *channels)

    async def sunsubscribe(self, *channels: str) -> None:
        await self.command("SUNSUBSCRIBE", *channels)

    async def ping(self) -> None:
        await self.command("PING")

    async def read(self, timeout: float) -> list[Reply] | None:
        """Every complete reply the next socket read brings (an empty list when it brought only
        part of one), or None when nothing arrived within `timeout` seconds. A closed
        connection raises ConnectionError."""
        stream = self._stream
        if stream is None:
            raise RedisConnectionError("the pub/sub connection is not open")
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                data = await stream.read(READ_SIZE)
        except TimeoutError as exc:
            if deadline.expired():
                return None
            # The kernel's ETIMEDOUT is the same class: a dead socket, not a quiet one.
            raise RedisConnectionError(f"pub/sub connection lost: {exc}") from exc
        except OSError as exc:
            raise RedisConnectionError(f"pub/sub connection lost: {exc}") from exc
        if not data:
            raise RedisConnectionError("the pub/sub connection was closed by the server")
        parser = self._parser
        parser.feed(data)
        replies = []
        # False is "no complete reply yet" (hiredis would also give it for a RESP3 boolean
        # false, which no pub/sub reply is).
        while (reply := parser.gets()) is not False:
            replies.append(reply)
        return replies

    async def aclose(self) -> None:
        self._stream = None
        await self._conn.disconnect()
