"""GET /metrics: Prometheus text that moves with what the server does."""

from __future__ import annotations

import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from meeting.config import Config, with_overrides
from tests.helpers import Api, Device
from tests.test_ws import connections, until


async def scrape(api: Api) -> dict[str, float]:
    resp = await api.client.get("/metrics")
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(await resp.text()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


async def test_counters_follow_messages_and_connections(api: Api) -> None:
    alice, bob = await api.users(2)
    before = await scrape(api)
    assert before["meeting_open_connections"] == 0 and before["meeting_messages_stored_total"] == 0
    phone, laptop = await Device.connect(api, bob), await Device.connect(api, bob)
    await phone.handshake()
    await laptop.handshake()
    for _ in range(3):
        await api.send(alice, [bob])
    for device in (phone, laptop):
        for _ in range(3):
            await device.expect("message.new")
    during = await scrape(api)
    assert during["meeting_open_connections"] == 2 and during["meeting_connected_users"] == 1
    assert during["meeting_messages_stored_total"] == 3
    assert during["meeting_write_batched_sends_total"] == 3 and 1 <= during["meeting_write_batches_total"] <= 3
    assert during["meeting_frames_sent_total{type=message.new}"] == 6
    assert during["meeting_frames_sent_total{type=connected}"] == 2
    assert during["meeting_push_latency_seconds_count"] == 6
    assert during["meeting_outbound_queue_high_water"] >= 1
    assert during["meeting_broker_publishes_total"] >= 3
    await phone.ws.close()
    await laptop.ws.close()
    await until(lambda: not connections(api))
    after = await scrape(api)
    assert after["meeting_open_connections"] == 0 and after["meeting_connected_users"] == 0
    names = set(after)
    for expected in ("meeting_cache_hits_total", "meeting_cache_misses_total", "meeting_cache_errors_total",
                     "meeting_slow_consumer_closes_total", "meeting_heartbeat_timeouts_total", "meeting_broker_reconnects_total",
                     "meeting_recipient_lists_hits_total", "meeting_recipient_lists_misses_total",
                     "meeting_redis_breaker_trips_total"):
        assert expected in names
    assert after["meeting_redis_breaker_open"] == 0
    assert all(re.fullmatch(r"meeting_[a-z_]+(\{.*\})?", n) for n in names if n.startswith("meeting"))


async def test_metrics_can_be_restricted_or_turned_off(make_client: Any, config: Config) -> None:
    restricted = Api(await make_client(with_overrides(config, metrics={"allow": "10.0.0.0/8"})))
    assert (await restricted.call("GET", "/metrics", expect=403))["error"]["code"] == "forbidden"
    allowed = Api(await make_client(with_overrides(config, metrics={"allow": "10.0.0.0/8, 127.0.0.1/32"})))
    assert (await allowed.client.get("/metrics")).status == 200
    off = Api(await make_client(with_overrides(config, metrics={"enabled": False})))
    await off.call("GET", "/metrics", expect=404)
