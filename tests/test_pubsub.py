"""The bulk pub/sub reader (meeting.pubsub) against a real Redis: the bytes Redis sends, read
in one piece or a few bytes at a time, parse to exactly the replies they are, with hiredis and
with the RESP reader used without it; and a burst arrives whole, in order, in few reads."""

from __future__ import annotations

import asyncio
import random
import uuid
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, ResponseError

from meeting import pubsub
from meeting.pubsub import RespReader, Subscriber

PAYLOADS = [b"", b"a", b"two\r\nlines", "caf\u00e9 \u2603".encode(), bytes(range(256)), b"x" * 100_000]


def _normal(reply: object) -> object:
    """Comparable: an error reply as its message, a list subclass (a RESP3 push) as a list."""
    if isinstance(reply, ResponseError):
        return ("error", str(reply).split(" ")[0])
    if isinstance(reply, list):
        return [_normal(r) for r in reply]
    return reply


async def _raw_session(url: str, channel: str) -> bytes:
    """Everything Redis sends a RESP2 subscriber: a confirmation, the payloads, a pong, an error."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 6379)
    client = aioredis.Redis.from_url(url)
    try:
        writer.write(f"*2\r\n$9\r\nSUBSCRIBE\r\n${len(channel)}\r\n{channel}\r\n".encode())
        received = await reader.readuntil(b":1\r\n")  # the confirmation ends with the subscription count
        for payload in PAYLOADS:
            assert await client.publish(channel, payload) == 1
        writer.write(b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n")  # GET is refused in this mode
        while not received.endswith(b"\r\n") or b"\r\n-ERR" not in received:
            received += await asyncio.wait_for(reader.read(65536), 5)
        return received
    finally:
        writer.close()
        await client.aclose()


def _expected(channel: str) -> list[object]:
    ch = channel.encode()
    return [[b"subscribe", ch, 1], *[[b"message", ch, p] for p in PAYLOADS], [b"pong", b""], ("error", "ERR")]


def _parse(reader: object, data: bytes, chunks: int | None) -> list[object]:
    rng = random.Random(chunks)
    replies = []
    position = 0
    while position < len(data):
        step = len(data) if chunks is None else rng.randint(1, chunks)
        reader.feed(data[position:position + step])  # type: ignore[attr-defined]
        position += step
        while (reply := reader.gets()) is not False:  # type: ignore[attr-defined]
            replies.append(_normal(reply))
    return replies


@pytest.mark.parametrize("chunks", [None, 1, 7, 4096])
async def test_the_resp_reader_parses_what_redis_sends_however_it_is_split(redis_url: str, chunks: int | None) -> None:
    channel = f"t{uuid.uuid4().hex[:8]}:user:1"
    data = await _raw_session(redis_url, channel)
    assert _parse(RespReader(), data, chunks) == _expected(channel)
    if pubsub.hiredis is not None:  # the two readers agree
        assert _parse(pubsub.new_reader(), data, chunks) == _expected(channel)


@pytest.mark.parametrize("with_hiredis", [True, False])
async def test_a_burst_arrives_whole_and_in_order_in_few_reads(redis_url: str, with_hiredis: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    if with_hiredis and pubsub.hiredis is None:
        pytest.skip("hiredis is not installed (the `speed` extra)")
    if not with_hiredis:
        monkeypatch.setattr(pubsub, "hiredis", None)
    channel = f"t{uuid.uuid4().hex[:8]}:user:2"
    client = aioredis.Redis.from_url(redis_url)
    subscriber = Subscriber(client)
    try:
        await subscriber.open()
        await subscriber.subscribe(channel)
        assert await subscriber.read(5) == [[b"subscribe", channel.encode(), 1]]
        async with client.pipeline(transaction=False) as pipe:
            for i in range(2000):
                pipe.publish(channel, f"frame {i}")
            await pipe.execute()
        got: list[object] = []
        reads = 0
        while len(got) < 2000:
            replies = await subscriber.read(5)
            assert replies is not None, f"only {len(got)} of 2000 arrived"
            got.extend(_normal(r) for r in replies)
            reads += 1
        assert got == [[b"message", channel.encode(), f"frame {i}".encode()] for i in range(2000)]
        assert reads < 200  # by the socket read, not by the message
        await subscriber.ping()
        assert await subscriber.read(5) in ([b"PONG"], [[b"pong", b""]])  # RESP3 / RESP2
        assert await subscriber.read(0.05) is None  # nothing more: a timeout, not an error
    finally:
        await subscriber.aclose()
        await client.aclose()


async def test_a_closed_connection_is_a_connection_error(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    subscriber = Subscriber(client)
    killer = aioredis.Redis.from_url(redis_url)
    try:
        await subscriber.open()
        await subscriber.command("CLIENT", "SETNAME", name := f"t{uuid.uuid4().hex[:8]}")
        assert await subscriber.read(5) == [b"OK"]
        clients = [c for c in await killer.client_list() if c.get("name") == name]
        assert len(clients) == 1
        await killer.execute_command("CLIENT", "KILL", "ID", clients[0]["id"])
        with pytest.raises(RedisConnectionError):
            while True:
                await subscriber.read(5)
    finally:
        await subscriber.aclose()
        await client.aclose()
        await killer.aclose()


@pytest.mark.parametrize("garbage", [b"$9x\r\n", b"*two\r\n", b":1.5\r\n", b"%1\r\n"])
def test_a_malformed_reply_is_a_protocol_error_not_a_crash(garbage: bytes) -> None:
    """Without hiredis as with it: the broker's reader treats InvalidResponse as a lost
    connection (reconnect, resync); a ValueError would have ended it silently."""
    reader = RespReader()
    reader.feed(garbage)
    with pytest.raises(InvalidResponse):
        reader.gets()
