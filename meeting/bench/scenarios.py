"""The scenarios: each returns one flat result dict (also the --json line)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any, Callable

import aiohttp

from .cpu import CpuMeter
from .harness import make_users, receivers
from .stats import ClientHealth, Ledger, rss_kib, summary

Progress = Callable[[int], None]


class LostOrDoubled(AssertionError):
    pass


async def _deliver_run(url: str, users: int, messages: int, schedule: Callable[[int], float] | None, concurrency: int,
                       progress: Progress, settle: float = 30.0, devices: int = 1, recipients: int = 1,
                       keys: bool = True, dialect: str = "meeting", server_pid: int | None = None,
                       per: str = "message") -> dict[str, Any]:
    """Users with `devices` devices each (in the receiver process); `messages` sends to
    `recipients` users each, open-loop at `schedule(i)` seconds or closed-loop with `concurrency`;
    each with an Idempotency-Key (a new UUID), as a client should, unless not `keys`. CPU is
    metered from the first send until the last due frame is in, per message sent or (`per`
    "frame") per frame delivered."""
    people = await make_users(url, users)
    with receivers(url, [p["token"] for p in people for _ in range(devices)], dialect) as receiving:
        ready = await receiving.ready(300)
        meter = CpuMeter(server_pid, receiving.pid)
        rng = random.Random(7)
        ledger = Ledger()
        post_started: dict[int, float] = {}
        post_latency: list[float] = []
        errors = 0
        health = ClientHealth()
        health.start()
        connector = aiohttp.TCPConnector(limit=0 if schedule else concurrency)

        async with aiohttp.ClientSession(url, connector=connector) as http:
            async def send_one(i: int) -> None:
                nonlocal errors
                sender, *targets = rng.sample(range(users), recipients + 1)
                started = time.time()
                async with http.post("/messages", json={"recipient_ids": [people[t]["id"] for t in targets], "content": f"bench {i}"},
                                     headers=_headers(people[sender]["token"], keys)) as r:
                    if r.status != 201:
                        errors += 1
                        return
                    message_id = (await r.json())["id"]
                post_latency.append(time.time() - started)
                post_started[message_id] = started
                ledger.expect(message_id, [t * devices + d for t in targets for d in range(devices)])
                progress(1)

            meter.start()
            begin = time.monotonic()
            if schedule is not None:  # open loop: send i starts at its time, whatever came before
                tasks = []
                for i in range(messages):
                    delay = begin + schedule(i) - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(send_one(i)))
                await asyncio.gather(*tasks)
            else:
                counter = iter(range(messages))

                async def worker() -> None:
                    for i in counter:
                        await send_one(i)

                await asyncio.gather(*(worker() for _ in range(concurrency)))
            sent_seconds = time.monotonic() - begin
        client = await health.stop()
        # wait for every due copy, or report it lost
        frames, receiver_health = await receiving.collect(sum(ledger.expected.values()), settle, on_delivered=meter.stop)
    delivery = []
    last_received = 0.0
    for message_id, device, received_at in frames:
        ledger.record(message_id, device)
        if message_id in post_started:
            delivery.append(received_at - post_started[message_id])
            last_received = max(last_received, received_at)
    result = {
        "users": users, "devices": users * devices, "messages": messages, "frames": len(delivery), "post_errors": errors, "lost": ledger.lost, "duplicated": ledger.duplicated,
        "connect_seconds": round(ready["connect_seconds"], 2), "failed_devices": ready["failed"], "send_seconds": round(sent_seconds, 2),
        **{f"post_{k}": round(v, 2) for k, v in summary(post_latency).items() if k != "count"},
        **{f"delivery_{k}": round(v, 2) for k, v in summary(delivery).items() if k != "count"},
        **{f"client_{k}": round(v, 2) for k, v in client.items()},
        **{f"receiver_{k}": round(v, 2) for k, v in receiver_health.items()},
        **meter.figures(len(delivery) if per == "frame" else len(post_started), per),
    }
    if post_started:
        first = min(post_started.values())
        result["delivered_per_second"] = round(len(delivery) / max(1e-9, last_received - first), 1)
    result["_delivery_seconds"] = delivery  # raw samples for --plot; not part of the printed result
    return result


def _headers(token: str, keys: bool) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **({"Idempotency-Key": str(uuid.uuid4())} if keys else {})}


async def latency(url: str, users: int = 1000, rate: float = 500.0, duration: float = 10.0,
                  progress: Progress = lambda n: None, keys: bool = True, dialect: str = "meeting",
                  server_pid: int | None = None) -> dict[str, Any]:
    messages = int(rate * duration)
    result = await _deliver_run(url, users, messages, schedule=lambda i: i / rate, concurrency=0, progress=progress, keys=keys,
                                dialect=dialect, server_pid=server_pid)
    return {"scenario": "latency", "rate": rate, "keys": keys, **result}


async def throughput(url: str, users: int = 200, messages: int = 10_000, concurrency: int = 32,
                     progress: Progress = lambda n: None, keys: bool = True, dialect: str = "meeting",
                     server_pid: int | None = None) -> dict[str, Any]:
    result = await _deliver_run(url, users, messages, schedule=None, concurrency=concurrency, progress=progress, keys=keys,
                                dialect=dialect, server_pid=server_pid)
    return {"scenario": "throughput", "concurrency": concurrency, "keys": keys, **result}


async def fanout(url: str, users: int = 1000, devices: int = 2, recipients: int = 100, messages: int = 200,
                 concurrency: int = 8, progress: Progress = lambda n: None, keys: bool = True,
                 dialect: str = "meeting", server_pid: int | None = None) -> dict[str, Any]:
    result = await _deliver_run(url, users, messages, schedule=None, concurrency=concurrency, progress=progress,
                                devices=devices, recipients=recipients, keys=keys, dialect=dialect, server_pid=server_pid,
                                per="frame")
    return {"scenario": "fanout", "recipients": recipients, "concurrency": concurrency, "keys": keys, **result}


async def reconnect(url: str, users: int = 2000, backlog: int = 20, group: int = 10, concurrency: int = 32,
                    progress: Progress = lambda n: None, keys: bool = True, dialect: str = "meeting",
                    server_pid: int | None = None) -> dict[str, Any]:
    """Every user has `backlog` unread messages, each sent to a group of `group` users; all
    devices connect at once. The time until the last one has its whole backlog
    (message.synced comes right after it; the toy sends it in one message.unread) is the result,
    and CPU is metered over that time, per synced device."""
    people = await make_users(url, users + 1)
    sender, people = people[0], people[1:]
    ledger = Ledger()
    sends = [(list(range(chunk, min(users, chunk + group))), i) for chunk in range(0, users, group) for i in range(backlog)]
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def send(members: list[int], i: int) -> None:
            async with http.post("/messages", json={"recipient_ids": [people[g]["id"] for g in members], "content": f"backlog {i}"},
                                 headers=_headers(sender["token"], keys)) as r:
                assert r.status == 201, (r.status, await r.text())
                ledger.expect((await r.json())["id"], members)
            progress(len(members))

        await asyncio.gather(*(send(members, i) for members, i in sends))
    with receivers(url, [p["token"] for p in people], dialect) as receiving:
        meter = CpuMeter(server_pid, receiving.pid)
        ready = await receiving.ready(300, on_start=meter.start)
        meter.stop()
        frames, receiver_health = await receiving.collect(0, 0.0)
    for message_id, device, _ in frames:
        ledger.record(message_id, device)
    return {"scenario": "reconnect", "users": users, "backlog": backlog, "group": group, "keys": keys, "messages": len(sends),
            "copies": users * backlog, "post_errors": 0, "failed_devices": ready["failed"],
            "lost": ledger.lost, "duplicated": ledger.duplicated, "all_backlogs_seconds": round(ready["connect_seconds"], 2),
            "backlog_bytes": ready["bytes"],  # received by all devices until every backlog was in
            **{f"receiver_{k}": round(v, 2) for k, v in receiver_health.items()}, **meter.figures(users, "synced device")}


async def conns(url: str, connections: int = 10_000, users: int = 2000, server_pid: int | None = None,
                progress: Progress = lambda n: None, dialect: str = "meeting") -> dict[str, Any]:
    """Hold `connections` idle sockets across `users`; memory per connection and a ping round.
    CPU is metered while they connect (the connect rate's time), per connect."""
    people = await make_users(url, users)
    rss_before = rss_kib(server_pid) if server_pid else None
    with receivers(url, [people[i % users]["token"] for i in range(connections)], dialect) as receiving:
        meter = CpuMeter(server_pid, receiving.pid)
        ready = await receiving.ready(600, on_start=meter.start)
        meter.stop()
        progress(connections)
        rss_after = rss_kib(server_pid) if server_pid else None
        answered = await receiving.ping()
        _, receiver_health = await receiving.collect(0, 0.0)
    handshake = summary(ready["handshakes"])
    result: dict[str, Any] = {
        "scenario": "conns", "users": users, "connections": connections, "answered_ping": answered,
        "lost": connections - answered, "duplicated": 0, "post_errors": 0, "failed_devices": ready["failed"],
        "connect_seconds": round(ready["connect_seconds"], 2),
        "connects_per_second": round(connections / max(ready["connect_seconds"], 1e-9), 1),
        "handshake_p50_ms": round(handshake["p50_ms"], 2), "handshake_p99_ms": round(handshake["p99_ms"], 2),
        "server_rss_before_kib": rss_before, "server_rss_after_kib": rss_after,
        "kib_per_connection": round((rss_after - rss_before) / connections, 2) if rss_before and rss_after else None,
        **{f"receiver_{k}": round(v, 2) for k, v in receiver_health.items()},
        **meter.figures(connections, "connect"),
    }
    return result


def check(result: dict[str, Any]) -> None:
    """Fail loudly: a benchmark that lost or doubled a copy has no result."""
    if result["lost"] or result["duplicated"] or result["post_errors"]:
        raise LostOrDoubled(f"{result['scenario']}: lost {result['lost']}, duplicated {result['duplicated']}, "
                            f"failed sends {result['post_errors']}")
