"""The `oauth-gateway` command: operator commands on Redis, the built-in server and the gateway."""

from gateway.cli.commands import main

__all__ = ["main"]
