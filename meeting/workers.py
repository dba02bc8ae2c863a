"""`python -m meeting --workers N`: N server processes on one port, one per core.

One Python process serves from one core. The supervisor (this module) starts N
copies of `python -m meeting` with `--worker`; each binds the same address with
SO_REUSEPORT (the kernel spreads new connections over them) and runs its own
event loop, exactly as a separate instance would: the workers share nothing but
the database, Redis and the JWT secret, which is why N > 1 needs `redis.url`
(and therefore an explicit `auth.secret`, see meeting.config).

Why our own supervisor and not gunicorn's aiohttp worker: gunicorn would be a
new dependency for a loop of a few dozen lines, aiohttp's GunicornWebWorker
ignores our `web.run_app` arguments (access logger, backlog, shutdown timeout,
uvloop choice) unless each is configured again in gunicorn's own terms, and its
arbiter owns signals in ways the graceful drain (web.drain_then_close) would
have to be re-tested against.

The supervisor:
- restarts a worker that exits while it is not shutting down (after 0.5 s,
  doubling to 10 s while a worker keeps dying within 5 s of its start);
- on SIGTERM or SIGINT forwards one SIGTERM to every worker, which drains
  (`server.shutdown_timeout`) and exits; workers still running after twice that
  (plus 5 s) are killed. It exits 0 when every worker did (a worker waiting to be
  restarted when the stop came counts as stopped: the stop was asked for);
- logs a worker it cannot start at all (fork or exec failing) and tries again, with
  the same backoff as after a crash.
Workers run in their own session, so a terminal's Ctrl-C reaches them once,
through the supervisor; a worker whose supervisor died (SIGKILL) shuts itself
down gracefully (`orphan_watch`), so no worker outlives it for long.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import AsyncIterator, Callable

from aiohttp import web

log = logging.getLogger(__name__)

FAST_EXIT = 5.0  # a worker that dies sooner than this after starting is restarted more slowly


class Supervisor:
    def __init__(self, count: int, argv: list[str], shutdown_timeout: float):
        self.count = count
        self.argv = argv  # the worker's arguments after `python -m meeting`
        self.shutdown_timeout = shutdown_timeout
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        slots = [asyncio.create_task(self._slot(i), name=f"worker-{i}") for i in range(self.count)]
        codes = await asyncio.gather(*slots)
        failed = [code for code in codes if code != 0]
        log.info("all %d worker(s) stopped%s", self.count, f"; {len(failed)} did not exit cleanly" if failed else "")
        return 0 if not failed else 1

    def stop(self) -> None:
        if self.stopping.is_set():
            return
        log.info("stopping %d worker(s): SIGTERM, then up to %.0f s to drain", len(self.procs), self.shutdown_timeout)
        self.stopping.set()
        for proc in self.procs.values():
            if proc.returncode is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:  # exited a moment ago; its slot sees it
                    pass

    async def _slot(self, index: int) -> int:
        """Keep worker `index` running until the supervisor stops; its last exit code."""
        delay = 0.5
        while True:
            started = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "meeting", *self.argv, "--worker", str(index), start_new_session=True)
            except OSError as exc:  # out of processes or memory: say so, and try again like after a crash
                log.error("cannot start worker %d (%s: %s); trying again", index, type(exc).__name__, exc)
                code = 1
            else:
                self.procs[index] = proc
                log.info("worker %d started (pid %d)", index, proc.pid)
                if self.stopping.is_set():  # a signal arrived while it was being started
                    proc.send_signal(signal.SIGTERM)
                code = await self._wait(proc)
                if self.stopping.is_set():
                    return code
                log.warning("worker %d (pid %d) exited with %s; restarting it", index, proc.pid,
                            f"signal {-code}" if code < 0 else f"code {code}")
            delay = min(delay * 2, 10.0) if time.monotonic() - started < FAST_EXIT else 0.5
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                return 0  # stopped as asked: no worker was running to fail the stop
            except asyncio.TimeoutError:
                pass

    async def _wait(self, proc: asyncio.subprocess.Process) -> int:
        waiting = asyncio.create_task(proc.wait())
        stop = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait([waiting, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not waiting.done():  # stopping: give it the drain, then kill it
            try:
                await asyncio.wait_for(asyncio.shield(waiting), 2 * self.shutdown_timeout + 5)
            except asyncio.TimeoutError:
                log.warning("worker pid %d did not stop in time; killing it", proc.pid)
                proc.kill()
        return await waiting


def supervise(count: int, argv: list[str], shutdown_timeout: float,
              new_loop: Callable[[], asyncio.AbstractEventLoop]) -> int:
    loop = new_loop()
    try:
        return loop.run_until_complete(Supervisor(count, argv, shutdown_timeout).run())
    finally:
        loop.close()


def orphan_watch(parent: int) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context: SIGTERM ourselves (the graceful path) once the supervisor is gone."""

    async def watch() -> None:
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        log.warning("the supervisor (pid %d) is gone; shutting down", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(watch(), name="orphan-watch")
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    return ctx
