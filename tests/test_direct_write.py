"""Connection.push writes straight to an idle socket (meeting.direct_write) and takes the writer
task whenever that could block or reorder: compression, a paused transport, frames queued.

The first test guards the private aiohttp API direct_write copies: if aiohttp changes what
`send_str` does for an uncompressed frame, it fails here rather than in production."""

from __future__ import annotations

import inspect
import types
from typing import Any

from aiohttp import web
from aiohttp._websocket.writer import WebSocketWriter

from meeting import frames
from meeting.config import Config, with_overrides
from meeting.connection import Connection
from meeting.direct_write import write_now
from meeting.typedefs import stats_key, ws_users
from tests.helpers import Api, Device, User, until
from tests.test_stream import stalled_device, tight_client  # noqa: F401 - a fixture


def _source(function: Any) -> str:
    return " ".join(inspect.getsource(function).split())


def test_aiohttp_still_sends_an_uncompressed_frame_the_way_direct_write_copies() -> None:
    """send_str -> send_frame: an uncompressed frame is one synchronous _write_websocket_frame,
    then the flow-control count is reset past the limit and a paused transport drained."""
    assert "self._writer.send_frame( data.encode(\"utf-8\"), WSMsgType.TEXT, compress=compress )" in _source(
        web.WebSocketResponse.send_str)
    send_frame = _source(WebSocketWriter.send_frame)
    for step in ("if self._closing and not (opcode & WSMsgType.CLOSE): raise ClientConnectionResetError",
                 "if not (compress or self.compress) or opcode >= WS_CONTROL_FRAME_OPCODE: "
                 "# Non-compressed frames don't need lock or shield self._write_websocket_frame(message, opcode, 0)",
                 "if self._output_size > self._limit: self._output_size = 0 if self.protocol._paused: "
                 "await self.protocol._drain_helper()"):
        assert step in send_frame, step
    assert list(inspect.signature(WebSocketWriter._write_websocket_frame).parameters) == ["self", "message", "opcode", "rsv"]
    write = _source(WebSocketWriter._write_websocket_frame)
    assert "self._output_size += header_len + msg_length" in write
    assert "if self.transport.is_closing(): raise ClientConnectionResetError" in write


def test_a_writer_it_does_not_know_is_left_to_send_str() -> None:
    assert write_now(types.SimpleNamespace(), "{}") is False  # type: ignore[arg-type]
    unknown = types.SimpleNamespace(_closing=False, compress=0, protocol=types.SimpleNamespace(_paused=False))
    assert write_now(types.SimpleNamespace(_writer=unknown), "{}") is False  # type: ignore[arg-type]


def _conn(api: Api, user: User) -> Connection:
    (conn,) = api.client.app[ws_users][user.id]
    return conn


def _numbered(i: int, pad: int = 0) -> str:
    return frames.error("test", f"{i} {'x' * pad}")


async def _numbers(device: Device, count: int) -> list[int]:
    return [int((await device.expect("error"))["message"].split()[0]) for _ in range(count)]


def _latencies(stats: Any) -> float:
    (family,) = stats.push_latency.collect()
    return sum(sample.value for sample in family.samples if sample.name.endswith("_count"))


async def test_an_idle_socket_is_written_at_once_with_aiohttps_accounting(api: Api) -> None:
    bob = await api.user()
    device = await Device.connect(api, bob)
    await device.handshake()
    conn, stats = _conn(api, bob), api.client.app[stats_key]
    writer = conn.ws._writer
    assert isinstance(writer, WebSocketWriter) and not writer.compress
    before, errors, latencies = writer._output_size, stats.frames_sent["error"], _latencies(stats)
    frame = _numbered(1)
    assert conn.push(frame, committed_at=0.0)
    assert conn._writer is None and conn.queued == 0  # no task, nothing queued
    direct = writer._output_size - before
    await conn.ws.send_str(frame)  # what aiohttp itself counts for the same frame
    size = len(frame.encode())
    assert direct == writer._output_size - before - direct == (2 if size < 126 else 4) + size
    assert stats.frames_sent["error"] == errors + 1 and _latencies(stats) == latencies + 1
    assert await _numbers(device, 2) == [1, 1]
    await device.ws.close()


async def test_a_compressed_socket_keeps_the_writer_task(make_client: Any, config: Config) -> None:
    api = Api(await make_client(with_overrides(config, push={"compress": True})))
    bob = await api.user()
    device = await Device.connect(api, bob, compress=15)
    await device.handshake()
    conn = _conn(api, bob)
    assert conn.push(_numbered(1)) and conn.push(_numbered(2))
    assert conn._writer is not None and conn.queued == 2  # both wait for the task, in order
    assert await _numbers(device, 2) == [1, 2]
    await until(lambda: conn._writer is None)
    await device.ws.close()


async def test_a_paused_transport_queues_and_nothing_overtakes_the_queue(tight_client: Any, config: Config) -> None:
    """Written at once until the client's buffers and the transport fill up; from then on
    queued, and a frame pushed while anything is queued or being sent waits its turn."""
    api = await tight_client(config)
    bob = await api.user()
    session, device = await stalled_device(api, bob, {})
    await device.handshake()
    conn = _conn(api, bob)
    pushed = 0
    while conn.queued < 20:
        assert conn.push(_numbered(pushed, pad=1000))
        pushed += 1
        assert pushed < 500, "the transport never paused"
    assert conn._writer is not None and conn.ws._writer.protocol.writing_paused
    first = await _numbers(device, 10)  # reading resumes the transport while frames are still queued
    for _ in range(5):
        assert conn.push(_numbered(pushed, pad=1000))
        pushed += 1
    assert first + await _numbers(device, pushed - 10) == list(range(pushed))
    await until(lambda: conn._writer is None and conn.queued == 0)
    assert conn.push(_numbered(pushed)) and conn._writer is None  # idle again: written at once
    assert await _numbers(device, 1) == [pushed]
    await session.close()
