"""Running the gateway: listeners, signals, logging, graceful shutdown.

- SIGTERM / SIGINT: ``/readyz`` turns 503 at once (so load balancers stop sending),
  the listeners stop accepting, in-flight requests get ``GATEWAY_SHUTDOWN_TIMEOUT``
  seconds to finish, then pools and background tasks close.
- SIGHUP: the policies are re-read; a bad file is refused and the old policy stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Callable

from aiohttp import web

from .app import GATEWAY, ConfigurationError, create_apps
from .settings import Settings, parse_hostport

log = logging.getLogger("gateway")


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


async def serve(settings: Settings, *, ready: Callable[[], None] | None = None) -> None:
    """Run until SIGTERM or SIGINT; raise :class:`ConfigurationError` if it cannot start."""
    proxy, admin = create_apps(settings)
    gw = proxy[GATEWAY]
    proxy_runner = web.AppRunner(proxy, access_log=None, shutdown_timeout=settings.shutdown_timeout,
                                 handler_cancellation=True)
    admin_runner = web.AppRunner(admin, access_log=None, shutdown_timeout=1.0)
    await proxy_runner.setup()
    try:
        await admin_runner.setup()
        host, port = parse_hostport(settings.listen, "GATEWAY_LISTEN")
        ahost, aport = parse_hostport(settings.admin_listen, "GATEWAY_ADMIN_LISTEN")
        await web.TCPSite(admin_runner, ahost, aport, shutdown_timeout=1.0).start()
        await web.TCPSite(proxy_runner, host, port, backlog=1024,
                          shutdown_timeout=settings.shutdown_timeout).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, gw.reload_policy)
        log.info("gateway listening on %s (admin %s), validator %s, %d routes", settings.listen,
                 settings.admin_listen, settings.resolved_validator, len(gw.policy.routes))
        if ready is not None:
            ready()
        await stop.wait()
        gw.draining = True
        log.info("shutting down: draining in-flight requests (up to %ss)",
                 settings.shutdown_timeout)
        started = time.monotonic()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    finally:
        await proxy_runner.cleanup()
        await admin_runner.cleanup()
    log.info("stopped after %.2fs of draining", time.monotonic() - started)


def run(settings: Settings) -> int:
    """Entry point of ``oauth-gateway serve``: exit code 0 on a clean stop."""
    configure_logging(settings)
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(settings))
    except ConfigurationError as exc:
        log.error("cannot start: %s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return 2
    return 0
