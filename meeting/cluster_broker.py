"""RedisBroker on a Redis Cluster: sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis 7.0 or later).

Classic pub/sub on a cluster copies every message to every node, so a cluster
carries no more of it than one node does. A shard channel lives on the shard
that owns its hash slot and only that shard carries it. So each user's channel
`<prefix>:user:<id>` (each room's, and `<prefix>:resync`) is published to its
own shard, and an instance keeps one pub/sub connection per master, subscribed
there to the channels of its own connections whose slots that master owns.

Everything else is RedisBroker's: the outbox and its publisher task, echo
suppression by origin, subscription confirmations, late subscriptions, the
resync channel. What changes is what counts as "the pub/sub connection
dropped": any one of the per-master connections failing or going silent, a
master answering a subscription with an error (MOVED: the topology changed), a
master pushing an SUNSUBSCRIBE nobody asked for (Redis does that when a slot
moves away: a failover, a resharding), or a channel whose slot belongs to a
master this reader does not know. Each is handled like the loss of the single
pub/sub connection of RedisBroker: drop every per-master connection, read the
topology again, subscribe everything afresh on the current owners, then bring
every local connection up to date from the database (`on_resync`).

Not redis-py's ClusterPubSub (8.1): its get_sharded_message polls the per-node
connections in turn, waiting out the whole timeout on each before looking at the
next, and it moves subscriptions after a topology change in a background task
of its own, so there is no moment at which the caller learns that frames may
have been missed and must resync. redis-py's RedisCluster does the rest: the
slot map (initialised before any routing: ClusterPubSub routing on an
uninitialised client fails, redis-py#4296), SPUBLISH routing in a pipeline (one
round trip per shard) and topology refreshes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import key_slot
from redis.exceptions import RedisError

from .breaker import REDIS_FAILURES
from .broker import RedisBroker
from .pubsub import Subscriber
from .redis_client import no_cluster_retry

log = logging.getLogger(__name__)


class TopologyChanged(RedisError):
    """A channel's slot moved to a master this reader has no connection to."""


class Shards:
    """One reader generation's pub/sub connections, one per master: routes (un)subscriptions
    by hash slot, the way RedisBroker uses its single Subscriber (meeting.pubsub). Any trouble resolves `trouble`."""

    def __init__(self, cluster: RedisCluster, url: str, timeout: float):
        self._cluster = cluster
        self._url = urlsplit(url)
        self._timeout = timeout
        self.pubsubs: dict[str, Subscriber] = {}
        self._clients: list[aioredis.Redis] = []
        self.where: dict[str, str] = {}   # channel -> the master it is subscribed on
        self.leaving: set[str] = set()    # SUNSUBSCRIBEs we sent and whose answer is due
        self.trouble: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def _client_for(self, host: str, port: int) -> aioredis.Redis:
        # Same credentials as the seed node; no retries, like RedisBroker's own client: a
        # dropped connection must surface, not be reconnected behind our back.
        auth = self._url.netloc.rpartition("@")[0]
        netloc = f"{auth}@{host}:{port}" if auth else f"{host}:{port}"
        client = aioredis.Redis.from_url(urlunsplit((self._url.scheme, netloc, "", "", "")), socket_timeout=self._timeout,
                                         socket_connect_timeout=self._timeout, health_check_interval=30,
                                         retry=Retry(NoBackoff(), 0))
        self._clients.append(client)
        return client

    async def open(self) -> None:
        """A connection to every master of the current topology, each answering a PING."""
        for node in self._cluster.get_primaries():
            pubsub = Subscriber(self._client_for(node.host, node.port))
            self.pubsubs[node.name] = pubsub
            await pubsub.open()
            await pubsub.ping()  # the answer is read (and ignored) by the reader

    def _groups(self, channels: tuple[str, ...]) -> dict[tuple[str, int], list[str]]:
        groups: dict[tuple[str, int], list[str]] = {}
        for channel in channels:
            node = self._cluster.get_node_from_key(channel)
            groups.setdefault((node.name, key_slot(channel.encode())), []).append(channel)
        return groups

    async def subscribe(self, *channels: str) -> None:
        """One SSUBSCRIBE per slot (a command may not span slots), on the slot's master.
        Any failure (an uncovered slot mid-failover, a master this reader does not know, a
        dropped connection) also ends this generation: the reader reconnects and resubscribes
        everything, so no channel stays unsubscribed until some later reconnect."""
        try:
            for (name, _), group in self._groups(channels).items():
                pubsub = self.pubsubs.get(name)
                if pubsub is None:
                    raise TopologyChanged(f"{len(group)} channel(s) now live on {name}, unknown to this reader")
                await pubsub.ssubscribe(*group)
                self.where.update(dict.fromkeys(group, name))
        except Exception as exc:
            self.fail(exc)
            raise

    async def unsubscribe(self, *channels: str) -> None:
        by_node: dict[str, list[str]] = {}
        for channel in channels:
            name = self.where.pop(channel, None)
            if name is not None:
                by_node.setdefault(name, []).append(channel)
        try:
            for name, group in by_node.items():
                self.leaving.update(group)
                await self.pubsubs[name].sunsubscribe(*group)
        except Exception as exc:
            self.fail(exc)
            raise

    def fail(self, exc: BaseException) -> None:
        if not isinstance(exc, REDIS_FAILURES):  # a failure the reader reconnects after, whatever it was
            exc = TopologyChanged(f"{type(exc).__name__}: {exc}")
        if not self.trouble.done():
            self.trouble.set_exception(exc)
            self.trouble.exception()  # retrieved here: whoever reads on raises it again

    async def aclose(self) -> None:
        for pubsub in self.pubsubs.values():
            await pubsub.aclose()
        for client in self._clients:
            await client.aclose()
        if not self.trouble.done():
            self.trouble.cancel()


class ClusterBroker(RedisBroker):
    def _connect(self, url: str, socket_timeout: float) -> RedisCluster:  # type: ignore[override]
        self._url = url
        return RedisCluster.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                                     retry=no_cluster_retry())

    async def _transmit(self, channels: list[str], payloads: list[str]) -> None:
        """A batch in one pipeline: one round trip per shard, in order on each (so per user)."""
        async with self._client.pipeline(transaction=False) as pipe:
            for channel, payload in zip(channels, payloads):
                pipe.spublish(channel, payload)
            await pipe.execute()

    def _new_pubsub(self) -> Shards:  # type: ignore[override]
        self._shards = Shards(self._client, self._url, self._timeout)
        return self._shards

    async def _open(self, pubsub: Shards, channels: list[str]) -> None:  # type: ignore[override]
        cluster: RedisCluster = self._client
        await cluster.initialize()
        await cluster.nodes_manager.initialize()  # again on every reconnect: the old owners may be gone
        await pubsub.open()
        await pubsub.subscribe(*channels)

    async def _read(self, pubsub: Shards) -> None:  # type: ignore[override]
        """RedisBroker's read loop (idle PINGs included) on every master at once, until
        one of them fails or the topology changes under us."""
        readers = [asyncio.create_task(super(ClusterBroker, self)._read(p), name=f"broker-reader-{name}")
                   for name, p in pubsub.pubsubs.items()]
        try:
            done, _ = await asyncio.wait([*readers, pubsub.trouble], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what ended it
            raise TopologyChanged("a master's reader stopped")
        finally:
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)

    async def _control(self, reply: Any) -> None:
        """RedisBroker's, plus: an SUNSUBSCRIBE nobody asked for means the slot moved.
        (Shard messages and confirmations, `smessage` and `ssubscribe`, RedisBroker reads
        like their classic counterparts.)"""
        if isinstance(reply, list) and reply and reply[0] == b"sunsubscribe":
            channel = reply[1].decode()
            if channel in self._shards.leaving:
                self._shards.leaving.discard(channel)
                return
            raise TopologyChanged(f"{channel} was unsubscribed by the server: its slot moved")
        await super()._control(reply)


def redis_broker(redis_cfg: Any, deliver: Any, resync: Any, wants: Any, breaker: Any, kind: str = "user") -> RedisBroker:
    """The broker for a configured Redis: sharded pub/sub on a cluster, classic otherwise
    (user push and rooms build theirs here, so the two cannot drift apart)."""
    cls = ClusterBroker if redis_cfg.cluster else RedisBroker
    return cls(redis_cfg.url, redis_cfg.prefix, max(redis_cfg.socket_timeout, 2.0), deliver, resync, wants, breaker, kind=kind)
