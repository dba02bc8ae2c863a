"""Prometheus metrics at GET /metrics, one registry per app (no module-level state).

The hot paths only bump plain integers (PushStats) or observe one histogram;
everything else (open connections, cache and broker counters) is read from the
app's objects when Prometheus scrapes, so the send path pays nothing for it.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any, Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import Forbidden
from .handlers.common import doc, public
from .typedefs import (
    cache_key, config_key, message_service_key, metrics_key, push_hub_key, redis_breaker_key, stats_key, ws_users,
)

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class PushStats:
    """Counters bumped on the hot path; exported by AppCollector at scrape time."""

    def __init__(self, registry: CollectorRegistry):
        self.frames_sent: Counter[str] = Counter()
        self.messages_stored = 0
        self.slow_consumer_closes = 0
        self.live_frames_dropped = 0  # message.sent / message.receipt that did not fit a queue
        self.heartbeat_timeouts = 0
        self.queue_high_water = 0
        self.push_latency = Histogram("meeting_push_latency_seconds", "From the commit of a message to its frame written to a socket",
                                      buckets=LATENCY_BUCKETS, registry=registry)

    def sent(self, frame: str) -> None:
        # Every frame starts with {"type":"<type>" (frames.encode and frames.MessageBodies).
        self.frames_sent[frame[9:frame.find('"', 9)]] += 1


class AppCollector(Collector):
    def __init__(self, app: web.Application):
        self._app = app

    def collect(self) -> Iterator[Any]:
        app = self._app
        stats = app[stats_key]
        users = app[ws_users]
        yield _gauge("meeting_open_connections", "Open /ws/messages connections on this instance", sum(len(c) for c in users.values()))
        yield _gauge("meeting_connected_users", "Users with at least one open connection on this instance", len(users))
        yield _gauge("meeting_outbound_queue_high_water", "Deepest outbound queue of any connection so far", stats.queue_high_water)
        frames = CounterMetricFamily("meeting_frames_sent", "WebSocket frames written, by type", labels=["type"])
        for kind, count in sorted(stats.frames_sent.items()):
            frames.add_metric([kind], count)
        yield frames
        yield _counter("meeting_messages_stored", "Messages committed", stats.messages_stored)
        yield _counter("meeting_slow_consumer_closes", "Connections closed with 1013 for falling behind", stats.slow_consumer_closes)
        yield _counter("meeting_live_frames_dropped", "Live-only frames (message.sent, message.receipt) dropped for a full "
                       "queue; the client re-reads the sent box and receipts", stats.live_frames_dropped)
        yield _counter("meeting_heartbeat_timeouts", "Connections dropped for not answering pings", stats.heartbeat_timeouts)
        writer = app[message_service_key].writer
        yield _counter("meeting_write_batches", "Transactions of the send path (group commit)", writer.batches)
        yield _counter("meeting_write_batched_sends", "Sends written by those transactions", writer.items)
        recipients = app[message_service_key].recipients
        yield _counter("meeting_recipient_lists_hits", "Recipient lists attached from memory", recipients.hits)
        yield _counter("meeting_recipient_lists_misses", "Recipient lists read from the database", recipients.misses)
        cache = app[cache_key]
        yield _counter("meeting_cache_hits", "Cache reads answered by Redis", cache.hits)
        yield _counter("meeting_cache_misses", "Cache reads answered by the database", cache.misses)
        yield _counter("meeting_cache_errors", "Redis failures seen by the cache", cache.errors)
        breaker = app[redis_breaker_key]
        yield _gauge("meeting_redis_breaker_open", "1 while Redis is not used after a failure (the probe closes it)", int(breaker.open))
        yield _counter("meeting_redis_breaker_trips", "Times the Redis circuit breaker opened", breaker.trips)
        failures = CounterMetricFamily("meeting_redis_failures", "Failed Redis commands, by who sent them", labels=["source"])
        for source, count in sorted(breaker.failures.items()):
            failures.add_metric([source], count)
        yield failures
        if push_hub_key in app:
            broker = app[push_hub_key].broker
            yield _counter("meeting_broker_publishes", "Frames published to the broker", broker.publishes)
            yield _counter("meeting_broker_received", "Frames received from Redis pub/sub", getattr(broker, "received", 0))
            yield _counter("meeting_broker_reconnects", "Reconnections of the pub/sub reader", getattr(broker, "reconnects", 0))


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def setup_metrics(app: web.Application) -> None:
    registry = CollectorRegistry()
    app[metrics_key] = registry
    app[stats_key] = PushStats(registry)
    registry.register(AppCollector(app))


def _allowed(remote: str | None, allow: str) -> bool:
    if not allow.strip():
        return True
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    return any(address in ipaddress.ip_network(net.strip(), strict=False) for net in allow.split(",") if net.strip())


@doc("Prometheus metrics (text format); restricted by metrics.allow", errors=(403,), tag="meta", database=False)
@public
async def metrics(request: web.Request) -> web.Response:
    if not _allowed(request.remote, request.app[config_key].metrics.allow):
        raise Forbidden("Metrics are not available from this address.")
    body = generate_latest(request.app[metrics_key])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
