"""TCP proxies that cause real faults: CommitCutter in front of MariaDB cuts a connection
at its COMMIT; PubSubCutter in front of Redis cuts one kind of pub/sub reader.

CommitCutter: the client (the app's aiomysql connections) talks to the proxy, the proxy to the
server. Armed, it watches the client's MySQL packets; at the first `COMMIT` (alone, or
the last of a packet of statements) of a transaction that inserted into (or, armed so, updated) the watched table it either

- "before": drops the connection without forwarding the COMMIT (the server rolls the
  transaction back when it sees the socket close: not applied), or
- "after": forwards it, lets the server commit and answer, and drops the connection
  instead of passing the answer on (applied, but the client never hears so).

With `down_after_cut` it then refuses every connection (and cuts the open ones)
until `restore()`: nobody can ask the database what happened.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

COM_QUERY = 0x03


class CommitCutter:
    def __init__(self, host: str, port: int):
        self.upstream = (host, port)
        self.mode: str | None = None
        self.watch = b""
        self.down_after_cut = False
        self.cuts = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    def arm(self, mode: str, table: str = "messages", down_after_cut: bool = False, verb: str = "INSERT INTO") -> None:
        """Cut the next COMMIT of a transaction that ran `verb table` (e.g. "UPDATE")."""
        assert mode in ("before", "after")
        self.mode, self.watch, self.down_after_cut = mode, f"{verb} {table} ".encode(), down_after_cut

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def restore(self) -> None:
        """Accept connections again, on the same port."""
        if self._server is None:
            await self.start()

    async def close(self) -> None:
        await self._go_down()

    async def _go_down(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for client, server in list(self._pairs):
            client.transport.abort()
            server.transport.abort()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return
        pair = (client_w, server_w)
        self._pairs.add(pair)
        state: dict[str, Any] = {"wrote": False, "swallow": False}
        try:
            await asyncio.gather(self._upstream(client_r, server_w, client_w, state), self._downstream(server_r, client_w, server_w, state))
        finally:
            self._pairs.discard(pair)
            client_w.transport.abort()
            server_w.transport.abort()

    async def _upstream(self, reader: asyncio.StreamReader, server_w: asyncio.StreamWriter, client_w: asyncio.StreamWriter,
                        state: dict[str, Any]) -> None:
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header = await reader.readexactly(4)
                payload = await reader.readexactly(int.from_bytes(header[:3], "little"))
                if payload[:1] == bytes([COM_QUERY]):
                    sql = payload[1:].strip().upper()
                    # a COMMIT alone, or ending a packet of statements (meeting.storage.packets)
                    commits = sql.startswith(b"COMMIT") or sql.endswith(b"; COMMIT")
                    if self.mode and self.watch in payload[1:]:
                        state["wrote"] = True
                    if self.mode and state["wrote"] and commits:
                        await self._cut(header + payload, server_w, client_w, state)
                        return
                    if commits or sql.startswith(b"ROLLBACK"):
                        state["wrote"] = False
                server_w.write(header + payload)
                await server_w.drain()

    async def _cut(self, packet: bytes, server_w: asyncio.StreamWriter, client_w: asyncio.StreamWriter, state: dict[str, Any]) -> None:
        mode, self.mode = self.mode, None  # one cut per arming
        self.cuts += 1
        if mode == "before":
            server_w.transport.abort()  # the server sees the socket close and rolls back
            client_w.transport.abort()
            if self.down_after_cut:
                await self._go_down()
        else:
            state["swallow"] = True  # the downstream pump cuts instead of passing the OK on
            server_w.write(packet)
            await server_w.drain()

    async def _downstream(self, reader: asyncio.StreamReader, client_w: asyncio.StreamWriter, server_w: asyncio.StreamWriter,
                          state: dict[str, Any]) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if state["swallow"]:  # the COMMIT's answer: applied, and the client never hears it
                    client_w.transport.abort()
                    server_w.close()
                    if self.down_after_cut:
                        await self._go_down()
                    return
                client_w.write(data)
                await client_w.drain()
        client_w.transport.abort()


class PubSubCutter:
    """A TCP proxy in front of Redis that cuts one kind of pub/sub reader and holds its return.

    It forwards everything, and tags each connection on which the client sent a
    SUBSCRIBE naming a channel that contains `mark` (b":room:": the room broker's
    reader). `cut()` aborts the tagged connections and holds every connection made
    from then on (accepted, never forwarded: the client's handshake waits for its
    timeout); connections made before it keep working. `release()` ends the hold.
    `cut(hold=False)` only aborts the tagged connections.
    """

    def __init__(self, host: str, port: int, mark: bytes):
        self.upstream = (host, port)
        self.mark = mark
        self.port = 0
        self.holding = False
        self.tagged: set[asyncio.StreamWriter] = set()
        self._held: set[asyncio.StreamWriter] = set()
        self._open: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.gated = False                     # hold_subscribes(): SUBSCRIBEs naming `mark` wait at the proxy
        self.held = asyncio.Event()            # one of them is waiting
        self._gate = asyncio.Event()

    def hold_subscribes(self) -> None:
        """From now on a SUBSCRIBE naming `mark` (and whatever its connection sends after it) is
        held at the proxy, unsent to Redis, until `open_gate()`: a subscription in flight."""
        self.gated, self.held = True, asyncio.Event()
        self._gate.clear()

    def open_gate(self) -> None:
        self.gated = False
        self._gate.set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def cut(self, hold: bool = True) -> None:
        self.holding = hold
        for writer in list(self.tagged):
            writer.transport.abort()

    def release(self) -> None:
        self.holding = False
        for writer in list(self._held):
            writer.transport.abort()
        self._held.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in (*self._held, *self._open):
            writer.transport.abort()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.holding:
            self._held.add(client_w)  # never read, never answered
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_w.transport.abort()
            return
        self._open.update((client_w, server_w))

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, watch: bool) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while chunk := await reader.read(65536):
                    if watch and b"SUBSCRIBE" in chunk.upper() and self.mark in chunk:
                        self.tagged.add(client_w)
                        if self.gated:
                            self.held.set()
                            await self._gate.wait()
                    writer.write(chunk)
                    await writer.drain()
            writer.transport.abort()

        try:
            await asyncio.gather(pump(client_r, server_w, True), pump(server_r, client_w, False))
        finally:
            self.tagged.discard(client_w)
            self._open.difference_update((client_w, server_w))
            client_w.transport.abort()
            server_w.transport.abort()
