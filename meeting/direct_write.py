"""Writing a text frame to the transport at once, without a task, when nothing is in its way.

In fan-out a socket has one frame to send at a time, and a writer task per frame (created,
scheduled, run, ended) cost more server time than the write itself (py-spy on the `fanout`
bench: `_write_loop` about 20 %, `create_task` 4-8 %). aiohttp's own `send_str` of an
uncompressed frame is synchronous anyway: `WebSocketWriter.send_frame` writes the frame with
`_write_websocket_frame` and suspends only to wait for a paused transport to drain. So when
compression is off, the writer is not closing and the transport is neither closing nor paused,
`write_now` does what `send_str` would, minus the two coroutines: it writes the frame and keeps
the writer's flow-control count (`_output_size`, reset past `_limit`) as `send_frame` does.

Private aiohttp API (checked against 3.14): whatever is missing makes `write_now` say no, and
the caller sends through `send_str` in a task as before; tests/test_direct_write.py fails loudly
when aiohttp changes what this relies on.
"""

from __future__ import annotations

from aiohttp import WSMsgType, web

TEXT = int(WSMsgType.TEXT)


def write_now(ws: web.WebSocketResponse, frame: str) -> bool:
    """Write `frame` now if that is what `ws.send_str(frame)` would do without suspending;
    False (nothing written) if it might suspend or the writer is not the one we know.
    Raises what the transport raises (ClientConnectionResetError on a closing one)."""
    writer = getattr(ws, "_writer", None)
    try:
        if (writer is None or writer._closing or writer.compress or writer.protocol._paused
                or writer.transport.is_closing()):
            return False
        writer._output_size  # noqa: B018 - present, or this is not the writer we know
        limit = writer._limit
        write = writer._write_websocket_frame
    except AttributeError:
        return False
    write(frame.encode(), TEXT, 0)
    # send_frame resets the count past the limit and then waits for a paused transport. If
    # this write paused it, leave the count over the limit: the next frame finds the transport
    # paused, goes through send_str, and that send_frame resets the count and waits the drain.
    if writer._output_size > limit and not writer.protocol._paused:
        writer._output_size = 0
    return True
