"""Running the gateway: listeners, signals, logging, graceful shutdown, worker processes.

- SIGTERM / SIGINT: ``/readyz`` turns 503 at once (so load balancers stop sending),
  the listeners stop accepting, in-flight requests get ``GATEWAY_SHUTDOWN_TIMEOUT``
  seconds to finish, then pools and background tasks close.
- SIGHUP: the policies are re-read; a bad file is refused and the old policy stays.
- ``GATEWAY_WORKERS=N``: the process started is worker 0 and spawns N-1 more; all of
  them bind the proxy listener with ``SO_REUSEPORT``, so the kernel spreads
  connections among them. Each has its own caches, metrics and Redis pool; worker
  ``i`` serves its admin listener on the admin port + ``i``, so that each one's
  ``/metrics`` and ``/readyz`` can be scraped (a shared port would answer for a random
  worker). Worker 0 passes SIGTERM, SIGINT (as SIGTERM) and SIGHUP on to the others;
  when any worker exits on its own, worker 0 stops them all and exits non-zero, for
  the supervisor to restart the set; a worker whose parent is gone stops by itself.
- The proxy listener's connections are guarded by :mod:`gateway.runtime.listener`
  (``GATEWAY_HEADER_TIMEOUT``, ``GATEWAY_KEEPALIVE_TIMEOUT``, ``GATEWAY_MAX_CONNECTIONS``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway.appkeys import GATEWAY
from gateway.config.settings import Settings, parse_hostport
from gateway.runtime.app import ConfigurationError, create_apps
from gateway.runtime.listener import ConnectionGuard, GuardedRunner, descriptor_room

log = logging.getLogger("gateway")
_YOUNG_GENERATION = 10_000  # objects allocated between two young collections (default 700)


class JsonFormatter(logging.Formatter):
    """One JSON object per log record."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(),
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"))


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # aiohttp's own access logger would log every request a second time
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@dataclass(frozen=True, slots=True)
class Worker:
    """Which of the ``GATEWAY_WORKERS`` processes this is."""

    index: int = 0
    count: int = 1
    #: the extra workers stop when this process (worker 0) is gone
    parent_pid: int | None = None


async def _watch_parent(parent_pid: int, stop: asyncio.Event) -> None:
    # an orphan is re-parented: polling is the portable way to notice
    while True:
        await asyncio.sleep(1.0)
        if os.getppid() != parent_pid:
            break
    log.error("worker 0 (pid %d) is gone: stopping", parent_pid)
    stop.set()


def listener_runner(proxy: web.Application, *, max_connections: int | None = None,
                    **kwargs: Any) -> GuardedRunner:
    """The proxy listener's runner, as ``serve`` runs it: the guard's limits, the fast
    path for the proxy's requests (:mod:`gateway.runtime.fastpath`), aiohttp's protocol
    for the rest."""
    gw = proxy[GATEWAY]
    settings = gw.settings
    guard = ConnectionGuard(
        header_timeout=settings.header_timeout, metrics=gw.metrics, access_log=gw.access_log,
        max_connections=max_connections or settings.max_connections)
    return GuardedRunner(proxy, guard=guard, pipeline=lambda: gw.running().pipeline,
                         access_log=None, keepalive_timeout=settings.keepalive_timeout,
                         shutdown_timeout=settings.shutdown_timeout, handler_cancellation=True,
                         **kwargs)


async def serve(settings: Settings, *, ready: Callable[[], None] | None = None,
                worker: Worker = Worker(),
                on_signal: Callable[[signal.Signals], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT; raise :class:`ConfigurationError` if it cannot start.

    ``on_signal`` hears every signal this process acts on (worker 0 passes them on).
    """
    proxy, admin = create_apps(settings)
    gw = proxy[GATEWAY]
    proxy_runner = listener_runner(proxy, max_connections=descriptor_room(
        settings.max_connections, settings.upstream_pool_size or 1024))
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(proxy_runner.guard.exception_handler(
        loop.get_exception_handler()))
    admin_runner = web.AppRunner(admin, access_log=None, shutdown_timeout=1.0)
    await proxy_runner.setup()
    watcher: asyncio.Task[None] | None = None
    try:
        await admin_runner.setup()
        host, port = parse_hostport(settings.listen, "GATEWAY_LISTEN")
        ahost, aport = parse_hostport(settings.admin_listen, "GATEWAY_ADMIN_LISTEN")
        if aport:
            aport += worker.index
        await web.TCPSite(admin_runner, ahost, aport, shutdown_timeout=1.0).start()
        await web.TCPSite(proxy_runner, host, port, backlog=1024,
                          shutdown_timeout=settings.shutdown_timeout,
                          reuse_port=worker.count > 1 or None).start()
        # What start-up built lives as long as the process: keep it out of the garbage
        # collector's full passes, which otherwise walk it all. And let the young
        # generation grow past the objects of the requests in flight, which alone pass
        # the default threshold (700) every few dozen requests: collections that find
        # nothing (docs/PERFORMANCE.md has what they cost).
        gc.collect()
        gc.freeze()
        gc.set_threshold(_YOUNG_GENERATION, *gc.get_threshold()[1:])
        stop = asyncio.Event()

        def stopping(sig: signal.Signals) -> None:
            stop.set()
            if on_signal is not None:
                on_signal(sig)

        def reloading() -> None:
            gw.reload_policy()
            if on_signal is not None:
                on_signal(signal.SIGHUP)

        # an extra worker leaves Ctrl-C to worker 0, which passes it on as SIGTERM
        stop_signals = (signal.SIGTERM, signal.SIGINT) if worker.index == 0 else (
            signal.SIGTERM,)
        for sig in stop_signals:
            loop.add_signal_handler(sig, stopping, sig)
        loop.add_signal_handler(signal.SIGHUP, reloading)
        if worker.parent_pid is not None:
            watcher = asyncio.create_task(_watch_parent(worker.parent_pid, stop))
        log.info("gateway listening on %s (admin %s:%d), validator %s, %d routes, worker %d/%d, "
                 "event loop %s", settings.listen, ahost, aport, settings.resolved_validator,
                 len(gw.policy.routes), worker.index + 1, worker.count, _loop_name(loop))
        if ready is not None:
            ready()
        await stop.wait()
        gw.draining = True
        log.info("shutting down: draining in-flight requests (up to %ss)",
                 settings.shutdown_timeout)
        started = time.monotonic()
        if worker.index == 0:  # a second signal stops worker 0 at once
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
    finally:
        if watcher is not None:
            watcher.cancel()
        await proxy_runner.cleanup()
        await admin_runner.cleanup()
    log.info("stopped after %.2fs of draining", time.monotonic() - started)


def _loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop``, or ``asyncio`` (the default install has uvloop wherever it has wheels)."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def _serve_until_stopped(settings: Settings, worker: Worker,
                         on_signal: Callable[[signal.Signals], None] | None = None) -> int:
    """Run :func:`serve` on uvloop when installed; the process's exit code."""
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings, worker=worker, on_signal=on_signal))
    except ConfigurationError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 2
    return 0


def _extra_worker(settings: Settings, worker: Worker) -> None:
    """Entry point of worker 1..N-1 (a spawned process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until serve() installs its handlers
    configure_logging(settings)
    code = _serve_until_stopped(settings, worker)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # stopped already: exit cleanly
    sys.exit(code)


def run(settings: Settings) -> int:
    """Entry point of ``oauth-gateway serve``: exit code 0 on a clean stop."""
    configure_logging(settings)
    if settings.workers <= 1:
        return _serve_until_stopped(settings, Worker())
    # spawn, not fork: each worker starts clean, with no state of the parent's
    context = multiprocessing.get_context("spawn")
    extra = [context.Process(target=_extra_worker, name=f"gateway-worker-{i}",
                             args=(settings, Worker(i, settings.workers, os.getpid())))
             for i in range(1, settings.workers)]
    for proc in extra:
        proc.start()
    stopping = threading.Event()

    def pass_on(sig: signal.Signals) -> None:
        if sig != signal.SIGHUP:
            stopping.set()
        for proc in extra:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGHUP if sig == signal.SIGHUP else signal.SIGTERM)

    def watch() -> None:
        ended = multiprocessing.connection.wait([proc.sentinel for proc in extra])
        if not stopping.is_set():
            for proc in extra:
                if proc.sentinel in ended:
                    proc.join(1.0)  # reaped, for its exit code
            dead = [f"{p.name} (exit {p.exitcode})" for p in extra if p.sentinel in ended]
            log.error("%s stopped on its own: stopping every worker", ", ".join(dead))
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="worker-watch", daemon=True).start()
    code = _serve_until_stopped(settings, Worker(0, settings.workers), pass_on)
    if not stopping.is_set():  # worker 0 could not start: the others stop too
        pass_on(signal.SIGTERM)
    for proc in extra:
        proc.join(settings.shutdown_timeout + 5)
        if proc.is_alive():
            log.error("%s did not stop in time: killed", proc.name)
            proc.kill()
            proc.join()
    if code == 0 and any(proc.exitcode != 0 for proc in extra):
        code = 1
    return code
