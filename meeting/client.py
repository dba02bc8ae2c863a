"""Watch a user's message stream, or send a message: `python -m meeting.client listen|send --url ... --username ... --password ...`.

`listen` logs in, connects to /ws/messages (token in the `bearer` subprotocol, never in
the URL) and prints every frame as one JSON line. It behaves as docs/websocket.md
asks of a client: reconnect with backoff, log in again on 4001, stop on 1003
and 4029. Run it twice to watch two devices of one user.

`send` posts one message with an Idempotency-Key (a new UUID, or `--key`) and
retries with the same key on a timeout, a lost connection, 409, 429, 502, 503 or
504, as docs/api.md says a client may: the message is stored once however many
tries it takes. A 500 is not retried: it is a server bug, not a passing state,
and sending the request again would only repeat it. It prints the answer's JSON body.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import uuid
from typing import Any

import aiohttp

NO_RETRY = {1003: "binary frame (client bug)", 4029: "too many connections"}


async def login(http: aiohttp.ClientSession, username: str, password: str) -> str:
    async with http.post("/auth/login", json={"username": username, "password": password}) as resp:
        body = await resp.json()
        if resp.status != 200:
            raise SystemExit(f"login failed: {body.get('error', {}).get('message', resp.status)}")
        return str(body["access_token"])


async def listen(url: str, username: str, password: str, max_frames: int | None = None, out: Any = sys.stdout) -> int:
    seen = 0
    backoff = 0.5
    async with aiohttp.ClientSession(url) as http:
        token = await login(http, username, password)
        while True:
            try:
                async with http.ws_connect("/ws/messages", protocols=("bearer", token), heartbeat=30) as ws:
                    backoff = 0.5
                    async for msg in ws:
                        if msg.type != aiohttp.WSMsgType.TEXT:
                            break
                        print(json.dumps(json.loads(msg.data), ensure_ascii=False), file=out, flush=True)
                        seen += 1
                        if max_frames is not None and seen >= max_frames:
                            return 0
                    code = ws.close_code
            except aiohttp.ClientError as exc:
                code = None
                print(f"# connection failed: {exc}", file=sys.stderr, flush=True)
            if code in NO_RETRY:
                print(f"# closed with {code}: {NO_RETRY[code]}; not reconnecting", file=sys.stderr, flush=True)
                return 1
            if code == 4001:
                token = await login(http, username, password)
            delay = backoff * (1 + random.random())
            print(f"# closed ({code}); reconnecting in {delay:.1f}s", file=sys.stderr, flush=True)
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, 30.0)


#: Passing states worth a retry with the same key (409: idempotency_key_in_use). Not 500: a bug.
RETRY_STATUSES = {409, 429, 502, 503, 504}


async def send(url: str, username: str, password: str, to: list[int], content: str, key: str | None = None,
               attempts: int = 5, timeout: float = 10.0, out: Any = sys.stdout) -> int:
    key = key or str(uuid.uuid4())
    async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        token = await login(http, username, password)
        headers = {"Authorization": f"Bearer {token}", "Idempotency-Key": key}
        for attempt in range(1, attempts + 1):
            try:
                async with http.post("/messages", json={"recipient_ids": to, "content": content}, headers=headers) as resp:
                    text = await resp.text()
                    if resp.status not in RETRY_STATUSES or attempt == attempts:
                        print(text, file=out, flush=True)
                        return 0 if resp.status == 201 else 1
                    delay = float(resp.headers.get("Retry-After", 0.5 * 2**attempt))
                    print(f"# {resp.status}; retrying with the same key in {delay:.1f}s", file=sys.stderr, flush=True)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                if attempt == attempts:
                    print(f"# gave up after {attempts} tries: {exc!r}", file=sys.stderr, flush=True)
                    return 1
                delay = 0.5 * 2**attempt
                print(f"# {exc!r}; retrying with the same key in {delay:.1f}s", file=sys.stderr, flush=True)
            await asyncio.sleep(delay * (1 + random.random() / 2))
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meeting.client", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("listen", help="log in and print every frame pushed to this user")
    cmd.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    cmd.add_argument("--username", required=True)
    cmd.add_argument("--password", required=True)
    cmd.add_argument("--max-frames", type=int, help="exit after this many frames (for scripts)")
    cmd = sub.add_parser("send", help="send one message, retrying safely with an Idempotency-Key")
    cmd.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    cmd.add_argument("--username", required=True)
    cmd.add_argument("--password", required=True)
    cmd.add_argument("--to", type=int, action="append", required=True, help="a recipient's user id (repeat for several)")
    cmd.add_argument("--content", required=True)
    cmd.add_argument("--key", help="the Idempotency-Key (default: a new UUID); reuse it to retry a send by hand")
    args = parser.parse_args(argv)
    try:
        if args.command == "send":
            return asyncio.run(send(args.url, args.username, args.password, args.to, args.content, args.key))
        return asyncio.run(listen(args.url, args.username, args.password, args.max_frames))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
