"""Watch a user's message stream, send a message, or see what you sent and who read it:
`python -m meeting.client listen|send|sent|receipts --url ... --username ... --password ...`.

`listen` logs in, connects to /ws/messages (token in the `bearer` subprotocol, never in
the URL) and prints every frame as one JSON line. It behaves as docs/websocket.md
asks of a client: reconnect with backoff, log in again on 4001, stop on 1003
and 4029. Run it twice to watch two devices of one user.

`send` posts one message with an Idempotency-Key (a new UUID, or `--key`) and
retries with the same key on a timeout, a lost connection, 409, 429, 502, 503 or
504, as docs/api.md says a client may: the message is stored once however many
tries it takes. A 500 is not retried: it is a server bug, not a passing state,
and sending the request again would only repeat it. It prints the answer's JSON body.

`sent` prints a page of the sent box (GET /messages?box=sent: recipients and read
counts), `receipts MESSAGE_ID` who read one of your messages and when
(GET /messages/{id}/receipts; `--unread` only those who have not), each as the
server's JSON body; the exit status is 1 on an error answer (e.g. 404 for a
message you did not send).
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
        try:
            token = await login(http, username, password)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # nothing sent yet: nothing to retry safely
            print(f"# request failed: {exc!r}", file=sys.stderr, flush=True)
            return 1
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


async def fetch(url: str, username: str, password: str, path: str, params: dict[str, str], timeout: float = 10.0,
                out: Any = sys.stdout) -> int:
    """GET one page as the user and print its body. Not retried (a read is cheap to run
    again by hand); a server that is unreachable or does not answer in `timeout` seconds
    is one line on stderr and exit status 1, like `send`, not a traceback."""
    try:
        async with aiohttp.ClientSession(url, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
            token = await login(http, username, password)
            async with http.get(path, params=params, headers={"Authorization": f"Bearer {token}"}) as resp:
                print(await resp.text(), file=out, flush=True)
                return 0 if resp.status == 200 else 1
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        print(f"# request failed: {exc!r}", file=sys.stderr, flush=True)
        return 1


def _paging(args: argparse.Namespace, cursor: str) -> dict[str, str]:
    params = {"limit": str(args.limit)}
    if getattr(args, cursor) is not None:
        params[cursor] = str(getattr(args, cursor))
    return params


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
    cmd = sub.add_parser("sent", help="print a page of the messages you sent, with read counts")
    cmd.add_argument("--limit", type=int, default=50)
    cmd.add_argument("--before", type=int, help="the previous page's next_before")
    cmd = sub.add_parser("receipts", help="print who read a message you sent, and when")
    cmd.add_argument("message_id", type=int)
    cmd.add_argument("--unread", action="store_true", help="only those who have not read it")
    cmd.add_argument("--limit", type=int, default=100)
    cmd.add_argument("--after", type=int, help="the previous page's next_after")
    for name in ("sent", "receipts"):
        cmd = sub.choices[name]
        cmd.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
        cmd.add_argument("--username", required=True)
        cmd.add_argument("--password", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "send":
            return asyncio.run(send(args.url, args.username, args.password, args.to, args.content, args.key))
        if args.command == "sent":
            params = {"box": "sent", **_paging(args, "before")}
            return asyncio.run(fetch(args.url, args.username, args.password, "/messages", params))
        if args.command == "receipts":
            params = _paging(args, "after") | ({"unread": "true"} if args.unread else {})
            return asyncio.run(fetch(args.url, args.username, args.password, f"/messages/{args.message_id}/receipts", params))
        return asyncio.run(listen(args.url, args.username, args.password, args.max_frames))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
