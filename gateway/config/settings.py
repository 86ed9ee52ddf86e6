"""Settings: defaults, overridden by a YAML config file, overridden by environment variables.

Every setting has a default. The YAML file uses the lower-case name without the
``GATEWAY_`` prefix (``redis_url: redis://...``); the environment uses the upper-case
name with it (``GATEWAY_REDIS_URL``). ``SETTINGS_DOC`` is the single source of the
README's settings table.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it."""


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob of the gateway. Field names map to ``GATEWAY_<NAME>`` variables."""

    listen: str = field(default="0.0.0.0:8080", metadata=_doc(
        "host:port of the proxy listener (client traffic, `/oauth/*`)"))
    admin_listen: str = field(default="127.0.0.1:9090", metadata=_doc(
        "host:port of the operator listener: `/metrics`, `/healthz`, `/readyz`"))
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata=_doc(
        "Redis (or Valkey) URL; `rediss://` for TLS; "
        "`redis+sentinel://host:26379[,host:26379]/service[/db]` for Redis Sentinel; "
        "`redis+cluster://host:6379[,host:6379]` for Redis Cluster (`rediss+` for TLS)"))
    key_prefix: str = field(default="gw:", metadata=_doc(
        "prefix of every Redis key the project writes"))
    policies: str = field(default="policies/", metadata=_doc(
        "a policy file, or a folder of `*.yaml` policy files"))
    validator: str = field(default="auto", metadata=_doc(
        "`introspection`, `jwt`, `anaplan`, `builtin`, or `auto` (introspection when "
        "`GATEWAY_INTROSPECTION_URL` is set, else jwt when `GATEWAY_JWKS_URL` is set, "
        "else anaplan when `GATEWAY_ANAPLAN_VALIDATE_URL` is set, else builtin when "
        "`GATEWAY_ISSUER` is set)"))
    introspection_url: str = field(default="", metadata=_doc(
        "RFC 7662 endpoint of an external authorization server"))
    introspection_client_id: str = field(default="", metadata=_doc(
        "client id the gateway presents at the introspection endpoint (client_secret_basic)"))
    introspection_client_secret: str = field(default="", metadata=_doc(
        "client secret the gateway presents at the introspection endpoint"))
    revocation_url: str = field(default="", metadata=_doc(
        "RFC 7009 endpoint used by `oauth-gateway tokens revoke` (same credentials)"))
    introspection_timeout: float = field(default=2.0, metadata=_doc(
        "total seconds for one call to the authorization server"))
    introspection_retries: int = field(default=2, metadata=_doc(
        "extra attempts on connection errors and 5xx only, with exponential backoff"))
    jwks_url: str = field(default="", metadata=_doc(
        "JWKS URL for local JWT validation"))
    jwt_issuer: str = field(default="", metadata=_doc(
        "required `iss` of JWT access tokens"))
    jwt_audience: str = field(default="", metadata=_doc(
        "required `aud` of JWT access tokens (empty: `aud` not checked)"))
    jwt_algorithms: str = field(default="RS256 ES256 PS256 EdDSA", metadata=_doc(
        "space-separated allow-list of JWS algorithms (asymmetric only)"))
    jwt_leeway: int = field(default=30, metadata=_doc(
        "seconds of clock skew allowed on `exp`, `nbf`, `iat`"))
    anaplan_validate_url: str = field(
        default="", metadata=_doc(
            "Anaplan's token-validate endpoint, e.g. "
            "`https://auth.anaplan.com/token/validate`"))
    issuer: str = field(default="", metadata=_doc(
        "issuer URL of the built-in authorization server; setting it enables that server"))
    as_access_token_ttl: int = field(default=2100, metadata=_doc(
        "built-in server: default access-token lifetime in seconds (35 minutes)"))
    as_refresh_mode: str = field(default="rotatable", metadata=_doc(
        "built-in server: default refresh-token mode, `rotatable` or `non_rotatable`"))
    as_refresh_token_ttl: int = field(default=43200, metadata=_doc(
        "built-in server: default refresh-token lifetime in seconds (up to one year)"))
    as_idle_timeout: int = field(default=0, metadata=_doc(
        "built-in server: default seconds without use that end a grant (0: none)"))
    as_grant_max_lifetime: int = field(default=31536000, metadata=_doc(
        "built-in server: default absolute cap on a grant's life, in seconds"))
    as_access_token_format: str = field(default="opaque", metadata=_doc(
        "built-in server: `opaque` or `jwt` (RFC 9068, signed with keys it rotates)"))
    as_local_login: bool = field(default=True, metadata=_doc(
        "built-in server: offer the local username/password login"))
    sso_issuer: str = field(default="", metadata=_doc(
        "OpenID Connect provider for single sign-on (its issuer URL); empty: no SSO"))
    sso_client_id: str = field(default="", metadata=_doc(
        "the built-in server's client id at the OpenID provider"))
    sso_client_secret: str = field(default="", metadata=_doc(
        "the built-in server's client secret at the OpenID provider"))
    sso_scopes: str = field(default="openid profile email", metadata=_doc(
        "scopes asked of the OpenID provider"))
    sso_username_claim: str = field(default="preferred_username", metadata=_doc(
        "ID-token claim that names the user (falls back to `sub`)"))
    require_client_record: bool = field(default=False, metadata=_doc(
        "`true`: refuse tokens of clients that have no record in Redis"))
    log_format: str = field(default="json", metadata=_doc("`json` or `text`"))
    log_level: str = field(default="INFO", metadata=_doc("Python log level"))
    access_log: bool = field(default=True, metadata=_doc(
        "one line per request on standard output"))
    token_digest_key: str = field(default="", metadata=_doc(
        "secret key (hex or text) of the keyed BLAKE2b token digest; empty: one random key "
        "is created once in Redis (`gw:meta:digest_key`) and shared by the fleet"))
    local_cache_ttl: float = field(default=5.0, metadata=_doc(
        "seconds a validation result lives in the in-process layer"))
    local_cache_size: int = field(default=100_000, metadata=_doc(
        "entries in the in-process layer (least recently used evicted)"))
    cache_max_ttl: int = field(default=300, metadata=_doc(
        "most seconds an active result lives in Redis (never beyond the token's `exp`)"))
    negative_cache_ttl: int = field(default=10, metadata=_doc(
        "seconds an inactive result is cached, so bad tokens cannot flood the AS"))
    client_refresh_interval: float = field(default=0.5, metadata=_doc(
        "seconds between re-reads of known client records (the `redis-cli` safety net)"))
    keyspace_notifications: bool = field(default=True, metadata=_doc(
        "ask Redis (CONFIG SET, best effort) for keyspace notifications on hashes, so a "
        "`redis-cli HSET` on a client record reaches every replica in milliseconds"))
    max_body_size: int = field(default=100 * 1024 * 1024, metadata=_doc(
        "largest request body forwarded, in bytes (413 beyond)"))
    max_auth_header: int = field(default=8192, metadata=_doc(
        "largest `Authorization` header accepted, in bytes (400 beyond)"))
    upstream_connect_timeout: float = field(default=5.0, metadata=_doc(
        "seconds to get an upstream connection: a free pool slot, TCP connect and TLS "
        "handshake (502 beyond; 0: no limit)"))
    upstream_timeout: float = field(default=60.0, metadata=_doc(
        "seconds an upstream may stay silent: before its response headers 504, after them "
        "the stream is cut (0: no limit)"))
    upstream_pool_size: int = field(default=256, metadata=_doc(
        "open upstream connections per replica (kept alive and reused; beyond it requests "
        "wait for one; 0: no limit)"))
    client_body_timeout: float = field(default=60.0, metadata=_doc(
        "seconds a client may pause while sending a request body (408 beyond, and the "
        "upstream connection is let go; 0: no limit)"))
    shutdown_timeout: float = field(default=20.0, metadata=_doc(
        "seconds in-flight requests get to finish on SIGTERM"))
    usage_window: int = field(default=3600, metadata=_doc(
        "seconds of the fleet-wide token-usage window per client"))
    usage_flush_interval: float = field(default=1.0, metadata=_doc(
        "seconds between writes of this replica's usage counts to Redis"))
    trusted_proxies: int = field(default=0, metadata=_doc(
        "how many proxies in front of the gateway append to `X-Forwarded-For` "
        "(0: the client's own address is used)"))
    workers: int = field(default=1, metadata=_doc(
        "number of worker processes sharing the listener with SO_REUSEPORT; worker `i` "
        "serves its own admin listener on the admin port + `i`"))

    @property
    def resolved_validator(self) -> str:
        """The validator ``auto`` resolves to, or the explicit one."""
        if self.validator != "auto":
            return self.validator
        if self.introspection_url:
            return "introspection"
        if self.jwks_url:
            return "jwt"
        if self.anaplan_validate_url:
            return "anaplan"
        if self.issuer:
            return "builtin"
        return "none"


def _convert(name: str, kind: Any, raw: Any) -> Any:
    if kind is bool or kind == "bool":
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"1", "true", "yes", "on"}:
            return True
        if text in {"0", "false", "no", "off", ""}:
            return False
        raise SettingsError(f"{name}: expected true or false, got {raw!r}")
    if kind is int or kind == "int":
        try:
            return int(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
    if kind is float or kind == "float":
        try:
            return float(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{name}: expected a number, got {raw!r}") from None
    return str(raw)


def env_name(field_name: str) -> str:
    """``redis_url`` -> ``GATEWAY_REDIS_URL``."""
    return "GATEWAY_" + field_name.upper()


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> Settings:
    """Build :class:`Settings` from defaults, a YAML file, the environment, then overrides."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(Settings)}
    config_file = config_file or env.get("GATEWAY_CONFIG") or None
    if config_file:
        path = Path(config_file)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise SettingsError(f"{path}: cannot read config file: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SettingsError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise SettingsError(f"{path}: expected a mapping of setting names to values")
        for key, raw in data.items():
            name = str(key).lower().removeprefix("gateway_")
            if name not in fields:
                raise SettingsError(f"{path}: unknown setting {key!r}")
            values[name] = _convert(f"{path}: {key}", fields[name].type, raw)
    for name, f in fields.items():
        var = env_name(name)
        if var in env:
            values[name] = _convert(var, f.type, env[var])
    for name, raw in overrides.items():
        if name not in fields:
            raise SettingsError(f"unknown setting {name!r}")
        values[name] = raw
    settings = Settings(**values)
    _validate(settings)
    return settings


def _validate(s: Settings) -> None:
    for name in ("listen", "admin_listen"):
        parse_hostport(getattr(s, name), env_name(name))
    if s.log_format not in {"json", "text"}:
        raise SettingsError(f"GATEWAY_LOG_FORMAT: expected json or text, got {s.log_format!r}")
    if s.as_refresh_mode not in {"rotatable", "non_rotatable"}:
        raise SettingsError("GATEWAY_AS_REFRESH_MODE: expected rotatable or non_rotatable")
    if s.as_access_token_format not in {"opaque", "jwt"}:
        raise SettingsError("GATEWAY_AS_ACCESS_TOKEN_FORMAT: expected opaque or jwt")
    if s.issuer and not s.issuer.startswith(("https://", "http://")):
        raise SettingsError("GATEWAY_ISSUER: expected an https:// URL")
    if s.validator not in {"auto", "introspection", "jwt", "anaplan", "builtin"}:
        raise SettingsError(
            "GATEWAY_VALIDATOR: expected auto, introspection, jwt, anaplan or builtin, "
            f"got {s.validator!r}")
    if not s.redis_url.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://",
                                   "rediss+sentinel://", "redis+cluster://",
                                   "rediss+cluster://")):
        raise SettingsError("GATEWAY_REDIS_URL: expected a redis://, rediss://, unix://, "
                            "redis+sentinel:// or redis+cluster:// URL")
    for name in ("local_cache_ttl", "cache_max_ttl", "negative_cache_ttl", "local_cache_size",
                 "max_body_size", "max_auth_header", "client_refresh_interval", "workers",
                 "usage_flush_interval"):
        if getattr(s, name) <= 0:
            raise SettingsError(f"{env_name(name)}: must be greater than 0")
    for name in ("upstream_connect_timeout", "upstream_timeout", "upstream_pool_size",
                 "client_body_timeout"):
        if getattr(s, name) < 0:
            raise SettingsError(f"{env_name(name)}: must be 0 (no limit) or more")


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:8080``)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SettingsError(f"{what}: expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 (the documented default)


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, meaning, default) rows for documentation."""
    rows = []
    for f in dataclasses.fields(Settings):
        default = f.default
        shown = "(empty)" if default == "" else str(default).lower() if isinstance(
            default, bool) else str(default)
        rows.append((env_name(f.name), f.metadata.get("doc", ""), shown))
    return rows
