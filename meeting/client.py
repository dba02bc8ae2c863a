"""Watch a user's message stream: `python -m meeting.client listen --url ... --username ... --password ...`.

Logs in, connects to /ws/messages (token in the `bearer` subprotocol, never in
the URL) and prints every frame as one JSON line. It behaves as docs/websocket.md
asks of a client: reconnect with backoff, log in again on 4001, stop on 1003
and 4029. Run it twice to watch two devices of one user.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meeting.client", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    cmd = sub.add_parser("listen", help="log in and print every frame pushed to this user")
    cmd.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL")
    cmd.add_argument("--username", required=True)
    cmd.add_argument("--password", required=True)
    cmd.add_argument("--max-frames", type=int, help="exit after this many frames (for scripts)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(listen(args.url, args.username, args.password, args.max_frames))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
